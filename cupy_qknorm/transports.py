"""How the per-token partial sums travel between ranks.

    ipc   one fused kernel: sums -> peers' IPC buffers over NVLink -> wait -> scale, store
    nccl  partial_sums kernel -> NCCL all-reduce of [T, 2] fp32 -> apply kernel
    mpi   partial sums -> MPI Allreduce on the host -> apply; numpy arrays run on the CPU

Each device transport walks the tokens in chunks of at most max_tokens, one launch (or one
kernel-collective-kernel sequence) per chunk, on the caller's stream, with no host
synchronization (except "mpi", which must bring the sums to the host).
"""
from __future__ import annotations

import ctypes
import os
import struct

import numpy as np

from . import compile as kc
from . import reference
from .errors import CallMismatchError, PeerTimeoutError, QKNormError
from .peers import PeerBuffers

# struct qknorm::Params, field by field (see kernels/qknorm.cuh). The head (pointers and
# strides) and the token count change per launch; the rest is packed once.
_PARAMS = struct.Struct("<6Q4q8Q4Qq3i3f")
_HEAD = struct.Struct("<6Q4q")
_TOKENS = struct.Struct("<i")
_TOKENS_AT = kc.PARAMS_DTYPE.fields["tokens"][1]
assert _PARAMS.size == kc.PARAMS_DTYPE.itemsize
_HOST_ALLOC_MAPPED = 2  # cudaHostAllocMapped; with UVA the device sees the same address
SLOT_BYTES = 16         # one exchange slot: {sum_q, sum_k, tokens, use number}
ERROR_WORDS = 8         # qknorm::kErrorWords: {code, peer, token, rank, theirs, ours, 0, 0}
ERROR_TIMEOUT, ERROR_TOKENS, ERROR_SEQUENCE = 1, 2, 3
PDL_ENV = "CUPY_QKNORM_PDL"  # "0": launch the fused kernel without programmatic dependence
# Launches of this many tokens or more use the wide layout (compile.LAYOUTS: 8 vectors a
# thread, three rows in flight in shared memory), fewer the narrow one (2 vectors a thread,
# two rows in registers). Measured on H200, G=2, bf16, MiniMax dims (BENCHMARKS.md, fifth
# session): narrow 0.3-0.9 us faster up to 1024 tokens, even at 1536; from 2048 the wide
# layout is 6-10% faster than narrow rows staged the same way and 13-21% faster than
# either layout with its rows in registers.
WIDE_FROM = 2048
WIDE_FROM_ENV = "CUPY_QKNORM_WIDE_FROM"  # overrides it (benchmark experiments)


def layout_for(tokens, wide_from=WIDE_FROM):
    """The fused kernel's layout (compile.LAYOUTS) for a launch of `tokens` tokens."""
    return "wide" if tokens >= wide_from else "narrow"


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint),
                ("gridDimZ", ctypes.c_uint), ("blockDimX", ctypes.c_uint),
                ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
assert ctypes.sizeof(_LaunchAttribute) == 72 and ctypes.sizeof(_LaunchConfig) == 56


