"""Transport "mpi": the sums are all-reduced by MPI on the host. numpy arrays are
normalized on the CPU (float64), GPU arrays by the partial_sums and apply kernels.

Every call first agrees on the call itself, with one non-blocking all-reduce bounded by
timeout_s: the token count of every rank and whether each rank's input was valid. So a
rank with bad input, or a T that differs, raises on every rank at once with nothing
written, and a rank that never calls makes the others raise PeerTimeoutError instead of
waiting forever. Its collectives run on the object's own duplicate of the communicator,
so a request left pending by a timeout cannot match a later collective of the caller.
"""
from __future__ import annotations

import time

import numpy as np

from .. import reference
from ..errors import CallMismatchError, ClosedError, PeerTimeoutError
from ..params import SUMS_HEADER
from .device import DeviceTransport

MESSAGE_BYTES = 240  # of a rank's error message, when one rank's input is refused
_REFUSED = 1


def wait(request, deadline, what, rank):
    """Test `request` until it completes or `deadline` (time.monotonic(); None: never)."""
    spins = 0
    while not request.Test():
        if deadline is not None and time.monotonic() > deadline:
            raise PeerTimeoutError(
                f"rank {rank} waited longer than the timeout for the other ranks in {what} "
                f"(a rank did not make this call, or is gone); the object is closed for use")
        spins += 1
        if spins > 64:
            time.sleep(2e-5 if spins < 4096 else 1e-3)


