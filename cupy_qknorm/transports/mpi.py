"""Transport "mpi": the sums are all-reduced by MPI on the host. numpy arrays are
normalized on the CPU (float64, host.py), GPU arrays by the partial_sums and apply kernels
(kernels/unfused.cuh) with the sums brought to the host between them.

Every call first agrees on the call itself, with one non-blocking all-reduce bounded by
timeout_s: each rank's T, tag, whether its input was refused, and its first RoPE position
outside the table. So a rank with bad input, a T or tag that differs, raises on every
rank at once with nothing written; a bad position raises on every rank once the rows of
valid positions are written; and a rank that never calls makes the others raise
PeerTimeoutError instead of waiting forever. Its collectives run on the object's own
duplicate of the communicator, so a request left pending by a timeout cannot match a
later collective of the caller. It synchronizes with the host: it cannot be captured in a
CUDA graph, and says so at the capture.
"""
from __future__ import annotations

import time

import numpy as np

from .. import host
from ..collectives import wait
from ..errors import CallMismatchError, ClosedError, PeerTimeoutError, \
    TransportUnavailableError
from ..params import SUMS_HEADER
from .base import Transport, describe_tag, peer_position_error, position_error, slot_error
from .device import DeviceTransport

MESSAGE_BYTES = 240  # of a rank's error message, when one rank's input is refused
TOKENS, TAG, REFUSED, BAD = range(4)  # a rank's row of the call's agreement
CAPTURE = ("transport 'mpi' cannot be captured in a CUDA graph (it brings the sums to the "
           "host); capture calls of an object with transport 'ipc' or 'nccl'")


