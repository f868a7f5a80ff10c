"""Fault: one rank is killed (SIGKILL) in the middle of a loop of calls.

    mpiexec -n G python scripts/fault_kill.py [--transport ipc|nccl] [--timeout 1.0]
                                              [--calls-before-kill 2000]

The last rank kills itself after N calls. The others keep calling: their waits end after
--timeout (the fused kernel's own clock for "ipc", the watchdog that aborts NCCL for
"nccl"), the next call raises PeerTimeoutError, and they abort the job
(what an application should do: a peer is gone). Each survivor prints the seconds from the
kill to its error. The run must end, with a non-zero exit, instead of hanging;
scripts/gpu_suite.sh runs it under `timeout` and checks exactly that."""
import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package

from cupy_qknorm import QKNormError, TPQKNorm  # noqa: E402
from cupy_qknorm.placement import select_device  # noqa: E402
from cupy_qknorm.shapes import default_dims  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=float, default=1.0, help="peer wait bound, seconds")
    ap.add_argument("--calls-before-kill", type=int, default=2000,
                    help="calls every rank makes before the last one is killed")
    ap.add_argument("--transport", default="ipc", choices=("ipc", "nccl"),
                    help="the GPU transport to kill a rank under")
    args = ap.parse_args()
    import cupy
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    select_device(comm)
    G, rank = comm.size, comm.rank
    victim = G - 1
    q_dim, k_dim = default_dims(G)
    q = cupy.ones((16, q_dim // G), cupy.uint16)
    k = cupy.ones((16, k_dim // G), cupy.uint16)
    qw = cupy.ones(q_dim // G, cupy.uint16)
    kw = cupy.ones(k_dim // G, cupy.uint16)
    norm = TPQKNorm(comm, q_dim, k_dim, "bfloat16", max_tokens=64, transport=args.transport,
                    timeout_s=args.timeout)
    comm.Barrier()
    kill_at = None
    for i in range(10_000_000):
        if i == args.calls_before_kill:
            cupy.cuda.get_current_stream().synchronize()
            comm.Barrier()  # every rank is here: the kill happens at a known time
            kill_at = time.perf_counter()
            if rank == victim:
                print(f"rank {rank}: SIGKILL after {i} calls", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        try:
            norm(q, k, qw, kw)
        except QKNormError as e:
            took = time.perf_counter() - kill_at
            print(f"rank {rank}: {type(e).__name__} {took:.2f} s after the kill, {i} calls: "
                  f"{e}", flush=True)
            sys.stdout.flush()
            comm.Abort(3)
        if i % 64 == 63:
            cupy.cuda.get_current_stream().synchronize()  # bound the queue of launches


if __name__ == "__main__":
    main()
