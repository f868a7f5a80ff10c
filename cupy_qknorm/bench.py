"""mpiexec -n G python -m cupy_qknorm bench: fused ("ipc") vs unfused ("nccl") vs floors.

graph mode: 8 calls on 8 distinct input sets captured in one CUDA graph, median replay
time / 8. eager mode: host wall time per call, --calls calls back to back on the same
arrays after a warm-up, synchronized at the end, for `norm(...)` and for a bound call,
against CuPy's own launch of an empty kernel timed the same way. Floors, measured in the
same run: an empty kernel as a graph node, one-way GPU-to-GPU latency (flag ping-pong
through IPC memory, halved), and device-to-device copy bandwidth; with --exchange-floor,
the exchange alone as a graph node (the decode floor); and per T in graph mode, the same
bytes through a plain copy kernel timed like the fused one (the memory floor at that
size, launch and ramp included). With --rope, also the norm with MiniMax M2's RoPE,
fused and as the norm followed by a separate RoPE kernel. Every number is the slowest
rank's. Progress goes to stderr, the table to stdout (rank 0).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

GRAPH_CALLS = 8
EXCHANGE_PEERS = 8  # the peer pointers qknorm_exchange takes (kernels/tools.cu): G <= 8
KV_SCALES = (0.5, 0.25)  # --kv-cache fp8: k_scale, v_scale (Python floats)


# what bench can time: the GPU transports ("mpi" sums on the host and cannot be captured
# in a CUDA graph)
TRANSPORT_CHOICES = ("ipc", "nccl")


def kv_cache_option(kind, dtype, rope):
    """The KVCache of `--kv-cache bf16|fp8` (check and bench): blocks of 16, rows of one
    RoPE head; None without the option. ValueError, one line, where it cannot run."""
    if kind is None:
        return None
    from .kvcache import CACHE_FP8, KVCache
    if rope is None:
        raise ValueError("--kv-cache needs --rope (the prologue is norm, RoPE, cache)")
    if kind == "bf16" and dtype != "bfloat16":
        raise ValueError(f"--kv-cache bf16 needs --dtype bfloat16 (a cache holds the "
                         f"data's dtype or FP8), got {dtype}")
    return KVCache(16, rope.head_dim, CACHE_FP8 if kind == "fp8" else None)


def _transports(text):
    names = [v for v in text.split(",") if v]
    bad = [v for v in names if v not in TRANSPORT_CHOICES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"transports must be a comma-separated list of {', '.join(TRANSPORT_CHOICES)}; "
            f"got {text!r}")
    return list(dict.fromkeys(names))


def _token_list(text):
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"tokens must be positive ints, e.g. 1,64,4096; "
                                         f"got {text!r}")
    return values


def add_parser(sub, formatter_class=argparse.ArgumentDefaultsHelpFormatter):
    """The bench subcommand of `sub`; formatter_class: the command's, so that every option's
    default shows once."""
    b = sub.add_parser("bench", help="fused vs unfused latency and the hardware floors",
                       description=__doc__.split("\n\n")[0],
                       formatter_class=formatter_class)
    b.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="data type of q and k")
    b.add_argument("--q-dim", type=int, help="full q width (default: 6144, or what splits "
                   "over G ranks: cupy_qknorm.shapes.default_dims)")
    b.add_argument("--k-dim", type=int, help="full k width (default: 1024, or as --q-dim)")
    b.add_argument("--model", metavar="NAME",
                   help="a model preset (cupy_qknorm.models): its widths and KV heads, and "
                        "with --rope its RoPE (default: none)")
    b.add_argument("--tokens", default="1,8,64,512,2048,8192,16384", type=_token_list,
                   help="token counts T, comma-separated")
    b.add_argument("--mode", default="both", choices=("graph", "eager", "both"),
                   help="graph: CUDA-graph replays (device time); eager: host time per call, "
                        "back to back")
    b.add_argument("--transports", default="ipc,nccl", type=_transports,
                   help=f"comma-separated, of {', '.join(TRANSPORT_CHOICES)}")
    b.add_argument("--rope", action="store_true",
                   help="also time the norm with MiniMax M2's RoPE: fused (T+rope), and for "
                        "ipc the norm followed by a separate RoPE kernel (ipc>rope) "
                        "(default: off)")
    b.add_argument("--kv-cache", choices=("bf16", "fp8"),
                   help="with --rope: also the whole attention prologue, norm + RoPE + the "
                        "paged KV-cache write (blocks of 16, random slots) of a bf16 or FP8 "
                        "cache: the op (T+kv), ipc+rope then a separate cache write kernel "
                        "(ipc+rope>kv), and the copy kernel over the prologue's bytes "
                        "(copy kv us) (default: off)")
    b.add_argument("--positions", default="random", choices=("random", "sequence"),
                   help="with --rope: random, each token anywhere in the table (a decode "
                        "batch of unrelated sequences: every token's angles from memory); "
                        "sequence, one prompt's positions 0..T-1 (a prefill)")
    b.add_argument("--replays", type=int, default=30, help="graph replays per timing")
    b.add_argument("--calls", type=int, default=3000, help="eager calls per timing")
    b.add_argument("--json", help="write every number to this file (rank 0; default: none)")
    b.add_argument("--plot", help="latency vs T, log-log, to this PNG (needs matplotlib; "
                   "default: none)")
    b.add_argument("--commit", help="the commit to print (default: the checkout's, with "
                                    "-dirty where tracked files differ from it)")
    b.add_argument("--exchange-floor", action="store_true",
                   help="also time the exchange alone (a one-warp kernel that only pushes "
                        "and waits) as a graph node: the decode floor of this host "
                        "(default: off)")
    from .bench_jax import N1, N2  # no JAX import: the chain lengths
    b.add_argument("--jax", action="store_true",
                   help="also, per T (graph mode), our call inside jax.jit (JaxQKNorm, with "
                        "RoPE where --rope) as '<transport> jit us', and XLA's own jitted "
                        "norm (+ RoPE) as 'xla us' (at G >= 2 with a psum of the sums of "
                        "squares across the processes, through jax.distributed), each per "
                        f"call as the slope between chains of {N1} and {N2} dependent calls "
                        "in one jitted function (JAX's dispatch cancels); jit/graph: over "
                        "the CuPy graph column; xla/jit: XLA's over ours. Needs JAX's CUDA "
                        "plugin, jax[cuda13] or jax[cuda12] (default: off)")
    b.add_argument("--in-place", action="store_true",
                   help="every call writes its output over its input (as SGLang's kernel "
                        "and benchmark do); the copy kernel then copies each buffer onto "
                        "itself. Default: separate output arrays")
    return b


def jax_refusal(args) -> str | None:
    """Why --jax cannot run with these options (one line), or None. Pure."""
    if not getattr(args, "jax", False):
        return None
    if args.mode == "eager":
        return "--jax times jitted chains beside the CuPy graph numbers: it needs --mode " \
               "graph or both"
    if args.kv_cache is not None:
        return "--jax with --kv-cache is not supported yet (it times the norm, + RoPE " \
               "with --rope)"
    return None


def _say(comm, msg):
    if comm.rank == 0:
        print(msg, file=sys.stderr, flush=True)


def _median_event_ms(fn, reps, stream):
    import cupy
    times = []
    for _ in range(reps):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record(stream)
        fn()
        b.record(stream)
        b.synchronize()
        times.append(cupy.cuda.get_elapsed_time(a, b))
    return float(np.median(times))


def floor_empty_kernel_us(stream):
    from .compile import load_plain
    empty = load_plain("qknorm_empty")
    with stream:
        empty((1,), (32,), ())
        stream.synchronize()
        stream.begin_capture()
        for _ in range(GRAPH_CALLS):
            empty((1,), (32,), ())
        g = stream.end_capture()
        g.launch(stream)
        ms = _median_event_ms(lambda: g.launch(stream), 50, stream)
    return 1000 * ms / GRAPH_CALLS


def floor_one_way_us(comm, stream, iters=2000):
    """Ranks 0 and 1 bounce a flag; the others idle. Half the round trip."""
    import cupy
    from .compile import load_plain
    from .peers import PeerBuffers
    if comm.size < 2:
        return float("nan")
    pair = comm.Split(0 if comm.rank < 2 else 1, comm.rank)
    result = float("nan")
    try:
        if comm.rank < 2:
            buf = PeerBuffers(pair, 8)
            try:
                ping = load_plain("qknorm_pingpong")
                other = 1 - pair.rank
                mine, peer = buf.ptrs[pair.rank], buf.ptrs[other]
                args = (np.uint64(mine), np.uint64(peer), np.int32(iters),
                        np.int32(pair.rank == 0))
                for rep in range(3):  # the first one warms up; keep the last
                    cupy.cuda.runtime.memset(mine, 0, 8)
                    cupy.cuda.runtime.deviceSynchronize()
                    pair.Barrier()
                    a, b = cupy.cuda.Event(), cupy.cuda.Event()
                    with stream:
                        a.record(stream)
                        ping((1,), (1,), args)
                        b.record(stream)
                    b.synchronize()
                    pair.Barrier()
                    result = 1000 * cupy.cuda.get_elapsed_time(a, b) / iters / 2
            finally:
                buf.close()
    finally:
        pair.Free()
    return comm.bcast(result, root=0)


def floor_exchange_us(comm, stream, timeout_ns=10 ** 9):
    """The exchange alone (qknorm_exchange: push a call number to every rank, wait for
    theirs; no row), 8 calls in one graph like the fused kernel, median replay / 8, the
    slowest rank. What a call cannot go below at decode on this host, launch included.
    NaN at G=1 and beyond EXCHANGE_PEERS ranks."""
    import cupy
    from .compile import load_plain
    from .peers import PeerBuffers
    if not 2 <= comm.size <= EXCHANGE_PEERS:
        return float("nan")
    buf = PeerBuffers(comm, 8 * comm.size)
    try:
        cupy.cuda.runtime.memset(buf.local, 0, 8 * comm.size)  # no call seen yet
        state = cupy.zeros(2, cupy.uint64)                      # calls made, timed out
        cupy.cuda.runtime.deviceSynchronize()
        comm.Barrier()
        exchange = load_plain("qknorm_exchange")
        ptrs = list(buf.ptrs) + [0] * (EXCHANGE_PEERS - comm.size)
        args = tuple(np.uint64(p) for p in ptrs) + (
            state, np.int32(comm.size), np.int32(comm.rank), np.int64(timeout_ns))
        with stream:
            exchange((1,), (32,), args)  # warm up: module load, first touch
            stream.synchronize()
            comm.Barrier()
            stream.begin_capture()
            for _ in range(GRAPH_CALLS):
                exchange((1,), (32,), args)
            g = stream.end_capture()
            g.launch(stream)
            stream.synchronize()
            comm.Barrier()
            ms = _median_event_ms(lambda: g.launch(stream), 50, stream)
        stream.synchronize()
        del g
        calls, timed_out = (int(v) for v in state.get())
        expected = 1 + GRAPH_CALLS * 51  # the warm-up, the first launch, 50 timed replays
        wrong = comm.allgather(f"rank {comm.rank} made {calls} of {expected} calls"
                               f"{', a wait timed out' if timed_out else ''}"
                               if timed_out or calls != expected else None)
        if any(wrong):
            raise RuntimeError("exchange floor: " + "; ".join(w for w in wrong if w))
    finally:
        buf.close()
    return 1000 * ms / GRAPH_CALLS


def floor_copy_gbps(stream, nbytes=1 << 30):
    import cupy
    a = cupy.empty(nbytes // 4, cupy.float32)
    a.fill(1.0)
    b = cupy.empty_like(a)
    with stream:
        ms = _median_event_ms(lambda: cupy.cuda.runtime.memcpyAsync(
            b.data.ptr, a.data.ptr, nbytes, cupy.cuda.runtime.memcpyDeviceToDevice,
            stream.ptr), 10, stream)
    del a, b
    return 2 * nbytes / (ms * 1e-3) / 1e9  # read + write


COPY_THREADS = 256


def time_copy_graph_us(sets, stream, replays):
    """The same bytes as one call (read q and k, write them) through a plain copy kernel,
    timed like the fused kernel: a graph of one launch per input set, median replay / sets.
    This is the memory floor at this T, launch and ramp included."""
    import cupy
    from .compile import load_plain
    copy = load_plain("qknorm_copy")
    nq, nk = sets[0][0].nbytes // 16, sets[0][1].nbytes // 16
    sms = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["multiProcessorCount"]
    blocks = max(1, min(-(-(nq + nk) // (4 * COPY_THREADS)), 8 * sms))

    def launch(q, k, qo, ko):
        copy((blocks,), (COPY_THREADS,), (q, qo, np.int64(nq), k, ko, np.int64(nk)))
    with stream:
        for s in sets:
            launch(*s)
        stream.synchronize()
        for q, k, qo, ko in sets:  # the copy is exact: check it, so that it cannot be wrong
            if qo is not q and not (bool((qo == q).all()) and bool((ko == k).all())):
                raise RuntimeError("qknorm_copy did not copy its input")
        stream.begin_capture()
        for s in sets:
            launch(*s)
        g = stream.end_capture()
        g.launch(stream)
        ms = _median_event_ms(lambda: g.launch(stream), replays, stream)
    return 1000 * ms / len(sets)


def _inputs(comm, dtype, dq, dk, tokens, sets, in_place=False, positions="random", kv=None,
            rope=None):
    """`sets` tuples (q, k, q_out, k_out, positions, cache); in place, q_out is q and k_out
    is k. Positions: random in `rope`'s table (MiniMax M2's without one), or the sequence
    0..T-1 (positions="sequence").
    cache: with `kv` (a KVCache), {v, k_cache, v_cache, slot_mapping} (NHD caches of room
    for 2 T tokens, distinct random slots), else None.
    The weights are ones, so calls in place keep every row's RMS at 1 however often a
    graph replays (and a rotation keeps it too)."""
    import cupy
    from .host import from_f64
    from .shapes import MINIMAX_ROPE
    table_rows = MINIMAX_ROPE["max_position"] if rope is None else rope.rows()
    rng = np.random.default_rng(1000 + comm.rank)
    pos_rng = np.random.default_rng(77)  # the same positions on every rank

    def rows(width):  # standard normals, each row scaled to an RMS of 10^U(-1, 1)
        x = rng.standard_normal((tokens, width))
        return from_f64(x * 10.0 ** rng.uniform(-1, 1, size=(tokens, 1)), dtype)
    out = []
    for _ in range(sets):
        q, k = cupy.asarray(rows(dq)), cupy.asarray(rows(dk))
        pos = cupy.asarray(pos_rng.integers(0, table_rows, tokens)
                           if positions == "random" else np.arange(tokens))
        cache = None
        if kv is not None:
            heads, block = kv.kv_heads(dk), kv.block_size
            blocks = -(-2 * tokens // block)
            storage = kv.storage_dtype(dtype)
            cache = {"v": cupy.asarray(rows(dk)),
                     "k_cache": cupy.zeros((blocks, block, heads, kv.head_dim), storage),
                     "v_cache": cupy.zeros((blocks, block, heads, kv.head_dim), storage),
                     "slot_mapping": cupy.asarray(rng.permutation(blocks * block)[:tokens])}
        out.append((q, k, q, k, pos, cache) if in_place else
                   (q, k, cupy.empty_like(q), cupy.empty_like(k), pos, cache))
    w = (cupy.asarray(from_f64(np.ones(dq), dtype)), cupy.asarray(from_f64(np.ones(dk), dtype)))
    return out, w


def separate_rope(norm, q, k, positions):
    """go(stream): the rotary embedding of `norm` (a GPU object built with rope=) alone, in
    place on rows q and k that a norm left, as a launch of its own: the benchmark's unfused
    baseline, norm then RoPE (kernels/tools.cu). It reads no weight."""
    from . import arrays
    from .transports import Call
    t, c = norm._transport, norm.config
    if c.rope is None or not hasattr(t, "chunks"):
        raise TypeError("separate_rope needs an object built with rope= on a GPU transport")
    qo, ko, pos = (arrays.describe(x, role) for x, role in
                   ((q, "q"), (k, "k"), (positions, "positions")))
    arrays.check_rows(qo, "q", c.q_local, c.dtype)
    arrays.check_rows(ko, "k", c.k_local, c.dtype)
    arrays.check_positions(pos, qo.shape[0])
    strides = (arrays.row_stride(qo), arrays.row_stride(ko)) * 2
    plan = arrays.Plan(qo.shape[0], c.dtype, strides, qo.itemsize, pos.itemsize)
    call = Call((qo, ko, None, None, qo, ko, pos), plan,
                (qo.ptr, ko.ptr, 0, 0, qo.ptr, ko.ptr, pos.ptr), 0)
    launches = [t._launch.bind(t.cuda.load_rope(chunk.spec, t.build), chunk.spec.threads,
                               chunk.grid, chunk.params) for chunk in t.chunks(call, kinds=())]

    def go(stream):
        for launch in launches:
            launch(stream)
    go.keep = (q, k, positions)
    return go


def separate_cache_write(norm, k, v, k_cache, v_cache, slot_mapping, k_scale=None,
                         v_scale=None):
    """go(stream): the KV-cache write of `norm` (a GPU object built with kv_cache=) alone:
    rows k (as a norm left them) and v to their slots of the caches, one launch a chunk
    (kernels/tools.cu's cache_write, as vLLM's reshape_and_cache_flash): the benchmark's
    unfused baseline, norm + RoPE then the cache write."""
    from . import arrays
    from .transports import Call
    t, c = norm._transport, norm.config
    if c.kv is None or not hasattr(t, "chunks"):
        raise TypeError("separate_cache_write needs an object built with kv_cache= on a GPU "
                        "transport")
    ko = arrays.describe(k, "k")
    arrays.check_rows(ko, "k", c.k_local, c.dtype)
    tokens = ko.shape[0]
    cache, _ = norm._validate_cache((v, k_cache, v_cache, slot_mapping, k_scale, v_scale,
                                     True), [ko] * 6 + [None], tokens)
    plan = arrays.Plan(tokens, c.dtype, (arrays.row_stride(ko),) * 4, ko.itemsize, 0)
    call = Call((ko,) * 6 + (None,), plan, (ko.ptr,) * 6 + (0,), 0, cache)
    # a block a token, as reshape_and_cache_flash launches (the op's persistent grid of a
    # few blocks an SM left this kernel a fifth of the copy kernel's bandwidth)
    threads, writer = t.cache_writer()
    launches = [t._launch.bind(writer, threads, max(chunk.tokens, 1), chunk.params)
                for chunk in t.chunks(call, kinds=())]

    def go(stream):
        for launch in launches:
            launch(stream)
    go.keep = (k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return go


def checkout_commit(cwd=None) -> str:
    """The checkout's commit, short, with "-dirty" where tracked files differ from it
    (the tree that ran is not that commit's), or "unknown" outside a checkout."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                              cwd=cwd)
    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - no git
        return "unknown"


def _variants(norms, rope_norms, w, rope_of, kv_norms=None, scales=(1.0, 1.0)):
    """{column: call(q, k, q_out, k_out, positions, cache, stream)} of what is timed."""
    out = {}
    for t, norm in norms.items():
        out[t] = (lambda n: lambda q, k, qo, ko, pos, cache, stream:
                  n(q, k, *w, out=(qo, ko), stream=stream))(norm)
    for t, norm in rope_norms.items():
        out[f"{t}+rope"] = (lambda n: lambda q, k, qo, ko, pos, cache, stream:
                            n(q, k, *w, out=(qo, ko), positions=pos, stream=stream))(norm)
    if rope_of is not None:
        plain, rope = rope_of
        bound = {}

        def norm_then_rope(q, k, qo, ko, pos, cache, stream):
            plain(q, k, *w, out=(qo, ko), stream=stream)
            key = (id(qo), id(ko), id(pos))
            if key not in bound:
                bound[key] = separate_rope(rope, qo, ko, pos)
            bound[key](stream)
        out["ipc>rope"] = norm_then_rope
    ks, vs = scales
    for t, norm in (kv_norms or {}).items():
        out[f"{t}+kv"] = (lambda n: lambda q, k, qo, ko, pos, cache, stream:
                          n(q, k, *w, out=(qo, ko), positions=pos, stream=stream,
                            k_scale=ks, v_scale=vs, **cache))(norm)
    if kv_norms and "ipc" in kv_norms and "ipc" in rope_norms:
        fused, writer = rope_norms["ipc"], kv_norms["ipc"]
        writes = {}

        def rope_then_cache(q, k, qo, ko, pos, cache, stream):
            fused(q, k, *w, out=(qo, ko), positions=pos, stream=stream)
            key = (id(ko), id(cache["k_cache"]))
            if key not in writes:
                writes[key] = separate_cache_write(writer, ko, cache["v"], cache["k_cache"],
                                                   cache["v_cache"], cache["slot_mapping"],
                                                   ks, vs)
            writes[key](stream)
        out["ipc+rope>kv"] = rope_then_cache
    return out


def prologue_bytes(tokens, dq, dk, itemsize, cache_itemsize):
    """Bytes the attention prologue moves: q, k and v read; q, k and both caches written."""
    return tokens * ((2 * dq + 3 * dk) * itemsize + 2 * dk * cache_itemsize)


def _copy_sets_for(sets, tokens, dq, nbytes, itemsize):
    """Copy-kernel sets that move `nbytes` like a call of `sets`: q, and a second buffer
    of the width that makes up the rest (whole 16-byte vectors)."""
    import cupy
    rest = nbytes // (2 * tokens * itemsize) - dq
    rest = -(-rest * itemsize // 16) * 16 // itemsize
    out = []
    for s in sets:
        x = cupy.zeros((tokens, rest), s[0].dtype)
        out.append((s[0], x, s[2], cupy.empty_like(x)))
    return out


def time_graph_us(call, sets, stream, replays, comm):
    """8 calls on 8 input sets captured in one CUDA graph; median replay / 8."""
    with stream:
        for s in sets:  # warm up: compile, first touch
            call(*s, stream)
        stream.synchronize()
        comm.Barrier()
        stream.begin_capture()
        for s in sets:
            call(*s, stream)
        g = stream.end_capture()
        g.launch(stream)
        stream.synchronize()
        comm.Barrier()
        ms = _median_event_ms(lambda: g.launch(stream), replays, stream)
        stream.synchronize()
    del g
    return 1000 * ms / len(sets)


def time_eager_us(call, s, stream, calls, comm):
    """Host wall time per call, `calls` calls back to back on the same arrays after a
    warm-up, synchronized at the end (sustained: the launch queue does not hide it)."""
    with stream:
        for _ in range(10):
            call(*s, stream)
        stream.synchronize()
        comm.Barrier()
        t = time.perf_counter()
        for _ in range(calls):
            call(*s, stream)
        stream.synchronize()
        dt = time.perf_counter() - t
    return 1e6 * dt / calls


def time_cupy_launch_us(stream, calls):
    """CuPy's own launch of an empty kernel (qknorm_empty), timed like time_eager_us:
    the eager floor of a Python launch."""
    from .compile import load_plain
    empty = load_plain("qknorm_empty")
    with stream:
        for _ in range(10):
            empty((1,), (32,), ())
        stream.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            empty((1,), (32,), ())
        stream.synchronize()
        dt = time.perf_counter() - t
    return 1e6 * dt / calls


def run(args):
    """The bench command. Needs MPI and a GPU on every rank: cupy_qknorm.cli checks both
    first (one line naming what is missing); an argument it cannot time raises ValueError."""
    refusal = jax_refusal(args)
    if refusal is not None:
        raise ValueError(refusal)
    jx = None  # the jax module, with --jax
    if getattr(args, "jax", False):
        from . import bench_jax
        jx = bench_jax.require_jax()
    import cupy
    from mpi4py import MPI

    from . import RoPE, TPQKNorm
    from .placement import select_device
    from .shapes import ITEMSIZE, default_dims, whole_heads
    comm = MPI.COMM_WORLD
    select_device(comm)
    world = comm.size
    heads = {}  # kv_heads and head_dim, with --model
    if args.model is not None:
        from .models import get
        model = get(args.model)
        if args.q_dim or args.k_dim:
            raise ValueError("--q-dim, --k-dim and --model do not go together: the model "
                             "sets them")
        if not model.layout(world):
            raise ValueError(model.refusal(world))
        if args.rope and model.rope is None:
            raise ValueError(f"--rope: {model.name} has no RoPE preset ({model.note})")
        args.q_dim, args.k_dim = model.q_dim, model.k_dim
        dq, dk = model.local_dims(world)
        heads = dict(kv_heads=model.kv_heads, head_dim=model.head_dim)
        rope = model.rope if args.rope else None
    else:
        q, k = default_dims(world)
        args.q_dim = args.q_dim or q
        args.k_dim = args.k_dim or k
        dq, dk = args.q_dim // world, args.k_dim // world
        rope = RoPE.minimax_m2() if args.rope else None
        if rope is not None and not whole_heads(world, args.q_dim, args.k_dim, rope.head_dim):
            raise ValueError(f"--rope: q_dim={args.q_dim}, k_dim={args.k_dim} do not split "
                             f"into whole heads of {rope.head_dim} over {world} ranks")
    dev = None  # JAX's GPU, with --jax: CuPy's; every rank raises alike where one has none
    mesh, xla_why = None, None  # --jax at G >= 2: the psum baseline's mesh, or why none
    if jx is not None:
        if world > 1:  # before device(): jax.distributed must precede JAX's backend
            xla_why = _first(comm, bench_jax.start_distributed(jx))
        try:
            dev, why = bench_jax.device(jx), None
        except ValueError as e:
            why = str(e)
        why = _first(comm, why)
        if why:
            raise ValueError(why)
        if world > 1 and xla_why is None:
            try:
                mesh = bench_jax.process_mesh(jx, dev)
            except ValueError as e:
                xla_why = str(e)
            xla_why = _first(comm, xla_why)
            if xla_why:
                mesh = None
    stream = cupy.cuda.Stream(non_blocking=True)
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    card = props["name"].decode()
    commit = args.commit if args.commit is not None else checkout_commit()
    modes = ["graph", "eager"] if args.mode == "both" else [args.mode]
    _say(comm, "floors ...")
    floors = {"empty_kernel_graph_us": floor_empty_kernel_us(stream),
              "one_way_us": floor_one_way_us(comm, stream),
              "copy_GBps": floor_copy_gbps(stream)}
    if "eager" in modes:
        floors["cupy_launch_us"] = time_cupy_launch_us(stream, args.calls)
    if args.exchange_floor:
        _say(comm, "exchange floor ...")
        floors["exchange_graph_us"] = floor_exchange_us(comm, stream)
    floors = {k: comm.allreduce(v, op=MPI.MAX) if k != "copy_GBps" else
              comm.allreduce(v, op=MPI.MIN) for k, v in floors.items()}
    rows = []
    top = max(args.tokens)
    kv = kv_cache_option(args.kv_cache, args.dtype, rope)
    # each object is collective; those built before a failure are closed in `finally`
    norms, rope_norms, kv_norms, jax_norms = {}, {}, {}, {}
    columns, layouts, pdl = [], None, None
    try:
        for t in args.transports:
            norms[t] = TPQKNorm(comm, args.q_dim, args.k_dim, args.dtype, max_tokens=top,
                                transport=t, **heads)
        for t in (args.transports if rope is not None else ()):
            rope_norms[t] = TPQKNorm(comm, args.q_dim, args.k_dim, args.dtype,
                                     max_tokens=top, transport=t, rope=rope, **heads)
        for t in (args.transports if kv is not None else ()):
            kv_norms[t] = TPQKNorm(comm, args.q_dim, args.k_dim, args.dtype, max_tokens=top,
                                   transport=t, rope=rope, kv_cache=kv, **heads)
        if jx is not None:
            from .jax import JaxQKNorm
            # collective, like TPQKNorm; with --rope the +rope call (the graph's "ipc+rope")
            for t in args.transports:
                jax_norms[t] = JaxQKNorm(comm, args.q_dim, args.k_dim, args.dtype,
                                         max_tokens=top, transport=t, rope=rope,
                                         backend="gpu", **heads)
        separate = None
        if rope is not None and "ipc" in norms:
            separate = (norms["ipc"], rope_norms["ipc"])
        ipc = norms.get("ipc")
        pdl = bool(getattr(ipc._transport, "pdl", False)) if ipc is not None else None
        layouts = _layouts(args.dtype, world, dq, dk, ipc._transport.wide_from) \
            if ipc is not None else None
        if layouts is not None and "ipc" in rope_norms:
            layouts["rope_wide_from"] = rope_norms["ipc"]._transport.wide_from
        if layouts is not None and "ipc" in kv_norms:
            layouts["cache_split_from"] = kv_norms["ipc"]._transport.split_from
        for tokens in args.tokens:
            sets, w = _inputs(comm, args.dtype, dq, dk, tokens, GRAPH_CALLS, args.in_place,
                              args.positions, kv, rope)
            variants = _variants(norms, rope_norms, w, separate, kv_norms, KV_SCALES)
            columns = list(variants)
            row = {"T": tokens, "bytes": 2 * tokens * (dq + dk) * ITEMSIZE[args.dtype]}
            for mode in modes:
                for name, call in variants.items():
                    _say(comm, f"T={tokens} {name} {mode} ...")
                    if mode == "graph":
                        us = time_graph_us(call, sets, stream, args.replays, comm)
                    else:
                        us = time_eager_us(call, sets[0], stream, args.calls, comm)
                    row[f"{name}_{mode}_us"] = comm.allreduce(us, op=MPI.MAX)
                if mode == "eager":
                    for t, norm in {**norms, **{f"{t}+rope": n for t, n in
                                                rope_norms.items()}}.items():
                        _say(comm, f"T={tokens} {t} bound eager ...")
                        q_, k_, qo, ko, pos = sets[0][:5]
                        bound = norm.bind(q_, k_, *w, out=(qo, ko),
                                          positions=pos if "+rope" in t else None)
                        us = time_eager_us(lambda *a: bound(a[-1]), sets[0], stream,
                                           args.calls, comm)
                        row[f"{t}_bound_eager_us"] = comm.allreduce(us, op=MPI.MAX)
            if "graph" in modes:
                _say(comm, f"T={tokens} copy kernel graph ...")
                row["copy_graph_us"] = comm.allreduce(
                    time_copy_graph_us([s[:4] for s in sets], stream, args.replays),
                    op=MPI.MAX)
                if kv is not None:
                    item = ITEMSIZE[args.dtype]
                    row["kv_bytes"] = prologue_bytes(tokens, dq, dk, item,
                                                     kv.storage_dtype(args.dtype).itemsize)
                    _say(comm, f"T={tokens} copy kernel over the prologue's bytes ...")
                    row["copy_kv_graph_us"] = comm.allreduce(time_copy_graph_us(
                        _copy_sets_for(sets, tokens, dq, row["kv_bytes"], item), stream,
                        args.replays), op=MPI.MAX)
            if jx is not None:
                stream.synchronize()
                row.update(_jax_row(jx, comm, jax_norms, dev, sets[0], w, rope,
                                    args.in_place, tokens, mesh))
            for n in (*norms.values(), *rope_norms.values(), *kv_norms.values()):
                n.synchronize()
            rows.append(row)
            del sets
    finally:
        for n in (*norms.values(), *rope_norms.values(), *kv_norms.values(),
                  *jax_norms.values()):
            n.close()
    floor_us = floors["empty_kernel_graph_us"] + (floors["one_way_us"] if world > 1 else 0)
    result = {"card": card, "G": world, "model": args.model, "dtype": args.dtype,
              "q_dim": args.q_dim,
              "k_dim": args.k_dim, "commit": commit, "pdl": pdl, "in_place": args.in_place,
              "rope": None if rope is None else repr(rope), "columns": columns,
              "kv_cache": None if kv is None else repr(kv),
              "positions": args.positions if rope is not None else None,
              "layouts": layouts, "floors": floors, "rows": rows,
              "jax": None if jx is None else {
                  "version": jx.__version__, "calls": [bench_jax.N1, bench_jax.N2],
                  "reps": bench_jax.REPS, "transports": list(jax_norms),
                  "xla": "local" if world == 1 else "psum" if mesh is not None else None,
                  "xla_why": xla_why},
              "date": time.strftime("%Y-%m-%d")}
    if comm.rank == 0:
        print(_table(result, modes, columns, floor_us))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        if args.plot:
            _plot(result, modes, columns, floor_us, args.plot)
    return 0


def _first(comm, why):
    """The first rank's reason of those that have one (every rank gets the same), or None."""
    return next((w for w in comm.allgather(why) if w), None)


def _jax_row(jax, comm, jax_norms, dev, inputs, w, rope, in_place, tokens, mesh=None):
    """--jax's numbers at one T, the slowest rank's: {"<t>_jit_us": our call (JaxQKNorm
    of transport t) inside jax.jit, "xla_us": XLA's own norm (+ RoPE), at G=1, or at
    G >= 2 with `mesh` (bench_jax.process_mesh) its psum across the processes}, per call
    by bench_jax's slope. `inputs`: an input set of _inputs (q, k, ..., positions, ...)."""
    from mpi4py import MPI

    from . import bench_jax
    q, k, _, _, positions = inputs[:5]
    jargs = bench_jax.to_jax(jax, dev, q, k, *w, positions)
    row = {}
    for t, qk in jax_norms.items():
        _say(comm, f"T={tokens} {t} jit ...")
        us, (captured, runs) = bench_jax.jit_us(jax, qk, jargs, in_place, comm.Barrier)
        row[f"{t}_jit_us"] = comm.allreduce(us, op=MPI.MAX)
        _say(comm, f"T={tokens} {t} jit: the handler ran {runs} times, {captured} of them "
                   f"captured by XLA into a command buffer")
    if jax_norms and (comm.size == 1 or mesh is not None):
        _say(comm, f"T={tokens} xla{' psum' if mesh is not None else ''} ...")
        eps = next(iter(jax_norms.values())).config.eps
        row["xla_us"] = comm.allreduce(bench_jax.xla_us(jax, jargs, eps, rope, dev,
                                                        mesh=mesh, barrier=comm.Barrier),
                                       op=MPI.MAX)
    return row


def _layouts(dtype, world, q_local, k_local, wide_from):
    """What the fused kernel runs at this shape (experiment knobs included), for the
    header: {"wide_from": tokens, layout: {warps, depth, staged}}."""
    from .tuning import LAYOUTS, Spec
    out = {"wide_from": wide_from}
    for name in LAYOUTS:
        s = Spec.plan(dtype, dtype, world, q_local, k_local, name)
        out[name] = {"warps": s.warps, "depth": s.depth, "staged": bool(s.staged)}
    return out


def _layout_line(layouts):
    def one(d):
        rows = "shared memory" if d["staged"] else "registers"
        return f"{d['warps']} warps a token, {d['depth']} tokens in flight in {rows}"
    rope = layouts.get("rope_wide_from")
    with_rope = f" ({rope} with RoPE)" if rope not in (None, layouts["wide_from"]) else ""
    return (f"fused kernel: narrow below {layouts['wide_from']}{with_rope} tokens a launch "
            f"({one(layouts['narrow'])}); wide from there ({one(layouts['wide'])})")


def _table(r, modes, columns, floor_us):
    f = r["floors"]
    model = f"  model={r['model']}" if r.get("model") else ""
    lines = [f"{r['card']} x{r['G']}{model}  dtype={r['dtype']}  q_dim={r['q_dim']} "
             f"k_dim={r['k_dim']}"
             f"  commit={r['commit']}  pdl={r.get('pdl')}"
             f"{'  in place' if r.get('in_place') else ''}  {r['date']}",
             f"floors: empty kernel (graph node) {f['empty_kernel_graph_us']:.2f} us; one-way "
             f"GPU-to-GPU {f['one_way_us']:.2f} us; device copy {f['copy_GBps']:.0f} GB/s",
             "floor(T) = max(empty kernel + one-way latency, bytes / copy bandwidth)"]
    if "exchange_graph_us" in f:
        lines.insert(2, f"exchange alone (graph node, no row): {f['exchange_graph_us']:.2f} us")
    if "cupy_launch_us" in f:
        lines.append(f"eager floor: CuPy's launch of an empty kernel, back to back: "
                     f"{f['cupy_launch_us']:.2f} us")
    if r.get("layouts"):
        lines.insert(1, _layout_line(r["layouts"]))
    if r.get("rope"):
        lines.append(f"rope: {r['rope']}, positions {r.get('positions') or 'random'}; "
                     f"T+rope: fused; ipc>rope: the ipc norm, then a separate RoPE kernel "
                     f"(two launches)")
    if r.get("kv_cache"):
        split = (r.get("layouts") or {}).get("cache_split_from")
        apart = f"; ipc from {split} tokens a launch: then a cache write launch" if split else ""
        lines.append(f"kv: {r['kv_cache']}, NHD, random slots; T+kv: the op's prologue "
                     f"(norm, RoPE, cache write{apart}); ipc+rope>kv: ipc+rope, then a "
                     f"separate cache write kernel; copy kv us: the prologue's bytes through "
                     f"the copy kernel")
    rows = r["rows"]
    if r.get("jax") and "graph" in modes:
        lines += _jax_lines(r)
    if rows and all("copy_graph_us" in row for row in rows):
        lines.append("copy us: the same bytes through a plain copy kernel, timed like ipc "
                     "(graph); ipc/copy: the fused call over it")
    for mode in modes:
        cols = [c for c in columns if all(f"{c}_{mode}_us" in row for row in rows)]
        if mode == "eager":
            cols += [f"{c}_bound" for c in columns
                     if all(f"{c}_bound_{mode}_us" in row for row in rows)]
        extra = []  # (title, function of the row)

        def ratio(a, b, title):
            if a in cols and b in cols:
                extra.append((title, lambda row, a=a, b=b:
                              f"{row[f'{a}_{mode}_us'] / row[f'{b}_{mode}_us']:.2f}x"))
        ratio("nccl", "ipc", "nccl/ipc")
        ratio("ipc+rope", "ipc", "ipc+rope/ipc")
        ratio("ipc>rope", "ipc+rope", "ipc>rope/ipc+rope")
        ratio("ipc+kv", "ipc+rope", "ipc+kv/ipc+rope")
        ratio("ipc+rope>kv", "ipc+kv", "ipc+rope>kv/ipc+kv")
        if mode == "eager" and "cupy_launch_us" in f:
            for c in ("ipc", "ipc_bound", "nccl", "nccl_bound"):
                if c in cols:
                    extra.append((f"{c}/launch", lambda row, c=c:
                                  f"{row[f'{c}_{mode}_us'] / f['cupy_launch_us']:.2f}x"))
        if mode == "graph" and "ipc" in cols:
            extra.append(("floor us", lambda row: f"{_floor(row, f, floor_us):.2f}"))
            extra.append(("ipc GB/s", lambda row: f"{row['bytes'] / (row['ipc_graph_us'] * 1e3):.0f}"))
            extra.append(("% copy", lambda row: f"{100 * row['bytes'] / (row['ipc_graph_us'] * 1e3) / f['copy_GBps']:.0f}%"))
            if all("copy_graph_us" in row for row in rows):
                extra.append(("copy us", lambda row: f"{row['copy_graph_us']:.2f}"))
                extra.append(("ipc/copy", lambda row: f"{row['ipc_graph_us'] / row['copy_graph_us']:.2f}x"))
            for c, copy, title in (("ipc+rope", "copy", "ipc+rope/copy"),
                                   ("ipc+kv", "copy_kv", "ipc+kv/copy kv")):
                if c not in cols or not all(f"{copy}_graph_us" in row for row in rows):
                    continue
                if copy == "copy_kv":
                    extra.append(("copy kv us", lambda row: f"{row['copy_kv_graph_us']:.2f}"))
                extra.append((title, lambda row, c=c, copy=copy:
                              f"{row[f'{c}_graph_us'] / row[f'{copy}_graph_us']:.2f}x"))
        if mode == "graph" and r.get("jax"):
            extra += _jax_columns(r, cols)
        titles = [f"{c.replace('_bound', ' bound')} us" for c in cols] + [t for t, _ in extra]
        widths = [max(9, len(t)) for t in titles]
        head = f"{'T':>6} | " + " | ".join(f"{t:>{w}}" for t, w in zip(titles, widths))
        lines += ["", f"[{mode}]", head, "-" * len(head)]
        for row in rows:
            cells = [f"{row[f'{c}_{mode}_us']:.2f}" for c in cols] + [fn(row) for _, fn in extra]
            lines.append(f"{row['T']:>6} | " + " | ".join(f"{v:>{w}}" for v, w in
                                                           zip(cells, widths)))
    return "\n".join(lines)


def _jax_lines(r):
    """The header lines of --jax's columns."""
    j = r["jax"]
    n1, n2 = j["calls"]
    rope = "+rope" if r.get("rope") else ""
    lines = [f"jit us: our call ({', '.join(f'{t}{rope}' for t in j['transports'])}) "
             f"inside jax.jit (jax {j['version']}), per call = (wall({n2}) - wall({n1})) / "
             f"{n2 - n1} over chains of {n1} and {n2} dependent calls in one jitted "
             f"function (JAX's dispatch cancels); jit/graph: over the CuPy graph column",
             f"xla us: XLA's own jitted norm{' + RoPE' if rope else ''} timed alike; "
             f"xla/jit: XLA's over ours"]
    if j.get("xla") == "psum":
        lines[-1] = (f"xla us: XLA's jitted norm{' + RoPE' if rope else ''} with a psum of "
                     f"the sums of squares across the {r['G']} processes (jax.distributed, "
                     f"shard_map; one psum for q and k), timed alike; "
                     f"xla/jit: XLA's over ours")
    elif not j.get("xla"):
        lines[-1] = f"xla: no psum baseline across the processes: " \
                    f"{j.get('xla_why') or 'not timed'}"
    return lines


def _jax_columns(r, cols):
    """[(title, function of the row)] of --jax: per transport '<t> jit us' and
    '<t> jit/graph' (over the graph column of the same call, '<t>+rope' with --rope),
    then 'xla us' and 'xla/<t> jit' where XLA's norm was timed."""
    rows, out, jitted = r["rows"], [], []
    for t in r["jax"]["transports"]:
        key = f"{t}_jit_us"
        if not all(key in row for row in rows):
            continue
        jitted.append(key)
        out.append((f"{t} jit us", lambda row, key=key: f"{row[key]:.2f}"))
        graph = f"{t}+rope" if r.get("rope") else t
        if graph in cols:
            out.append((f"{t} jit/graph", lambda row, key=key, g=f"{graph}_graph_us":
                        f"{row[key] / row[g]:.2f}x"))
    if rows and all("xla_us" in row for row in rows):
        out.append(("xla us", lambda row: f"{row['xla_us']:.2f}"))
        for key in jitted:
            out.append((f"xla/{key[:-len('_jit_us')]} jit", lambda row, key=key:
                        f"{row['xla_us'] / row[key]:.2f}x"))
    return out


def _floor(row, f, floor_us):
    return max(floor_us, row["bytes"] / (f["copy_GBps"] * 1e3))


def _plot(r, modes, transports, floor_us, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install 'cupy-qknorm[plot]')",
              file=sys.stderr)
        return
    ts = [row["T"] for row in r["rows"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in modes:
        for t in transports:
            if all(f"{t}_{mode}_us" in row for row in r["rows"]):
                ax.plot(ts, [row[f"{t}_{mode}_us"] for row in r["rows"]], marker="o",
                        label=f"{t} ({mode})")
    floor = [max(floor_us, row["bytes"] / (r["floors"]["copy_GBps"] * 1e3)) for row in r["rows"]]
    ax.plot(ts, floor, "k--", label="floor")
    if "graph" in modes and all("copy_graph_us" in row for row in r["rows"]):
        ax.plot(ts, [row["copy_graph_us"] for row in r["rows"]], "k:",
                label="copy kernel (graph)")
    ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="us per call",
           title=f"TP QK norm, {r['card']} x{r['G']}, {r['dtype']}")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
