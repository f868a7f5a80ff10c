"""The scripts and examples a person runs, on the CPU: each parses --help with CuPy hidden
(so a broken import fails here, not on a GPU host), every name each takes from the package
exists and every call of one binds to its signature (most run only on a GPU host), and
the examples run under mpiexec with numpy arrays and transport "mpi"."""
import ast
import importlib
import inspect
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
def test_minimax_prologue_writes_and_checks_an_fp8_cache():
    """The example's paged FP8 cache (k's scale a float, v's an array; a padding slot of
    -1) checked bit for bit against reference.expected_cache on each of 2 ranks."""
    r = run_mpi(2, "examples/minimax_prologue.py", "--transport", "mpi", "--tokens", "3",
                "--layers", "2", "--steps", "2", "--check", "--kv-cache", "fp8",
                "--block-size", "4", timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "KV cache of layer 1" in r.stdout and "0 bytes differ" in r.stdout, out
    assert r.stdout.count("PASS") == 2 and "FAIL" not in r.stdout, out


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (pip install mpich)")
def test_readme_example_at_a_world_minimax_widths_do_not_split():
    r = run_mpi(5, "scripts/example.py", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("max |q - reference|") == 5, r.stdout + r.stderr
    assert "q_dim=5120, k_dim=640" in r.stdout


def package_misuses(source: str) -> list:
    """Lines of `source` that take a name from cupy_qknorm that it lacks, or call one of its
    functions or classes with arguments its signature refuses. Names are resolved from the
    program's own imports (`from cupy_qknorm import bench`, `from cupy_qknorm.x import f`);
    calls with *args or **kwargs are not bound."""
    tree = ast.parse(source)
    modules, names, found = {}, {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == \
                "cupy_qknorm":
            module = importlib.import_module(node.module)
            for alias in node.names:
                local = alias.asname or alias.name
                try:
                    obj = importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    obj = getattr(module, alias.name, None)
                if obj is None:
                    found.append(f"{node.lineno}: {node.module} has no {alias.name}")
                elif inspect.ismodule(obj):
                    modules[local] = obj
                else:
                    names[local] = obj
    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id in modules:
            module = modules[node.value.id]
            if not hasattr(module, node.attr):
                found.append(f"{node.lineno}: {module.__name__} has no {node.attr}")
            continue
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in names:
            target = names[f.id]
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and \
                f.value.id in modules:
            target = getattr(modules[f.value.id], f.attr, None)
        if target is None or any(isinstance(a, ast.Starred) for a in node.args) or \
                any(k.arg is None for k in node.keywords):
            continue
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):  # a builtin without one
            continue
        try:
            signature.bind(*node.args, **{k.arg: k.value for k in node.keywords})
        except TypeError as e:
            found.append(f"{node.lineno}: {ast.unparse(node.func)}(...): {e}")
    return sorted(found, key=lambda line: int(line.split(":")[0]))


@pytest.mark.parametrize("program", PROGRAMS)
def test_programs_use_the_package_as_it_is(program):
    """Most programs run only on a GPU host: a renamed helper or a changed signature fails
    here instead."""
    assert package_misuses((ROOT / program).read_text()) == []


def test_the_use_check_finds_each_kind_of_misuse():
    source = ("from cupy_qknorm import bench, TPQKNorm\n"
              "from cupy_qknorm.shapes import default_dims, no_such_name\n"
              "bench.time_graph_us(call, sets, stream, replays, comm)\n"     # fits
              "bench.time_graph_us(call, sets, stream, replays, comm, 1)\n"  # one too many
              "bench._inputs(comm, 'bfloat16', 1, 2, 3, 8, in_place=True, colour=1)\n"
              "bench.no_such_helper(1)\n"
              "x = bench.NO_SUCH_CONSTANT\n"
              "default_dims()\n"                                             # one too few
              "TPQKNorm(comm, 6144, 1024, 'bfloat16', transport='ipc', colour=1)\n"
              "bench._inputs(*args)\n")                                       # not bound
    found = package_misuses(source)
    assert [f.split(":")[0] for f in found] == ["2", "4", "5", "6", "7", "8", "9"], found
    assert "no_such_name" in found[0] and "too many positional" in found[1]
    assert "colour" in found[2] and "no_such_helper" in found[3]


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (pip install mpich)")
@pytest.mark.parametrize("scan", ["unrolled", "rolled"])
def test_jax_prologue_checks_at_two_ranks(scan):
    """Unrolled, the layers' calls are ordered by data alone (each layer's x takes a zero
    from the last's q): JAX's CPU backend ran independent calls at once before it."""
    pytest.importorskip("jax", reason="needs jax (pip install -e '.[jax]')")
    r = run_mpi(2, "examples/jax_prologue.py", "--check", "--tokens", "3", "--layers", "3",
                "--steps", "2", "--hidden", "256", "--pipelined",
                *(["--rolled"] if scan == "rolled" else []))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith(f"G=2 T=3 layers=3 ({scan}) on CPU (cpu, transport 'mpi'): "), \
        lines
    assert lines[1].startswith("pipelined: GPU only"), lines
    assert lines[-1].startswith("PASS"), lines


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (pip install mpich)")
def test_jax_prologue_without_the_norm():
    """--no-norm times the layers without the norm; --check with it is refused."""
    pytest.importorskip("jax", reason="needs jax (pip install -e '.[jax]')")
    r = run_mpi(2, "examples/jax_prologue.py", "--no-norm", "--tokens", "3", "--layers", "2",
                "--steps", "1", "--hidden", "256")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(cpu, transport 'mpi'), no norm: " in r.stdout, r.stdout
    r = run_mpi(1, "examples/jax_prologue.py", "--no-norm", "--check")
    assert r.returncode == 2 and "--check needs the norm" in r.stderr, r.stderr
