"""Run pytest in one MPI rank, keep its whole output in a per-rank log, and print one
summary line tagged with the rank (under mpiexec only rank 0's pytest output is readable).

    mpiexec -n G python scripts/rank_pytest.py LOGDIR TAG -- [pytest args]
"""
import os
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest


def main():
    argv = sys.argv[1:]
    usage = f"usage: {__doc__.strip().splitlines()[-1].strip()}"
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{usage}\n\n{__doc__.strip()}")
        return
    if len(argv) < 3 or argv[2] != "--":
        sys.exit(usage)
    logdir, tag, args = argv[0], argv[1], argv[3:]
    from mpi4py import MPI
    rank, size = MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size
    os.environ["CUPY_QKNORM_VERBOSE_RANKS"] = "1"  # each rank's own log is complete
    os.makedirs(logdir, exist_ok=True)
    path = os.path.join(logdir, f"{tag}-G{size}-rank{rank}.log")
    # written as it goes, so a run killed by a timeout still leaves its log
    with open(path, "w", buffering=1) as f, redirect_stdout(f), redirect_stderr(f):
        rc = pytest.main(["-p", "no:cacheprovider", "-rfEs", "--with-mpi", *args])
    with open(path) as f:
        text = f.read()
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    last = lines[-1].strip("= ") if lines else "no output"
    print(f"{tag} G={size} rank {rank}: {last} (exit {int(rc)})", flush=True)
    ok = MPI.COMM_WORLD.allreduce(int(rc) == 0, op=MPI.LAND)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
