"""A MiniMax-M2-shaped attention prologue over G tensor-parallel ranks, no PyTorch:

    mpiexec -n G python examples/minimax_prologue.py [--tokens 16] [--layers 4] [--check]
                                                     [--kv-cache data|fp8]

Per layer, on every rank (column-parallel, as in the model):

    x [T, hidden]  @  W_qkv[:, this rank's columns]  ->  qkv [T, q/G + k/G + v/G]
    q, k = views of qkv (strided rows)  ->  TPQKNorm in place: RMSNorm over the FULL q and
    k rows (all ranks), then RoPE at the tokens' positions  ->  q, k, v for attention
    with --kv-cache, the same call writes the rotated k and v into the layer's paged KV
    cache at the tokens' slots (in the data's dtype, or FP8 E4M3 with per-tensor scales)

The projection runs in float32 through the array module's matmul (CuPy on a GPU, numpy on
the CPU) and is rounded once to --dtype (bfloat16 held as uint16 bits). One TPQKNorm
serves every layer: each call passes that layer's norm weights. On GPUs, the --layers
prologues of a decode step are captured in ONE CUDA graph and replayed for --steps
steps, the positions advancing by one a step; a second graph holds the norms alone, so
the table shows the norm's own time and its share of the prologue. CuPy (14) refuses
cuBLAS calls during a capture: where it does, the steps run eagerly and the table's
header says why. Without a GPU the same steps run eagerly on numpy arrays with
transport "mpi".

--check compares the last layer's q and k after the last step with the float64
reference (cupy_qknorm.reference.qk_norm_rope on rank 0, from the gathered shards) and
that v is the projection untouched; it prints PASS or FAIL and exits 1 on FAIL. The
inputs lie on a coarse grid (x in steps of 1/4, W in steps of 1/64), so every float32
product and sum of the projection is exact in any order: the host reproduces the
device's projection bit for bit, and the check measures the norm and the rotation.

--kv-cache: each token of the decode batch is the newest of its own sequence; a
sequence owns blocks of --block-size slots of an NHD cache [blocks, block_size,
kv heads of the rank, 128] per layer, handed out in a shuffled order as an allocator
would, and the last token (with T > 1) is padding (slot -1). With fp8, k's scale is a
Python float and v's an fp32 array of one element beside the data (read at every call
and graph replay). With --check, each rank's
last-layer caches must equal cupy_qknorm.reference.expected_cache (FP8 through
ml_dtypes) of the cache before the last step and the k and v rows it produced, bit for
bit: every written slot holds its row, no other byte changed.

RoPE needs whole heads of 128 on every rank: the default widths (MiniMax M2's where
they split over G ranks, else cupy_qknorm.shapes.default_dims(G)) have them; given
widths must be multiples of 128 * G.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

try:
    import cupy_qknorm
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cupy_qknorm

from cupy_qknorm import RoPE, TPQKNorm  # noqa: E402
from cupy_qknorm import reference as ref  # noqa: E402
from cupy_qknorm.kvcache import CACHE_FP8, KVCache  # noqa: E402
from cupy_qknorm.placement import select_device  # noqa: E402
from cupy_qknorm.shapes import default_dims, whole_heads  # noqa: E402

STORAGE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}
EPS = 1e-6                  # MiniMax M2's rms_norm_eps
HIDDEN = 3072               # MiniMax M2's hidden size
FIRST_POSITION = 4096       # tokens' positions at step 0 are below this (a decode batch)
K_SCALE, V_SCALE = 0.0125, 0.03  # FP8 cache scales: about each's largest value / 448


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16, help="tokens a decode step (T)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="decode steps timed")
    p.add_argument("--dtype", default="bfloat16", choices=tuple(STORAGE))
    p.add_argument("--transport", default="auto", choices=("auto", "ipc", "nccl", "mpi"))
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--q-dim", type=int, help="full q width (default: 6144, MiniMax M2, or "
                   "cupy_qknorm.shapes.default_dims(G))")
    p.add_argument("--k-dim", type=int, help="full k and v width (default: 1024, or as "
                   "--q-dim)")
    p.add_argument("--timeout", type=float, default=5.0, help="peer wait bound, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true",
                   help="compare the last layer with the float64 reference; exit 1 on FAIL")
    p.add_argument("--kv-cache", choices=("data", "fp8"),
                   help="also write k and v into a paged KV cache a layer, in the data's "
                   "dtype or FP8 E4M3 (--check then checks the caches bit for bit)")
    p.add_argument("--block-size", type=int, default=16, help="KV-cache slots a block")
    args = p.parse_args(argv)
    for name in ("tokens", "layers", "steps", "hidden", "block_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


class Layer:
    """One layer's prologue on this rank: its hidden states, its slice of W_qkv, its
    slices of the norm weights, and the fused qkv output whose q and k views the norm
    rewrites in place."""

    def __init__(self, xp, index, args, world, rank):
        self.xp = xp
        ql, kl = args.q_dim // world, args.k_dim // world
        self.widths = (ql, kl, kl)                      # q, k, v columns of this rank
        x, w, qw, kw = host_inputs(args, index, world, rank)
        self.x = xp.asarray(x.astype(np.float32))       # exact: a coarse grid
        self.w = xp.asarray(w.astype(np.float32))
        self.qw = xp.asarray(ref.from_f64(qw, args.dtype))
        self.kw = xp.asarray(ref.from_f64(kw, args.dtype))
        self.qkv = xp.zeros((args.tokens, sum(self.widths)), STORAGE[args.dtype])
        self.q = self.qkv[:, :ql]                       # strided rows: views of qkv
        self.k = self.qkv[:, ql:ql + kl]
        self.v = self.qkv[:, ql + kl:]
        self.caches = None
        if args.kv_cache:  # filled with a pattern no write leaves: NaN in every dtype
            kv = kv_config(args)
            storage = kv.storage_dtype(args.dtype)
            shape = (args.paged.num_blocks, kv.block_size, kv.kv_heads(kl), kv.head_dim)
            fill = 0xFF if kv.is_fp8() else ref.poison(args.dtype)
            self.caches = tuple(xp.full(shape, fill, storage) for _ in "kv")

    def project(self, acc, dtype):
        """qkv = x @ W (float32), rounded once to `dtype`."""
        self.xp.matmul(self.x, self.w, out=acc)
        round_into(self.xp, acc, self.qkv, dtype)

    def norm(self, norm, positions, cache_args=None):
        if self.caches is None:
            norm(self.q, self.k, self.qw, self.kw, positions=positions)
        else:  # the cache's arguments go by keyword
            extra = dict(cache_args, v=self.v, k_cache=self.caches[0],
                         v_cache=self.caches[1])
            norm(self.q, self.k, self.qw, self.kw, positions=positions, **extra)

    def forward(self, norm, acc, positions, dtype, cache_args=None):
        self.project(acc, dtype)
        self.norm(norm, positions, cache_args)


def host_inputs(args, index, world, rank):
    """Layer `index`'s inputs on this rank, float64 on the host: x [T, hidden] (the same on
    every rank), this rank's columns of W_qkv [hidden, q/G + k/G + v/G], and its slices of
    the q and k norm weights. Every value lies on a coarse grid (see the module's doc)."""
    rng = np.random.default_rng([args.seed, index])
    x = rng.integers(-4, 5, (args.tokens, args.hidden)) / 4.0
    ql, kl = args.q_dim // world, args.k_dim // world
    rng = np.random.default_rng([args.seed, index, world, rank])
    w = rng.integers(-8, 9, (args.hidden, ql + 2 * kl)) / 64.0
    qw = 1.0 + rng.integers(-32, 33, ql) / 128.0
    kw = 1.0 + rng.integers(-32, 33, kl) / 128.0
    return x, w, qw, kw


def kv_config(args):
    """The layers' KV-cache configuration: the data's dtype or FP8, heads of 128."""
    return KVCache(block_size=args.block_size, head_dim=RoPE.minimax_m2().head_dim,
                   dtype=CACHE_FP8 if args.kv_cache == "fp8" else None)


class Paged:
    """The decode batch's places in the paged cache: token i is the newest token of
    sequence i, at position base[i] + step. Sequence i owns the blocks its positions of
    the run fall in (drawn from a shuffled pool); slots[step] is slot_mapping at a step:
    block * block_size + position % block_size, and -1 for the last token, padding,
    where T > 1."""

    def __init__(self, args, base):
        bs, tokens = args.block_size, args.tokens
        first = base // bs
        per_sequence = int(((base + args.steps - 1) // bs - first).max()) + 1
        self.num_blocks = tokens * per_sequence
        rng = np.random.default_rng([args.seed, 2 << 20])
        table = rng.permutation(self.num_blocks).reshape(tokens, per_sequence)
        self.slots = np.empty((args.steps, tokens), np.int32)
        for step in range(args.steps):
            pos = base + step
            self.slots[step] = table[np.arange(tokens), pos // bs - first] * bs + pos % bs
        if tokens > 1:
            self.slots[:, -1] = -1


_TO_BF16 = None


def round_into(xp, acc, out, dtype):
    """acc (float32) rounded to nearest even into `out` of `dtype` (bf16: uint16 bits, as
    cupy_qknorm.reference.f32_to_bf16). No allocation on the GPU: it may be captured."""
    global _TO_BF16
    if dtype != "bfloat16":
        xp.copyto(out, acc, casting="same_kind")
    elif xp is np:
        out[...] = ref.f32_to_bf16(acc)
    else:
        if _TO_BF16 is None:
            _TO_BF16 = xp.ElementwiseKernel(
                "float32 x", "uint16 y",
                "unsigned int u = __float_as_uint(x);"
                "y = (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)",
                "minimax_prologue_to_bf16")
        _TO_BF16(acc, out)


class Clock:
    """Times a step: CUDA events on the stream (GPU), or the host clock (numpy)."""

    def __init__(self, xp, stream):
        self.xp, self.stream = xp, stream

    def us(self, fn, comm):
        if self.stream is None:
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            return 1e6 * (time.perf_counter() - t0)
        self.stream.synchronize()
        comm.Barrier()
        a, b = self.xp.cuda.Event(), self.xp.cuda.Event()
        with self.stream:
            a.record(self.stream)
            fn()
            b.record(self.stream)
        b.synchronize()
        return 1000.0 * self.xp.cuda.get_elapsed_time(a, b)


def capture(stream, fn):
    """fn()'s work on `stream` as a CUDA graph."""
    with stream:
        stream.begin_capture()
        try:
            fn()
        finally:
            graph = stream.end_capture()
    return graph


def run(args, comm):
    """Returns (rank 0's report lines, verdict: None without --check, else True/False)."""
    from mpi4py import MPI
    world, rank = comm.size, comm.rank
    on_gpu = select_device(comm)
    if on_gpu:
        import cupy as xp
        stream = xp.cuda.Stream(non_blocking=True)
    else:
        xp, stream = np, None
    rope = RoPE.minimax_m2()
    base = np.random.default_rng([args.seed, 1 << 20]).integers(0, FIRST_POSITION,
                                                                  args.tokens)
    args.paged = Paged(args, base) if args.kv_cache else None
    layers = [Layer(xp, i, args, world, rank) for i in range(args.layers)]
    acc = xp.empty((args.tokens, sum(layers[0].widths)), np.float32)
    positions = xp.asarray(base.astype(np.int32))
    step_base = xp.asarray(base.astype(np.int32))
    cache_args, built = None, {}
    if args.kv_cache:
        slots = xp.asarray(args.paged.slots[0])
        cache_args = dict(slot_mapping=slots, store_k=True)
        if args.kv_cache == "fp8":  # k's scale fixed; v's read from its array at each call
            cache_args.update(k_scale=K_SCALE, v_scale=xp.full((1,), V_SCALE, np.float32))
        built = dict(kv_cache=kv_config(args))

    def prologue():
        for layer in layers:
            layer.forward(norm, acc, positions, args.dtype, cache_args)

    def norms_alone():
        for layer in layers:
            layer.norm(norm, positions, cache_args)

    def set_step(s):
        if stream is None:
            positions[...] = base + s
            if cache_args is not None:
                slots[...] = args.paged.slots[s]
        else:
            with stream:
                xp.add(step_base, np.int32(s), out=positions)
                if cache_args is not None:
                    slots.set(args.paged.slots[s], stream=stream)

    clock = Clock(xp, stream)
    norm = TPQKNorm(comm, args.q_dim, args.k_dim, args.dtype, EPS, max_tokens=args.tokens,
                    transport=args.transport, timeout_s=args.timeout, rope=rope, **built)
    graphs, step, alone, mode = None, None, None, "eager"
    try:
        set_step(0)
        clock.us(prologue, comm)     # compile the kernels, set up cuBLAS, build the RoPE
        clock.us(norms_alone, comm)  # table: no first time in a graph or in the figures
        if on_gpu and norm.capturable:  # "mpi" waits for the host: not capturable
            why = None
            try:
                graphs = (capture(stream, prologue), capture(stream, norms_alone))
            except Exception as e:  # noqa: BLE001 - every rank falls back together
                why = f"{type(e).__name__}: {e}"
            whys = comm.allgather(why)
            if any(whys):
                graphs = None
                mode = "eager (graph capture failed: " + \
                    "; ".join(f"rank {r}: {w}" for r, w in enumerate(whys) if w) + ")"
            else:
                mode = "one CUDA graph a step"
        if graphs is None:
            step, alone = prologue, norms_alone
        else:
            step = (lambda g: lambda: g.launch(stream))(graphs[0])
            alone = (lambda g: lambda: g.launch(stream))(graphs[1])
        total, norm_only = [], []
        for s in range(args.steps):
            set_step(s)
            total.append(clock.us(step, comm))
            norm_only.append(clock.us(alone, comm))
        # the last step once more, for the check: the norm-only run above was in place
        set_step(args.steps - 1)
        fetch = (lambda a: xp.asnumpy(a) if xp is not np else a.copy())
        norm.synchronize(stream)
        cache_before = [fetch(c) for c in layers[-1].caches] if layers[-1].caches else None
        clock.us(step, comm)
        norm.synchronize(stream)
        out = [fetch(a) for a in (layers[-1].q, layers[-1].k, layers[-1].v)]
        if cache_before is not None:
            out.append((cache_before, [fetch(c) for c in layers[-1].caches]))
        transport = norm.transport
    finally:
        graphs = step = alone = None  # graphs of the norm's calls go before the norm
        norm.close()
    per_layer = [comm.allreduce(float(np.median(t)) / args.layers, op=MPI.MAX)
                 for t in (total, norm_only)]
    lines = header(args, world, transport, on_gpu, mode) + table(args, *per_layer)
    verdict = None
    if args.check:
        verdict, text = check(args, comm, out, base + args.steps - 1, rope)
        lines.append(text)
        if args.kv_cache:
            cached, text = check_caches(args, comm, out)
            verdict = verdict and cached
            lines.append(text)
    return lines, verdict


def header(args, world, transport, on_gpu, mode):
    ql, kl = args.q_dim // world, args.k_dim // world
    r = RoPE.minimax_m2()
    where = "CuPy on one GPU a rank" if on_gpu else \
        "numpy on the CPU (no GPU here: the times are the host's, not the kernels')"
    cache = []
    if args.kv_cache:
        what = f"FP8 E4M3, k_scale {K_SCALE:g}, v_scale {V_SCALE:g} (an fp32 array, read at each call)" \
            if args.kv_cache == "fp8" else args.dtype
        cache = [f"  the same call writes k and v into the layer's paged KV cache: NHD, "
                 f"{args.paged.num_blocks} blocks of {args.block_size}, {what}"]
    return [
        f"MiniMax-M2 attention prologue: G={world}, T={args.tokens} tokens a step, "
        f"{args.layers} layers, {args.dtype}, {args.steps} steps",
        f"  widths: hidden {args.hidden}, q {args.q_dim}, k {args.k_dim}, v {args.k_dim}; "
        f"per rank q {ql}, k {kl}, v {kl}",
        f"  per layer: qkv = x @ W_qkv (float32, rounded to {args.dtype}); TPQKNorm in place "
        f"on the q and k views, RoPE {r.head_dim}/{r.rotary_dim} {r.style} theta {r.theta:g}",
        f"  transport {transport}, {where}, {mode}",
    ] + cache


def table(args, layer_us, norm_us):
    share = 100.0 * norm_us / layer_us if layer_us > 0 else float("nan")
    op = "norm + RoPE + cache write" if args.kv_cache else "norm + RoPE"
    return [
        "",
        f"| per layer (median of {args.steps} steps, slowest rank) | us |",
        "| --- | ---: |",
        f"| qkv projection + {op} | {layer_us:.1f} |",
        f"| {op} alone | {norm_us:.1f} |",
        f"| norm's share | {share:.0f}% |",
        "",
    ]


def check(args, comm, out, positions, rope):
    """(passed, one line for rank 0): the last layer's q and k against the float64
    reference from the gathered shards; v must be the projection, bit for bit."""
    from cupy_qknorm.rope import host_table
    world, rank = comm.size, comm.rank
    x, w, qw, kw = host_inputs(args, args.layers - 1, world, rank)
    ql, kl = args.q_dim // world, args.k_dim // world
    qkv = ref.from_f64(x @ w, args.dtype)   # exact on the host too: the same rounding
    mine = dict(q_in=qkv[:, :ql], k_in=qkv[:, ql:ql + kl], v_in=qkv[:, ql + kl:],
                qw=ref.from_f64(qw, args.dtype), kw=ref.from_f64(kw, args.dtype),
                q=out[0], k=out[1], v=out[2])
    parts = comm.gather(mine, root=0)
    passed, line = None, None
    if rank == 0:
        full = {name: ref.gather([p[name] for p in parts]) for name in mine}
        f64 = {name: ref.to_f64(full[name], args.dtype)
               for name in ("q_in", "k_in", "qw", "kw")}
        qy, ky, qm, km = ref.qk_norm_rope(
            f64["q_in"], f64["k_in"], f64["qw"], f64["kw"], EPS, positions,
            host_table(rope), rope.head_dim, rope.rotary_dim, rope.style)
        (qe, qbad), (ke, kbad) = (ref.compare_rope(full["q"], qy, qm, args.dtype),
                                  ref.compare_rope(full["k"], ky, km, args.dtype))
        v_same = bool(np.array_equal(ref.to_f64(full["v"], args.dtype),
                                     ref.to_f64(full["v_in"], args.dtype)))
        passed = qbad == 0 and kbad == 0 and v_same
        line = (f"check, layer {args.layers - 1} after step {args.steps - 1}: q max error "
                f"{qe:.3g}, k max error {ke:.3g}, {qbad + kbad} elements past tolerance; "
                f"v {'unchanged' if v_same else 'CHANGED'}: {'PASS' if passed else 'FAIL'}")
    return comm.bcast(passed, root=0), line


def check_caches(args, comm, out):
    """(passed, one line for rank 0): every rank's last-layer k and v caches after the last
    step against reference.expected_cache of the caches before it and the k output and v
    rows the step produced, bit for bit."""
    kv = kv_config(args)
    before, after = out[3]
    slots = args.paged.slots[args.steps - 1]
    heads = kv.kv_heads(args.k_dim // comm.size)
    k_scale, v_scale = (K_SCALE, V_SCALE) if kv.is_fp8() else (1.0, 1.0)
    wrong = 0
    for old, new, rows, scale in ((before[0], after[0], out[1], k_scale),
                                  (before[1], after[1], out[2], v_scale)):
        want = ref.expected_cache(old, rows, slots, kv, heads, args.dtype, scale)
        wrong += int(np.count_nonzero(want.view(np.uint8) != new.view(np.uint8)))
    wrong = comm.allreduce(wrong)
    written = int(np.count_nonzero(slots >= 0))
    passed = wrong == 0
    line = (f"check, KV cache of layer {args.layers - 1} at step {args.steps - 1}: {written} "
            f"slots of {len(slots)} tokens written on each of {comm.size} ranks, "
            f"{wrong} bytes differ from the reference: {'PASS' if passed else 'FAIL'}")
    return passed, line


def main(argv=None):
    args = parse(argv)
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    world = comm.size
    q_dim, k_dim = default_dims(world)
    args.q_dim, args.k_dim = args.q_dim or q_dim, args.k_dim or k_dim
    head = RoPE.minimax_m2().head_dim
    if not whole_heads(world, args.q_dim, args.k_dim, head):
        if comm.rank == 0:
            print(f"minimax_prologue: q_dim={args.q_dim} and k_dim={args.k_dim} must split "
                  f"into whole heads of {head} over {world} ranks (multiples of "
                  f"{head * world})", file=sys.stderr)
        return 2
    lines, verdict = run(args, comm)
    if comm.rank == 0:
        print("\n".join(lines), flush=True)
    return 1 if verdict is False else 0


if __name__ == "__main__":
    sys.exit(main())
