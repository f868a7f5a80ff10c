"""The fused kernel alone, for Nsight Compute: one rank, so no exchange (ncu replays a
kernel, and a kernel that waits on other GPUs' writes cannot be replayed by one rank);
--rope adds MiniMax M2's rotation.

    ncu --clock-control none -k regex:fused -s 2 -c 1 --page raw \
        python scripts/profile_g1.py --tokens 1024 --q-dim 3072 --k-dim 512

Widths default to G=2's local widths of MiniMax M2, so the kernel does a G=2 rank's memory
work. Also prints, per T, the fused call and the same bytes through the benchmark's plain
copy kernel, each timed as the benchmark does (a graph of 8 calls on 8 input sets): how
far the kernel without its exchange is from a copy of its rows at that size.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1024", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--q-dim", type=int, default=3072)
    p.add_argument("--k-dim", type=int, default=512)
    p.add_argument("--calls", type=int, default=4, help="plain launches for the profiler")
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--world", type=int, default=2,
                   help="the G whose layout thresholds the kernel takes (one rank alone "
                        "would take G=1's)")
    p.add_argument("--rope", action="store_true",
                   help="with MiniMax M2's RoPE fused (random positions, as bench)")
    args = p.parse_args(argv)
    import cupy
    from mpi4py import MPI

    from cupy_qknorm import RoPE, TPQKNorm, bench
    from cupy_qknorm.tuning import wide_from
    from cupy_qknorm import reference as ref
    comm = MPI.COMM_SELF
    rng = np.random.default_rng(7)
    stream = cupy.cuda.Stream(non_blocking=True)
    print("| T | fused (G=1) us | copy kernel, same bytes us |")
    print("| --- | --- | --- |")
    for tokens in args.tokens:
        sets = []
        for _ in range(bench.GRAPH_CALLS):
            q = cupy.asarray(ref.from_f64(ref.random_rows(rng, tokens, args.q_dim, (-1, 1)),
                                          "bfloat16"))
            k = cupy.asarray(ref.from_f64(ref.random_rows(rng, tokens, args.k_dim, (-1, 1)),
                                          "bfloat16"))
            pos = cupy.asarray(rng.integers(0, 196608, tokens)) if args.rope else None
            sets.append((q, k, cupy.empty_like(q), cupy.empty_like(k), pos))
        w = (cupy.asarray(ref.from_f64(np.ones(args.q_dim), "bfloat16")),  # as the benchmark
             cupy.asarray(ref.from_f64(np.ones(args.k_dim), "bfloat16")))
        with TPQKNorm(comm, args.q_dim, args.k_dim, "bfloat16", max_tokens=max(tokens, 1),
                      transport="ipc", rope=RoPE.minimax_m2() if args.rope else None) as norm:
            norm._transport.wide_from = wide_from(args.world, args.rope)  # G=2's layouts
            with stream:
                for i in range(args.calls):  # what ncu profiles (-s / -c pick among these)
                    q, k, qo, ko, pos = sets[i % len(sets)]
                    norm(q, k, *w, out=(qo, ko), positions=pos)
            stream.synchronize()
            fused = bench.time_graph_us(
                lambda q, k, qo, ko, pos, stream: norm(q, k, *w, out=(qo, ko), positions=pos,
                                                       stream=stream),
                sets, stream, args.replays, comm)
        copy = bench.time_copy_graph_us([s[:4] for s in sets], stream, args.replays)
        print(f"| {tokens} | {fused:.2f} | {copy:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
