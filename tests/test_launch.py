"""Start the MPI test files under mpiexec with 2, 3, 5 and 8 ranks, as a user would, and
require every rank to pass (the CuPy distributed tests' pattern)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def mpiexec():
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (pip install mpich)")
@pytest.mark.parametrize("ranks", [2, 3, 5, 8])
def test_mpi_suite_under_mpiexec(ranks):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "pytest", "-q",
           "-p", "no:cacheprovider", "--with-mpi", "tests/test_mpi.py"]
    if "open" in subprocess.run([mpiexec(), "--version"], capture_output=True,
                                text=True).stdout.lower():
        cmd[1:1] = ["--oversubscribe"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    print(r.stdout[-4000:], r.stderr[-4000:])
    assert r.returncode == 0, f"mpiexec -n {ranks} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert " passed" in r.stdout and " failed" not in r.stdout


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (pip install mpich)")
@pytest.mark.parametrize("ranks", [2, 7])
def test_check_command_under_mpiexec(ranks):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, "-m", "cupy_qknorm", "check",
                        "--transport", "mpi", "--tokens", "0,1,33"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (pip install mpich)")
def test_readme_example_runs():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([mpiexec(), "-n", "2", sys.executable, "scripts/example.py"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("max |q - reference|") == 2
