"""Host time of one eager call, split into its parts (T=1, bf16, MiniMax dims):
    mpiexec -n G python scripts/eager_breakdown.py"""
import timeit

import cupy
from mpi4py import MPI

from cupy_qknorm import TPQKNorm
from cupy_qknorm.cli import _select_device

comm = MPI.COMM_WORLD
_select_device(comm)
G = comm.size
q = cupy.zeros((1, 6144 // G), cupy.uint16)
k = cupy.zeros((1, 1024 // G), cupy.uint16)
qw = cupy.zeros(6144 // G, cupy.uint16)
kw = cupy.zeros(1024 // G, cupy.uint16)
qo, ko = cupy.empty_like(q), cupy.empty_like(k)
s = cupy.cuda.get_current_stream()
with TPQKNorm(comm, 6144, 1024, "bfloat16", max_tokens=64, transport="ipc") as norm:
    t = norm._transport
    norm(q, k, qw, kw, out=(qo, ko))
    ops = norm._validate(q, k, qw, kw, (qo, ko))
    spec, kern, cap = t.kernels(ops[2].dtype)
    n = 2000
    parts = {
        "validate": lambda: norm._validate(q, k, qw, kw, (qo, ko)),
        "pack+launch": lambda: t.run(ops, 1, s),
        "full call": lambda: norm(q, k, qw, kw, out=(qo, ko)),
    }
    path = "cuLaunchKernel" if kern["fused"][1] is not None else "CuPy launch (fallback)"
    res = {}
    for name, fn in parts.items():
        comm.Barrier()
        res[name] = 1e6 * timeit.timeit(fn, number=n) / n
        s.synchronize()
    norm.synchronize()
if comm.rank == 0:
    print(f"eager host time per call (us, {path}): " +
          ", ".join(f"{k} {v:.2f}" for k, v in res.items()))
