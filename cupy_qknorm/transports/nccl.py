"""Transport "nccl": partial_sums kernel -> NCCL all-reduce of the sums -> apply kernel.
The baseline, and the path across nodes.

NCCL's own wait has no deadline, so a watchdog thread bounds it (the design of PyTorch's
NCCL watchdog): partial_sums counts its launches in device memory and apply the launches
it follows; the watchdog copies both counts on a stream of its own every POLL_S, so it
sees an all-reduce in flight without synchronizing the caller's stream. One that stays in
flight past timeout_s (or an asynchronous NCCL error) makes the watchdog write a timeout
into the device's error record (apply then stores nothing) and into the host's copy, and
abort the communicator, which ends NCCL's kernel. The stream then drains, and the next
call or synchronize() raises. Works the same for calls replayed from a CUDA graph, since
the counts are kept by the kernels themselves.
"""
from __future__ import annotations

import threading
import time

from ..params import ERROR_TIMEOUT, ERROR_WORDS, SUMS_HEADER
from .device import DeviceTransport

POLL_S = 0.02     # how often the watchdog looks
# where the watchdog copies the device's counts (host words after the error record):
# launches of partial_sums made / followed by apply
STARTED, FOLLOWED = ERROR_WORDS, ERROR_WORDS + 1


class NcclTransport(DeviceTransport):
    name = "nccl"

    def __init__(self, cfg, comm):
        import cupy
        from cupy.cuda import nccl
        super().__init__(cfg, comm)
        self._nccl = None
        self._watchdog = None
        self._stop = threading.Event()
        self.aborted = False
        self._counter = cupy.zeros(2, cupy.uint32)
        self.counters = self._counter.data.ptr
        self.sums = cupy.zeros(SUMS_HEADER + 2 * cfg.max_tokens, cupy.float32)
        uid = comm.bcast(nccl.get_unique_id() if comm.rank == 0 else None, root=0)
        self._nccl = nccl.NcclCommunicator(comm.size, uid, comm.rank)
        # NCCL connects the channels of an algorithm/protocol lazily, at its first use: do
        # that now, for every size a call can use, so that no first use falls inside a
        # CUDA graph capture (where the connection cannot be made). The sums are zeros, and
        # stay zeros.
        ptr = self._sums_ptr = self.sums.data.ptr
        self._f32, self._sum = nccl.NCCL_FLOAT32, nccl.NCCL_SUM
        count = 2
        while True:
            self._nccl.allReduce(ptr, ptr, count, self._f32, self._sum, 0)
            if count >= SUMS_HEADER + 2 * cfg.max_tokens:
                break
            count = min(4 * count, SUMS_HEADER + 2 * cfg.max_tokens)
        cupy.cuda.runtime.deviceSynchronize()
        if cfg.world > 1 and cfg.timeout_ns > 0:
            self._watchdog = threading.Thread(target=self._watch, name="cupy_qknorm nccl "
                                              "watchdog", daemon=True)
            self._watchdog.start()

    def launch(self, go, tokens, grid, stream):
        go["partial_sums"](grid, stream)
        if self.cfg.world > 1:
            ptr = self._sums_ptr
            self._nccl.allReduce(ptr, ptr, SUMS_HEADER + 2 * tokens, self._f32, self._sum,
                                 stream.ptr)
        go["apply"](grid, stream)

    def _watch(self):
        import cupy
        from cupy.cuda import runtime
        words, limit = self._host_words, self.cfg.timeout_ns / 1e9
        seen, since = None, 0.0
        with self.device:
            stream = cupy.cuda.Stream(non_blocking=True)
            counts = self._host + 4 * STARTED
            while not self._stop.wait(POLL_S):
                if words[0]:
                    return  # a kernel recorded an error: the next call raises it
                reason = None
                try:
                    self._nccl.check_async_error()
                except Exception as e:  # noqa: BLE001 - NcclError: a peer or the network failed
                    reason = str(e)
                runtime.memcpyAsync(counts, self._counter.data.ptr, 8,
                                    runtime.memcpyDeviceToHost, stream.ptr)
                stream.synchronize()
                started, followed = words[STARTED], words[FOLLOWED]
                if started == followed:
                    seen = None
                elif started != seen:
                    seen, since = started, time.monotonic()
                elif time.monotonic() - since > limit:
                    reason = "timeout"
                if reason is not None:
                    self._abort(stream)
                    return

    def _abort(self, stream):
        """Record a timeout where apply and the host read it, then end NCCL's kernel."""
        from cupy.cuda import runtime
        words = self._host_words
        record = [ERROR_TIMEOUT, -1, 0, self.cfg.rank, 0, 0]
        for i in range(1, len(record)):
            words[i] = record[i]
        words[0] = record[0]
        runtime.memcpyAsync(self._error.data.ptr, self._host, 4 * (ERROR_WORDS - 1),
                            runtime.memcpyHostToDevice, stream.ptr)
        stream.synchronize()
        self.aborted = True
        self._nccl.abort()

    def _bounded_barrier(self):
        from .mpi import wait
        ns = self.cfg.timeout_ns or 5 * 10 ** 9
        try:
            wait(self.comm.Ibarrier(), time.monotonic() + ns / 1e9, "close", self.cfg.rank)
        except Exception:  # noqa: BLE001 - a peer did not come: close anyway
            pass

    def close(self):
        """CUDA graphs that captured calls of this object must be destroyed first (NCCL's
        teardown waits for them). Abort rather than destroy: after the device
        synchronization and a barrier nothing of ours is in flight, and abort needs no
        handshake. The barrier is bounded by timeout_s (5 s when unbounded), so a close
        facing peers that are gone, or waiting for a call this rank never makes, ends."""
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None
        if self._nccl is not None:
            import cupy
            cupy.cuda.runtime.deviceSynchronize()
            if not self.aborted:
                if not self.failed():
                    self._bounded_barrier()
                self._nccl.abort()
            self._nccl = None
        super().close()

