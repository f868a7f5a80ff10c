"""TPQKNorm: validates, picks a transport, launches."""
from __future__ import annotations

import math
import numbers
import warnings
import weakref
from dataclasses import dataclass
from typing import NamedTuple

from . import arrays
from .collectives import agree
from .errors import ClosedError, ConfigMismatchError, QKNormError, TransportUnavailableError
from .kvcache import CACHE_FP8, KVCache, cache_view, scale_arg, slot_view
from .placement import choose_transport, local_facts
from .rope import RoPE, check as check_rope
from .shapes import DTYPES, MAX_WORLD, kv_layout, positive_int, vector_elems
from .transports import Call, open_transport, tag_code
from .transports.base import CacheCall

TRANSPORTS = ("auto", "ipc", "nccl", "mpi")
MAX_CACHED_CALLS = 1024  # array sets whose validation is remembered per object


@dataclass(frozen=True)
class Config:
    q_dim: int
    k_dim: int
    dtype: str
    eps: float
    max_tokens: int
    timeout_ns: int      # 0: wait forever
    world: int
    rank: int
    rope: RoPE | None = None
    kv_heads: int | None = None   # k's heads, where given (then head_dim too)
    head_dim: int | None = None
    kv: KVCache | None = None

    @property
    def q_local(self):
        return self.q_dim // self.world

    @property
    def k_replicas(self) -> int:
        """Ranks that hold each k head: world / kv_heads where the KV heads are fewer than
        the ranks (replicated), else 1."""
        if self.kv_heads is None or self.kv_heads >= self.world:
            return 1
        return self.world // self.kv_heads

    @property
    def k_local(self):
        return self.head_dim if self.k_replicas > 1 else self.k_dim // self.world

    @property
    def k_counted(self) -> bool:
        """Whether this rank's k partial counts in the full row's sum: the first rank of
        each replica group does (rank r holds head r * kv_heads // world)."""
        return self.rank % self.k_replicas == 0

    def shared(self):
        """What every rank must agree on."""
        rope = None if self.rope is None else (
            self.rope.head_dim, self.rope.rotary_dim, self.rope.style, self.rope.rows(),
            None if self.rope.table is not None else float(self.rope.theta))
        kv = None if self.kv is None else (self.kv.block_size, self.kv.head_dim,
                                           self.kv.cache_dtype(self.dtype))
        return (self.q_dim, self.k_dim, self.dtype, self.eps, self.max_tokens,
                self.timeout_ns, self.world, rope, self.kv_heads, self.head_dim) + (
                    (kv,) if kv is not None else ())


def _int(name, v, low, high=None):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {v!r}")
    if v < low or (high is not None and v > high):
        raise ValueError(f"{name} must be an int in {low}..{high if high else 'inf'}, "
                         f"got {v!r}")
    return int(v)


def _real(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Real)


