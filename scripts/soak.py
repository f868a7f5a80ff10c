"""Soak: many calls with a random T each (the same on every rank), eager and in CUDA
graphs, parity sampled along the way. No error, no hang, every sample exact.

    mpiexec -n G python scripts/soak.py [--calls 1000000] [--mode eager|graph|both]

T is drawn per call: 80% in 1..64 (decode), 20% in 65..--max-t (prefill); launches are
chunked at --max-tokens, so with the defaults (4096, 2048) both layouts of the fused
kernel run, the wide one for every chunk of 2048 tokens or more. Every
--check-every calls the outputs are poisoned, one call (eager) or one graph replay runs,
and its rows are compared with the float64 reference. Graph mode captures --graphs
graphs of --calls-per-graph calls (random T each) and replays them in a random order.
Progress on stderr; one summary line per rank and mode; exit 1 on any failure."""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package

from cupy_qknorm import TPQKNorm  # noqa: E402
from cupy_qknorm import reference as ref  # noqa: E402
from cupy_qknorm.placement import select_device  # noqa: E402
from cupy_qknorm.shapes import default_dims  # noqa: E402

DTYPE = "bfloat16"


def draw(rng, n, max_t):
    return np.where(rng.random(n) < 0.8, rng.integers(1, 65, n),
                    rng.integers(65, max_t + 1, n)).astype(np.int64)


class Case:
    def __init__(self, comm, max_t):
        import cupy
        G, r = comm.size, comm.rank
        q, k, qw, kw, qr, kr = ref.make_case(17, max_t, *default_dims(G), DTYPE)
        self.q, self.k, self.qw, self.kw = [
            cupy.asarray(np.ascontiguousarray(ref.shard(a, G, r))) for a in (q, k, qw, kw)]
        self.want = (ref.shard(qr, G, r), ref.shard(kr, G, r))
        self.qo, self.ko = cupy.empty_like(self.q), cupy.empty_like(self.k)
        self.comm = comm

    def call(self, norm, t):
        norm(self.q[:t], self.k[:t], self.qw, self.kw, out=(self.qo[:t], self.ko[:t]))

    def poison(self):
        self.qo.fill(ref.poison(DTYPE))
        self.ko.fill(ref.poison(DTYPE))

    def bad(self, rows):
        """Elements past tolerance in rows [0, rows), plus any row past it written."""
        qo, ko = self.qo.get(), self.ko.get()
        n = sum(ref.compare(o[:rows], w[:rows], DTYPE)[1]
                for o, w in ((qo, self.want[0]), (ko, self.want[1])))
        p = ref.poison(DTYPE)
        n += int((qo[rows:] != p).sum() + (ko[rows:] != p).sum())
        return n


def eager(norm, case, calls, args, rng, log):
    sizes = draw(rng, calls, args.max_t)
    bad = checks = 0
    t0 = time.perf_counter()
    for i, t in enumerate(sizes):
        t = int(t)
        if i % args.check_every == args.check_every - 1:
            case.poison()
            case.call(norm, t)
            norm.synchronize()
            bad += case.bad(t)
            checks += 1
            if i % (20 * args.check_every) == 20 * args.check_every - 1:
                log(f"eager {i + 1}/{calls} calls, {time.perf_counter() - t0:.0f} s, "
                    f"{bad} bad")
        else:
            case.call(norm, t)
    norm.synchronize()
    return bad, checks, time.perf_counter() - t0, int(sizes.sum())


def graph(norm, case, calls, args, rng, log):
    """Returns (elements bad, samples, seconds, rows); calls = replays * calls_per_graph."""
    import cupy
    stream = cupy.cuda.Stream(non_blocking=True)
    graphs, widest, rows_of = [], [], []
    with stream:
        case.call(norm, 8)
        stream.synchronize()
        for _ in range(args.graphs):
            sizes = draw(rng, args.calls_per_graph, args.max_t)
            stream.begin_capture()
            for t in sizes:
                case.call(norm, int(t))
            graphs.append(stream.end_capture())
            widest.append(int(sizes.max()))
            rows_of.append(int(sizes.sum()))
        replays = calls // args.calls_per_graph
        order = rng.integers(0, args.graphs, replays)
        every = max(1, args.check_every // args.calls_per_graph)
        bad = checks = 0
        t0 = time.perf_counter()
        for i, g in enumerate(order):
            check = i % every == every - 1
            if check:
                stream.synchronize()
                case.poison()
                cupy.cuda.Device().synchronize()
            graphs[g].launch(stream)
            if check:
                stream.synchronize()
                norm.synchronize(stream)
                bad += case.bad(widest[g])
                checks += 1
                if checks % 20 == 0:
                    log(f"graph {(i + 1) * args.calls_per_graph}/{calls} calls, "
                        f"{time.perf_counter() - t0:.0f} s, {bad} bad")
            elif i % 64 == 63:
                stream.synchronize()  # bound the launch queue
        stream.synchronize()
        norm.synchronize(stream)
        took = time.perf_counter() - t0
    del graphs
    return bad, checks, took, int(sum(rows_of[g] for g in order))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1_000_000)
    ap.add_argument("--mode", choices=("eager", "graph", "both"), default="both")
    ap.add_argument("--max-t", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--check-every", type=int, default=10_000)
    ap.add_argument("--graphs", type=int, default=16)
    ap.add_argument("--calls-per-graph", type=int, default=200)
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args()
    import cupy
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    select_device(comm)
    G, rank = comm.size, comm.rank
    card = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()

    def log(msg):
        if rank == 0:
            print(f"  {msg}", file=sys.stderr, flush=True)

    case = Case(comm, args.max_t)
    ok = True
    modes = ("eager", "graph") if args.mode == "both" else (args.mode,)
    with TPQKNorm(comm, *default_dims(G), DTYPE, max_tokens=args.max_tokens,
                  transport="ipc") as norm:
        for mode in modes:
            rng = np.random.default_rng(args.seed)  # the same T sequence on every rank
            fn = eager if mode == "eager" else graph
            try:
                bad, checks, took, rows = fn(norm, case, args.calls, args, rng, log)
                err = None
            except Exception as e:  # noqa: BLE001 - reported per rank, run fails
                bad, checks, took, rows, err = -1, 0, 0.0, 0, e
            good = err is None and bad == 0 and checks > 0
            ok &= good
            print(f"soak {mode} G={G} rank {rank} ({card}): {args.calls} calls "
                  f"({rows} rows) in {took:.1f} s ({1e6 * took / max(1, args.calls):.1f} "
                  f"us/call), {checks} parity samples, {bad} elements bad"
                  f"{'' if err is None else f', error {err!r}'}: "
                  f"{'OK' if good else 'FAIL'}", flush=True)
            if err is not None:
                break
    sys.exit(0 if comm.allreduce(ok, op=MPI.LAND) else 1)


if __name__ == "__main__":
    main()
