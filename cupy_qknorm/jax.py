"""The norm inside jax.jit: JaxQKNorm, an XLA FFI target over TPQKNorm (pip extra `jax`).

    qk = JaxQKNorm(comm, q_dim, k_dim, "bfloat16", rope=RoPE.minimax_m2())  # collective
    @jax.jit
    def layer(q, k, qw, kw, pos):
        return qk(q, k, qw, kw, pos)          # (q_out, k_out), jax.Arrays

The call is an XLA custom call (jax.ffi.ffi_call) whose handler is a C function pointer
made with ctypes over XLA's FFI C API (cupy_qknorm.xla_ffi): the wheel stays pure Python.
With kv_cache= (a KVCache, as for TPQKNorm) each call also writes the paged KV cache:
it takes v, k_cache, v_cache and slot_mapping and returns the caches, aliased to the ones
passed (XLA's buffers written in place where the caller donates them).

On a GPU it launches the same compiled kernels as TPQKNorm on XLA's stream, with the
same transports; with transport "ipc" or "nccl" it tells XLA that its calls may be
captured in a command buffer (a CUDA graph), with "mpi" that they may not. On JAX's CPU
backend it runs transport "mpi"'s numpy host path on XLA's host buffers.

Contract and errors are TPQKNorm's: every rank builds the object alike, every rank's
program makes the same calls in the same order with the same T. Bad shapes and dtypes
raise at trace time with TPQKNorm's one-line messages (and the peers are told, as for a
refused input). An error of a call (PeerTimeoutError, CallMismatchError, PositionError,
SlotError, ClosedError) fails the jitted computation: JAX raises its runtime error with
the message "cupy_qknorm <ExceptionType>: <message>", and synchronize() (or an eager
call of the object) raises the typed exception itself.

Importing cupy_qknorm never imports this module or JAX.
"""
from __future__ import annotations

import contextlib
import numbers
import threading
import warnings
import weakref

import numpy as np

from . import arrays, xla_ffi
from .errors import (ClosedError, PeerTimeoutError, QKNormError)
from .kvcache import cache_view, scale_arg, slot_view
from .norm import TPQKNorm, check_cache_arguments, check_cache_pair, check_value_rows
from .transports import tag_code
from .transports.base import MAX_TAG

_OBJECTS = weakref.WeakValueDictionary()  # handle -> JaxQKNorm
_TARGETS: dict = {}     # target name -> the registered ctypes handler (kept alive forever)
_LOCK = threading.Lock()
_NEXT = [1]
MAX_BOUND = 256         # bound calls remembered per object (keyed by XLA's buffer addresses)
# the "kv" attribute of a call that writes the KV cache: which operands it has
KV, KV_STORE_K, KV_K_SCALE_ARRAY, KV_V_SCALE_ARRAY = 1, 2, 4, 8


def _target(platform: str, graphs: bool) -> str:
    """The FFI target for `platform` ("cpu" or "CUDA"), registered once per process."""
    import jax
    name = f"cupy_qknorm_{platform.lower()}{'_graph' if graphs else ''}"
    with _LOCK:
        if name not in _TARGETS:
            handler = _make_handler(xla_ffi.COMMAND_BUFFER_COMPATIBLE if graphs else 0)
            ptr = xla_ffi.ctypes.cast(handler, xla_ffi.ctypes.c_void_p).value
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(ptr), platform=platform,
                                        api_version=1)
            _TARGETS[name] = handler
    return name


def _code(e: BaseException) -> int:
    if isinstance(e, PeerTimeoutError):
        return xla_ffi.DEADLINE_EXCEEDED
    if isinstance(e, ClosedError):
        return xla_ffi.FAILED_PRECONDITION
    if isinstance(e, (TypeError, ValueError)):
        return xla_ffi.INVALID_ARGUMENT
    return xla_ffi.INTERNAL


