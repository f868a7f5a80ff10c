"""Transport "ipc": the fused kernel, partial sums pushed into the peers' CUDA IPC buffers
over NVLink; one launch a chunk, nothing on the host between the ranks."""
from __future__ import annotations

from .. import knobs
from ..compile import tracing
from ..errors import QKNormError
from ..params import SLOT_BYTES, TRACE_WORDS
from ..peers import PeerBuffers
from .device import DeviceTransport


class IpcTransport(DeviceTransport):
    name = "ipc"
    CALL_KINDS = ("fused",)
    PDL_KINDS = ("fused",)  # it waits (griddepcontrol.wait) before touching memory

    def __init__(self, cfg, comm):
        import cupy
        major = int(cupy.cuda.Device().compute_capability[:-1])
        self.buffers = None
        super().__init__(cfg, comm, pdl=knobs.get("CUPY_QKNORM_PDL") == 1 and major >= 9)
        try:
            self._counters = cupy.zeros(cfg.max_tokens, cupy.uint32)
            if cfg.world > 1:
                self.buffers = PeerBuffers(comm, 2 * cfg.max_tokens * cfg.world * SLOT_BYTES)
                self.slots = tuple(self.buffers.ptrs)
        except BaseException:
            self.close()
            raise
        self.counters = self._counters.data.ptr
        if tracing():  # each block of the fused kernel records where its time goes
            blocks = self.device.attributes["MultiProcessorCount"] * 32  # at most 32 an SM
            self.sums = cupy.zeros((blocks, TRACE_WORDS), cupy.uint64)

    def trace(self, blocks):
        """The fused kernel's time records of its last launch's first `blocks` blocks
        (numpy, [blocks, TRACE_WORDS]; qknorm::Trace), with CUPY_QKNORM_TRACE=1."""
        if self.sums is None:
            raise QKNormError("the trace needs CUPY_QKNORM_TRACE=1 when the object is built")
        return self.sums[:blocks].get()

    @property
    def pdl(self):
        return self._launch.pdl

    def launch(self, go, tokens, grid, stream):
        go["fused"](grid, stream)

    def launch_fixed(self, go, tokens):
        return go["fused"]  # one launch, nothing else

    def reject(self, weight_dtype, stream):
        """After this rank refused its input: tell the peers at once, through token 0's
        slot of this call, instead of letting them wait for the timeout."""
        if self.cfg.world == 1:
            return
        if not self._static_packed:
            self._pack_static()
        _, go, _ = self.kernels(weight_dtype, "narrow")
        go["reject"](1, stream)

    def close(self):
        if self.buffers is not None:
            self.buffers.close()
            self.buffers = None
        super().close()
