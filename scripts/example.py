"""Usage example (README): mpiexec -n 2 python scripts/example.py
Runs on GPUs with CuPy arrays where every rank has one, else on the CPU with numpy."""
import numpy as np
from mpi4py import MPI

from cupy_qknorm import TPQKNorm
from cupy_qknorm import reference as ref

comm = MPI.COMM_WORLD
G, r = comm.size, comm.rank
try:  # one GPU per rank, chosen from the node-local rank
    import cupy as xp
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    xp.cuda.Device(local.rank % xp.cuda.runtime.getDeviceCount()).use()
except Exception:
    xp = np

T = 5
rng = np.random.default_rng(0)          # same full rows on every rank ...
q_full = rng.standard_normal((T, 6144)).astype(np.float32)
k_full = rng.standard_normal((T, 1024)).astype(np.float32)
qw_full, kw_full = np.ones(6144, np.float32), np.ones(1024, np.float32)
# ... of which rank r holds slice r: q [T, 6144/G], k [T, 1024/G], and the weights' slices
q, k, qw, kw = (xp.asarray(np.ascontiguousarray(ref.shard(a, G, r)))
                for a in (q_full, k_full, qw_full, kw_full))

with TPQKNorm(comm, q_dim=6144, k_dim=1024, dtype="float32", eps=1e-6,
              max_tokens=8192) as norm:
    q_out, k_out = norm(q, k, qw, kw, out=(xp.empty_like(q), xp.empty_like(k)))
    norm(q, k, qw, kw)                   # in place
    norm.synchronize()
    q_ref, _ = ref.qk_norm(q_full, k_full, qw_full, kw_full, 1e-6)
    host = q.get() if hasattr(q, "get") else q
    err = np.abs(host - ref.shard(q_ref, G, r)).max()
    print(f"rank {r}/{G}: transport={norm.transport}, max |q - reference| = {err:.2e}")
