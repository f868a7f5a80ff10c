"""Transport "ipc": the fused kernel (kernels/fused.cuh). Each block sums its token's slice,
pushes the two partial sums into every peer's CUDA IPC buffer over NVLink, waits for the
peers' partials in its own buffer, then scales, rotates and stores: one launch a chunk,
nothing on the host between the ranks."""
from __future__ import annotations

from .. import knobs
from ..compile import tracing
from ..errors import QKNormError
from ..params import HEAD, SLOT_BYTES, TRACE_WORDS
from ..peers import PeerBuffers
from .device import DeviceTransport


class IpcTransport(DeviceTransport):
    name = "ipc"
    KINDS = ("fused",)
    PDL_KINDS = ("fused",)  # it waits (griddepcontrol.wait) before using memory
    # the wide layout with a cache holds 2 blocks an SM where the fused kernel without one
    # holds 3: on long launches norm + RoPE and then the cache write, a block a token, is
    # faster (device.SPLIT_FROM)
    SPLIT_CACHE = True

    def __init__(self, cfg, comm, cuda=None):
        self.buffers = self._trace = None
        super().__init__(cfg, comm, cuda)
        try:
            self._counters = self.cuda.zeros(4 * cfg.max_tokens)  # uses of each token slot
            self.counters = self._counters.ptr
            if cfg.world > 1:
                self.buffers = PeerBuffers(comm, 2 * cfg.max_tokens * cfg.world * SLOT_BYTES)
                self.slots = tuple(self.buffers.ptrs)
            if self.writes_cache_apart(cfg.max_tokens):
                self.k_scratch()  # not at a call: a call may be under graph capture
            if tracing(self.build):  # each block of the fused kernel records its times
                blocks = self.cuda.sms * 32  # at most 32 an SM
                self._trace = self.cuda.zeros(8 * blocks * TRACE_WORDS)
                self.sums = self._trace.ptr
        except BaseException:
            self.close()
            raise

    def _pdl(self) -> bool:  # read once, at construction
        return knobs.get("CUPY_QKNORM_PDL") == 1 and self.cuda.major >= 9

    @property
    def pdl(self) -> bool:
        return self._launch.pdl

    def compose(self, chunks):
        launches = [go for c in chunks for go in c.go.values()]  # fused[, cache_write]
        if len(launches) == 1:
            return launches[0]  # one launch, nothing else

        def run(stream):
            for go in launches:
                go(stream)
        return run

    def refuse(self, tokens, tag, why, stream):
        """Tell the peers at once, through token 0's slot of this call (the reject kernel),
        instead of letting them wait for the timeout."""
        self.refused = True
        if self.cfg.world == 1:
            return None
        try:
            spec, loaded, _ = self.kernels(self.cfg.dtype, "narrow")
            params = bytes(HEAD.size) + self._static_bytes()
            self._launch.bind(loaded["reject"], 32, 1, params)(stream)
        except Exception as e:  # noqa: BLE001 - the caller raises its own input error
            return f"the reject kernel failed ({e})"
        return None

    def trace(self, blocks: int):
        """The fused kernel's time records of its last launch's first `blocks` blocks
        (numpy, [blocks, TRACE_WORDS]; qknorm::Trace), with CUPY_QKNORM_TRACE=1."""
        if self._trace is None:
            raise QKNormError("the trace needs CUPY_QKNORM_TRACE=1 when the object is built")
        return self._trace.owner.view("uint64").reshape(-1, TRACE_WORDS)[:blocks].get()

    def close(self):
        if self.buffers is not None:
            self.buffers.close()
            self.buffers = None
        super().close()