def _make_handler(traits: int):
    def handle(address):
        frame = None
        try:
            frame = xla_ffi.frame_at(address)
            if frame.extensions and xla_ffi.handshake(frame, traits) or \
                    frame.stage != xla_ffi.STAGE_EXECUTE:
                return None
            attrs = xla_ffi.scalar_attrs(frame)
            obj = _OBJECTS.get(attrs.get("handle"))
            if obj is None:
                raise ClosedError("this JaxQKNorm is closed")
            obj._execute(frame, attrs)
            return None
        except BaseException as e:  # noqa: BLE001 - every error goes back to XLA
            if frame is None:
                return None
            try:
                return xla_ffi.error(frame, _code(e), f"cupy_qknorm {type(e).__name__}: {e}")
            except BaseException:  # noqa: BLE001 - nothing else can be said from here
                return None
    return xla_ffi.HANDLER(handle)


class JaxQKNorm:
    """TPQKNorm for jax.Arrays, callable inside jax.jit (and lax.scan): the same math,
    configuration, transports, collective contract and errors (cupy_qknorm.TPQKNorm).

    Collective: every rank of `comm` builds it with the same arguments (MPI exchanges the
    IPC handles here, before any jitted call). `backend`: JAX's backend the calls run on
    (default jax.default_backend()): "gpu" launches the kernels on XLA's stream on the
    current CuPy device (which must be this process's JAX GPU); "cpu" runs transport
    "mpi" on the host (transport "auto" means "mpi" there). `kv_cache` (a KVCache): every
    call also writes the paged KV cache (docs/kvcache.md); XLA's arrays are row-major, so
    a cache is NHD [num_blocks, block_size, kv heads, head_dim] or a token pool [slots,
    kv heads, head_dim] with block_size 1. The norm itself is `self.norm` (a TPQKNorm:
    eager CuPy calls work on it as ever)."""

    def __init__(self, comm, q_dim: int, k_dim: int, dtype: str = "bfloat16",
                 eps: float = 1e-6, max_tokens: int = 8192, *, transport: str = "auto",
                 timeout_s: float | None = 5.0, rope=None, backend: str | None = None,
                 kv_heads: int | None = None, head_dim: int | None = None,
                 kv_cache=None):
        import jax
        self.norm = None
        backend = jax.default_backend() if backend is None else backend
        if backend not in ("cpu", "gpu", "cuda"):
            raise ValueError(f"backend must be 'cpu' or 'gpu', got {backend!r}")
        self.backend = "cpu" if backend == "cpu" else "gpu"
        if self.backend == "cpu":
            if transport not in ("auto", "mpi"):
                raise ValueError(f"JAX's CPU backend runs transport 'mpi' (host arrays); "
                                 f"transport {transport!r} needs backend='gpu'")
            transport = "mpi"
        self.norm = TPQKNorm(comm, q_dim, k_dim, dtype, eps, max_tokens,
                             transport=transport, timeout_s=timeout_s, rope=rope,
                             kv_heads=kv_heads, head_dim=head_dim, kv_cache=kv_cache)
        self.config = self.norm.config
        self.transport = self.norm.transport
        self._device = self.norm._device
        if self.backend == "gpu" and self._device is None:
            self.norm.close()
            raise QKNormError("backend 'gpu' needs a CUDA GPU on every rank")
        self._target = _target("cpu" if self.backend == "cpu" else "CUDA",
                               self.backend == "gpu" and self.norm.capturable)
        self._bound = {}
        self._streams = {}
        self.executions = 0      # times XLA ran the handler (a call, or its capture)
        self.captured_calls = 0  # executions XLA captured into a command buffer (CUDA graph)
        self.cache_copies = 0    # caches copied because XLA's result was not the operand
        self._runtime = None
        if self._device is not None:
            import cupy
            self._runtime = cupy.cuda.runtime
        self._error = None      # the typed exception of the last failed call
        self._sites = 0         # calls traced without a tag (each takes its own: auto_tag)
        self._thread = threading.local()
        with _LOCK:
            self._handle = _NEXT[0]
            _NEXT[0] += 1
        _OBJECTS[self._handle] = self

    # -- tracing ---------------------------------------------------------------------------
    def __call__(self, q, k, q_weight, k_weight, positions=None, *, in_place: bool = False,
                 tag: int | None = None, v=None, k_cache=None, v_cache=None,
                 slot_mapping=None, k_scale=None, v_scale=None, store_k: bool = True):
        """(q_out, k_out) = the norm (then RoPE by `positions`, [T] int32/int64) of q
        [T, q_dim/G] and k [T, k_dim/G] with the weights [q_dim/G], [k_dim/G] (dtype or
        float32). `in_place`: the outputs alias q and k (input_output_aliases): no new
        buffers where the caller donates q and k (jax.jit(..., donate_argnums)), else XLA
        copies them first. `tag`: a static int every rank passes alike, or None: then
        the call takes the next of this object's tags in the order calls are traced
        (auto_tag), the same on every rank, so that calls XLA runs in another order on
        another rank fail with CallMismatchError instead of pairing the wrong sums.

        With kv_cache= at construction: (q_out, k_out, k_cache_out, v_cache_out). Token
        t's k output row and its row of `v` [T, k_dim/G] go to slot slot_mapping[t] ([T]
        int32/int64; -1: none) of `k_cache` and `v_cache` (NHD [num_blocks, block_size,
        kv heads, head_dim] or a token pool [slots, kv heads, head_dim]; bf16 as uint16 or
        bfloat16, FP8 as uint8 or float8_e4m3fn), converted to the cache's dtype (FP8:
        value / k_scale or v_scale: a Python float, static, or an fp32 jax array of
        shape () or (1,), read when the call runs). The cache outputs alias the caches
        passed (input_output_aliases): XLA writes the rows into the donated buffers, or
        into a copy where the caches are not donated. store_k=False: k's output is not
        stored and the result is (q_out, None, k_cache_out, v_cache_out).

        Shapes and dtypes are checked here, at trace time (TypeError/ValueError)."""
        import jax
        norm = self.norm
        if norm is None:
            raise ClosedError("this JaxQKNorm is closed")
        norm._check_usable()
        if tag is None:
            tag = self.auto_tag()
        try:
            code = tag_code(tag)
            check_avals(self.config, q, k, q_weight, k_weight, positions)
            check_cache_avals(self.config, q.shape[0], v, k_cache, v_cache, slot_mapping,
                              k_scale, v_scale, store_k)
        except Exception as e:  # noqa: BLE001 - re-raised once the peers know
            norm._refuse(q, tag, e, norm._current_stream())
            raise
        if self._device is not None:
            self._load_kernels(q.shape[0], arrays.dtype_name(np.dtype(q_weight.dtype)))
        args = [q, k, q_weight, k_weight] + ([] if positions is None else [positions])
        results = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct(k.shape, k.dtype)]
        aliases = {0: 0, 1: 1} if in_place else {}
        attrs = {"handle": np.int64(self._handle), "tag": np.int32(code - 1)}
        cache = self.config.kv is not None
        if cache:
            flags = KV | (KV_STORE_K if store_k else 0)
            if not store_k:  # no k output: k is left as it was
                results.pop()
                aliases.pop(1, None)
            at = len(args)
            args += [v, k_cache, v_cache, slot_mapping]
            for i, c in ((at + 1, k_cache), (at + 2, v_cache)):
                aliases[i] = len(results)  # the cache's own buffer, where XLA can keep it
                results.append(jax.ShapeDtypeStruct(c.shape, c.dtype))
            for x, name, bit in ((k_scale, "k_scale", KV_K_SCALE_ARRAY),
                                 (v_scale, "v_scale", KV_V_SCALE_ARRAY)):
                if x is None or _real(x):
                    attrs[name] = np.float32(scale_arg(x, name)[0])
                else:
                    args.append(x)
                    flags |= bit
            attrs["kv"] = np.int32(flags)
        call = jax.ffi.ffi_call(
            self._target, tuple(results), input_output_aliases=aliases or None,
            # on the CPU: XLA keeps side-effecting calls in program order and never drops
            # one, so every rank's calls pair off alike
            has_side_effect=self.backend == "cpu")
        try:
            out = call(*args, **attrs)
        except Exception as e:  # an eager call: its own typed error
            err = self._take_error()
            if err is not None:
                raise err from e
            raise
        out = tuple(out)
        if cache and not store_k:
            return (out[0], None) + out[1:]
        return out

    def auto_tag(self) -> int:
        """The tag of the next call traced without one: 0, 1, ... MAX_TAG, then 0 again,
        counted per object in the order calls are traced (a call site in a lax.scan body
        is traced once: its iterations, ordered by the loop, share it). Every rank traces
        the same program in the same order, so the tags agree; two calls with no data
        between them that XLA runs in either order then carry different tags, and the
        ranks' calls that do not match raise CallMismatchError."""
        with _LOCK:
            tag, self._sites = self._sites % (MAX_TAG + 1), self._sites + 1
        return tag

    def _load_kernels(self, tokens, weight_dtype):
        """Load the kernels a call of `tokens` rows launches now, at trace time: XLA may
        run the call's first execution inside a stream capture, where loading a module is
        not allowed."""
        import cupy
        t = self.norm._transport
        t = getattr(t, "_device", None) if t.name == "mpi" else t
        if t is None or not hasattr(t, "load_for"):
            return
        step = self.config.max_tokens
        with cupy.cuda.Device(self._device):
            for n in {min(tokens, step), tokens % step} - {0}:
                t.load_for(weight_dtype, n)

    def synchronize(self, *results):
        """Wait for `results` (jax.Arrays, e.g. the outputs of a jitted function) and for
        this object's work on the device; raise the typed error of a failed call, if any."""
        import jax
        try:
            jax.block_until_ready(results)
        except Exception as e:  # noqa: BLE001 - XLA's error of a failed call
            err = self._take_error()
            if err is not None:
                raise err from e
            raise
        if self._device is not None:
            import cupy
            with cupy.cuda.Device(self._device):
                cupy.cuda.runtime.deviceSynchronize()
        err = self._take_error()
        if err is not None:
            raise err
        if self.norm is None:
            raise ClosedError("this JaxQKNorm is closed")
        self.norm._check_usable()

    @contextlib.contextmanager
    def errors(self):
        """Raise the typed error of a failed call instead of XLA's runtime error:
        `with qk.errors(): out = step(x)` (JAX raises a call's failure where the jitted
        function runs or where its result is awaited)."""
        try:
            yield
        except Exception as e:
            err = self._take_error()
            if err is not None and err is not e:
                raise err from e
            raise

    def _take_error(self):
        err, self._error = self._error, None
        return err

    def close(self):
        """Collective and idempotent (TPQKNorm.close). Jitted functions that call the
        object raise ClosedError afterwards."""
        norm, self.norm = self.norm, None
        self._bound = {}
        if norm is not None:
            norm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"JaxQKNorm(backend={self.backend!r}, {self.norm!r})"

    # -- execution (XLA's handler) ---------------------------------------------------------
    def _execute(self, frame, attrs):
        self.executions += 1
        try:
            args, rets = xla_ffi.args(frame), xla_ffi.rets(frame)
            tag = attrs.get("tag", -1)
            key = (tuple(args), tuple(rets), tuple(attrs.items()))
            stream = None
            if self._device is not None:
                stream = self._stream(xla_ffi.stream(frame))
                if self._runtime.streamIsCapturing(stream.ptr):
                    self.captured_calls += 1
            bound = self._bound.get(key)
            if bound is None:
                bound = self._bind(args, rets, None if tag < 0 else tag, stream, attrs)
                if len(self._bound) >= MAX_BOUND:
                    self._bound.clear()
                self._bound[key] = bound
            bound(stream)
        except Exception as e:
            self._error = e
            self._bound = {}
            raise

    def _bind(self, args, rets, tag, stream, attrs):
        norm = self.norm
        if norm is None:
            raise ClosedError("this JaxQKNorm is closed")
        view = self._host_view if self._device is None else self._device_view
        views = [view(a) for a in args]
        q, k, qw, kw = views[:4]
        outs = [view(r) for r in rets]
        at = 4 if self.config.rope is None else 5
        positions = views[4] if at == 5 else None
        flags = attrs.get("kv", 0)
        try:
            if not flags & KV:
                return norm.bind(q, k, qw, kw, out=tuple(outs), positions=positions, tag=tag)
            # operands: ..., v, k_cache, v_cache, slot_mapping[, k_scale][, v_scale];
            # results: q_out[, k_out], k_cache, v_cache (the caches' own buffers, aliased)
            v, slots = views[at], views[at + 3]
            scales, i = [], at + 4
            for name, bit in (("k_scale", KV_K_SCALE_ARRAY), ("v_scale", KV_V_SCALE_ARRAY)):
                if flags & bit:
                    scales.append(views[i])
                    i += 1
                else:
                    scales.append(attrs.get(name, 1.0))
            store_k = bool(flags & KV_STORE_K)
            out = (outs[0], outs[1] if store_k else k)  # k as it was: not written
            bound = norm.bind(q, k, qw, kw, out=out, positions=positions, tag=tag, v=v,
                              k_cache=outs[-2], v_cache=outs[-1], slot_mapping=slots,
                              k_scale=scales[0], v_scale=scales[1], store_k=store_k)
            # XLA may hand a cache result that is not the operand's buffer (under lax.scan
            # it slices the stacked caches straight into the call): the result is then the
            # cache as passed, copied first, with the tokens' rows written over it
            moved = [(rets[r], args[a]) for r, a in ((-2, at + 1), (-1, at + 2))
                     if rets[r].ptr != args[a].ptr]
            return bound if not moved else self._copying(moved, bound)
        except Exception as e:  # noqa: BLE001 - re-raised once the peers know
            norm._refuse(q, tag, e, stream if stream is not None else norm._current_stream())
            raise

    def _copying(self, moved, bound):
        """`bound`, after copying each (result, operand) cache pair's operand into its
        result, on the call's stream (a device copy; on the host a numpy copy)."""
        def call(stream):
            for dst, src in moved:
                n = int(np.prod(src.shape, dtype=np.int64)) * src.dtype.itemsize
                if stream is None:
                    np.copyto(xla_ffi.host_array(dst), xla_ffi.host_array(src))
                else:
                    self._runtime.memcpyAsync(dst.ptr, src.ptr, n,
                                              self._runtime.memcpyDeviceToDevice, stream.ptr)
                self.cache_copies += 1
            bound(stream)
        return call

    @staticmethod
    def _host_view(a):
        if a.dtype is None:
            raise TypeError(f"an operand's dtype is not one of {OPERAND_DTYPES}")
        return xla_ffi.host_array(a)

    def _device_view(self, a):
        import cupy
        if a.dtype is None:
            raise TypeError(f"an operand's dtype is not one of {OPERAND_DTYPES}")
        n = int(np.prod(a.shape, dtype=np.int64)) * a.dtype.itemsize
        if n == 0 or not a.ptr:
            return cupy.ndarray(a.shape, a.dtype)
        mem = cupy.cuda.UnownedMemory(a.ptr, n, self._views, self._device)
        return cupy.ndarray(a.shape, a.dtype, cupy.cuda.MemoryPointer(mem, 0))

    _views = object()  # the owner CuPy's views of XLA's buffers name (XLA owns them)

    def _stream(self, ptr):
        """XLA's stream as a CuPy stream, with this object's device current on the thread
        XLA calls from (the kernels are launched through the driver on the current
        context)."""
        if not getattr(self._thread, "ready", False):
            import cupy
            cupy.cuda.runtime.setDevice(self._device)
            self._thread.ready = True
        s = self._streams.get(ptr)
        if s is None:
            import cupy
            with warnings.catch_warnings():  # CuPy 14 deprecates it for from_external()
                warnings.simplefilter("ignore", DeprecationWarning)
                s = self._streams[ptr] = cupy.cuda.ExternalStream(ptr, self._device)
        return s


