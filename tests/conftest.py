"""Shared fixtures. MPI tests (pytest-mpi's `mpi` mark) run only under
`mpiexec -n G python -m pytest --with-mpi`; a plain run skips them, and
tests/test_launch.py starts those runs as subprocesses.

Under MPI: the GPU comes from the node-local rank, ranks other than 0 are quiet, and a
barrier surrounds each test so one rank's failure cannot shift the others' collectives."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def has_gpu() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no cupy, no driver or no device
        return False


HAS_GPU = has_gpu()
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


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


@pytest.fixture
def fault_times(pytestconfig):
    """Lines of the MPI fault tests' times to the error, listed at the end of the run."""
    return pytestconfig.stash.setdefault(FAULT_TIMES, [])


def pytest_terminal_summary(terminalreporter, config):
    lines = config.stash.get(FAULT_TIMES, [])
    if lines:
        terminalreporter.section("time to the error of each fault, per rank (test_mpi.py)")
        for line in lines:
            terminalreporter.write_line(line[len("FAULT-TIME "):])


@pytest.fixture
def comm(request):
    from mpi4py import MPI
    c = MPI.COMM_WORLD
    c.Barrier()
    yield c
    c.Barrier()
