"""Shared fixtures. MPI tests (pytest-mpi's `mpi` mark) run only under
`mpiexec -n G python -m pytest --with-mpi`; a plain run skips them, saying where they run:
tests/test_launch.py starts tests/test_mpi.py's runs as subprocesses, scripts/gpu_suite.sh
those of tests/gpu.

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


# Runs cupy_qknorm.cli.main on each argv of argv[2] (JSON) in a fresh process that lacks
# argv[1]: "cupy" (import cupy fails, as where it is not installed), "driver" (CuPy imports,
# the runtime finds no driver, as here without a GPU), "mpi" (mpi4py's loader finds no
# libmpi, with the error it raises then) or "" (nothing); argv[3] is Python run first.
# Prints [[exit code, stdout, stderr or the escaped exception's traceback], ...] as JSON.
_CLI_WITHOUT = r"""
import contextlib, io, json, sys, traceback
missing, commands, setup = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
if missing == "cupy":
    for name in ("cupy", "cupyx", "cupy_backends"):
        sys.modules[name] = None
elif missing == "driver":
    import cupy
    from cupy_backends.cuda.api.runtime import CUDARuntimeError

    def no_driver():
        raise CUDARuntimeError(35)  # cudaErrorInsufficientDriver
    cupy.cuda.runtime.getDeviceCount = no_driver
    cupy.cuda.runtime.driverGetVersion = lambda: 0  # no driver installed at all
elif missing == "mpi":
    class NoLibmpi:
        def find_spec(self, name, path=None, target=None):
            if name == "mpi4py.MPI":
                raise RuntimeError("cannot load MPI library\n"
                                   "libmpi.so: cannot open shared object file: No such file "
                                   "or directory\n"
                                   "libmpi.so.12: cannot open shared object file: No such "
                                   "file or directory")
    sys.meta_path.insert(0, NoLibmpi())
exec(setup)
from cupy_qknorm import cli
results = []
for argv in commands:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException:
            rc = "escaped"
            traceback.print_exc()
    results.append([rc, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def cli_without(missing, *commands, setup="", env=None):
    """{" ".join(argv): (exit code, stdout, stderr)} of the cupy-qknorm commands run in one
    process where `missing` is missing (_CLI_WITHOUT): cheaper than a venv without it."""
    import json
    env = dict(os.environ if env is None else env, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", _CLI_WITHOUT, missing,
                        json.dumps([list(c) for c in commands]), setup],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    return {" ".join(c): tuple(res) for c, res in zip(commands, results)}


def _under_mpi(config) -> bool:
    return bool(config.getoption("--with-mpi", default=False))


MPI_RANKS = (2, 3)  # tests/test_launch.py runs tests/test_mpi.py under mpiexec -n G at these
PYTEST_MPI_SKIP = "need --with-mpi option to run"  # pytest-mpi's reason: says not where


def mpi_skip_reason(path: Path) -> str:
    """Why an MPI test of file `path` skips in a plain run: where it runs instead."""
    where = Path(path).resolve().relative_to(ROOT).as_posix()
    if where in ("tests/test_mpi.py", "tests/test_jax_mpi.py",
                 "tests/test_mpi_kvcache.py"):
        ranks = " and ".join(f"-n {g}" for g in MPI_RANKS)
        return f"runs under mpiexec {ranks} from tests/test_launch.py"
    if where.startswith("tests/gpu/"):
        return "runs under mpiexec on a GPU host (scripts/gpu_suite.sh)"
    return "runs under mpiexec -n G python -m pytest --with-mpi"


def _say_where_mpi_tests_run(items):
    """pytest-mpi marks each MPI test of a plain run skipped with its own reason; put ours
    in its place, first, so that -rs and the summary below show it."""
    for item in items:
        if item.get_closest_marker("mpi") is None:
            continue
        item.own_markers[:] = [m for m in item.own_markers if not (
            m.name == "skip" and m.kwargs.get("reason") == PYTEST_MPI_SKIP)]
        item.add_marker(pytest.mark.skip(reason=mpi_skip_reason(item.path)), append=False)


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


@pytest.hookimpl(trylast=True)  # after -k / -m deselection and pytest-mpi's marks
def pytest_collection_modifyitems(config, items):
    """MPI tests of a plain run say where they run. The NVRTC build of
    tests/test_compile.py starts now, in the background, and its tests run last: the
    compile uses the CPU the other tests leave idle."""
    if not _under_mpi(config):
        _say_where_mpi_tests_run(items)
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