def check_heads(q_dim, k_dim, world, kv_heads, head_dim, rope=None):
    """Raise ValueError where k's heads neither split evenly over the ranks nor replicate
    evenly (or q's heads do not split evenly). Returns (kv_heads, head_dim, k_local)."""
    kv_heads = positive_int("kv_heads", kv_heads)
    if head_dim is None and isinstance(rope, RoPE):
        head_dim = rope.head_dim
    if head_dim is None:
        raise ValueError("kv_heads needs head_dim (the width of one head)")
    head_dim = positive_int("head_dim", head_dim)
    if isinstance(rope, RoPE) and rope.head_dim != head_dim:
        raise ValueError(f"head_dim={head_dim} but rope.head_dim={rope.head_dim}")
    if k_dim != kv_heads * head_dim:
        raise ValueError(f"k_dim={k_dim} must be kv_heads * head_dim = {kv_heads} * {head_dim} "
                         f"(every distinct KV head once)")
    if q_dim % head_dim or (q_dim // head_dim) % world:
        raise ValueError(f"q_dim={q_dim} is {q_dim / head_dim:g} heads of {head_dim}, which do "
                         f"not split evenly over {world} ranks")
    layout = kv_layout(world, kv_heads)
    if not layout:
        raise ValueError(f"{kv_heads} KV heads neither split evenly over {world} ranks nor "
                         f"replicate evenly on them (G must divide {kv_heads} or be a "
                         f"multiple of it)")
    return kv_heads, head_dim, head_dim if layout == "replicated" else k_dim // world


def check_config(q_dim, k_dim, dtype, eps, max_tokens, timeout_s, world, rope=None,
                 kv_heads=None, head_dim=None, kv_cache=None):
    """Raise TypeError/ValueError for a bad configuration. Pure: no GPU, no MPI.
    Returns (q_dim, k_dim, eps, max_tokens, timeout_ns, kv_heads, head_dim) as plain Python
    numbers (kv_heads and head_dim None where kv_heads is not given)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if not 1 <= world <= MAX_WORLD:
        raise ValueError(f"the communicator has {world} ranks; 1..{MAX_WORLD} are supported")
    n = vector_elems(dtype)
    dims = [positive_int("q_dim", q_dim), positive_int("k_dim", k_dim)]
    k_local = None
    if kv_heads is not None:
        kv_heads, head_dim, k_local = check_heads(*dims, world, kv_heads, head_dim, rope)
    elif head_dim is not None:
        raise ValueError("head_dim is given without kv_heads")
    for name, d in (("q_dim", dims[0]), ("k_dim", dims[1])):
        if name == "k_dim" and k_local is not None and k_local * world != d:
            if k_local % n:
                raise ValueError(f"head_dim={k_local} must be a multiple of {n} elements "
                                 f"({dtype}: 16-byte vectors)")
            continue  # replicated: one head a rank
        if d % world or (d // world) % n:
            raise ValueError(
                f"{name}={d} must split over {world} ranks into slices that are multiples of "
                f"{n} elements ({dtype}: 16-byte vectors); {d}/{world} = {d / world:g}")
    max_tokens = _int("max_tokens", max_tokens, 1, 1 << 24)
    if not (_real(eps) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if timeout_s is None:
        timeout_ns = 0
    elif _real(timeout_s) and math.isfinite(timeout_s) and timeout_s > 0:
        timeout_ns = max(1, int(timeout_s * 1e9))
    else:
        raise ValueError(f"timeout_s must be a finite number of seconds > 0, or None to "
                         f"wait forever; got {timeout_s!r}")
    if rope is not None:  # replicated k: one head a rank, as if G heads
        check_rope(rope, dtype, world, dims[0], dims[1] if k_local is None else k_local * world)
    if kv_cache is not None:
        if not isinstance(kv_cache, KVCache):
            raise TypeError(f"kv_cache must be a cupy_qknorm.KVCache, got "
                            f"{type(kv_cache).__name__}")
        for what, d in (("head_dim", head_dim), ("rope.head_dim",
                                                 rope.head_dim if rope is not None else None)):
            if d is not None and kv_cache.head_dim != d:
                raise ValueError(f"kv_cache: head_dim={kv_cache.head_dim} but {what}={d} "
                                 f"(a cache row is one head)")
        kv_cache.kv_heads(dims[1] // world if k_local is None else k_local)
        if kv_cache.cache_dtype(dtype) not in (dtype, CACHE_FP8):
            raise ValueError(f"kv_cache: a cache holds the data's dtype ({dtype}) or "
                             f"{CACHE_FP8}, got {kv_cache.cache_dtype(dtype)}")
        if kv_cache.head_dim % n:
            raise ValueError(f"kv_cache: head_dim={kv_cache.head_dim} must be a multiple of "
                             f"{n} elements ({dtype}: 16-byte vectors)")
    return dims[0], dims[1], float(eps), max_tokens, timeout_ns, kv_heads, head_dim


KV_ARGUMENTS = "v=, k_cache=, v_cache=, slot_mapping=, k_scale=, v_scale=, store_k="


def check_cache_arguments(cfg, v, k_cache, v_cache, slot_mapping, k_scale, v_scale,
                          store_k) -> bool:
    """Whether a call writes the KV cache: TypeError, one line, where its cache arguments do
    not fit the object `cfg` describes (given without kv_cache=, one of v, k_cache, v_cache,
    slot_mapping missing, store_k not a bool)."""
    if cfg.kv is None:
        if any(a is not None for a in (v, k_cache, v_cache, slot_mapping, k_scale,
                                       v_scale)) or store_k is not True:
            raise TypeError(f"KV cache arguments given ({KV_ARGUMENTS}), but this object "
                            f"was built without kv_cache=")
        return False
    missing = [n for n, a in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache),
                              ("slot_mapping", slot_mapping)) if a is None]
    if missing:
        names = ", ".join(m + "=" for m in missing)
        raise TypeError(f"this object writes a KV cache: pass {names} (v=, k_cache=, "
                        f"v_cache= and slot_mapping= on every call)")
    if type(store_k) is not bool:
        raise TypeError(f"store_k must be True or False, got {store_k!r}")
    return True


def check_value_rows(vop, cfg, tokens):
    """v's operand: rows of k's local width and the data dtype, one per token."""
    arrays.check_rows(vop, "v", cfg.k_local, cfg.dtype)
    if vop.shape[0] != tokens:
        raise ValueError(f"v has {vop.shape[0]} rows but q has {tokens}")


def check_cache_pair(kc, vc):
    """k_cache's and v_cache's views (kvcache.CacheView): the same blocks and strides, and
    slots and a row's heads that the kernels' 32-bit indices reach."""
    if (kc.num_blocks, kc.strides) != (vc.num_blocks, vc.strides):
        raise ValueError(f"v_cache must have k_cache's blocks and strides: k_cache has "
                         f"{kc.num_blocks} blocks, strides {kc.strides}; v_cache "
                         f"{vc.num_blocks}, {vc.strides}")
    if kc.slots >= 2 ** 31 or (kc.heads - 1) * kc.strides[2] + kc.head_dim >= 2 ** 31:
        raise ValueError(f"k_cache: {kc.slots} slots and a head stride of "
                         f"{kc.strides[2]}: the kernels index slots and a row's heads "
                         f"with 32-bit integers (below 2^31)")


class TPQKNorm:
    """Tensor-parallel RMSNorm of q and k over the full rows:

        q_out = q * q_weight / sqrt(sum over ranks of sum(q^2) / q_dim + eps)   (same for k)

    then, with `rope`, the rotary embedding of every head (cupy_qknorm.RoPE). One MPI rank
    per GPU; rank r of `comm` holds columns [r*q_dim/G, (r+1)*q_dim/G) of every row of q
    (and likewise of k and of both weights). Accumulation is fp32 and the result is
    rounded once to `dtype`.

    `kv_heads` (with `head_dim`, or rope's) says how many heads k has (k_dim = kv_heads *
    head_dim): they split evenly (kv_heads a multiple of G), or, where G is a multiple of
    kv_heads, they are replicated: rank r holds head r * kv_heads // G and its weight
    slice, and the k norm's sum counts each distinct head once. Any other layout is
    refused with one line on every rank. `TPQKNorm.for_model` builds one from a preset.

    Collective contract: every rank of `comm` constructs the object with the same
    arguments, makes the same calls in the same order with the same T (and tag, where
    given), and closes it. A call whose T, tag or refusal differs between ranks raises
    CallMismatchError on the ranks that see it; calls that pair off in the wrong order
    with the same T cannot be told apart, unless each carries a `tag` (an int such as the
    layer index): then a rank that skipped or repeated a call raises CallMismatchError
    naming both tags instead of mixing two calls. Calls are asynchronous on the current
    CuPy stream (or `stream`) and can be captured in a CUDA graph (except with transport
    "mpi"); they make no MPI call (except transport "mpi"). `timeout_s` bounds every wait
    for a peer (None: wait forever). An error a call raises or leaves pending closes the
    object for use on every rank (ClosedError), except a refused input at G=1; close()
    still works.
    """

    def __init__(self, comm, q_dim: int, k_dim: int, dtype: str = "bfloat16",
                 eps: float = 1e-6, max_tokens: int = 8192, *, transport: str = "auto",
                 timeout_s: float | None = 5.0, rope: RoPE | None = None,
                 kv_heads: int | None = None, head_dim: int | None = None,
                 kv_cache: KVCache | None = None):
        self._transport = None
        self._closed = True
        self._calls = {}
        self._validations = 0
        self._current_stream = _no_stream
        self._device = None
        self._error = _NO_ERROR  # the transport's host-visible error word (fast path)
        self._kv = kv_cache is not None
        self.comm = comm
        world, rank = comm.Get_size(), comm.Get_rank()
        error, checked = None, None
        try:
            if transport not in TRANSPORTS:
                raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
            checked = check_config(q_dim, k_dim, dtype, eps, max_tokens, timeout_s, world,
                                   rope, kv_heads, head_dim, kv_cache)
        except (TypeError, ValueError) as e:
            error = str(e)
        agree(comm, error, ValueError)
        q_dim, k_dim, eps, max_tokens, timeout_ns, kv_heads, head_dim = checked
        self.config = Config(q_dim, k_dim, dtype, eps, max_tokens, timeout_ns, world, rank,
                             rope, kv_heads, head_dim, kv_cache)
        configs = comm.allgather((self.config.shared(), transport))
        if len(set(configs)) > 1:
            lines = "; ".join(f"rank {r}: (q_dim, k_dim, dtype, eps, max_tokens, timeout_ns, "
                              f"world, rope, kv_heads, head_dim[, kv_cache]) = {c[0]}, "
                              f"transport={c[1]!r}"
                              for r, c in enumerate(configs))
            raise ConfigMismatchError(f"ranks disagree on the configuration: {lines}")
        facts = comm.allgather(local_facts())
        name, reason = choose_transport(transport, facts)
        if name is None:
            raise TransportUnavailableError(f"transport {transport!r}: {reason}")
        mine = facts[rank]
        if mine.gpu:
            import cupy
            self._device = mine.device
            self._current_stream = cupy.cuda.get_current_stream
        # the object's own communicator: a request a fault leaves pending on it can never
        # match a later collective of the caller's
        self._comm = comm.Dup()
        try:
            self._transport = open_transport(name, transport, self.config, self._comm,
                                             mine.gpu)
        except BaseException:
            self._comm.Free()
            raise
        self.transport = self._transport.name
        self._error = self._transport.error
        self._closed = False

    @classmethod
    def for_model(cls, name: str, comm, max_tokens: int = 8192, *, dtype: str = "bfloat16",
                  transport: str = "auto", timeout_s: float | None = 5.0, rope: bool = True,
                  kv_cache: KVCache | None = None):
        """The norm of the model preset `name` (cupy_qknorm.models.MODELS: its widths, KV
        heads, head_dim, eps and RoPE) at this communicator's G. Rank r passes its slices:
        q [T, q_heads * head_dim / G], k [T, k_local] (whole KV heads split evenly, or the
        head r * kv_heads // G where the KV heads are fewer than the ranks) and the same
        slices of both weights. `rope=False` leaves the model's RoPE out (the norm alone);
        `kv_cache` as TPQKNorm's (its head_dim the model's). A G the model's heads do not fit raises ValueError, one line, on every rank alike
        (nothing is allocated)."""
        from .models import get
        model = get(name)
        world = comm.Get_size()
        if not model.layout(world):
            raise ValueError(model.refusal(world))
        return cls(comm, model.q_dim, model.k_dim, dtype, model.eps, max_tokens,
                   transport=transport, timeout_s=timeout_s,
                   rope=model.rope if rope else None, kv_heads=model.kv_heads,
                   head_dim=model.head_dim, kv_cache=kv_cache)

    @property
    def capturable(self) -> bool:
        """Whether calls of this object may be captured in a CUDA graph ("ipc" and "nccl";
        "mpi" brings the sums to the host, and says so at the capture)."""
        return self._transport is not None and self._transport.capturable

    # ------------------------------------------------------------------------------------
    def __call__(self, q, k, q_weight, k_weight, *, out=None, positions=None, stream=None,
                 tag=None, v=None, k_cache=None, v_cache=None, slot_mapping=None,
                 k_scale=None, v_scale=None, store_k=True):
        """Normalize q [T, q_dim/G] and k [T, k_dim/G] (in place, or into out=(q2, k2));
        with RoPE, then rotate by `positions` ([T] int32 or int64). `tag`: an int in
        0..32766 that every rank passes alike for this call (e.g. the layer index), or None.

        With kv_cache= at construction, every call also writes the paged KV cache: token t's
        k row (as stored: after norm and RoPE) and its row of `v` [T, k_local] go to slot
        slot_mapping[t] ([T] int32 or int64; -1: none) of `k_cache` and `v_cache` ([blocks,
        block_size, kv heads, head_dim] of any strides, or [slots, kv heads, head_dim] for
        block_size 1), converted to the cache's dtype (FP8: value / k_scale or v_scale, a
        float or an fp32 device scalar). store_k=False leaves k's output unwritten.

        Returns the output pair. Raises TypeError/ValueError before anything is launched
        for bad input, and the error of this call or an earlier one (PeerTimeoutError,
        CallMismatchError, PositionError, SlotError) if one failed."""
        if self._kv or v is not None or k_cache is not None or v_cache is not None or \
                slot_mapping is not None or k_scale is not None or v_scale is not None or \
                store_k is not True:
            return self._call_cache(q, k, q_weight, k_weight, out, positions, stream, tag,
                                    (v, k_cache, v_cache, slot_mapping, k_scale, v_scale,
                                     store_k))
        # Fast path: the same CuPy array objects and tag as an earlier call. What
        # validation read can change on a live CuPy array only through its shape (strides,
        # dtype and data are read-only): the 2-D arrays' shapes are compared, and for the
        # 1-D ones (weights, positions) that they are still 1-D, which fixes their shape
        # since a reshape in place keeps the size. out=(q, k) is the in-place call. A dead
        # array drops its entry, and close() or a failure drops them all. An out= that is
        # not a pair, or anything not cached, takes the slow path, which says what is wrong.
        qo = ko = entry = None
        if out is not None and isinstance(out, (tuple, list)) and len(out) == 2:
            qo, ko = out
        if tag is not None and type(tag) is not int:
            pass  # validated on the slow path: it says what is wrong with it
        elif out is None or (qo is q and ko is k):
            e = self._calls.get((id(q), id(k), id(q_weight), id(k_weight), id(positions), tag))
            if e is not None and e.shapes == (q.shape, k.shape):
                entry, qo, ko = e, q, k
        elif qo is not None:
            e = self._calls.get((id(q), id(k), id(q_weight), id(k_weight), id(positions), tag,
                                 id(qo), id(ko)))
            if e is not None and e.shapes == (q.shape, k.shape, qo.shape, ko.shape):
                entry = e
        if entry is not None and q_weight.ndim == 1 and k_weight.ndim == 1 and \
                (positions is None or positions.ndim == 1) and not self._error[0]:
            try:
                entry.go(stream if stream is not None else self._current_stream())
            except QKNormError:
                self._close_for_use()
                raise
            return qo, ko
        return self._call_slow(q, k, q_weight, k_weight, out, positions, stream, tag)

    def _call_cache(self, q, k, q_weight, k_weight, out, positions, stream, tag, kv):
        """A call with the KV cache's arguments `kv` (v, k_cache, v_cache, slot_mapping,
        k_scale, v_scale, store_k): the fast path keyed by them too, else the slow one."""
        qo = ko = None
        if out is not None and isinstance(out, (tuple, list)) and len(out) == 2:
            qo, ko = out
        if (tag is None or type(tag) is int) and (out is None or qo is not None) and \
                not self._error[0]:
            in_place = out is None or (qo is q and ko is k)
            key = _cache_key(q, k, q_weight, k_weight, positions, tag, kv,
                             () if in_place else (qo, ko))
            e = self._calls.get(key) if key is not None else None
            if e is not None and e.shapes == _cache_shapes(q, k, kv, () if in_place
                                                           else (qo, ko)) and \
                    q_weight.ndim == 1 and k_weight.ndim == 1 and \
                    (positions is None or positions.ndim == 1):
                try:
                    e.go(stream if stream is not None else self._current_stream())
                except QKNormError:
                    self._close_for_use()
                    raise
                return (q, k) if in_place else (qo, ko)
        return self._call_slow(q, k, q_weight, k_weight, out, positions, stream, tag, kv)

    def _call_slow(self, q, k, q_weight, k_weight, out, positions, stream, tag, kv=None):
        self._check_usable()
        stream = stream if stream is not None else self._current_stream()
        try:
            qo, ko = (q, k) if out is None else _pair(out)
            arrs = (q, k, q_weight, k_weight, qo, ko, positions)
            call = self._validate(*arrs, tag, kv=kv)
            go = self._transport.bind(call) if call.tokens else None
        except Exception as e:  # noqa: BLE001 - re-raised once the peers know
            self._refuse(q, tag, e, stream)
            raise
        if go is not None:
            self._remember(arrs, tag, go, kv)
            self._run(go, stream)
        return qo, ko

    def _run(self, go, stream):
        try:
            go(stream)
        except QKNormError:
            self._close_for_use()
            raise

    def _refuse(self, q, tag, error, stream):
        """This rank refused its input of a call its peers make (or could not launch it).
        With peers the call is broken for every rank: tell them at once, through the
        transport, and close for use. Alone, nothing was launched: the object stays usable."""
        if self.config.world == 1:
            return
        self._close_for_use()
        try:
            code = tag_code(tag)
        except ValueError:
            code = 0
        shape = getattr(q, "shape", None)
        rows = shape[0] if isinstance(shape, tuple) and shape else 0
        why = self._transport.refuse(rows, code, f"{type(error).__name__}: {error}", stream)
        if why is not None:
            warnings.warn(f"cupy_qknorm: rank {self.config.rank} could not tell its peers that "
                          f"it refused its input ({why}); they raise PeerTimeoutError after "
                          f"timeout_s", RuntimeWarning, stacklevel=4)

    def _remember(self, arrs, tag, go, kv=None):
        """Cache a validated call of CuPy arrays, keyed by the arrays' identity and the tag
        (as __call__ looks it up: without the outputs for a call in place), and with a KV
        cache by its arguments (_cache_key)."""
        if self._device is None or not (tag is None or type(tag) is int):
            return
        import cupy
        if not all(type(a) is cupy.ndarray for a in arrs[:6]) or \
                not (arrs[6] is None or type(arrs[6]) is cupy.ndarray):
            return
        q, k, qw, kw, qo, ko, pos = arrs
        outs = () if (qo is q and ko is k) else (qo, ko)
        if kv is not None:
            if not all(type(a) is cupy.ndarray for a in kv[:4]) or \
                    not all(a is None or type(a) is cupy.ndarray or _real(a) for a in kv[4:6]):
                return
            key = _cache_key(q, k, qw, kw, pos, tag, kv, outs)
            shapes = _cache_shapes(q, k, kv, outs)
            arrs = arrs + tuple(a for a in kv[:6] if type(a) is cupy.ndarray)
        else:
            key = (id(q), id(k), id(qw), id(kw), id(pos), tag)
            shapes = (q.shape, k.shape)
            if outs:
                key += (id(qo), id(ko))
                shapes += (qo.shape, ko.shape)
        if len(self._calls) >= MAX_CACHED_CALLS:
            self._calls.clear()
        owner = weakref.ref(self)

        def forget(_, key=key):
            o = owner()
            if o is not None:
                o._calls.pop(key, None)
        self._calls[key] = CachedCall(go, shapes, tuple(weakref.ref(a, forget) for a in arrs
                                                        if a is not None))

    def bind(self, q, k, q_weight, k_weight, *, out=None, positions=None, tag=None, v=None,
             k_cache=None, v_cache=None, slot_mapping=None, k_scale=None, v_scale=None,
             store_k=True):
        """Validate these arrays once; return a BoundCall that normalizes them on each
        call with no validation at all: `call(stream=None)` -> (q_out, k_out). The least
        host time per eager call, for pipelines that reuse their buffers. The call holds
        the arrays; they must keep their shapes (no in-place reshape) and the same
        contract holds as for __call__ (every rank calls, same T, same tag). The KV
        cache's arguments as __call__'s: the contents of slot_mapping, positions and
        device scalar scales are read at each call (a CUDA graph replay too)."""
        self._check_usable()
        qo, ko = (q, k) if out is None else _pair(out)
        arrs = (q, k, q_weight, k_weight, qo, ko, positions)
        kv = (v, k_cache, v_cache, slot_mapping, k_scale, v_scale, store_k)
        call = self._validate(*arrs, tag, kv=kv)
        go = self._transport.bind(call) if call.tokens else _no_tokens
        return BoundCall(self, go, arrs + ((kv,) if call.cache is not None else ()))

    def _validate(self, q, k, q_weight, k_weight, qo, ko, positions, tag=None,
                  kv=None) -> Call:
        self._validations += 1
        cfg = self.config
        code = tag_code(tag)
        dq, dk = cfg.q_local, cfg.k_local
        ops = [arrays.describe(x, role) for x, role in (
            (q, "q"), (k, "k"), (q_weight, "q_weight"), (k_weight, "k_weight"),
            (qo, "out[0]"), (ko, "out[1]"))]
        for op, role, width in ((ops[0], "q", dq), (ops[1], "k", dk),
                                (ops[4], "out[0]", dq), (ops[5], "out[1]", dk)):
            arrays.check_rows(op, role, width, cfg.dtype)
        for op, role in ((ops[4], "out[0]" if qo is not q else "q (in place)"),
                         (ops[5], "out[1]" if ko is not k else "k (in place)")):
            if not op.writable:
                raise ValueError(f"{role}: the array is read-only")
        arrays.check_weights(ops[2], ops[3], dq, dk, cfg.dtype)
        tokens = ops[0].shape[0]
        arrays.check_call_tokens(tokens)
        for op, role in ((ops[1], "k"), (ops[4], "out[0]"), (ops[5], "out[1]")):
            if op.shape[0] != tokens:
                raise ValueError(f"{role} has {op.shape[0]} rows but q has {tokens}")
        pos = None
        if cfg.rope is not None:
            if positions is None:
                raise TypeError("this object applies RoPE: pass positions=[T] int32 or int64")
            pos = arrays.describe(positions, "positions")
            arrays.check_positions(pos, tokens)
        elif positions is not None:
            raise TypeError("positions given, but this object was built without rope=")
        ops.append(pos)
        _check_overlaps(ops)
        cache, extra = self._validate_cache(kv, ops, tokens)
        where = {op.device for op in ops + extra if op is not None}
        if len(where) > 1:
            raise TypeError(f"all arrays must be on one device; got devices "
                            f"{sorted(where, key=str)} (None = host memory)")
        dev = where.pop()
        if dev is None and not self._transport.host_arrays:
            raise TypeError(f"transport {self.transport!r} needs GPU arrays; numpy arrays "
                            f"run with transport='mpi'")
        if dev is not None and self._device is not None and dev != self._device:
            raise TypeError(f"arrays are on device {dev}, this object on device {self._device}")
        if dev is not None and self._device is None:
            raise TypeError("this object was built without a GPU; pass numpy arrays")
        return Call(tuple(ops), arrays.Plan.of(ops), tuple(arrays.Plan.pointers(ops)), code,
                    cache)

    def _validate_cache(self, kv, ops, tokens):
        """(CacheCall or None, the cache's operands) of a call's KV cache arguments `kv`
        (None: none given); raises TypeError/ValueError, one line, for bad ones."""
        cfg = self.config
        v, k_cache, v_cache, slots, k_scale, v_scale, store_k = kv if kv is not None \
            else (None,) * 6 + (True,)
        if not check_cache_arguments(cfg, v, k_cache, v_cache, slots, k_scale, v_scale,
                                     store_k):
            return None, []
        kv_cfg, width = cfg.kv, cfg.k_local
        vop = arrays.describe(v, "v")
        check_value_rows(vop, cfg, tokens)
        for out, name in ((ops[4], "out[0]"), (ops[5], "out[1]")):
            if arrays.overlap(out, vop):
                raise ValueError(f"{name} overlaps v (outputs may only be their own input "
                                 f"exactly, in place)")
        heads = kv_cfg.kv_heads(width)
        kc = cache_view(k_cache, "k_cache", kv_cfg, heads, cfg.dtype)
        vc = cache_view(v_cache, "v_cache", kv_cfg, heads, cfg.dtype)
        check_cache_pair(kc, vc)
        slot_ptr, slot_bytes = slot_view(slots, tokens)
        ks, ks_at = scale_arg(k_scale, "k_scale")
        vs, vs_at = scale_arg(v_scale, "v_scale")
        scale_ops = [(arrays.describe(x, role), role) for x, role in
                     ((k_scale, "k_scale"), (v_scale, "v_scale"))
                     if x is not None and not _real(x)]
        slot_op = arrays.describe(slots, "slot_mapping")
        extra = [vop, arrays.describe(k_cache, "k_cache"), arrays.describe(v_cache, "v_cache"),
                 slot_op] + [op for op, _ in scale_ops]
        item = kv_cfg.storage_dtype(cfg.dtype).itemsize
        # every other operand (rows, positions, slots, scales) is read while the caches
        # are written: none may share a byte with either cache, nor the caches each other
        others = [(op, name) for op, name in list(zip(ops[:7], OPERAND_NAMES[:7])) +
                  [(vop, "v"), (slot_op, "slot_mapping")] + scale_ops if op is not None]
        spans = []
        for c, role in ((kc, "k_cache"), (vc, "v_cache")):
            end = c.ptr + item * (sum((n - 1) * st for n, st in zip(
                (c.num_blocks, c.block_size, c.heads), c.strides)) + c.head_dim)
            spans.append((c.ptr, end))
            for op, name in others:
                span = arrays.extent(op)
                if span is not None and span[0] < end and c.ptr < span[1]:
                    raise ValueError(f"{role} overlaps {name}")
        if spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]:
            raise ValueError("k_cache and v_cache overlap (each needs its own memory)")
        cache = CacheCall(vop.ptr, arrays.row_stride(vop), kc.ptr, vc.ptr, tuple(kc.strides),
                          slot_ptr, ks_at, vs_at, kc.slots, kc.block_size, slot_bytes, ks, vs,
                          store_k, (v, k_cache, v_cache, slots, k_scale, v_scale), heads,
                          kv_cfg.head_dim, kv_cfg.cache_dtype(cfg.dtype))
        return cache, extra

    def _check_usable(self):
        if self._closed:
            raise ClosedError("this TPQKNorm is closed")
        if self._error[0]:
            self._fail()

    def _fail(self):
        """Raise the error a kernel recorded; the buffers are in an unknown state, so the
        object closes for use."""
        self._close_for_use()
        self._transport.raise_error()

    def _close_for_use(self):
        self._closed = True
        self._calls.clear()

    def synchronize(self, stream=None):
        """Wait for this object's work on `stream` (default: current) and raise any error."""
        if self._device is not None:
            (stream if stream is not None else self._current_stream()).synchronize()
        self._check_usable()

    def close(self):
        """Collective and idempotent: waits for the device and frees every buffer.

        Destroy CUDA graphs that captured calls of this object before closing it: their
        kernels point into its buffers, and with transport "nccl" NCCL's teardown waits
        for such graphs to be destroyed."""
        t, self._transport = self._transport, None
        self._close_for_use()
        self._error = _NO_ERROR
        if t is not None and t.close():
            self._comm.Free()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_transport", None) is not None:
            warnings.warn("TPQKNorm was not closed; call close() on every rank (its buffers "
                          "stay allocated until the process exits)", ResourceWarning)

    def __repr__(self):
        c = self.config
        return (f"TPQKNorm(q_dim={c.q_dim}, k_dim={c.k_dim}, dtype={c.dtype!r}, eps={c.eps}, "
                f"max_tokens={c.max_tokens}, transport={getattr(self, 'transport', None)!r}, "
                f"rope={c.rope!r}, " + (f"kv_heads={c.kv_heads}, head_dim={c.head_dim}, "
                                        if c.kv_heads is not None else "") +
                f"rank={c.rank}/{c.world})")


def _scale_key(x):
    return ("value", float(x)) if _real(x) else id(x)


def _cache_key(q, k, qw, kw, pos, tag, kv, outs):
    """The call cache's key of a call with a KV cache (None where a scale is neither a
    number nor an array)."""
    v, kc, vc, sm, ks, vs, store_k = kv
    if type(store_k) is not bool:
        return None
    return (id(q), id(k), id(qw), id(kw), id(pos), tag, id(v), id(kc), id(vc), id(sm),
            _scale_key(ks), _scale_key(vs), store_k) + tuple(id(o) for o in outs)


def _cache_shapes(q, k, kv, outs):
    v, kc, vc, sm = kv[:4]
    return (q.shape, k.shape, getattr(v, "shape", None), getattr(kc, "shape", None),
            getattr(vc, "shape", None), getattr(sm, "shape", None)) + \
        tuple(o.shape for o in outs)


class CachedCall(NamedTuple):
    """A validated call of CuPy arrays, remembered by TPQKNorm: its launch function, the
    shapes it was validated with (q, k; then q_out, k_out out of place) and weak
    references to its arrays (an entry dies with any of them)."""
    go: object
    shapes: tuple
    arrays: tuple


OPERAND_NAMES = ("q", "k", "q_weight", "k_weight", "out[0]", "out[1]", "positions")


def _check_overlaps(ops):
    """Outputs may be their own inputs exactly (in place), nothing else may overlap them."""
    q, k, qw, kw, qo, ko, pos = ops
    names = OPERAND_NAMES
    for i, out in ((4, qo), (5, ko)):
        for j, other in enumerate(ops):
            if j == i or other is None:
                continue
            if (i, j) in ((4, 0), (5, 1)) and arrays.same_view(out, other):
                continue  # in place
            if arrays.overlap(out, other):
                raise ValueError(f"{names[i]} overlaps {names[j]} (outputs may only be their "
                                 f"own input exactly, in place)")


class BoundCall:
    """TPQKNorm.bind(...)'s result: the same normalization of the same arrays, again."""
    __slots__ = ("_norm", "_go", "arrays")

    def __init__(self, norm, go, arrs):
        self._norm, self._go, self.arrays = norm, go, arrs

    def __call__(self, stream=None):
        norm = self._norm
        if norm._closed:
            raise ClosedError("this TPQKNorm is closed")
        if norm._error[0]:
            norm._fail()
        try:
            self._go(stream if stream is not None else norm._current_stream())
        except QKNormError:
            norm._close_for_use()
            raise
        return self.arrays[4], self.arrays[5]


def _no_tokens(stream):
    """T = 0: nothing is read, written or launched, and no peer is waited for."""


_NO_ERROR = (0,)


def _no_stream():
    """The current stream of an object built without a GPU: there is none."""


def _pair(out):
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("out must be a pair (q_out, k_out)")
    return out