OPERAND_DTYPES = ("bfloat16, float16, float32, int32, int64, uint8, uint16, "
                  "float8_e4m3fn")


def _real(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, numbers.Real)


def _operand(x, role) -> arrays.Operand:
    """What tracing knows of a jax array (or tracer): shape and dtype, row-major."""
    try:
        shape, dt = tuple(int(d) for d in x.shape), np.dtype(x.dtype)
    except (AttributeError, TypeError) as e:
        raise TypeError(f"{role}: expected a jax array, got {type(x).__name__}") from e
    strides, acc = [], dt.itemsize
    for d in reversed(shape):
        strides.insert(0, acc)
        acc *= max(d, 1)
    return arrays.Operand(x, 0, shape, tuple(strides), arrays.dtype_name(dt), dt.itemsize,
                          None)


def check_avals(cfg, q, k, q_weight, k_weight, positions) -> None:
    """TPQKNorm's checks of a call's shapes and dtypes, on what tracing knows (XLA's
    buffers are row-major and aligned; their addresses are checked at the call)."""
    ops = [_operand(x, role) for x, role in ((q, "q"), (k, "k"), (q_weight, "q_weight"),
                                             (k_weight, "k_weight"))]
    arrays.check_rows(ops[0], "q", cfg.q_local, cfg.dtype)
    arrays.check_rows(ops[1], "k", cfg.k_local, cfg.dtype)
    arrays.check_weights(ops[2], ops[3], cfg.q_local, cfg.k_local, cfg.dtype)
    tokens = ops[0].shape[0]
    arrays.check_call_tokens(tokens)
    if ops[1].shape[0] != tokens:
        raise ValueError(f"k has {ops[1].shape[0]} rows but q has {tokens}")
    if cfg.rope is not None:
        if positions is None:
            raise TypeError("this object applies RoPE: pass positions=[T] int32 or int64")
        arrays.check_positions(_operand(positions, "positions"), tokens)
    elif positions is not None:
        raise TypeError("positions given, but this object was built without rope=")