class _Launcher:
    """cuLaunchKernel through ctypes with one packed parameter buffer: less host time per
    launch than CuPy's generic argument handling. Falls back to CuPy's launch where libcuda
    or a kernel's function handle cannot be reached.

    With `pdl`, launches go through cuLaunchKernelEx with programmatic stream serialization:
    the kernel may start while the previous kernel of the stream finishes, and must itself
    wait (griddepcontrol.wait) before it touches memory that kernel may write."""

    def __init__(self, pdl=False):
        self.buf = ctypes.create_string_buffer(_PARAMS.size)
        self._argv = (ctypes.c_void_p * 1)(ctypes.addressof(self.buf))
        self.pdl = False
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            self._launch = lib.cuLaunchKernel
            self._launch.restype = ctypes.c_int
            self._launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + \
                [ctypes.c_void_p] * 3
            self._error_name = lib.cuGetErrorName
            self._error_name.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        except (OSError, AttributeError):
            self._launch = None
            return
        if pdl:
            try:
                self._launch_ex = lib.cuLaunchKernelEx
            except AttributeError:
                return
            self._launch_ex.restype = ctypes.c_int
            self._launch_ex.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_void_p]
            self._attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
            self.pdl = True

    def handle(self, kernel):
        """The CUfunction of a CuPy RawKernel on the current device, or None."""
        if self._launch is None:
            return None
        try:
            return int(kernel.kernel.ptr)
        except AttributeError:
            return None

    def bind(self, kernel, block, pdl=False, buf=None, grid=None):
        """A function go(grid, stream) that launches `kernel` ((RawKernel, CUfunction or
        None)) with the parameters currently in `buf` (default: the shared one): the
        per-call work is two field stores and one foreign call. With `grid` fixed, the
        function is go(stream) and the grid is set once here."""
        raw, fn = kernel
        buf = self.buf if buf is None else buf
        if fn is None:
            def go_cupy(grid_, stream):
                params = np.frombuffer(buf.raw, kc.PARAMS_DTYPE)[0]
                with stream:
                    raw((grid_,), (block,), (params,))
            if grid is None:
                return go_cupy
            return lambda stream: go_cupy(grid, stream)
        fn_ptr, fail = ctypes.c_void_p(fn), self._fail
        argv = self._argv if buf is self.buf else \
            (ctypes.c_void_p * 1)(ctypes.addressof(buf))
        if pdl and self.pdl:
            config = _LaunchConfig(gridDimX=grid or 0, gridDimY=1, gridDimZ=1,
                                   blockDimX=block, blockDimY=1, blockDimZ=1,
                                   attrs=ctypes.pointer(self._attr), numAttrs=1)
            config_ref, launch_ex = ctypes.byref(config), self._launch_ex

            if grid is None:
                def go_ex(grid_, stream):
                    config.gridDimX = grid_
                    config.hStream = stream.ptr
                    rc = launch_ex(config_ref, fn_ptr, argv, None)
                    if rc:
                        fail(rc)
            else:
                def go_ex(stream):
                    config.hStream = stream.ptr
                    rc = launch_ex(config_ref, fn_ptr, argv, None)
                    if rc:
                        fail(rc)
            go_ex.keep = (config, buf, argv)  # alive as long as the function
            return go_ex
        launch = self._launch
        if grid is None:
            def go(grid_, stream):
                rc = launch(fn_ptr, grid_, 1, 1, block, 1, 1, 0, stream.ptr, argv, None)
                if rc:
                    fail(rc)
        else:
            def go(stream):
                rc = launch(fn_ptr, grid, 1, 1, block, 1, 1, 0, stream.ptr, argv, None)
                if rc:
                    fail(rc)
        go.keep = (buf, argv)
        return go

    def _fail(self, rc):
        name = ctypes.c_char_p()
        self._error_name(rc, ctypes.byref(name))
        raise QKNormError(f"kernel launch failed: {(name.value or b'?').decode()} ({rc})")


