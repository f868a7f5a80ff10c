"""Where the fused kernel's time goes, per block, from its own clock (a diagnostic build).

    mpiexec -n G python scripts/trace_fused.py [--tokens 1,64,1024,16384] [--in-place]

Builds the kernel with CUPY_QKNORM_TRACE=1 (thread 0 of every block counts SM cycles,
qknorm::Trace), times it as the benchmark does (a CUDA graph of 8 calls on 8 input sets,
median replay / 8) next to the plain build, and reads the records of the graph's last call.
Per rank and T, over the blocks (median and max, in ns):
  pass    entry -> past griddepcontrol.wait (the end of the previous call)
  first   past the wait -> the block's first token pushed (loads, sums, barrier, store)
  ready   every wait for a row's loads and the block's sum, summed over its tokens
  wait    every wait for the peers' partials, summed over its tokens (first: the first
          token's; longest: the longest single one)
  block   entry -> end; tokens a block
and `wait %`, the share of the block's time spent waiting for partials. Cycles become ns
with the ratio globaltimer / clock64 over the longest blocks of the run.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package

TRACE = "CUPY_QKNORM_TRACE"  # read at each build: part of the compiled kernel's cache key


def main(argv=None):
    from cupy_qknorm.shapes import default_dims
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,64,1024,16384",
                   type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--q-dim", type=int, help="full q width (default: shapes.default_dims(G))")
    p.add_argument("--k-dim", type=int, help="full k width (default: shapes.default_dims(G))")
    p.add_argument("--replays", type=int, default=30)
    p.add_argument("--in-place", action="store_true")
    args = p.parse_args(argv)
    import cupy
    from mpi4py import MPI

    from cupy_qknorm import TPQKNorm, bench
    from cupy_qknorm.placement import select_device
    comm = MPI.COMM_WORLD
    select_device(comm)
    G = comm.size
    q_dim, k_dim = default_dims(G)
    args.q_dim, args.k_dim = args.q_dim or q_dim, args.k_dim or k_dim
    dq, dk = args.q_dim // G, args.k_dim // G
    stream = cupy.cuda.Stream(non_blocking=True)
    rows = []
    for tokens in args.tokens:
        sets, w = bench._inputs(comm, "bfloat16", dq, dk, tokens, bench.GRAPH_CALLS,
                                args.in_place)

        def call(q, k, qo, ko, pos, stream):
            norm(q, k, *w, out=(qo, ko), stream=stream)
        timed = {}
        for build in ("plain", "traced"):
            os.environ[TRACE] = "1" if build == "traced" else "0"
            with TPQKNorm(comm, args.q_dim, args.k_dim, "bfloat16", max_tokens=tokens,
                          transport="ipc") as norm:
                t = norm._transport
                timed[build] = bench.time_graph_us(call, sets, stream, args.replays, comm)
                if build == "traced":
                    grid = min(tokens, t.kernels("bfloat16", t.layout(tokens))[2])
                    rec = t.trace(grid)
                    layout = t.layout(tokens)
        os.environ.pop(TRACE)
        rows.append((tokens, layout, timed, rec))
    # ns per cycle from the longest blocks of the run (globaltimer's steps are coarse)
    longest = max(rows, key=lambda r: np.median(r[3][:, 4].astype(float)))[3]
    ns_per_cycle = float(np.sum(longest[:, 6] - longest[:, 0]) /
                         np.sum(longest[:, 4].astype(float)))
    lines = [f"rank {comm.rank}: ns per cycle {ns_per_cycle:.4f} "
             f"({1 / ns_per_cycle:.3f} GHz), "
             f"{cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)['name'].decode()}"
             f", G={G}",
             "| T | layout | plain us | traced us | blocks | tokens/block | pass | first | "
             "ready | wait | first wait | longest wait | block | wait % | entry spread |",
             "| --- " * 15 + "|"]

    def ns(col, rec, how):
        return how(rec[:, col].astype(float)) * ns_per_cycle

    for tokens, layout, timed, rec in rows:
        med = lambda c: ns(c, rec, np.median)  # noqa: E731
        top = lambda c: ns(c, rec, np.max)  # noqa: E731
        share = float(np.median(rec[:, 3].astype(float) / rec[:, 4]))
        spread = float(rec[:, 0].max() - rec[:, 0].min())
        lines.append(
            f"| {tokens} | {layout} | {timed['plain']:.2f} | {timed['traced']:.2f} | "
            f"{len(rec)} | {np.median(rec[:, 5]):.0f} | {med(1):.0f} / {top(1):.0f} | "
            f"{med(2):.0f} / {top(2):.0f} | {med(7):.0f} / {top(7):.0f} | "
            f"{med(3):.0f} / {top(3):.0f} | {med(8):.0f} / {top(8):.0f} | "
            f"{med(9):.0f} / {top(9):.0f} | {med(4):.0f} / {top(4):.0f} | "
            f"{100 * share:.0f} | {spread:.0f} |")
    out = comm.gather("\n".join(lines), root=0)
    if comm.rank == 0:
        print("median / max over blocks, ns (the graph's last call)")
        print("\n\n".join(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
