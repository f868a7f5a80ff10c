"""The scripts and examples a person runs, on the CPU: each parses --help with CuPy hidden
(so a broken import fails here, not on a GPU host), and the examples run under mpiexec
with numpy arrays and transport "mpi"."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import mpiexec, run_mpi

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = sorted(str(p.relative_to(ROOT)) for p in
                  [*(ROOT / "scripts").glob("*.py"), *(ROOT / "examples").glob("*.py")])

# `import cupy` fails from the start: --help must not need it
HELP = ("import runpy, sys\n"
        "sys.modules['cupy'] = None\n"
        "sys.argv = [sys.argv[1], '--help']\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def test_every_program_is_listed():
    assert "scripts/example.py" in PROGRAMS and "examples/minimax_prologue.py" in PROGRAMS


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_without_cupy(program):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", HELP, program], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{program} --help: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "usage" in r.stdout.lower() and "Traceback" not in r.stderr, r.stdout + r.stderr


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (pip install mpich)")
def test_minimax_prologue_checks_at_three_ranks():
    g = 3
    r = run_mpi(g, "examples/minimax_prologue.py", "--transport", "mpi", "--tokens", "3",
                "--layers", "2", "--steps", "3", "--hidden", "256", "--q-dim", str(256 * g),
                "--k-dim", str(128 * g), "--check", timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "G=3" in r.stdout and "norm's share" in r.stdout, out
    assert r.stdout.count("PASS") == 1 and "FAIL" not in r.stdout, out


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (pip install mpich)")
def test_readme_example_at_a_world_minimax_widths_do_not_split():
    r = run_mpi(5, "scripts/example.py", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("max |q - reference|") == 5, r.stdout + r.stderr
    assert "q_dim=5120, k_dim=640" in r.stdout


def test_bench_helpers_keep_the_parameters_the_scripts_pass():
    """compare_sglang.py, trace_fused.py and profile_g1.py time with bench's helpers; a
    changed signature would only show on a GPU host."""
    import inspect

    from cupy_qknorm import bench
    want = {"_inputs": "comm dtype dq dk tokens sets in_place positions",
            "time_graph_us": "call sets stream replays comm",
            "time_copy_graph_us": "sets stream replays",
            "floor_empty_kernel_us": "stream",
            "floor_one_way_us": "comm stream iters",
            "floor_exchange_us": "comm stream timeout_ns"}
    for name, params in want.items():
        assert list(inspect.signature(getattr(bench, name)).parameters) == params.split(), name
    assert bench.GRAPH_CALLS >= 1
