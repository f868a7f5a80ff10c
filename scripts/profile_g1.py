"""The fused kernel alone, for Nsight Compute: one rank, so no exchange (ncu replays a
kernel, and a kernel that waits on other GPUs' writes cannot be replayed by one rank).

    ncu --clock-control none -k regex:fused -s 2 -c 1 --page raw \
        python scripts/profile_g1.py --tokens 1024 --q-dim 3072 --k-dim 512

Widths default to G=2's local widths of MiniMax M2, so the kernel does a G=2 rank's memory
work. Also prints, for the same bytes, a copy kernel (16-byte
vectors, one launch for q and k), each as a graph of 8 calls on 8 input sets like the benchmark: the time a plain
copy of these rows takes at this size, launch and ramp included.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

SETS = 8
COPY = r"""
extern "C" __global__ void copy2(const uint4* a, uint4* ao, long long na, const uint4* b,
                                 uint4* bo, long long nb) {
  const long long n = na + nb, step = (long long)gridDim.x * blockDim.x;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += 4 * step) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const long long j = i + u * step;
      if (j < n) v[u] = j < na ? a[j] : b[j - na];
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const long long j = i + u * step;
      if (j < n) { if (j < na) ao[j] = v[u]; else bo[j - na] = v[u]; }
    }
  }
}
"""


def graph_us(fn, stream, replays=50):
    import cupy
    with stream:
        for i in range(SETS):
            fn(i)
        stream.synchronize()
        stream.begin_capture()
        for i in range(SETS):
            fn(i)
        g = stream.end_capture()
        g.launch(stream)
        times = []
        for _ in range(replays):
            a, b = cupy.cuda.Event(), cupy.cuda.Event()
            a.record(stream)
            g.launch(stream)
            b.record(stream)
            b.synchronize()
            times.append(cupy.cuda.get_elapsed_time(a, b))
    return 1000 * float(np.median(times)) / SETS


def main(argv=None):
    import cupy
    from mpi4py import MPI

    from cupy_qknorm import TPQKNorm
    from cupy_qknorm import reference as ref
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="1024", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--q-dim", type=int, default=3072)
    p.add_argument("--k-dim", type=int, default=512)
    p.add_argument("--calls", type=int, default=4, help="plain launches for the profiler")
    args = p.parse_args(argv)
    comm = MPI.COMM_SELF
    rng = np.random.default_rng(7)
    stream = cupy.cuda.Stream(non_blocking=True)
    copy2 = cupy.RawKernel(COPY, "copy2")
    print("| T | fused (G=1) us | copy of the same bytes us |")
    print("| --- | --- | --- |")
    for tokens in args.tokens:
        sets = []
        for _ in range(SETS):
            q = cupy.asarray(ref.from_f64(ref.random_rows(rng, tokens, args.q_dim, (-1, 1)),
                                          "bfloat16"))
            k = cupy.asarray(ref.from_f64(ref.random_rows(rng, tokens, args.k_dim, (-1, 1)),
                                          "bfloat16"))
            sets.append((q, k, cupy.empty_like(q), cupy.empty_like(k)))
        w = (cupy.full(args.q_dim, 0x3F80, cupy.uint16),  # bf16 ones, as the benchmark
             cupy.full(args.k_dim, 0x3F80, cupy.uint16))
        with TPQKNorm(comm, args.q_dim, args.k_dim, "bfloat16", max_tokens=max(tokens, 1),
                      transport="ipc") as norm:
            with stream:
                for i in range(args.calls):  # what ncu profiles (-s / -c pick among these)
                    q, k, qo, ko = sets[i % SETS]
                    norm(q, k, *w, out=(qo, ko))
            stream.synchronize()
            fused = graph_us(lambda i: norm(sets[i][0], sets[i][1], *w,
                                            out=(sets[i][2], sets[i][3])), stream)
            norm.synchronize(stream)

        nq, nk = sets[0][0].nbytes // 16, sets[0][1].nbytes // 16
        blocks = max(1, min(-(-(nq + nk) // (256 * 4)), 132 * 8))

        def copy(i):
            q, k, qo, ko = sets[i]
            copy2((blocks,), (256,), (q, qo, np.int64(nq), k, ko, np.int64(nk)))
        print(f"| {tokens} | {fused:.2f} | {graph_us(copy, stream):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
