"""A stand-in for cupy_qknorm.transports.cuda.Cuda on a machine without a GPU, so that the
GPU transports (their plans, chunks, bound launches, NCCL calls and error records) run on
the CPU: device memory is host memory, a kernel is its name, and the real Launcher binds
every launch to a recorder of cuLaunchKernelEx's arguments (grid, block, stream and the
packed Params, decoded). Nothing is computed: tests write the error record themselves.

Also: CuPy arrays over host memory (CuPy makes them without a GPU, and the package reads
only their shape, strides, dtype and address), and a TPQKNorm whose transport is one of
these fakes."""
from __future__ import annotations

import contextlib
import ctypes
import inspect

import numpy as np

from cupy_qknorm.params import CACHE, CACHE_OFFSET, FIELDS, HEAD, PARAMS
from cupy_qknorm.transports.cuda import Buffer
from cupy_qknorm.transports.launch import Kernel, Launcher, _LaunchConfig

HEAD_FIELDS = tuple(f.name for f in FIELDS[:[f.name for f in FIELDS].index("slots")])
CACHE_FIELDS = tuple(f.name for f in FIELDS if f.offset >= CACHE_OFFSET)


class Stream:
    """A CuPy stream's face: its handle and synchronize()."""

    def __init__(self, ptr=0x5151, capturing=False):
        self.ptr, self.capturing, self.synchronized = ptr, capturing, 0

    def synchronize(self):
        self.synchronized += 1


class Launch(dict):
    """One recorded launch: kernel kind and name, grid, block, stream handle, pdl, the
    Params head fields and KV-cache fields by name, and how many Python frames lay between the caller's
    frame named `frames_from` and the driver call."""


class FakeNccl:
    """An NCCL communicator that records its all-reduces (sums nothing: one rank's data is
    the sum)."""

    def __init__(self, calls):
        self.calls, self.aborted = calls, False

    def allReduce(self, send, recv, count, dtype, op, stream):  # noqa: N802 - NCCL's name
        self.calls.append(("allReduce", count, stream))

    def check_async_error(self):
        pass

    def abort(self):
        self.aborted = True


class FakeCuda:
    def __init__(self, sms=4, threads_per_sm=2048, blocks_per_sm=2, major=9,
                 frames_from="__call__"):
        self.id, self.major = 0, major
        self.sms, self.threads_per_sm, self.regs_per_sm = sms, threads_per_sm, 65536
        self._blocks = blocks_per_sm
        self.launches, self.nccl_calls, self.loads, self.builds = [], [], [], []
        self.frames_from = frames_from
        self.rc = 0              # what the next cuLaunchKernelEx returns
        self._memory = {}        # ptr -> numpy array, alive while the fake is
        self._kernels = {}       # handle -> (kind, name)
        self.stream0 = Stream()
        self.current_stream = lambda: self.stream0

    # memory: host memory at its own address
    def _keep(self, a):
        self._memory[a.ctypes.data] = a
        return a

    def zeros(self, nbytes):
        a = self._keep(np.zeros(max(1, nbytes), np.uint8))
        return Buffer(a.ctypes.data, nbytes, a)

    def upload(self, host):
        a = self._keep(np.array(host, copy=True, order="C"))
        return Buffer(a.ctypes.data, a.nbytes, a)

    def host_mapped(self, nbytes):
        return self._keep(np.zeros(nbytes, np.uint8)).ctypes.data

    def free_host(self, ptr):
        self._memory.pop(ptr)

    def pinned(self, nbytes):
        return bytearray(nbytes)

    def copy(self, dst, src, nbytes, stream):
        ctypes.memmove(dst, src, nbytes)

    def device(self):
        return contextlib.nullcontext()

    def stream(self):
        return Stream(0x7777)

    def capturing(self, stream):
        return stream.capturing

    def synchronize(self):
        pass

    # kernels
    def launcher(self, pdl):
        return Launcher(pdl, driver=(self._launch_ex, None))

    def load(self, spec, build):
        self.loads.append(spec)
        self.builds.append(build)
        out = {}
        for kind, name in spec.names.items():
            handle = 0x1000 + len(self._kernels)
            self._kernels[handle] = (kind, name)
            out[kind] = Kernel(None, handle, name)
        return out

    def load_rope(self, spec, build):
        handle = 0x1000 + len(self._kernels)
        self._kernels[handle] = ("rope", spec.rope_name)
        return Kernel(None, handle, spec.rope_name)

    def load_cache_write(self, spec, build):
        handle = 0x1000 + len(self._kernels)
        self._kernels[handle] = ("cache_write", spec.cache_name)
        return Kernel(None, handle, spec.cache_name)

    def blocks_per_sm(self, kernel, threads):
        return self._blocks

    def nccl(self, comm):
        self.nccl_comm = FakeNccl(self.nccl_calls)
        return self.nccl_comm

    def _launch_ex(self, config_ref, fn, argv, extra):
        config = config_ref._obj  # the _LaunchConfig that ctypes.byref wraps
        assert isinstance(config, _LaunchConfig)
        kind, name = self._kernels[fn.value]
        raw = ctypes.string_at(argv[0], PARAMS.size)
        frames, f = 0, inspect.currentframe().f_back
        while f is not None and f.f_code.co_name != self.frames_from:
            frames, f = frames + 1, f.f_back
        self.launches.append(Launch(
            kind=kind, name=name, grid=config.gridDimX, block=config.blockDimX,
            stream=config.hStream or 0, pdl=bool(config.numAttrs), raw=raw,
            frames=frames + 1 if f is not None else None,
            **dict(zip(HEAD_FIELDS, HEAD.unpack(raw[:HEAD.size]))),
            **dict(zip(CACHE_FIELDS, CACHE.unpack(raw[CACHE_OFFSET:])))))
        return self.rc

    def kinds(self):
        return [launch["kind"] for launch in self.launches]


