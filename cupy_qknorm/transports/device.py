"""What the GPU transports share: kernels per layout, launch parameters, chunking past
max_tokens, the RoPE table, and the error record the kernels write and the host reads."""
from __future__ import annotations

import ctypes

from ..compile import load, require_cupy
from ..errors import CallMismatchError, PeerTimeoutError, PositionError
from ..params import (ERROR_POSITION, ERROR_REJECTED, ERROR_SEQUENCE, ERROR_TOKENS,
                      ERROR_WORDS, HEAD, PARAMS, pack_static)
from ..tuning import Spec, layout_for, wide_from
from .launch import Launcher

_HOST_ALLOC_MAPPED = 2  # cudaHostAllocMapped; with UVA the device sees the same address
HOST_WORDS = 16         # the error record, then the unfused path's launch counters


class DeviceTransport:
    """Common part of the GPU transports. A subclass sets `name`, the kernels a call
    launches (CALL_KINDS), those it launches with programmatic dependent launch
    (PDL_KINDS), and launch(go, tokens, grid, stream)."""
    name = "?"
    CALL_KINDS = ("partial_sums", "apply")
    PDL_KINDS = ()

    def __init__(self, cfg, comm, pdl=False):
        cupy = require_cupy(f"transport {self.name!r}")
        from cupy.cuda import runtime
        self.cfg, self.comm = cfg, comm
        self.device = cupy.cuda.Device()
        self._kernels = {}
        self._raw = {}        # the RawKernels behind self._kernels, for bound()
        self.slots = ()
        self.counters = 0
        self.sums = None
        self.table = None     # RoPE: the device's cos/sin table
        self._launch = Launcher(pdl)
        self._static_packed = False
        self.wide_from = wide_from(cfg.world, cfg.rope is not None)
        self._host = 0
        self._host_words = None
        self._error = cupy.zeros(ERROR_WORDS, cupy.int32)
        self._host = runtime.hostAlloc(4 * HOST_WORDS, _HOST_ALLOC_MAPPED)
        self._host_words = (ctypes.c_int32 * HOST_WORDS).from_address(self._host)
        ctypes.memset(self._host, 0, 4 * HOST_WORDS)
        if cfg.rope is not None:
            self.table = _device_table(cupy, cfg.rope, self.device.id)

    # -- kernels --------------------------------------------------------------------------
    def layout(self, tokens):
        """The fused kernel's layout for a launch of `tokens` tokens."""
        return layout_for(tokens, self.wide_from)

    def spec(self, weight_dtype, layout="narrow"):
        c = self.cfg
        return Spec.plan(c.dtype, weight_dtype, c.world, c.q_local, c.k_local, layout, c.rope)

    def kernels(self, weight_dtype, layout="narrow"):
        """(spec, {kind: go(grid, stream)}, grid cap) for a weight dtype and layout."""
        k = self._kernels.get((weight_dtype, layout))
        if k is None:
            spec = self.spec(weight_dtype, layout)
            raw = load(spec)
            go = {kind: self._launch.bind((r, self._launch.handle(r)), _block(kind, spec),
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
        for kind, r in raw.items():
            if kind == "reject":
                continue
            try:
                per_sm = min(per_sm, driver.occupancyMaxActiveBlocksPerMultiprocessor(
                    r.kernel.ptr, spec.threads, 0))
            except Exception:  # noqa: BLE001 - no calculator: assume the worst register use
                per_sm = min(per_sm, props["regsPerMultiprocessor"] // (255 * spec.threads))
        return max(1, props["multiProcessorCount"] * max(1, per_sm))

    # -- launch parameters ----------------------------------------------------------------
    def _pack_static(self):
        cfg = self.cfg
        table = self.table
        pack_static(self._launch.buf, self.slots, self.counters, self._error.data.ptr,
                    self._host, self.sums.data.ptr if self.sums is not None else 0,
                    table.data.ptr if table is not None else 0, cfg.timeout_ns,
                    cfg.max_tokens, cfg.rank, cfg.eps, float(cfg.q_dim), float(cfg.k_dim),
                    table.shape[0] if table is not None else 0)
        self._static_packed = True

    def prepare(self, plan):
        """A function run(ptrs, stream) for arrays that match `plan` (validated): ptrs are
        the addresses of q, k, q_weight, k_weight, q_out, k_out and the positions (0
        without RoPE). It walks the tokens in chunks of at most max_tokens, each launched
        with the layout its length calls for; one chunk (the common case) takes the
        shortest path."""
        if not self._static_packed:
            self._pack_static()
        buf, strides, tokens = self._launch.buf, plan.strides, plan.tokens
        chunk, launch, pbytes = self.cfg.max_tokens, self.launch, plan.position_bytes
        pack_head = HEAD.pack_into
        if tokens <= chunk:
            _, go, cap = self.kernels(plan.weight_dtype, self.layout(tokens))
            grid = min(tokens, cap)

            def run_one(ptrs, stream):
                q, k, qw, kw, qo, ko, pos = ptrs
                pack_head(buf, 0, q, k, qo, ko, qw, kw, *strides, pos, tokens, pbytes)
                launch(go, tokens, grid, stream)
            return run_one
        step = [s * plan.itemsize for s in strides]
        pieces = []
        for start in range(0, tokens, chunk):
            n = min(chunk, tokens - start)
            _, go, cap = self.kernels(plan.weight_dtype, self.layout(n))
            pieces.append((start, n, go, min(n, cap)))

        def run_chunks(ptrs, stream):
            q, k, qw, kw, qo, ko, pos = ptrs
            for start, n, go, grid in pieces:
                pack_head(buf, 0, q + start * step[0], k + start * step[1],
                          qo + start * step[2], ko + start * step[3], qw, kw, *strides,
                          pos + start * pbytes if pos else 0, n, pbytes)
                launch(go, n, grid, stream)
        return run_chunks

    def bound(self, plan, ptrs):
        """go(stream) that normalizes these very arrays (ptrs as in prepare). A call of one
        chunk gets its own parameter buffer, packed once here, and launch functions with
        the grid fixed, so a call is the launch alone. Longer calls take prepare()'s path."""
        tokens = plan.tokens
        if tokens > self.cfg.max_tokens:
            run, ptrs = self.prepare(plan), list(ptrs)
            return lambda stream: run(ptrs, stream)
        layout = self.layout(tokens)
        buf = self._own_params(plan, ptrs)
        go = {kind: self._bind_own(plan, layout, kind, buf) for kind in self.CALL_KINDS}
        return self.launch_fixed(go, tokens)

    def bound_kind(self, plan, ptrs, kind):
        """go(stream) launching one kernel of this object's spec (such as "rope", the
        benchmark's separate RoPE kernel) on these arrays, parameters packed once."""
        layout = self.layout(min(plan.tokens, self.cfg.max_tokens))
        return self._bind_own(plan, layout, kind, self._own_params(plan, ptrs))

    def _own_params(self, plan, ptrs):
        """A parameter buffer of its own for these arrays (ptrs as in prepare), packed."""
        if not self._static_packed:
            self._pack_static()
        buf = ctypes.create_string_buffer(self._launch.buf.raw, PARAMS.size)
        q, k, qw, kw, qo, ko, pos = ptrs
        HEAD.pack_into(buf, 0, q, k, qo, ko, qw, kw, *plan.strides, pos, plan.tokens,
                       plan.position_bytes)
        return buf

    def _bind_own(self, plan, layout, kind, buf):
        """go(stream) launching `kind` of `layout` with the parameters in `buf`, the grid
        fixed."""
        spec, _, cap = self.kernels(plan.weight_dtype, layout)
        raw = self._raw[(plan.weight_dtype, layout)][kind]
        return self._launch.bind((raw, self._launch.handle(raw)), _block(kind, spec),
                                 pdl=kind in self.PDL_KINDS, buf=buf,
                                 grid=min(plan.tokens, cap))

    def launch_fixed(self, go, tokens):
        """go(stream) from launch functions whose grid and parameters are fixed."""
        launch = self.launch
        fixed = {kind: (lambda f: lambda grid, stream: f(stream))(f) for kind, f in go.items()}
        return lambda stream: launch(fixed, tokens, None, stream)

    def launch(self, go, tokens, grid, stream):
        raise NotImplementedError

    # -- errors ---------------------------------------------------------------------------
    def failed(self) -> bool:
        """Whether a kernel of this object recorded an error (host memory, no sync)."""
        w = self._host_words
        return w is not None and w[0] != 0

    def check(self):
        """Raise the error a kernel recorded, if any. Reads host memory only."""
        w = self._host_words
        if w is None or not w[0]:
            return
        raise self.error_of(*w[:6])

    def error_of(self, code, peer, token, rank, theirs, ours):
        """The exception for an error record {code, peer, token, rank, theirs, ours}."""
        closed = "the object is closed for use"
        if code == ERROR_TOKENS and peer >= 0:
            return CallMismatchError(
                f"rank {rank} launched {ours} tokens where rank {peer} launched {theirs} (T "
                f"must be the same on every rank within a call; calls past max_tokens launch "
                f"in chunks of max_tokens); nothing of that launch was written on rank "
                f"{rank}; {closed}", peer=peer, token=token)
        if code == ERROR_TOKENS:
            return CallMismatchError(
                f"rank {rank} launched {ours} tokens but the ranks' token counts differ (T "
                f"must be the same on every rank within a call); nothing of that launch was "
                f"written on rank {rank}; {closed}", token=token)
        if code == ERROR_SEQUENCE:
            return CallMismatchError(
                f"rank {rank} found use {theirs} of token {token}'s slot from rank {peer} "
                f"where it expected use {ours}: the ranks' calls are out of step; {closed}",
                peer=peer, token=token)
        if code == ERROR_REJECTED:
            return CallMismatchError(
                f"rank {peer} rejected its input of this call (its own error says why); "
                f"nothing of the launch was written on rank {rank}; {closed}",
                peer=peer, token=token)
        if code == ERROR_POSITION:
            return PositionError(
                f"rank {rank}: token {token} of a launch has position {theirs}, outside the "
                f"RoPE table's {ours} rows; its row was not written; {closed}",
                token=token, position=theirs)
        return PeerTimeoutError(
            f"rank {rank} waited longer than {self.cfg.timeout_ns / 1e9:g} s for the partial "
            f"sums of {'rank ' + str(peer) if peer >= 0 else 'the other ranks'} (token "
            f"{token} of a launch); {closed}", peer=peer if peer >= 0 else None, token=token)

    def close(self):
        """Free what this transport holds (subclasses free theirs first)."""
        if self._host:
            from cupy.cuda import runtime
            runtime.deviceSynchronize()
            self._host_words = None
            runtime.freeHost(self._host)
            self._host = 0


def _block(kind, spec):
    """Threads a block of each kernel: the spec's, except reject (one warp)."""
    return 32 if kind == "reject" else spec.threads


def _device_table(cupy, rope, device):
    """The cos/sin table on this device: the user's CuPy table where it lives here, else a
    copy (the built-in one is made on the host in float64 and stored as fp32)."""
    from ..rope import host_table
    t = rope.table
    if t is not None and isinstance(t, cupy.ndarray) and t.data.device_id == device:
        return t
    return cupy.asarray(host_table(rope))
