"""What the GPU transports ask of CUDA, in one place: memory, kernels, copies, streams and
NCCL, through CuPy. tests/fake_cuda.py stands in for it on a machine without a GPU, so
that the transports' plans, chunks, launches and error records are tested on the CPU."""
from __future__ import annotations

import ctypes

from ..compile import load, load_rope, require_cupy
from .launch import Kernel, Launcher

_HOST_ALLOC_MAPPED = 2  # cudaHostAllocMapped; with UVA the device sees the same address


class Buffer:
    """Device memory: its address and what keeps it alive."""
    __slots__ = ("ptr", "nbytes", "owner")

    def __init__(self, ptr, nbytes, owner):
        self.ptr, self.nbytes, self.owner = ptr, nbytes, owner


class Cuda:
    """The current CuPy device."""

    def __init__(self, what: str):
        cupy = require_cupy(what)
        from cupy.cuda import runtime
        self._cupy, self._runtime = cupy, runtime
        self.id = cupy.cuda.Device().id
        props = runtime.getDeviceProperties(self.id)
        self.major = props["major"]
        self.minor = props["minor"]
        self.sms = props["multiProcessorCount"]
        self.threads_per_sm = props["maxThreadsPerMultiProcessor"]
        self.regs_per_sm = props["regsPerMultiprocessor"]
        self.current_stream = cupy.cuda.get_current_stream

    # -- memory ---------------------------------------------------------------------------
    def zeros(self, nbytes: int) -> Buffer:
        a = self._cupy.zeros(max(1, nbytes), self._cupy.uint8)
        return Buffer(a.data.ptr, nbytes, a)

    def upload(self, host) -> Buffer:
        """A device copy of a numpy array."""
        a = self._cupy.asarray(host)
        return Buffer(a.data.ptr, a.nbytes, a)

    def host_mapped(self, nbytes: int) -> int:
        """Zeroed page-locked host memory that the device reads and writes at the same
        address: free it with free_host."""
        ptr = self._runtime.hostAlloc(nbytes, _HOST_ALLOC_MAPPED)
        ctypes.memset(ptr, 0, nbytes)
        return ptr

    def free_host(self, ptr: int) -> None:
        self._runtime.freeHost(ptr)

    def pinned(self, nbytes: int):
        """Page-locked host memory as a writable buffer (the "mpi" path's staging area)."""
        return self._cupy.cuda.alloc_pinned_memory(nbytes)

    def copy(self, dst: int, src: int, nbytes: int, stream) -> None:
        """Asynchronous copy on `stream`, either way (unified addressing)."""
        self._runtime.memcpyAsync(dst, src, nbytes, self._runtime.memcpyDefault, stream.ptr)

    # -- streams --------------------------------------------------------------------------
    def device(self):
        """A context in which this device is current (for threads of the transport's)."""
        return self._cupy.cuda.Device(self.id)

    def stream(self):
        return self._cupy.cuda.Stream(non_blocking=True)

    def capturing(self, stream) -> bool:
        """Whether `stream` is capturing a CUDA graph now."""
        return self._runtime.streamIsCapturing(stream.ptr) != 0

    def synchronize(self) -> None:
        self._runtime.deviceSynchronize()

    # -- kernels --------------------------------------------------------------------------
    def launcher(self, pdl: bool) -> Launcher:
        return Launcher(pdl)

    def load(self, spec, build) -> dict:
        """{kind: Kernel} of every kernel of `spec` built with `build` (the build knobs, as
        knobs.build_values() gives them) on this device."""
        return {kind: Kernel(raw, _handle(raw), spec.names[kind])
                for kind, raw in load(spec, build).items()}

    def load_rope(self, spec, build) -> Kernel:
        """The separate RoPE kernel of `spec` (the benchmark's baseline) on this device."""
        raw = load_rope(spec, build)
        return Kernel(raw, _handle(raw), spec.rope_name)

    def load_cache_write(self, spec, build) -> Kernel:
        """The separate KV-cache write kernel of `spec` (the benchmark's baseline)."""
        from ..compile import load_cache_write
        raw = load_cache_write(spec, build)
        return Kernel(raw, _handle(raw), spec.cache_name)

    def blocks_per_sm(self, kernel: Kernel, threads: int) -> int:
        """Blocks of `kernel` one multiprocessor holds at once (the occupancy calculator:
        registers, shared memory, threads); assume the worst register use without it."""
        from cupy.cuda import driver
        try:
            return driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.raw.kernel.ptr,
                                                                     threads, 0)
        except Exception:  # noqa: BLE001 - no calculator here
            return self.regs_per_sm // (255 * threads)

    # -- NCCL -----------------------------------------------------------------------------
    def nccl(self, comm):
        """An NCCL communicator over the ranks of `comm` (collective)."""
        from cupy.cuda import nccl
        uid = comm.bcast(nccl.get_unique_id() if comm.rank == 0 else None, root=0)
        return nccl.NcclCommunicator(comm.size, uid, comm.rank)


def _handle(raw):
    """The CUfunction of a CuPy RawKernel on the current device, or None."""
    try:
        return int(raw.kernel.ptr)
    except AttributeError:
        return None