class HostMemory:
    """CuPy arrays over one numpy buffer, as if on device 0."""

    def __init__(self, cupy, nbytes=1 << 20):
        self.cupy, self.host, self.used = cupy, np.zeros(nbytes, np.uint8), 0

    def array(self, shape, dtype=np.float32):
        cupy = self.cupy
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        mem = cupy.cuda.UnownedMemory(self.host.ctypes.data + self.used, max(1, nbytes),
                                      self.host, device_id=0)
        self.used += -(-max(1, nbytes) // 256) * 256
        return cupy.ndarray(shape, dtype, memptr=cupy.cuda.MemoryPointer(mem, 0))

    def numpy(self, a):
        """The host view of an array made here."""
        off = a.data.ptr - self.host.ctypes.data
        return np.ndarray(a.shape, a.dtype, self.host.data, off, a.strides)


def fake_norm(comm, transport, q_dim, k_dim, dtype="float32", cuda=None, world=None,
              rank=0, **kwargs):
    """A TPQKNorm on `comm` whose transport is `transport` ("ipc", "nccl" or "mpi") over a
    FakeCuda: built with transport "mpi" (which runs without a GPU), then given the
    transport the fake drives. `world`: the ranks the object believes it has, as `rank`
    ("nccl" and "mpi": their peers are the fake's NCCL, or MPI over `comm`; "ipc" needs
    its PeerBuffers replaced). Returns (norm, cuda)."""
    import dataclasses

    from cupy_qknorm import TPQKNorm
    from cupy_qknorm.transports import IpcTransport, MpiTransport, NcclTransport
    cuda = cuda or FakeCuda()
    norm = TPQKNorm(comm, q_dim, k_dim, dtype, transport="mpi", **kwargs)
    norm._transport.close()
    if world is not None:
        norm.config = dataclasses.replace(norm.config, world=world, rank=rank)
    cls = {"ipc": IpcTransport, "nccl": NcclTransport}.get(transport)
    if cls is not None:
        t = cls(norm.config, norm._comm, cuda)
    else:
        t = MpiTransport(norm.config, norm._comm, gpu=True, cuda=cuda)
    norm._transport, norm.transport, norm._device = t, transport, 0
    norm._error = t.error
    norm._current_stream = cuda.current_stream
    return norm, cuda
