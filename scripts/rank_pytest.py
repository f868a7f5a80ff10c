"""Run pytest in one MPI rank, keep its whole output in a per-rank log, and print one
summary line tagged with the rank (under mpiexec only rank 0's pytest output is readable).
Or count the errors of compute-sanitizer logs by whose kernel they are in: this
package's (namespace qknorm, extern "C" qknorm_*) and any that no one can be named for
count; NCCL's own (its init probes, which it makes on purpose) are listed, excluded.

    mpiexec -n G python scripts/rank_pytest.py LOGDIR TAG -- [pytest args]
    python scripts/rank_pytest.py --sanitizer LOG...    (exit 1 if any error counts)
"""
import os
import re
import sys
from contextlib import redirect_stderr, redirect_stdout

PREFIX = "========= "
# a record names one of our kernels: qknorm::fused<...>, qknorm_copy ...
OURS = re.compile(r"\bqknorm::|\bqknorm_[a-z]")
# NCCL's kernels (ncclDevKernel_*) or its library in a host backtrace (libnccl.so)
NCCL = re.compile(r"\bnccl|libnccl", re.IGNORECASE)
# records of the tool about the application, not errors of a kernel: the exit code says it
NOT_ERRORS = ("Target application returned an error",
              "Error: process didn't terminate successfully")


def sanitizer_records(text):
    """The error records of one compute-sanitizer log, each as its lines: a record starts
    at a line of the tool not indented after its prefix and runs until the next such line.
    Summaries, the banner and the tool's notes about the application are left out."""
    records = []
    for line in text.splitlines():
        if not line.startswith(PREFIX.rstrip()):
            continue
        body = line[len(PREFIX):] if line.startswith(PREFIX) else ""
        if not body.strip():
            continue
        if body[0].isspace():
            if records and records[-1] is not None:
                records[-1].append(body.strip())
            continue
        skip = body.startswith(("COMPUTE-SANITIZER", "ERROR SUMMARY", "RACECHECK SUMMARY",
                                "LEAK SUMMARY", *NOT_ERRORS))
        records.append(None if skip else [body.strip()])
    return [r for r in records if r is not None]


def sanitizer_counts(text):
    """{"ours", "nccl", "other", "warnings", "unprinted", "summary"} of one log. "ours":
    records naming a kernel of this package; "nccl": records naming NCCL and none of
    ours; "other": the rest (an API error of this package's host code is one); "warnings":
    racecheck's warnings, counted apart; "unprinted": errors the ERROR SUMMARY counts
    that the print limit left out (nobody can be named for them); "summary": that line."""
    counts = {"ours": 0, "nccl": 0, "other": 0, "warnings": 0, "unprinted": 0,
              "summary": ""}
    errors = 0
    for record in sanitizer_records(text):
        whole = "\n".join(record)
        if record[0].startswith("Warning"):
            counts["warnings"] += 1
            continue
        errors += 1
        key = "ours" if OURS.search(whole) else "nccl" if NCCL.search(whole) else "other"
        counts[key] += 1
    m = re.search(r"^=+ (ERROR SUMMARY: (\d+) errors?)", text, re.MULTILINE)
    if m:
        counts["summary"] = m.group(1)
        counts["unprinted"] = max(0, int(m.group(2)) - errors)
    return counts


def sanitizer_main(paths):
    """One line per log; exit status 1 where an error of ours, of nobody, or unprinted
    counts (NCCL's are excluded), or a log is missing."""
    bad = 0
    for path in paths:
        name = os.path.basename(path)
        try:
            with open(path, errors="replace") as f:
                c = sanitizer_counts(f.read())
        except OSError as e:
            print(f"{name}: no log ({e.strerror})")
            bad += 1
            continue
        counted = c["ours"] + c["other"] + c["unprinted"]
        bad += counted > 0
        print(f"{name}: {counted} error(s) counted: {c['ours']} in qknorm kernels, "
              f"{c['other']} elsewhere, {c['unprinted']} unprinted; {c['nccl']} in NCCL, "
              f"excluded (NCCL's own); {c['warnings']} warning(s); "
              f"{c['summary'] or 'no ERROR SUMMARY'}")
    return 1 if bad else 0


def main():
    argv = sys.argv[1:]
    usage = "usage: " + "\n       ".join(
        ln.strip() for ln in __doc__.strip().splitlines()[-2:])
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{usage}\n\n{__doc__.strip()}")
        return
    if argv[:1] == ["--sanitizer"] and len(argv) > 1:
        sys.exit(sanitizer_main(argv[1:]))
    if len(argv) < 3 or argv[2] != "--":
        sys.exit(usage)
    logdir, tag, args = argv[0], argv[1], argv[3:]
    import pytest
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
