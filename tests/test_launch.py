"""mpiexec runs, as a user starts them: the MPI test file at 2 and 3 ranks, and the
check command (with MiniMax's RoPE at 2 ranks, a quick smoke at 8, a GPU transport asked
for on a machine without one). Every rank must pass (CuPy's distributed tests' pattern).
The fault times the MPI tests print are listed at the end of the run; a plain run's skip
of the MPI tests says that they run here."""
import re
import subprocess
import sys

import pytest

from tests.conftest import (HAS_GPU, MPI_RANKS, PYTEST_MPI_SKIP, ROOT, mpi_skip_reason,
                            mpiexec, run_mpi)

needs_mpiexec = pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (pip install mpich)")


@needs_mpiexec
@pytest.mark.parametrize("ranks", MPI_RANKS)
def test_mpi_suite_under_mpiexec(ranks, fault_times):
    r = run_mpi(ranks, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--with-mpi",
               "tests/test_mpi.py")
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"mpiexec -n {ranks} failed:\n{out[-6000:]}"
    # mpiexec's exit code is the worst rank's; the ranks' lines may interleave
    assert re.search(r"\d+ passed", r.stdout) and not re.search(
        r"\d+ (failed|errors?|xpassed)", r.stdout), out[-3000:]
    times = [ln for ln in r.stdout.splitlines() if ln.startswith("FAULT-TIME")]
    assert len(times) == 6, out[-3000:]  # one line for each fault test_mpi.py times
    fault_times += times


@needs_mpiexec
def test_check_command_with_rope():
    r = run_mpi(2, "-m", "cupy_qknorm", "check", "--transport", "mpi", "--rope",
               "--tokens", "0,1,33")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rope=MiniMax M2" in r.stdout and r.stdout.rstrip().splitlines()[-1].startswith(
        "PASS")


@needs_mpiexec
def test_check_command_at_eight_ranks():
    r = run_mpi(8, "-m", "cupy_qknorm", "check", "--transport", "mpi", "--tokens", "0,1,33")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "G=8 dtype=bfloat16 q_dim=6144 k_dim=1024" in r.stdout
    assert r.stdout.rstrip().splitlines()[-1].startswith("PASS")


@needs_mpiexec
@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_check_gpu_transport_without_a_gpu_is_one_line_from_rank_0():
    r = run_mpi(2, "-m", "cupy_qknorm", "check", "--transport", "ipc")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [
        "cupy-qknorm check: transport 'ipc' needs a CUDA GPU on every rank; every rank: "
        "CuPy is installed but this host has no CUDA driver (no libcuda)"]


def test_a_plain_run_says_where_the_mpi_tests_run():
    """-rs and the summary line name the mpiexec runs above, not pytest-mpi's bare words."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        "tests/test_mpi.py"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    skipped = [ln for ln in r.stdout.splitlines() if ln.startswith("SKIPPED")]
    want = "runs under mpiexec -n 2 and -n 3 from tests/test_launch.py"
    assert r.returncode == 0 and skipped, r.stdout + r.stderr
    assert all(ln.endswith(f": {want}") for ln in skipped), skipped
    assert PYTEST_MPI_SKIP not in r.stdout
    summary = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "tests/test_mpi.py"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120).stdout
    assert re.search(rf"skipped \(-rs lists each\): \d+ {want}\n", summary), summary


def test_each_mpi_test_file_names_where_it_runs():
    assert mpi_skip_reason(ROOT / "tests" / "gpu" / "test_gpu.py") == \
        "runs under mpiexec on a GPU host (scripts/gpu_suite.sh)"
    assert mpi_skip_reason(ROOT / "tests" / "test_mpi.py").startswith(
        f"runs under mpiexec -n {MPI_RANKS[0]} ")
