"""Host time of one eager call, split into its parts (T=1, bf16, MiniMax dims):
    mpiexec -n G python scripts/eager_breakdown.py

Each part is timed in batches of 100 calls started on an idle GPU, so the launch queue
never fills and the figures are host time, not GPU time; "sustained" is the rate of many
back-to-back calls, which the GPU bounds when it is slower than the host."""
import time

import cupy
import numpy as np
from mpi4py import MPI

from cupy_qknorm import TPQKNorm, arrays
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
empty = cupy.RawKernel("extern \"C\" __global__ void e() {}", "e")


def batches(fn, calls=100, rounds=30):
    """Median host us per call over `rounds` batches of `calls`, each on an idle GPU."""
    per = []
    for _ in range(rounds):
        s.synchronize()
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t0) / calls * 1e6)
    s.synchronize()
    return float(np.median(per))


with TPQKNorm(comm, 6144, 1024, "bfloat16", max_tokens=64, transport="ipc") as norm:
    t = norm._transport
    norm(q, k, qw, kw, out=(qo, ko))
    arrs = (q, k, qw, kw, qo, ko)
    ops = norm._validate(*arrs)
    plan = arrays.Plan.of(ops)
    ptrs = [op.ptr for op in ops]
    spec, go, cap = t.kernels(plan.weight_dtype, "narrow")
    run = t.prepare(plan)
    fixed = t.bound(plan, ptrs)
    parts = {
        "cupy empty kernel": lambda: empty((1,), (32,), ()),
        "full validation": lambda: norm._validate(*arrs),
        "signature": lambda: arrays.cupy_signature(arrs),
        "pack+launch": lambda: run(ptrs, s),
        "full call": lambda: norm(q, k, qw, kw, out=(qo, ko)),
        "bound call": norm.bind(q, k, qw, kw, out=(qo, ko)),
        "bound launch alone": lambda: fixed(s),
    }
    path = ("CuPy launch (fallback)" if go["fused"].__name__ == "go_cupy" else
            "cuLaunchKernelEx" if t.pdl else "cuLaunchKernel")
    res = {name: batches(fn) for name, fn in parts.items()}
    s.synchronize()
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(2000):
        norm(q, k, qw, kw, out=(qo, ko))
    s.synchronize()
    res["sustained (2000 calls)"] = (time.perf_counter() - t0) / 2000 * 1e6
    norm.synchronize()
    pdl = t.pdl
if comm.rank == 0:
    print(f"eager host time per call (us, {path}, pdl={pdl}, G={G}, "
          f"{cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}): " +
          ", ".join(f"{k} {v:.2f}" for k, v in res.items()))
