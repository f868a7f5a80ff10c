"""The smallest use of TPQKNorm, out of place then in place, against the float64 reference:

    mpiexec -n G python scripts/example.py    (G = 1..16)

Runs on GPUs with CuPy arrays where every rank has one, else on the CPU with numpy.
Widths: MiniMax M2's (q 6144, k 1024) where they split over G ranks, else
cupy_qknorm.shapes.default_dims(G). One line a rank, printed by rank 0."""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package

from cupy_qknorm import TPQKNorm  # noqa: E402
from cupy_qknorm import reference as ref  # noqa: E402
from cupy_qknorm.placement import select_device  # noqa: E402
from cupy_qknorm.shapes import default_dims  # noqa: E402


def main():
    argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    G, r = comm.size, comm.rank
    if select_device(comm):   # one GPU per rank, chosen from the node-local rank
        import cupy as xp
    else:
        xp = np
    q_dim, k_dim = default_dims(G)

    T = 5
    rng = np.random.default_rng(0)          # the same full rows on every rank ...
    q_full = rng.standard_normal((T, q_dim)).astype(np.float32)
    k_full = rng.standard_normal((T, k_dim)).astype(np.float32)
    qw_full, kw_full = np.ones(q_dim, np.float32), np.ones(k_dim, np.float32)
    # ... of which rank r holds slice r: q [T, q_dim/G], k [T, k_dim/G], and the weights'
    q, k, qw, kw = (xp.asarray(np.ascontiguousarray(ref.shard(a, G, r)))
                    for a in (q_full, k_full, qw_full, kw_full))

    with TPQKNorm(comm, q_dim=q_dim, k_dim=k_dim, dtype="float32", eps=1e-6,
                  max_tokens=8192) as norm:
        q_out, k_out = norm(q, k, qw, kw, out=(xp.empty_like(q), xp.empty_like(k)))
        norm(q, k, qw, kw)                   # in place
        norm.synchronize()
        q_ref, _ = ref.qk_norm(q_full, k_full, qw_full, kw_full, 1e-6)
        host = q.get() if hasattr(q, "get") else q
        err = np.abs(host - ref.shard(q_ref, G, r)).max()
        line = (f"rank {r}/{G}: transport={norm.transport}, q_dim={q_dim}, k_dim={k_dim}, "
                f"max |q - reference| = {err:.2e}")
    lines = comm.gather(line, root=0)   # one line a rank, in rank order
    if r == 0:
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
