"""Host time of one eager call, split into its parts (bf16, widths shapes.default_dims(G)):

    mpiexec -n G python scripts/eager_breakdown.py [--tokens 1] [--transport ipc]

Each part is timed in batches of 100 calls started on an idle GPU, so the launch queue
never fills and the figures are host time, not GPU time; "sustained" is the rate of many
back-to-back calls, which the GPU bounds when it is slower than the host. One line on
rank 0, in us per call."""
import argparse
import sys
import time
import timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package


def batches(fn, stream, comm, calls=100, rounds=30):
    """Median host us per call over `rounds` batches of `calls`, each on an idle GPU."""
    per = []
    for _ in range(rounds):
        stream.synchronize()
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t0) / calls * 1e6)
    stream.synchronize()
    return float(np.median(per))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--transport", default="ipc", choices=("ipc", "nccl", "mpi"))
    p.add_argument("--sustained", type=int, default=2000, help="calls back to back")
    args = p.parse_args(argv)
    import cupy
    from mpi4py import MPI

    from cupy_qknorm import TPQKNorm
    from cupy_qknorm.compile import load_plain
    from cupy_qknorm.placement import select_device
    from cupy_qknorm.shapes import default_dims
    comm = MPI.COMM_WORLD
    select_device(comm)
    G = comm.size
    q_dim, k_dim = default_dims(G)
    T = args.tokens
    q = cupy.zeros((T, q_dim // G), cupy.uint16)
    k = cupy.zeros((T, k_dim // G), cupy.uint16)
    qw = cupy.zeros(q_dim // G, cupy.uint16)
    kw = cupy.zeros(k_dim // G, cupy.uint16)
    qo, ko = cupy.empty_like(q), cupy.empty_like(k)
    s = cupy.cuda.get_current_stream()
    empty = load_plain("qknorm_empty")
    with TPQKNorm(comm, q_dim, k_dim, "bfloat16", max_tokens=max(64, T),
                  transport=args.transport) as norm:
        t = norm._transport
        norm(q, k, qw, kw, out=(qo, ko))
        arrs = (q, k, qw, kw, qo, ko, None)
        call = norm._validate(*arrs)
        parts = {
            "CuPy empty kernel": lambda: empty((1,), (32,), ()),
            "full validation": lambda: norm._validate(*arrs),
            "validation + bind": lambda: t.bind(norm._validate(*arrs)),
            "full call": lambda: norm(q, k, qw, kw, out=(qo, ko)),
            "full call in place": lambda: norm(q, k, qw, kw),
            "bound call": norm.bind(q, k, qw, kw, out=(qo, ko)),
            "bound launch alone": t.bind(call),
        }
        parts["bound launch alone"] = (lambda go: lambda: go(s))(parts["bound launch alone"])
        pdl = bool(getattr(t, "pdl", False))  # only the fused kernel launches with PDL
        kernel = next(iter(t.chunks(call)[0].go.values()))
        path = ("CuPy launch (fallback)" if kernel.__name__ == "go_cupy" else
                "cuLaunchKernelEx" + (" with PDL" if pdl else ""))
        res = {name: batches(fn, s, comm) for name, fn in parts.items()}
        # the cached call's steps alone (host only, nothing launched), ns each
        calls, e = norm._calls, norm._error
        steps = {
            "identity key": lambda: calls.get((id(q), id(k), id(qw), id(kw), id(None), None,
                                               id(qo), id(ko))),
            "2-D shapes": lambda: (q.shape, k.shape, qo.shape, ko.shape),
            "1-D ranks": lambda: qw.ndim == 1 and kw.ndim == 1,
            "error word": lambda: not e[0],
            "current stream": norm._current_stream,
            "len+ndim of q": lambda: len(q) == T and q.ndim == 2,
            "empty call": lambda: None,
        }
        for name, fn in steps.items():
            best = min(timeit.repeat(fn, number=20000, repeat=5)) / 20000 * 1e9
            res[f"{name} (ns)"] = best
        s.synchronize()
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(args.sustained):
            norm(q, k, qw, kw, out=(qo, ko))
        s.synchronize()
        res[f"sustained ({args.sustained} calls)"] = \
            (time.perf_counter() - t0) / args.sustained * 1e6
        norm.synchronize()
        transport = norm.transport
    if comm.rank == 0:
        card = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
        print(f"eager host time per call (us; {card}, G={G}, T={T}, {transport}, {path}, "
              f"pdl={pdl}): " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
