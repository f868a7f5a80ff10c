"""mpiexec -n G python -m cupy_qknorm bench: fused ("ipc") vs unfused ("nccl") vs floors.

graph mode: 8 calls on 8 distinct input sets captured in one CUDA graph, >= 20 replays,
median replay time / 8. eager mode: host wall time per call over >= 200 calls,
synchronized at the end. Floors, measured in the same run: an empty kernel as a graph
node, one-way GPU-to-GPU latency (flag ping-pong through IPC memory, halved), and
device-to-device copy bandwidth; with --exchange-floor, the exchange alone as a graph
node (the decode floor); and per T in graph mode, the same bytes through a plain copy
kernel timed like the fused one (the memory floor at that size, launch and ramp
included). Progress goes to stderr, the table to stdout (rank 0).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

GRAPH_CALLS = 8


def add_parser(sub):
    b = sub.add_parser("bench", help="fused vs unfused latency and the hardware floors")
    b.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    b.add_argument("--q-dim", type=int, help="default: 6144, or what splits over G ranks")
    b.add_argument("--k-dim", type=int, help="default: 1024, or what splits over G ranks")
    b.add_argument("--tokens", default="1,8,64,512,2048,8192,16384",
                   type=lambda s: [int(v) for v in s.split(",") if v])
    b.add_argument("--mode", default="both", choices=("graph", "eager", "both"))
    b.add_argument("--transports", default="ipc,nccl", type=lambda s: s.split(","))
    b.add_argument("--replays", type=int, default=30)
    b.add_argument("--calls", type=int, default=200)
    b.add_argument("--json", help="write every number to this file (rank 0)")
    b.add_argument("--plot", help="latency vs T, log-log, to this PNG (needs matplotlib)")
    b.add_argument("--commit", help="the commit to print (default: git rev-parse HEAD)")
    b.add_argument("--exchange-floor", action="store_true",
                   help="also time the exchange alone (a one-warp kernel that only pushes "
                        "and waits) as a graph node: the decode floor of this host")
    b.add_argument("--in-place", action="store_true",
                   help="every call writes its output over its input (as SGLang's kernel "
                        "and benchmark do); the copy kernel then copies each buffer onto "
                        "itself. Default: separate output arrays")


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
    slowest rank. What a call cannot go below at decode on this host, launch included."""
    import cupy
    from .compile import load_plain
    from .shapes import MAX_WORLD
    from .peers import PeerBuffers
    if comm.size < 2:
        return float("nan")
    buf = PeerBuffers(comm, 8 * comm.size)
    try:
        cupy.cuda.runtime.memset(buf.local, 0, 8 * comm.size)  # no call seen yet
        state = cupy.zeros(2, cupy.uint64)                      # calls made, timed out
        cupy.cuda.runtime.deviceSynchronize()
        comm.Barrier()
        exchange = load_plain("qknorm_exchange")
        ptrs = list(buf.ptrs) + [0] * (MAX_WORLD - comm.size)
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


def _inputs(comm, dtype, dq, dk, tokens, sets, in_place=False):
    """`sets` tuples (q, k, q_out, k_out); in place, q_out is q and k_out is k. The weights
    are ones, so calls in place keep every row's RMS at 1 however often a graph replays."""
    import cupy
    from . import reference as ref
    rng = np.random.default_rng(1000 + comm.rank)
    out = []
    for _ in range(sets):
        q = cupy.asarray(ref.from_f64(ref.random_rows(rng, tokens, dq, (-1, 1)), dtype))
        k = cupy.asarray(ref.from_f64(ref.random_rows(rng, tokens, dk, (-1, 1)), dtype))
        out.append((q, k, q, k) if in_place else
                   (q, k, cupy.empty_like(q), cupy.empty_like(k)))
    w = (cupy.asarray(ref.from_f64(np.ones(dq), dtype)), cupy.asarray(ref.from_f64(np.ones(dk),
                                                                                   dtype)))
    return out, w


def time_graph_us(norm, sets, w, stream, replays):
    with stream:
        for q, k, qo, ko in sets:  # warm up: compile, first touch
            norm(q, k, *w, out=(qo, ko))
        stream.synchronize()
        norm.comm.Barrier()
        stream.begin_capture()
        for q, k, qo, ko in sets:
            norm(q, k, *w, out=(qo, ko))
        g = stream.end_capture()
        g.launch(stream)
        stream.synchronize()
        norm.comm.Barrier()
        ms = _median_event_ms(lambda: g.launch(stream), replays, stream)
    norm.synchronize(stream)
    return 1000 * ms / len(sets)


def time_eager_us(norm, sets, w, stream, calls):
    with stream:
        for q, k, qo, ko in sets:
            norm(q, k, *w, out=(qo, ko))
        stream.synchronize()
        norm.comm.Barrier()
        t = time.perf_counter()
        for i in range(calls):
            q, k, qo, ko = sets[i % len(sets)]
            norm(q, k, *w, out=(qo, ko))
        stream.synchronize()
        dt = time.perf_counter() - t
    norm.synchronize(stream)
    return 1e6 * dt / calls


