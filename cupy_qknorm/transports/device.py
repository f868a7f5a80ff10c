"""What the GPU transports share: the kernels of each layout, a call's chunks of at most
max_tokens tokens with their packed launch parameters, the RoPE table, and the error record
the kernels write and the host reads."""
from __future__ import annotations

import ctypes
from typing import NamedTuple

from ..errors import CallMismatchError, PeerTimeoutError
from ..errors import TransportUnavailableError
from ..params import (CACHE, CACHE_OFFSET, ERROR_PEER_POSITION, ERROR_POSITION,
                      ERROR_REJECTED, ERROR_SEQUENCE, ERROR_SLOT, ERROR_TAG, ERROR_TOKENS,
                      ERROR_WORDS, FLAG_K_REPLICA, FLAG_NO_K_STORE, HEAD, PARAMS,
                      pack_static)
from .. import knobs
from ..rope import host_table
from ..shapes import vector_elems
from ..tuning import FP8_MIN_ARCH, Spec, layout_for, read_knobs, wide_from
from .base import Transport, describe_tag, peer_position_error, position_error, slot_error
from .cuda import Cuda

HOST_WORDS = 16  # the error record, then words of the transport's own (nccl's watchdog)
# {cache kind: tokens a launch from which a transport with SPLIT_CACHE writes the KV cache
# by a second launch} (kind 1: the data's dtype, 2: FP8; the knob's defaults)
SPLIT_FROM = {1: knobs.CACHE_SPLIT_FROM["data"], 2: knobs.CACHE_SPLIT_FROM["fp8"]}


class Chunk(NamedTuple):
    """One launch's worth of a call: its rows, and what launches them."""
    tokens: int
    spec: Spec
    grid: int
    params: bytes        # the packed qknorm::Params of this chunk
    go: dict             # {kind: go(stream)} of the kernels a chunk launches


