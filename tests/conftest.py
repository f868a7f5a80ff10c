"""Shared fixtures. MPI tests (pytest-mpi's `mpi` mark) run only under
`mpiexec -n G python -m pytest --with-mpi`; a plain run skips them, and
tests/test_launch.py starts those runs as subprocesses.

Under MPI: the GPU comes from the node-local rank, ranks other than 0 are quiet, and a
barrier surrounds each test so one rank's failure cannot shift the others' collectives.

A plain run starts tests/test_compile.py's NVRTC build in the background at collection
and runs those tests last; at the end it lists the MPI faults' times to the error, the
build's summary, and why tests were skipped (counts per reason; -rs lists each)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def has_gpu() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no cupy, no driver or no device
        return False


HAS_GPU = has_gpu()
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="need a CUDA GPU (scripts/gpu_suite.sh "
                                  "runs them under mpiexec on a GPU host)")


ROOT = Path(__file__).resolve().parent.parent


def mpiexec():
    """The mpiexec next to this Python (the mpich wheel's), else the one on PATH, or None."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def run_mpi(ranks, *argv, timeout=120):
    """mpiexec -n ranks python argv... from the repository root, as a user starts it; a hang
    fails after `timeout` seconds."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, *argv]
    if "open" in subprocess.run([mpiexec(), "--version"], capture_output=True,
                                text=True).stdout.lower():
        cmd[1:1] = ["--oversubscribe"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _under_mpi(config) -> bool:
    return bool(config.getoption("--with-mpi", default=False))


def pytest_configure(config):
    if not _under_mpi(config):
        return
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    if HAS_GPU:
        import cupy
        cupy.cuda.Device(local.rank % cupy.cuda.runtime.getDeviceCount()).use()
    local.Free()
    if comm.rank != 0 and not os.environ.get("CUPY_QKNORM_VERBOSE_RANKS"):
        config.option.verbose = -1


FAULT_TIMES = pytest.StashKey[list]()
NVRTC_BUILD = pytest.StashKey[object]()


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(config, items):
    """The NVRTC build of tests/test_compile.py starts now, in the background, and its
    tests run last: the compile uses the CPU the other tests leave idle."""
    late = [i for i in items if "built" in getattr(i, "fixturenames", ())]
    if not late or _under_mpi(config):
        return
    ids = {id(i) for i in late}
    items[:] = [i for i in items if id(i) not in ids] + late
    config.stash[NVRTC_BUILD] = late[0].module.start_build()


@pytest.fixture(scope="module")
def nvrtc_build(pytestconfig):
    """nvrtc_build(start) -> the build started at collection, or start() now."""
    def get(start):
        build = pytestconfig.stash.get(NVRTC_BUILD, None)
        if build is None:
            build = pytestconfig.stash[NVRTC_BUILD] = start()
        return build
    return get


def pytest_unconfigure(config):
    build = config.stash.get(NVRTC_BUILD, None)
    if build is not None:
        build.close()


@pytest.fixture
def fault_times(pytestconfig):
    """Lines of the MPI fault tests' times to the error, listed at the end of the run."""
    return pytestconfig.stash.setdefault(FAULT_TIMES, [])


def pytest_terminal_summary(terminalreporter, config):
    tr = terminalreporter
    lines = config.stash.get(FAULT_TIMES, [])
    if lines:
        tr.section("time to the error of each fault, per rank (test_mpi.py)")
        for line in lines:
            tr.write_line(line[len("FAULT-TIME "):])
    build = config.stash.get(NVRTC_BUILD, None)
    if build is not None and getattr(build, "_done", False):
        tr.write_line(build.summary())
    skipped = tr.stats.get("skipped", [])
    if skipped and "s" not in config.option.reportchars and \
            "a" not in config.option.reportchars:
        reasons = {}
        for rep in skipped:
            reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
            reason = reason.removeprefix("Skipped: ")
            if reason == "need --with-mpi option to run":  # pytest-mpi's words
                reason = "need mpiexec (tests/test_launch.py runs them)"
            reasons[reason] = reasons.get(reason, 0) + 1
        tr.write_line("skipped (-rs lists each): " + "; ".join(
            f"{n} {reason}" for reason, n in sorted(reasons.items(), key=lambda r: -r[1])))


@pytest.fixture
def comm(request):
    from mpi4py import MPI
    c = MPI.COMM_WORLD
    c.Barrier()
    yield c
    c.Barrier()
