"""Construct/close cycles: device memory and IPC mappings must not grow.

    mpiexec -n G python scripts/cycles.py [--cycles 500] [--transport ipc]

Each cycle builds a TPQKNorm, makes one exact call and closes it. Device memory (free bytes
from cudaMemGetInfo) and this process's open IPC mappings are read after a first warm cycle
and at the end; one line per rank; exit 1 if anything grew."""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package

from cupy_qknorm import TPQKNorm, peers  # noqa: E402
from cupy_qknorm import reference as ref  # noqa: E402
from cupy_qknorm.placement import select_device  # noqa: E402
from cupy_qknorm.shapes import default_dims  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=500)
    ap.add_argument("--transport", default="ipc", choices=("ipc", "nccl", "mpi"))
    args = ap.parse_args()
    import cupy
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    select_device(comm)
    G, rank = comm.size, comm.rank
    q_dim, k_dim = default_dims(G)
    q, k, qw, kw, qr, kr = ref.make_case(5, 7, q_dim, k_dim, "bfloat16")
    sh = [cupy.asarray(np.ascontiguousarray(ref.shard(a, G, rank))) for a in (q, k, qw, kw)]
    want = [ref.shard(qr, G, rank), ref.shard(kr, G, rank)]
    pool = cupy.get_default_memory_pool()

    def cycle():
        outs = [cupy.full_like(sh[0], ref.poison("bfloat16")),
                cupy.full_like(sh[1], ref.poison("bfloat16"))]
        with TPQKNorm(comm, q_dim, k_dim, "bfloat16", max_tokens=4096,
                      transport=args.transport) as norm:
            norm(*sh, out=outs)
            norm.synchronize()
        bad = sum(ref.compare(o.get(), w, "bfloat16")[1] for o, w in zip(outs, want))
        return bad

    bad = cycle()
    cupy.cuda.Device().synchronize()
    pool.free_all_blocks()
    free0 = cupy.cuda.runtime.memGetInfo()[0]
    maps0 = peers.open_mappings()
    fds0 = len(os.listdir("/proc/self/fd"))
    t0 = time.perf_counter()
    for i in range(args.cycles):
        bad += cycle()
        if rank == 0 and (i + 1) % 100 == 0:
            print(f"  {i + 1}/{args.cycles} cycles, {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
    pool.free_all_blocks()
    free1 = cupy.cuda.runtime.memGetInfo()[0]
    maps1 = peers.open_mappings()
    fds1 = len(os.listdir("/proc/self/fd"))
    took = time.perf_counter() - t0
    grew = free0 - free1
    ok = grew <= 0 and maps1 == maps0 == 0 and fds1 <= fds0 and bad == 0
    card = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    print(f"cycles G={G} rank {rank} ({card}, {args.transport}): {args.cycles} cycles in "
          f"{took:.1f} s ({1e3 * took / args.cycles:.1f} ms each); device memory grew "
          f"{grew} bytes; open IPC mappings {maps0} -> {maps1}; open fds {fds0} -> {fds1}; "
          f"elements past tolerance "
          f"{bad}: {'OK' if ok else 'FAIL'}", flush=True)
    sys.exit(0 if comm.allreduce(ok, op=MPI.LAND) else 1)


if __name__ == "__main__":
    main()