class DeviceTransport:
    """Common part of the GPU transports: kernels, launch parameters, chunking."""
    name = "?"
    PDL_KINDS = ()  # kernels launched with programmatic dependent launch

    def __init__(self, cfg, comm, pdl=False):
        import cupy
        self.cfg = cfg
        self.comm = comm
        self.device = cupy.cuda.Device()
        self._kernels = {}
        self._raw = {}  # the RawKernels behind self._kernels, for bound()
        self.slots = (0,) * kc.MAX_WORLD
        self.counters = 0
        self.error = 0
        self.error_host = 0
        self.sums = None
        self._launch = _Launcher(pdl)
        self._static_packed = False
        self.wide_from = kc.env_int(WIDE_FROM_ENV, WIDE_FROM, 1)

    def layout(self, tokens):
        """The fused kernel's layout for a launch of `tokens` tokens."""
        return layout_for(tokens, self.wide_from)

    def kernels(self, weight_dtype, layout="narrow"):
        """(spec, {kind: go(grid, stream)}, grid cap) for a weight dtype and layout."""
        k = self._kernels.get((weight_dtype, layout))
        if k is None:
            spec = kc.Spec.plan(self.cfg.dtype, weight_dtype, self.cfg.world,
                                self.cfg.q_local, self.cfg.k_local, layout)
            raw = kc.load(spec)
            go = {kind: self._launch.bind((r, self._launch.handle(r)), spec.threads,
                                          pdl=kind in self.PDL_KINDS)
                  for kind, r in raw.items()}
            k = (spec, go, self._grid_cap(spec, raw))
            self._kernels[(weight_dtype, layout)] = k
            self._raw[(weight_dtype, layout)] = raw
        return k

    def _grid_cap(self, spec, raw):
        """Blocks of every kernel that are resident on the GPU at once: a block that spins
        on a peer must never wait for another block of its grid to be scheduled. Counted
        by the occupancy calculator (registers, shared memory, threads)."""
        from cupy.cuda import driver, runtime
        props = runtime.getDeviceProperties(self.device.id)
        per_sm = props["maxThreadsPerMultiProcessor"] // spec.threads
        for r in raw.values():
            try:
                per_sm = min(per_sm, driver.occupancyMaxActiveBlocksPerMultiprocessor(
                    r.kernel.ptr, spec.threads, 0))
            except Exception:  # noqa: BLE001 - no calculator: assume the worst register use
                per_sm = min(per_sm, props["regsPerMultiprocessor"] // (255 * spec.threads))
        return max(1, props["multiProcessorCount"] * max(1, per_sm))

    def _pack_static(self):
        cfg = self.cfg
        _PARAMS.pack_into(
            self._launch.buf, 0, *([0] * 10), *self.slots, self.counters, self.error,
            self.error_host, self.sums.data.ptr if self.sums is not None else 0,
            cfg.timeout_ns, 0, cfg.max_tokens, cfg.rank, cfg.eps, float(cfg.q_dim),
            float(cfg.k_dim))
        self._static_packed = True

    def prepare(self, plan):
        """A function run(ptrs, stream) for arrays that match `plan` (validated):
        ptrs are the addresses of q, k, q_weight, k_weight, q_out, k_out. It walks the
        tokens in chunks of at most max_tokens, each launched with the layout its length
        calls for; one chunk (the common case) takes the shortest path."""
        if not self._static_packed:
            self._pack_static()
        buf, strides, tokens = self._launch.buf, plan.strides, plan.tokens
        chunk, launch = self.cfg.max_tokens, self.launch
        pack_head, pack_tokens = _HEAD.pack_into, _TOKENS.pack_into
        if tokens <= chunk:
            _, go, cap = self.kernels(plan.weight_dtype, self.layout(tokens))
            grid = min(tokens, cap)

            def run_one(ptrs, stream):
                q, k, qw, kw, qo, ko = ptrs
                pack_head(buf, 0, q, k, qo, ko, qw, kw, *strides)
                pack_tokens(buf, _TOKENS_AT, tokens)
                launch(go, tokens, grid, stream)
            return run_one
        step = [s * plan.itemsize for s in strides]
        pieces = []
        for start in range(0, tokens, chunk):
            n = min(chunk, tokens - start)
            _, go, cap = self.kernels(plan.weight_dtype, self.layout(n))
            pieces.append((start, n, go, min(n, cap)))

        def run_chunks(ptrs, stream):
            q, k, qw, kw, qo, ko = ptrs
            for start, n, go, grid in pieces:
                pack_head(buf, 0, q + start * step[0], k + start * step[1],
                          qo + start * step[2], ko + start * step[3], qw, kw, *strides)
                pack_tokens(buf, _TOKENS_AT, n)
                launch(go, n, grid, stream)
        return run_chunks

    def bound(self, plan, ptrs):
        """go(stream) that normalizes these very arrays (ptrs as in prepare). A call of one
        chunk gets its own parameter buffer, packed once here, and launch functions with
        the grid fixed, so a call is the launch alone (TPQKNorm.bind). Longer calls take
        prepare()'s path."""
        tokens = plan.tokens
        if tokens > self.cfg.max_tokens:
            run, ptrs = self.prepare(plan), list(ptrs)
            return lambda stream: run(ptrs, stream)
        if not self._static_packed:
            self._pack_static()
        layout = self.layout(tokens)
        spec, _, cap = self.kernels(plan.weight_dtype, layout)
        buf = ctypes.create_string_buffer(self._launch.buf.raw, _PARAMS.size)
        q, k, qw, kw, qo, ko = ptrs
        _HEAD.pack_into(buf, 0, q, k, qo, ko, qw, kw, *plan.strides)
        _TOKENS.pack_into(buf, _TOKENS_AT, tokens)
        grid = min(tokens, cap)
        go = {kind: self._launch.bind((r, self._launch.handle(r)), spec.threads,
                                      pdl=kind in self.PDL_KINDS, buf=buf, grid=grid)
              for kind, r in self._raw[(plan.weight_dtype, layout)].items()}
        return self.launch_fixed(go, tokens)

    def launch_fixed(self, go, tokens):
        """go(stream) from launch functions whose grid and parameters are fixed."""
        launch = self.launch
        fixed = {kind: (lambda f: lambda grid, stream: f(stream))(f) for kind, f in go.items()}
        return lambda stream: launch(fixed, tokens, None, stream)

    def run(self, ptrs, plan, stream):
        self.prepare(plan)(ptrs, stream)

    def check(self):
        """Raise a pending asynchronous error. Reads host memory only: no synchronization."""

    def close(self):
        pass


class IpcTransport(DeviceTransport):
    """The fused kernel over CUDA IPC buffers."""
    name = "ipc"

    def __init__(self, cfg, comm):
        import cupy
        from cupy.cuda import runtime
        major = cupy.cuda.Device().compute_capability[:-1]
        super().__init__(cfg, comm, pdl=os.environ.get(PDL_ENV, "1") != "0" and
                         int(major) >= 9)
        self.buffers = None
        self._host = 0
        self._host_words = None
        try:
            self._counters = cupy.zeros(cfg.max_tokens, cupy.uint32)
            self._error = cupy.zeros(ERROR_WORDS, cupy.int32)
            self._host = runtime.hostAlloc(4 * ERROR_WORDS, _HOST_ALLOC_MAPPED)
            self._host_words = (ctypes.c_int32 * ERROR_WORDS).from_address(self._host)
            ctypes.memset(self._host, 0, 4 * ERROR_WORDS)
            if cfg.world > 1:
                self.buffers = PeerBuffers(comm, 2 * cfg.max_tokens * cfg.world * SLOT_BYTES)
                self.slots = tuple(self.buffers.ptrs) + (0,) * (kc.MAX_WORLD - cfg.world)
        except BaseException:
            self.close()
            raise
        self.counters = self._counters.data.ptr
        self.error = self._error.data.ptr
        self.error_host = self._host
        if kc.tracing():  # an experiment: each block of the fused kernel records its time
            blocks = self.device.attributes["MultiProcessorCount"] * 32  # at most 32 an SM
            self.sums = cupy.zeros((blocks, kc.TRACE_WORDS), cupy.uint64)

    def trace(self, blocks):
        """The fused kernel's time records of its last launch's `blocks` blocks (numpy,
        [blocks, compile.TRACE_WORDS]; see qknorm::Trace), with CUPY_QKNORM_TRACE=1."""
        if not kc.tracing() or self.sums is None:
            raise QKNormError("the trace needs CUPY_QKNORM_TRACE=1 when the object is built")
        return self.sums[:blocks].get()

    @property
    def pdl(self):
        return self._launch.pdl

    PDL_KINDS = ("fused",)  # it waits (griddepcontrol.wait) before touching memory

    def launch(self, go, tokens, grid, stream):
        go["fused"](grid, stream)

    def launch_fixed(self, go, tokens):
        return go["fused"]  # one launch, nothing else

    def check(self):
        w = self._host_words
        if w is None or not w[0]:
            return
        code, peer, token, rank, theirs, ours = w[0], w[1], w[2], w[3], w[4], w[5]
        if code == ERROR_TOKENS:
            raise CallMismatchError(
                f"rank {rank} launched {ours} tokens where rank {peer} launched {theirs} "
                f"(T must be the same on every rank within a call; calls past max_tokens "
                f"launch in chunks of max_tokens); nothing of that launch was written on "
                f"rank {rank}; the object is closed for use", peer=peer, token=token)
        if code == ERROR_SEQUENCE:
            raise CallMismatchError(
                f"rank {rank} found use {theirs} of token {token}'s slot from rank {peer} "
                f"where it expected use {ours}: the ranks' calls are out of step; the "
                f"object is closed for use", peer=peer, token=token)
        raise PeerTimeoutError(
            f"rank {rank} waited longer than {self.cfg.timeout_ns / 1e9:g} s for the "
            f"partial sums of rank {peer} (token {token} of a launch); the object is "
            f"closed for use", peer=peer, token=token)

    def close(self):
        from cupy.cuda import runtime
        if self.buffers is not None:
            self.buffers.close()
            self.buffers = None
        if self._host:
            runtime.deviceSynchronize()
            self._host_words = None
            runtime.freeHost(self._host)
            self._host = 0


class NcclTransport(DeviceTransport):
    """Unfused: partial sums, NCCL all-reduce, apply. The baseline and cross-node path."""
    name = "nccl"

    def __init__(self, cfg, comm):
        import cupy
        from cupy.cuda import nccl
        super().__init__(cfg, comm)
        self.sums = cupy.empty((cfg.max_tokens, 2), cupy.float32)
        uid = comm.bcast(nccl.get_unique_id() if comm.rank == 0 else None, root=0)
        self._nccl = nccl.NcclCommunicator(comm.size, uid, comm.rank)
        # NCCL connects the channels of an algorithm/protocol lazily, at its first use: do
        # that now, for every size a call can use, so that no first use falls inside a
        # CUDA graph capture (where the connection cannot be made).
        ptr = self.sums.data.ptr
        count = 2
        while True:
            self._nccl.allReduce(ptr, ptr, count, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, 0)
            if count >= 2 * cfg.max_tokens:
                break
            count = min(4 * count, 2 * cfg.max_tokens)
        cupy.cuda.runtime.deviceSynchronize()

    def launch(self, go, tokens, grid, stream):
        from cupy.cuda import nccl
        go["partial_sums"](grid, stream)
        if self.cfg.world > 1:
            ptr = self.sums.data.ptr
            self._nccl.allReduce(ptr, ptr, 2 * tokens, nccl.NCCL_FLOAT32, nccl.NCCL_SUM,
                                 stream.ptr)
        go["apply"](grid, stream)

    def close(self):
        """Collective. CUDA graphs that captured calls of this object must be destroyed
        first: NCCL's teardown waits for them (a close() with such a graph alive hung on
        H100). Abort rather than destroy: after the device synchronization and the barrier
        nothing of ours is in flight, and abort needs no handshake with the peers."""
        if getattr(self, "_nccl", None) is not None:
            import cupy
            cupy.cuda.runtime.deviceSynchronize()
            self.comm.Barrier()
            self._nccl.abort()
            self._nccl = None


class MpiTransport(DeviceTransport):
    """Partial sums on the GPU, MPI Allreduce on the host, apply on the GPU."""
    name = "mpi"

    def __init__(self, cfg, comm):
        import cupy
        super().__init__(cfg, comm)
        self.sums = cupy.empty((cfg.max_tokens, 2), cupy.float32)
        self._host = cupy.cuda.alloc_pinned_memory(cfg.max_tokens * 8)
        self._host_sums = np.frombuffer(self._host, np.float32, 2 * cfg.max_tokens)

    def launch(self, go, tokens, grid, stream):
        from mpi4py import MPI
        go["partial_sums"](grid, stream)
        if self.cfg.world > 1:
            host = self._host_sums[:2 * tokens]
            self.sums[:tokens].ravel().get(stream=stream, out=host)
            stream.synchronize()
            self.comm.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
            self.sums[:tokens].ravel().set(host, stream=stream)
        go["apply"](grid, stream)


def run_host(cfg, comm, ops, tokens):
    """The "mpi" transport on numpy arrays: float64 partial sums, MPI Allreduce, scale."""
    from mpi4py import MPI
    q, k, qw, kw, qo, ko = ops
    x = [reference.to_f64(q.obj, q.dtype), reference.to_f64(k.obj, k.dtype)]
    sums = np.zeros((tokens, 2))
    sums[:, 0] = (x[0] * x[0]).sum(axis=1)
    sums[:, 1] = (x[1] * x[1]).sum(axis=1)
    comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
    for v, w, dim, col, out in ((x[0], qw, cfg.q_dim, 0, qo), (x[1], kw, cfg.k_dim, 1, ko)):
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = 1.0 / np.sqrt(sums[:, col:col + 1] / dim + cfg.eps)
            y = reference.from_f64(v * scale * reference.to_f64(w.obj, w.dtype), cfg.dtype)
        dst = out.obj.view(np.uint16) if cfg.dtype == "bfloat16" else out.obj
        dst[...] = y
