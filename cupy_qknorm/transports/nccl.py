"""Transport "nccl": partial_sums kernel -> NCCL all-reduce of the sums -> apply kernel
(kernels/unfused.cuh). The baseline, and the path across nodes.

NCCL's own wait has no deadline, so a watchdog thread bounds it (the design of PyTorch's
NCCL watchdog): partial_sums counts its launches in device memory and apply the launches
it follows; the watchdog copies both counts on a stream of its own every POLL_S, so it
sees an all-reduce in flight without synchronizing the caller's stream. One that stays in
flight past timeout_s (or an asynchronous NCCL error) makes the watchdog mark the device's
error record failed (apply then stores nothing), report a timeout where nothing was
reported yet, and abort the communicator, which ends NCCL's kernel. The stream then
drains, and the next call or synchronize() raises. It keeps watching after the kernels
recorded an error: an all-reduce queued behind one (a chunk whose T differs, a call one
rank made and another did not) may never find its partner. Works the same for calls
replayed from a CUDA graph, since the counts are kept by the kernels themselves.
"""
from __future__ import annotations

import threading
import time

from ..collectives import wait
from ..params import (ERROR_FAILED, ERROR_TIMEOUT, ERROR_WORDS, FLAG_REFUSED, MAX_CALL_TOKENS,
                      SUMS_HEADER)
from .device import DeviceTransport

POLL_S = 0.02     # how often the watchdog looks
# where the watchdog copies the device's counts (host words after the error record):
# launches of partial_sums made / followed by apply
STARTED, FOLLOWED = ERROR_WORDS, ERROR_WORDS + 1
NCCL_FLOAT32, NCCL_SUM = 7, 0  # ncclFloat32, ncclSum (NCCL's ABI)


class NcclTransport(DeviceTransport):
    name = "nccl"

    def __init__(self, cfg, comm, cuda=None):
        super().__init__(cfg, comm, cuda)
        self._nccl = None
        self._watchdog = None
        self._stop = threading.Event()
        self.aborted = False
        try:
            self._counter = self.cuda.zeros(16)  # launches made, followed; partial_sums scratch
            self.counters = self._counter.ptr
            floats = SUMS_HEADER + 2 * cfg.max_tokens
            self._sums = self.cuda.zeros(4 * floats)
            self.sums = self._sums.ptr
            if cfg.world > 1:
                self._nccl = self.cuda.nccl(comm)
                self._warm_up(floats)
                if cfg.timeout_ns > 0:
                    self._watchdog = threading.Thread(
                        target=self._watch, name="cupy_qknorm nccl watchdog", daemon=True)
                    self._watchdog.start()
        except BaseException:
            self.close()
            raise

    def _warm_up(self, floats):
        """NCCL connects the channels of an algorithm/protocol lazily, at its first use: do
        that now, for every size a call can use, so that no first use falls inside a CUDA
        graph capture (where the connection cannot be made). The sums are zeros, and stay
        zeros."""
        count = 2
        while True:
            self._nccl.allReduce(self.sums, self.sums, count, NCCL_FLOAT32, NCCL_SUM, 0)
            if count >= floats:
                break
            count = min(4 * count, floats)
        self.cuda.synchronize()

    def compose(self, chunks):
        if self.cfg.world == 1:
            steps = [(c.go["partial_sums"], c.go["apply"]) for c in chunks]

            def alone(stream):
                for sums, apply in steps:
                    sums(stream)
                    apply(stream)
            return alone
        allreduce, ptr = self._nccl.allReduce, self.sums
        if len(chunks) == 1:
            sums, apply = chunks[0].go["partial_sums"], chunks[0].go["apply"]
            count = SUMS_HEADER + 2 * chunks[0].tokens

            def one(stream):
                sums(stream)
                allreduce(ptr, ptr, count, NCCL_FLOAT32, NCCL_SUM, stream.ptr)
                apply(stream)
            return one
        steps = [(c.go["partial_sums"], SUMS_HEADER + 2 * c.tokens, c.go["apply"])
                 for c in chunks]

        def run(stream):
            for sums, count, apply in steps:
                sums(stream)
                allreduce(ptr, ptr, count, NCCL_FLOAT32, NCCL_SUM, stream.ptr)
                apply(stream)
        return run

    def refuse(self, tokens, tag, why, stream):
        """Take part in the call with no row: partial_sums writes this rank's header with
        its refusal (and the T its q has), the all-reduce carries it, and the peers' apply
        fails the call at once, chunk by chunk as they launch it."""
        self.refused = True
        if self.cfg.world == 1:
            return None
        if not 0 < tokens <= MAX_CALL_TOKENS:
            return "its q has no row count to take part in the peers' all-reduce with"
        try:
            from ..arrays import Plan
            from .base import Call
            c = self.cfg
            plan = Plan(tokens, c.dtype, (0, 0, 0, 0), 2, 0)
            call = Call((), plan, (0,) * 7, tag)
            self.compose(self.chunks(call, flags=FLAG_REFUSED))(stream)
        except Exception as e:  # noqa: BLE001 - the caller raises its own input error
            return f"its refusal could not be launched ({e})"
        return None

    def _watch(self):
        words, limit = self.error, self.cfg.timeout_ns / 1e9
        seen, since = None, 0.0
        with self.cuda.device():
            stream = self.cuda.stream()
            counts = self._host + 4 * STARTED
            while not self._stop.wait(POLL_S):
                reason = None
                try:
                    self._nccl.check_async_error()
                except Exception as e:  # noqa: BLE001 - NcclError: a peer or the network failed
                    reason = str(e)
                self.cuda.copy(counts, self.counters, 8, stream)
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
        """Mark the device's record failed (apply stores nothing from here on), report a
        timeout where nothing is reported yet, then end NCCL's kernel."""
        words = self.error
        words[ERROR_FAILED] = 1
        if not words[0]:
            record = [ERROR_TIMEOUT, -1, 0, self.cfg.rank, 0, 0]
            for i in range(1, len(record)):
                words[i] = record[i]
            words[0] = record[0]
            self.cuda.copy(self._record.ptr, self._host, 4 * (ERROR_FAILED + 1), stream)
        else:  # the report is the kernels' (the cause): only the failed word
            at = 4 * ERROR_FAILED
            self.cuda.copy(self._record.ptr + at, self._host + at, 4, stream)
        stream.synchronize()
        self.aborted = True
        self._nccl.abort()

    def _bounded_barrier(self):
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
            self.cuda.synchronize()
            if not self.aborted:
                if self.fit():
                    self._bounded_barrier()
                self._nccl.abort()
            self._nccl = None
        return super().close()