class MpiTransport(Transport):
    name = "mpi"
    capturable = False
    host_arrays = True

    def __init__(self, cfg, comm, gpu=False, cuda=None):
        self.cfg, self.comm = cfg, comm
        self.broken = None  # why the object can no longer make collectives
        self._table = None
        self._device = _DevicePart(cfg, comm, self, cuda) if gpu else None
        self.error = self._device.error if self._device is not None else (0,)

    # -- the agreement --------------------------------------------------------------------
    def allreduce(self, buf, op, what):
        """In-place non-blocking all-reduce of `buf`, bounded by timeout_s."""
        from mpi4py import MPI
        if self.broken:
            raise ClosedError(self.broken)
        ns = self.cfg.timeout_ns
        req = self.comm.Iallreduce(MPI.IN_PLACE, buf, op=op)
        try:
            wait(req, time.monotonic() + ns / 1e9 if ns > 0 else None, what, self.cfg.rank)
        except PeerTimeoutError as e:
            self.broken = str(e)
            raise

    def agree(self, tokens: int, tag: int, bad: int = -1, refusal: str | None = None):
        """Collective, bounded: every rank states its T, tag code, refusal and first bad
        position (-1: none). Raises on every rank where the call cannot go on (a rank's
        refusal: CallMismatchError quoting it, except on a refusing rank, which raises its
        own error; T or tag that differ: CallMismatchError). Returns every rank's row."""
        from mpi4py import MPI
        cfg = self.cfg
        status = np.zeros((cfg.world, 4), np.int64)
        status[cfg.rank] = tokens, tag, refusal is not None, bad + 1
        self.allreduce(status, MPI.MAX, "agreeing on a call")
        refused = [r for r in range(cfg.world) if status[r, REFUSED]]
        if refused:
            text = np.zeros((cfg.world, MESSAGE_BYTES), np.uint8)
            if refusal is not None:
                msg = refusal.encode()[:MESSAGE_BYTES]
                text[cfg.rank, :len(msg)] = np.frombuffer(msg, np.uint8)
            self.allreduce(text, MPI.MAX, "sharing why a call was refused")
            if refusal is not None:
                return status
            why = "; ".join(f"rank {r}: {_text(text[r])}" for r in refused)
            raise CallMismatchError(f"rank {cfg.rank}: the call was refused by {why}; nothing "
                                    f"was written; the object is closed for use",
                                    peer=refused[0])
        counts = status[:, TOKENS]
        if counts.min() != counts.max():
            raise CallMismatchError(
                f"rank {cfg.rank} called with {tokens} tokens while the ranks' token counts "
                f"range from {counts.min()} to {counts.max()} (T must be the same on every "
                f"rank within a call); nothing was written; the object is closed for use")
        other = [r for r in range(cfg.world) if status[r, TAG] != tag]
        if other:
            r = other[0]
            raise CallMismatchError(
                f"rank {cfg.rank} made a call with {describe_tag(tag)} where rank {r} made it "
                f"with {describe_tag(int(status[r, TAG]))}: the ranks' calls are out of step; "
                f"nothing was written; the object is closed for use", peer=r)
        return status

    def finish(self, status, positions):
        """After the rows of valid positions are written: raise for a position outside the
        table on any rank (this rank's own: PositionError; a peer's: CallMismatchError)."""
        bad = [(r, int(status[r, BAD]) - 1) for r in range(self.cfg.world) if status[r, BAD]]
        if not bad:
            return
        mine = [t for r, t in bad if r == self.cfg.rank]
        if mine:
            raise position_error(self.cfg.rank, mine[0], int(positions[mine[0]]),
                                 self.cfg.rope.rows())
        raise peer_position_error(self.cfg.rank, *bad[0])

    # -- the contract ---------------------------------------------------------------------
    def bind(self, call):
        return self._bind_host(call) if call.on_host else self._device.bind(call)

    def refuse(self, tokens, tag, why, stream):
        try:
            self.agree(tokens, tag, refusal=why)
        except PeerTimeoutError:
            return "the other ranks did not come to agree on the call within timeout_s"
        except Exception as e:  # noqa: BLE001 - the caller raises its own input error
            return f"{type(e).__name__}: {e}"
        return None

    def raise_error(self):
        if self._device is not None:
            self._device.raise_error()

    def fit(self):
        """A refusal or a mismatch agreed on leaves the communicator as fit as a call: only
        a collective left pending by a timeout (broken) or a GPU error does not."""
        return not self.broken and not self.error[0]

    def close(self):
        fit = self.fit()
        if self._device is not None:
            fit = self._device.close() and not self.broken
            self._device = None
        return fit

    # -- numpy arrays ---------------------------------------------------------------------
    def host_table(self):
        if self._table is None:
            from ..rope import host_table
            self._table = host_table(self.cfg.rope)
        return self._table

    def _bind_host(self, call):
        """go(stream) for numpy arrays: the agreement, float64 partial sums, the bounded
        all-reduce, scale (and rotate), store."""
        from mpi4py import MPI
        cfg, rope = self.cfg, self.cfg.rope
        q, k, qw, kw, qo, ko, pos = (op.obj if op is not None else None for op in call.ops)
        wdt, tokens, tag = call.ops[2].dtype, call.tokens, call.tag
        table = self.host_table() if rope is not None else None
        cache = call.cache

        def go(stream=None):
            positions = None
            if rope is not None:
                positions = np.asarray(pos).astype(np.int64)
            bad = -1 if positions is None else host.first_bad_position(positions,
                                                                        table.shape[0])
            slots = None
            if cache is not None:  # a bad slot refuses the call: nothing is written
                slots = np.asarray(cache.arrays[3]).astype(np.int64)
                t = host.first_bad_slot(slots, cache.num_slots)
                if t >= 0:
                    error = slot_error(cfg.rank, t, int(slots[t]), cache.num_slots, False)
                    self.agree(tokens, tag, bad, refusal=f"SlotError: {error}")
                    raise error
            status = self.agree(tokens, tag, bad)
            sums = host.partial_sums(q, k, cfg.dtype)
            if not cfg.k_counted:  # a replica of a lower rank's k head adds nothing
                sums[:, 1] = 0.0
            if cfg.world > 1:
                self.allreduce(sums, MPI.SUM, "the all-reduce of the sums")
            k_rows = ko if cache is None or cache.store_k else np.empty_like(ko)
            for col, x, w, width, out in ((0, q, qw, cfg.q_dim, qo),
                                          (1, k, kw, cfg.k_dim, k_rows)):
                host.apply(x, host.to_f64(w, wdt), sums[:, col], width, cfg.eps, cfg.dtype,
                           out, rope, positions, table)
            if cache is not None:
                _write_caches(cache, k_rows, slots, positions, table, cfg.dtype)
            self.finish(status, positions)
        return go