class MpiTransport:
    """The "mpi" transport: the call agreement and the host path; GPU arrays go through
    a device part built at their first call."""
    name = "mpi"

    def __init__(self, cfg, comm):
        self.cfg, self.comm = cfg, comm
        self._device = None
        self.broken = None  # why the object can no longer make collectives

    def _deadline(self):
        ns = self.cfg.timeout_ns
        return time.monotonic() + ns / 1e9 if ns > 0 else None

    def allreduce(self, buf, op, what):
        """In-place non-blocking all-reduce of `buf`, bounded by timeout_s."""
        if self.broken:
            raise ClosedError(self.broken)
        req = self.comm.Iallreduce(_in_place(), buf, op=op)
        try:
            wait(req, self._deadline(), what, self.cfg.rank)
        except PeerTimeoutError as e:
            self.broken = str(e)
            raise

    def agree_on_call(self, tokens: int, error: Exception | None) -> None:
        """Collective, bounded: every rank states its T and whether its input was valid.
        Raises on every rank if any rank's input was refused (that rank re-raises its own
        error) or if the ranks' T differ; returns when the call can go on."""
        from mpi4py import MPI
        cfg = self.cfg
        status = np.zeros(2 + cfg.world, np.int64)
        status[0], status[1] = tokens, -tokens
        if error is not None:
            status[2 + cfg.rank] = _REFUSED
        self.allreduce(status, MPI.MAX, "agreeing on a call")
        refused = [r for r in range(cfg.world) if status[2 + r]]
        if refused:
            text = np.zeros((cfg.world, MESSAGE_BYTES), np.uint8)
            if error is not None:
                msg = f"{type(error).__name__}: {error}".encode()[:MESSAGE_BYTES]
                text[cfg.rank, :len(msg)] = np.frombuffer(msg, np.uint8)
            self.allreduce(text, MPI.MAX, "sharing why a call was refused")
            if error is not None:
                raise error
            why = "; ".join(f"rank {r}: {_text(text[r])}" for r in refused)
            raise CallMismatchError(f"rank {cfg.rank}: the call was refused by {why}; nothing "
                                    f"was written", peer=refused[0])
        high, low = int(status[0]), -int(status[1])
        if high != low:
            raise CallMismatchError(
                f"rank {cfg.rank} called with {tokens} tokens while the ranks' token counts "
                f"range from {low} to {high} (T must be the same on every rank within a "
                f"call); nothing was written")

    def run_host(self, ops, tokens):
        """numpy arrays: float64 partial sums, the bounded all-reduce, scale (and rotate)."""
        from mpi4py import MPI
        cfg = self.cfg
        q, k, qw, kw, qo, ko, pos = ops
        x = [reference.to_f64(q.obj, q.dtype), reference.to_f64(k.obj, k.dtype)]
        sums = np.zeros((tokens, 2))
        sums[:, 0] = (x[0] * x[0]).sum(axis=1)
        sums[:, 1] = (x[1] * x[1]).sum(axis=1)
        if cfg.world > 1:
            self.allreduce(sums, MPI.SUM, "the all-reduce of the sums")
        outs = []
        for v, w, dim, col in ((x[0], qw, cfg.q_dim, 0), (x[1], kw, cfg.k_dim, 1)):
            with np.errstate(divide="ignore", invalid="ignore"):
                scale = 1.0 / np.sqrt(sums[:, col:col + 1] / dim + cfg.eps)
                outs.append(v * scale * reference.to_f64(w.obj, w.dtype))
        if cfg.rope is not None:
            positions = np.asarray(pos.obj).astype(np.int64)
            table = self._host_table()
            bad = np.nonzero((positions < 0) | (positions >= table.shape[0]))[0]
            if bad.size:
                from ..errors import PositionError
                t = int(bad[0])
                raise PositionError(
                    f"rank {cfg.rank}: token {t} has position {int(positions[t])}, outside "
                    f"the RoPE table's {table.shape[0]} rows; nothing was written",
                    token=t, position=int(positions[t]))
            r = cfg.rope
            outs = [reference.apply_rope(o, positions, table, r.head_dim, r.rotary_dim,
                                         r.style)[0] for o in outs]
        for y, out in zip(outs, (qo, ko)):
            with np.errstate(invalid="ignore", over="ignore"):
                y = reference.from_f64(y, cfg.dtype)
            dst = out.obj.view(np.uint16) if cfg.dtype == "bfloat16" else out.obj
            dst[...] = y

    def _host_table(self):
        if getattr(self, "_table", None) is None:
            from ..rope import host_table
            self._table = host_table(self.cfg.rope)
        return self._table

    def device(self):
        if self._device is None:
            self._device = MpiDeviceTransport(self.cfg, self.comm, self)
        return self._device

    def prepare(self, plan):
        return self.device().prepare(plan)

    def failed(self) -> bool:
        return self._device is not None and self._device.failed()

    def check(self):
        if self._device is not None:
            self._device.check()

    def close(self):
        if self._device is not None:
            self._device.close()
            self._device = None


class MpiDeviceTransport(DeviceTransport):
    """GPU arrays under transport "mpi": partial_sums, the sums to the host, the bounded
    all-reduce, back to the device, apply. Synchronizes the stream once a chunk."""
    name = "mpi"

    def __init__(self, cfg, comm, host):
        import cupy
        super().__init__(cfg, comm)
        self.host = host
        self._counter = cupy.zeros(2, cupy.uint32)
        self.counters = self._counter.data.ptr
        n = SUMS_HEADER + 2 * cfg.max_tokens
        self.sums = cupy.zeros(n, cupy.float32)
        self._pinned = cupy.cuda.alloc_pinned_memory(4 * n)
        self._host_sums = np.frombuffer(self._pinned, np.float32, n)

    def launch(self, go, tokens, grid, stream):
        from mpi4py import MPI
        go["partial_sums"](grid, stream)
        if self.cfg.world > 1:
            n = SUMS_HEADER + 2 * tokens
            host = self._host_sums[:n]
            self.sums[:n].get(stream=stream, out=host)
            stream.synchronize()
            self.host.allreduce(host, MPI.SUM, "the all-reduce of the sums")
            self.sums[:n].set(host, stream=stream)
        go["apply"](grid, stream)


def _text(row) -> str:
    return bytes(row).rstrip(b"\0").decode(errors="replace")


def _in_place():
    from mpi4py import MPI
    return MPI.IN_PLACE