def run(args):
    import cupy
    from mpi4py import MPI

    from . import TPQKNorm
    from .placement import no_gpu_reason, select_device
    from .shapes import ITEMSIZE, default_dims
    comm = MPI.COMM_WORLD
    select_device(comm)
    reason = no_gpu_reason()
    if reason is not None:
        _say(comm, f"bench: needs one CUDA GPU per rank; this host has none usable ({reason})")
        return 2
    world = comm.size
    q, k = default_dims(world)
    args.q_dim = args.q_dim or q
    args.k_dim = args.k_dim or k
    dq, dk = args.q_dim // world, args.k_dim // world
    stream = cupy.cuda.Stream(non_blocking=True)
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    card = props["name"].decode()
    commit = args.commit
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True,
                                    timeout=5).stdout.strip() or "unknown"
        except Exception:  # noqa: BLE001 - no git, or not a checkout
            commit = "unknown"
    _say(comm, "floors ...")
    floors = {"empty_kernel_graph_us": floor_empty_kernel_us(stream),
              "one_way_us": floor_one_way_us(comm, stream),
              "copy_GBps": floor_copy_gbps(stream)}
    if args.exchange_floor:
        _say(comm, "exchange floor ...")
        floors["exchange_graph_us"] = floor_exchange_us(comm, stream)
    floors = {k: comm.allreduce(v, op=MPI.MAX) if k != "copy_GBps" else
              comm.allreduce(v, op=MPI.MIN) for k, v in floors.items()}
    modes = ["graph", "eager"] if args.mode == "both" else [args.mode]
    rows = []
    norms = {t: TPQKNorm(comm, args.q_dim, args.k_dim, args.dtype,
                         max_tokens=max(args.tokens), transport=t) for t in args.transports}
    ipc = norms.get("ipc")
    pdl = bool(getattr(ipc._transport, "pdl", False)) if ipc is not None else None
    layouts = _layouts(args.dtype, world, dq, dk, ipc._transport.wide_from) \
        if ipc is not None else None
    try:
        for tokens in args.tokens:
            sets, w = _inputs(comm, args.dtype, dq, dk, tokens, GRAPH_CALLS, args.in_place)
            row = {"T": tokens, "bytes": 2 * tokens * (dq + dk) * ITEMSIZE[args.dtype]}
            for mode in modes:
                for t, norm in norms.items():
                    _say(comm, f"T={tokens} {t} {mode} ...")
                    us = (time_graph_us(norm, sets, w, stream, args.replays) if mode == "graph"
                          else time_eager_us(norm, sets, w, stream, args.calls))
                    row[f"{t}_{mode}_us"] = comm.allreduce(us, op=MPI.MAX)
            if "graph" in modes:
                _say(comm, f"T={tokens} copy kernel graph ...")
                row["copy_graph_us"] = comm.allreduce(
                    time_copy_graph_us(sets, stream, args.replays), op=MPI.MAX)
            rows.append(row)
            del sets
    finally:
        for n in norms.values():
            n.close()
    floor_us = floors["empty_kernel_graph_us"] + (floors["one_way_us"] if world > 1 else 0)
    result = {"card": card, "G": world, "dtype": args.dtype, "q_dim": args.q_dim,
              "k_dim": args.k_dim, "commit": commit, "pdl": pdl, "in_place": args.in_place,
              "layouts": layouts, "floors": floors, "rows": rows,
              "date": time.strftime("%Y-%m-%d")}
    if comm.rank == 0:
        print(_table(result, modes, args.transports, floor_us))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        if args.plot:
            _plot(result, modes, args.transports, floor_us, args.plot)
    return 0


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
    return (f"fused kernel: narrow below {layouts['wide_from']} tokens a launch "
            f"({one(layouts['narrow'])}); wide from there ({one(layouts['wide'])})")


def _table(r, modes, transports, floor_us):
    f = r["floors"]
    lines = [f"{r['card']} x{r['G']}  dtype={r['dtype']}  q_dim={r['q_dim']} k_dim={r['k_dim']}"
             f"  commit={r['commit']}  pdl={r.get('pdl')}"
             f"{'  in place' if r.get('in_place') else ''}  {r['date']}",
             f"floors: empty kernel (graph node) {f['empty_kernel_graph_us']:.2f} us; one-way "
             f"GPU-to-GPU {f['one_way_us']:.2f} us; device copy {f['copy_GBps']:.0f} GB/s",
             "floor(T) = max(empty kernel + one-way latency, bytes / copy bandwidth)"]
    if "exchange_graph_us" in f:
        lines.insert(2, f"exchange alone (graph node, no row): {f['exchange_graph_us']:.2f} us")
    if r.get("layouts"):
        lines.insert(1, _layout_line(r["layouts"]))
    if r["rows"] and all("copy_graph_us" in row for row in r["rows"]):
        lines.append("copy us: the same bytes through a plain copy kernel, timed like ipc "
                     "(graph); ipc/copy: the fused call over it")
    for mode in modes:
        head = f"{'T':>6} | " + " | ".join(f"{t + ' us':>9}" for t in transports)
        if "ipc" in transports and "nccl" in transports:
            head += " | speedup"
        copy_col = mode == "graph" and "ipc" in transports and \
            all("copy_graph_us" in row for row in r["rows"])
        if "ipc" in transports:
            head += " | floor us | ipc GB/s | % copy"
        if copy_col:
            head += " |  copy us | ipc/copy"
        lines += ["", f"[{mode}]", head, "-" * len(head)]
        for row in r["rows"]:
            floor = max(floor_us, row["bytes"] / (f["copy_GBps"] * 1e3))
            cells = [f"{row[f'{t}_{mode}_us']:>9.2f}" for t in transports]
            s = f"{row['T']:>6} | " + " | ".join(cells)
            if "ipc" in transports and "nccl" in transports:
                s += f" | {row[f'nccl_{mode}_us'] / row[f'ipc_{mode}_us']:>6.1f}x"
            if "ipc" in transports:
                gbps = row["bytes"] / (row[f"ipc_{mode}_us"] * 1e3)
                s += f" | {floor:>8.2f} | {gbps:>8.0f} | {100 * gbps / f['copy_GBps']:>5.0f}%"
            if copy_col:
                c = row["copy_graph_us"]
                s += f" | {c:>8.2f} | {row['ipc_graph_us'] / c:>7.2f}x"
            lines.append(s)
    return "\n".join(lines)


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