class DeviceTransport(Transport):
    """The common part of "ipc", "nccl" and the GPU arrays of "mpi". A subclass names the
    kernels a chunk launches (KINDS), those launched with programmatic dependent launch
    (PDL_KINDS), and composes a call's chunks into one go(stream) (compose)."""
    KINDS = ("partial_sums", "apply")
    PDL_KINDS = ()
    # whether a long launch may write the KV cache in a second launch (split_from)
    SPLIT_CACHE = False

    def __init__(self, cfg, comm, cuda=None):
        self.cfg, self.comm = cfg, comm
        self.cuda = cuda if cuda is not None else Cuda(f"transport {self.name!r}")
        self.cache_kind = cache_kind(cfg)
        arch = 10 * self.cuda.major + getattr(self.cuda, "minor", 0)
        if self.cache_kind == 2 and arch < FP8_MIN_ARCH:
            raise TransportUnavailableError(
                f"an FP8 KV cache needs sm_{FP8_MIN_ARCH} or newer "
                f"(cvt.rn.satfinite.e4m3x2.f32); this GPU is sm_{arch}")
        self._kernels = {}    # (weight dtype, layout) -> (spec, {kind: Kernel}, grid cap)
        self._static = None   # the packed part of Params that no call changes
        self.slots, self.counters, self.sums = (), 0, 0  # set by subclasses
        # every knob a kernel build, a layout or a buffer depends on, read once: a knob
        # changed later in the process does not reach an object's kernels or buffers
        self.build, self.tuning = knobs.build_values(), read_knobs()
        self.wide_from = wide_from(cfg.world, cfg.rope is not None, self.tuning)
        # tokens a launch from which the KV cache is written by a second launch (a block a
        # token) after the kernels without a cache; None: always by the kernels
        self.split_from = None
        if self.SPLIT_CACHE and self.cache_kind:
            forced = knobs.get("CUPY_QKNORM_CACHE_SPLIT_FROM")
            self.split_from = forced or SPLIT_FROM[self.cache_kind]
        self._writer = None   # (threads, Kernel) of the separate cache write, loaded once
        self._k_scratch = None  # k's rows where the cache is written apart (k_scratch)
        self._launch = self.cuda.launcher(self._pdl())
        self._host = self.cuda.host_mapped(4 * HOST_WORDS)
        self.error = (ctypes.c_int32 * HOST_WORDS).from_address(self._host)
        self._record = self.cuda.zeros(4 * ERROR_WORDS)
        self.table = None if cfg.rope is None else self._device_table(cfg.rope)

    def _pdl(self) -> bool:
        """Whether launches of PDL_KINDS carry programmatic dependent launch."""
        return False

    def _device_table(self, rope):
        """The cos/sin table on this device: the user's CuPy table where it lives here,
        else a copy of the host's."""
        t = rope.table
        if t is not None and getattr(getattr(t, "data", None), "device_id", None) == \
                self.cuda.id and hasattr(t, "__cuda_array_interface__"):
            from .cuda import Buffer
            return Buffer(t.data.ptr, t.nbytes, t)
        return self.cuda.upload(host_table(rope))

    # -- kernels --------------------------------------------------------------------------
    def layout(self, tokens: int) -> str:
        """The fused kernel's layout for a launch of `tokens` tokens."""
        return layout_for(tokens, self.wide_from)

    def spec(self, weight_dtype: str, layout: str = "narrow", cache: bool = True) -> Spec:
        """The spec of a weight dtype and layout; with `cache` False, that of the same
        kernels without the KV cache."""
        c = self.cfg
        kv = (self.cache_kind, c.kv.head_dim) if cache and self.cache_kind else (0, 0)
        return Spec.plan(c.dtype, weight_dtype, c.world, c.q_local, c.k_local, layout, c.rope,
                         self.tuning, kv)

    def writes_cache_apart(self, tokens: int) -> bool:
        """Whether a launch of `tokens` tokens with a KV cache writes it in a second
        launch."""
        return self.split_from is not None and tokens >= self.split_from

    def kernels(self, weight_dtype: str, layout: str = "narrow", cache: bool = True):
        """(spec, {kind: Kernel}, grid cap) of a weight dtype and layout (`cache` False:
        without the KV cache), loaded once."""
        key = (weight_dtype, layout, cache)
        k = self._kernels.get(key)
        if k is None:
            spec = self.spec(weight_dtype, layout, cache)
            loaded = self.cuda.load(spec, self.build)
            k = self._kernels[key] = (spec, loaded, self._grid_cap(spec, loaded))
        return k

    def load_for(self, weight_dtype: str, tokens: int) -> None:
        """Load now the kernels a launch of `tokens` tokens takes (a stream capture may
        not load a module): its layout's, and where the cache is written apart (every
        call of an object with a cache passes one), those without the cache and the
        cache write."""
        apart = self.writes_cache_apart(tokens)
        self.kernels(weight_dtype, self.layout(tokens), not apart)
        if apart:
            self.cache_writer()

    def cache_writer(self):
        """(threads a block, Kernel) of the separate KV-cache write (kernels/tools.cu's
        cache_write: one launch, a block a token), loaded once. Its spec depends on the
        data dtype, k's width and the cache only."""
        if self._writer is None:
            spec = self.spec(self.cfg.dtype)
            self._writer = (spec.cache_threads, self.cuda.load_cache_write(spec, self.build))
        return self._writer

    def _grid_cap(self, spec, loaded) -> int:
        """Blocks of every kernel that are resident on the GPU at once: a block that spins
        on a peer must never wait for another block of its grid to be scheduled."""
        cuda = self.cuda
        per_sm = cuda.threads_per_sm // spec.threads
        for kind, kernel in loaded.items():
            if kind != "reject":
                per_sm = min(per_sm, cuda.blocks_per_sm(kernel, spec.threads))
        return max(1, cuda.sms * max(1, per_sm))

    # -- a call's chunks ------------------------------------------------------------------
    def _static_bytes(self) -> bytes:
        if self._static is None:
            c, table = self.cfg, self.table
            buf = ctypes.create_string_buffer(PARAMS.size)
            pack_static(buf, self.slots, self.counters, self._record.ptr, self._host,
                        self.sums, table.ptr if table is not None else 0, c.timeout_ns,
                        c.max_tokens, c.rank, c.eps, float(c.q_dim), float(c.k_dim),
                        c.rope.rows() if c.rope is not None else 0)
            self._static = buf.raw[HEAD.size:]
        return self._static

    def chunks(self, call, kinds=None, flags=0) -> list:
        """The call cut into launches of at most max_tokens tokens, each with its own packed
        parameters and its kernels (`kinds`, default KINDS) bound to them, the grid fixed.
        A rank whose k head repeats a lower rank's (replicated KV heads) launches with
        FLAG_K_REPLICA: its k partial counts 0. With the default kinds, a chunk that writes
        the KV cache apart (writes_cache_apart) runs the kernels without the cache, then
        "cache_write" (a block a token) on the same Params; its k rows go to the k output,
        or with store_k=False to the transport's scratch rows."""
        plan, (q, k, qw, kw, qo, ko, pos) = call.plan, call.ptrs
        if not self.cfg.k_counted:
            flags |= FLAG_K_REPLICA
        static, step = self._static_bytes(), [s * plan.itemsize for s in plan.strides]
        cache = call.cache
        out = []
        for start in range(0, plan.tokens, self.cfg.max_tokens):
            n = min(self.cfg.max_tokens, plan.tokens - start)
            layout = self.layout(n)
            apart = cache is not None and kinds is None and self.writes_cache_apart(n)
            spec, loaded, cap = self.kernels(plan.weight_dtype, layout, not apart)
            grid = min(n, cap)
            k_out, strides = ko + start * step[3], plan.strides
            if apart and not cache.store_k:  # k's rows, for the cache write only
                k_out, strides = self.k_scratch(), (*plan.strides[:3], self.cfg.k_local)
            extra = FLAG_NO_K_STORE if cache is not None and not cache.store_k and not apart \
                else 0
            params = HEAD.pack(q + start * step[0], k + start * step[1],
                               qo + start * step[2], k_out, qw, kw,
                               *strides, pos + start * plan.position_bytes if pos else 0,
                               n, plan.position_bytes, start, plan.tokens, call.tag,
                               flags | extra) + static
            if cache is not None:
                params = params[:CACHE_OFFSET] + CACHE.pack(*cache.fields(start,
                                                                          plan.itemsize))
            go = {kind: self._launch.bind(loaded[kind], spec.threads, grid, params,
                                          pdl=kind in self.PDL_KINDS)
                  for kind in (self.KINDS if kinds is None else kinds)}
            if apart:
                threads, writer = self.cache_writer()
                go["cache_write"] = self._launch.bind(writer, threads, n, params, pdl=True)
            out.append(Chunk(n, spec, grid, params, go))
        return out

    def k_scratch(self) -> int:
        """Device rows [max_tokens, k width] that hold k's output of a chunk whose cache is
        written apart with store_k=False (the k output is left as it was); allocated at the
        first need (at construction where max_tokens reaches split_from: a call may be
        under graph capture)."""
        if self._k_scratch is None:
            itemsize = 16 // vector_elems(self.cfg.dtype)
            self._k_scratch = self.cuda.zeros(self.cfg.max_tokens * self.cfg.k_local *
                                              itemsize)
        return self._k_scratch.ptr

    def bind(self, call):
        return self.compose(self.chunks(call))

    def compose(self, chunks):
        """go(stream) that launches every chunk of a call, in order."""
        raise NotImplementedError

    # -- errors ---------------------------------------------------------------------------
    def raise_error(self):
        w = self.error
        if w is not None and w[0]:
            raise self.error_of(*w[:6])

    def error_of(self, code, peer, token, rank, theirs, ours):
        """The exception for an error record {code, peer, token, rank, theirs, ours}."""
        closed = "the object is closed for use"
        if code == ERROR_TOKENS:
            return CallMismatchError(
                f"rank {rank} called with {ours} tokens where rank {peer} called with "
                f"{theirs} (T must be the same on every rank within a call); nothing of the "
                f"call was written on rank {rank}; {closed}", peer=peer, token=token)
        if code == ERROR_SEQUENCE:
            return CallMismatchError(
                f"rank {rank} found use {theirs} of token {token}'s slot from rank {peer} "
                f"where it expected use {ours}: the ranks' calls are out of step; {closed}",
                peer=peer, token=token)
        if code == ERROR_TAG:
            return CallMismatchError(
                f"rank {rank} made a call with {describe_tag(ours)} where rank {peer} made it "
                f"with {describe_tag(theirs)}: the ranks' calls are out of step; nothing of "
                f"the call was written on rank {rank}; {closed}", peer=peer, token=token)
        if code == ERROR_REJECTED:
            return CallMismatchError(
                f"rank {peer} refused its input of this call (its own error says why); "
                f"nothing of the call was written on rank {rank}; {closed}",
                peer=peer, token=token)
        if code == ERROR_POSITION:
            return position_error(rank, token, theirs, ours)
        if code == ERROR_PEER_POSITION:
            return peer_position_error(rank, peer, token)
        if code == ERROR_SLOT:
            return slot_error(rank, token, theirs, ours, written=True)
        return PeerTimeoutError(
            f"rank {rank} waited longer than {self.cfg.timeout_ns / 1e9:g} s for the partial "
            f"sums of {'rank ' + str(peer) if peer >= 0 else 'the other ranks'} (token "
            f"{token} of a call); {closed}", peer=peer if peer >= 0 else None, token=token)

    def close(self) -> bool:
        """Free what this transport holds (subclasses free theirs first); whether the
        communicator is fit to be freed, read once the device is idle."""
        fit = True
        if self._host:
            self.cuda.synchronize()
            fit = self.fit()
            self.error = _NO_ERROR
            self.cuda.free_host(self._host)
            self._host = 0
        return fit


_NO_ERROR = (0,) * 8


def cache_kind(cfg) -> int:
    """The kernels' KV cache of a configuration (tuning.Spec.cache): 0 none, 1 the data
    type, 2 FP8."""
    if getattr(cfg, "kv", None) is None:
        return 0
    from ..kvcache import CACHE_FP8
    return 2 if cfg.kv.cache_dtype(cfg.dtype) == CACHE_FP8 else 1