class _DevicePart(DeviceTransport):
    """GPU arrays under transport "mpi": the agreement (positions read back to the host
    for it), then per chunk partial_sums, the sums to the host, the bounded all-reduce,
    back to the device, apply. Synchronizes the stream once a chunk."""
    name = "mpi"

    def __init__(self, cfg, comm, host_part, cuda=None):
        super().__init__(cfg, comm, cuda)
        self.host = host_part
        self._counter = self.cuda.zeros(16)  # as nccl's
        self.counters = self._counter.ptr
        n = SUMS_HEADER + 2 * cfg.max_tokens
        self._sums = self.cuda.zeros(4 * n)
        self.sums = self._sums.ptr
        self._pinned = self.cuda.pinned(4 * n)
        self._host_sums = np.frombuffer(self._pinned, np.float32, n)

    def bind(self, call):
        from mpi4py import MPI
        chunks = self.chunks(call)
        cfg, mpi, cuda = self.cfg, self.host, self.cuda
        tokens, tag, pos = call.tokens, call.tag, call.ptrs[6]
        positions = np.empty(tokens, np.int32 if call.plan.position_bytes == 4 else np.int64) \
            if cfg.rope is not None else None
        rows = cfg.rope.rows() if cfg.rope is not None else 0
        steps = [(c.go["partial_sums"], SUMS_HEADER + 2 * c.tokens, c.go["apply"])
                 for c in chunks]
        sums, staged = self.sums, self._host_sums

        def go(stream):
            if cuda.capturing(stream):
                mpi.agree(tokens, tag, refusal=f"TransportUnavailableError: {CAPTURE}")
                raise TransportUnavailableError(CAPTURE)
            bad = -1
            if positions is not None:
                cuda.copy(positions.ctypes.data, pos, positions.nbytes, stream)
                stream.synchronize()
                bad = host.first_bad_position(positions, rows)
            status = mpi.agree(tokens, tag, bad)
            for partial, count, apply in steps:
                partial(stream)
                if cfg.world > 1:
                    cuda.copy(staged.ctypes.data, sums, 4 * count, stream)
                    stream.synchronize()
                    mpi.allreduce(staged[:count], MPI.SUM, "the all-reduce of the sums")
                    cuda.copy(sums, staged.ctypes.data, 4 * count, stream)
                apply(stream)
            mpi.finish(status, positions)
        return go


def _write_caches(cache, k_rows, slots, positions, table, dtype):
    """The host path's KV-cache write: k's stored rows and v's rows at their slots, but
    for tokens whose position is outside the table (their rows were not written)."""
    if positions is not None:
        slots = np.where((positions >= 0) & (positions < table.shape[0]), slots, -1)
    v, k_cache, v_cache, _, k_scale, v_scale = cache.arrays
    for c, rows, scale in ((k_cache, k_rows, k_scale), (v_cache, v, v_scale)):
        value = 1.0 if scale is None else float(np.asarray(scale, np.float32).reshape(-1)[0])
        host.write_cache(c, np.asarray(rows), slots, cache.heads, cache.head_dim,
                         cache.block_size, dtype, cache.cache_dtype, value)


def _text(row) -> str:
    return bytes(row).rstrip(b"\0").decode(errors="replace")