def _stand_in(x, role) -> np.ndarray:
    """A numpy array of x's shape and dtype with row-major strides, all of whose elements
    are one aligned element: what the cache checks read of an XLA buffer at trace time
    (its shape, dtype and row-major layout; XLA's buffers are aligned)."""
    op = _operand(x, role)
    dt = np.dtype(x.dtype)
    base = np.zeros(64 + dt.itemsize, np.uint8)
    at = -base.ctypes.data % 64
    one = base[at:at + dt.itemsize].view(dt)
    return np.lib.stride_tricks.as_strided(one, op.shape, op.strides, writeable=True)


def check_cache_avals(cfg, tokens, v, k_cache, v_cache, slot_mapping, k_scale, v_scale,
                      store_k) -> None:
    """TPQKNorm's checks of a call's KV cache arguments, on what tracing knows; nothing
    where the object has no kv_cache and none is given."""
    if not check_cache_arguments(cfg, v, k_cache, v_cache, slot_mapping, k_scale, v_scale,
                                 store_k):
        return
    check_value_rows(_operand(v, "v"), cfg, tokens)
    heads = cfg.kv.kv_heads(cfg.k_local)
    kc = cache_view(_stand_in(k_cache, "k_cache"), "k_cache", cfg.kv, heads, cfg.dtype)
    vc = cache_view(_stand_in(v_cache, "v_cache"), "v_cache", cfg.kv, heads, cfg.dtype)
    check_cache_pair(kc, vc)
    slot_view(_stand_in(slot_mapping, "slot_mapping"), tokens)
    for x, role in ((k_scale, "k_scale"), (v_scale, "v_scale")):
        if x is None or _real(x):
            scale_arg(x, role)
            continue
        try:
            op = _operand(x, role)
        except TypeError as e:
            raise ValueError(f"{role}: must be a number > 0 or an fp32 scalar array, got "
                             f"{type(x).__name__}") from e
        if op.dtype != "float32" or op.shape not in ((), (1,)):
            raise ValueError(f"{role}: an array scale must be float32 of shape () or (1,), "
                             f"got {np.dtype(x.dtype).name} {list(op.shape)}")
