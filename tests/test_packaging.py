"""The package as a user gets it. The wheel is built from this checkout, installed into a
scratch venv and run from outside the source tree: its kernels must come from the wheel.
And without CuPy, numpy arrays still run on transport "mpi", while a GPU transport says
how to install CuPy. CPU only."""
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

import cupy_qknorm

ROOT = Path(__file__).resolve().parents[1]
# what the wheel is built from; copied, so that no build/ of an older tree leaks into it
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "cupy_qknorm", "kernels")
SPEC = "tuning.Spec.plan('bfloat16', 'bfloat16', 2, 3072, 512)"


def pyproject_version() -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert m, "no version in pyproject.toml"
    return m.group(1)


def test_version_agrees_with_pyproject():
    assert cupy_qknorm.__version__ == pyproject_version()


def _run(cmd, cwd, env, timeout=120):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}: exit {r.returncode}\n" \
                              f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _at_least(dist: str, version: tuple) -> bool:
    """Whether `dist` is installed here at `version` or later."""
    try:
        have = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    parts = []
    for p in have.split(".")[:len(version)]:
        digits = re.match(r"\d+", p)
        parts.append(int(digits.group()) if digits else 0)
    return tuple(parts) >= version


def _nvrtc_dir():
    """The directory of the libnvrtc this interpreter finds, or None."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib
        return os.path.dirname(load_nvidia_dynamic_lib("nvrtc").abs_path)
    except Exception:  # noqa: BLE001 - no cuda-bindings or no NVRTC: the compile step skips
        return None


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel, installed into a scratch venv: .python, .venv, .site (its site-packages),
    .wheel, .env (for its commands), .work (a directory outside the source tree), .nvrtc
    (the directory of libnvrtc, or None)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns(
                "__pycache__", "*.egg-info", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(p, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"),
             str(src)]
    in_place = _at_least("setuptools", (77,))  # else pip fetches it: an isolated build
    if in_place:
        build.insert(4, "--no-build-isolation")
    r = subprocess.run(build, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    if r.returncode and not in_place and "setuptools" in r.stderr and \
            "distribution" in r.stderr:
        pytest.skip("building the wheel needs setuptools>=77, here or from the index: "
                    "pip install 'setuptools>=77'")
    assert r.returncode == 0, f"pip wheel: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    wheel, = (tmp / "dist").glob("cupy_qknorm-*.whl")
    venv = tmp / "venv"
    python = venv / "bin" / "python"
    if _at_least("pip", (22, 3)):  # pip --python: a venv without its own pip is enough
        _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
              str(venv)], tmp, env)
        _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
              "--no-deps", str(wheel)], tmp, env)
    else:
        _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp, env)
        _run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], tmp, env)
    site = Path(_run([str(python), "-c", "import sysconfig; "
                      "print(sysconfig.get_paths()['purelib'])"], tmp, env).strip())
    # numpy, mpi4py, cupy and cuda-bindings from this environment, after the wheel's copy
    # in sys.path (--system-site-packages reaches the base interpreter's, not a venv's)
    (site / "zz_test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    nvrtc = _nvrtc_dir()  # NVRTC's wheel is looked for in site.getsitepackages() only
    if nvrtc:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (nvrtc, env.get("LD_LIBRARY_PATH")) if p)
    work = tmp / "work"  # not the source tree: nothing can be imported from the checkout
    work.mkdir()
    return SimpleNamespace(python=python, venv=venv, site=site, wheel=wheel, env=env,
                           work=work, nvrtc=nvrtc)


def test_wheel_holds_the_package_kernels_and_license(installed):
    names = zipfile.ZipFile(installed.wheel).namelist()
    kernels = [f"cupy_qknorm/kernels/{f.name}" for f in (ROOT / "kernels").glob("*.cu*")]
    for want in ["cupy_qknorm/__init__.py", "cupy_qknorm/transports/__init__.py"] + kernels:
        assert want in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not [n for n in names if n.startswith(("tests/", "scripts/", "examples/"))]
    meta = zipfile.ZipFile(installed.wheel).read(next(n for n in names if n.endswith("/METADATA")))
    requires = [ln for ln in meta.decode().splitlines() if ln.startswith("Requires-Dist:")
                and "extra ==" not in ln]
    assert sorted(r.split()[1].split(">")[0] for r in requires) == ["mpi4py", "numpy"]


def test_installed_wheel_runs_outside_the_source_tree(installed):
    python, site, env, work, nvrtc = (installed.python, installed.site, installed.env,
                                      installed.work, installed.nvrtc)
    info = _run([str(installed.venv / "bin" / "cupy-qknorm"), "info"], work, env)
    assert f"cupy_qknorm {cupy_qknorm.__version__}; kernels {site / 'cupy_qknorm' / 'kernels'}" \
        in info, info
    code = ("import importlib.metadata, cupy_qknorm\n"
            "from cupy_qknorm import compile, params, tuning\n"
            "print(cupy_qknorm.__file__)\n"
            "print(params.KERNEL_DIR)\n"
            "print(importlib.metadata.version('cupy-qknorm'))\n"
            "print(compile.nvrtc_available())\n")
    if nvrtc:
        code += f"print(compile.nvrtc_compile({SPEC})['cubin_bytes'])\n"
    out = _run([str(python), "-c", code], work, env).splitlines()
    assert out[0] == str(site / "cupy_qknorm" / "__init__.py")
    assert out[1] == str(site / "cupy_qknorm" / "kernels")
    assert out[2] == cupy_qknorm.__version__
    version = _run([str(python), "-m", "cupy_qknorm", "--version"], work, env)
    assert version.strip().endswith(cupy_qknorm.__version__), version
    if not nvrtc:
        pytest.skip(f"NVRTC compile from the installed wheel: no NVRTC here ({out[3]})")
    assert out[3] == "None" and int(out[4]) > 0


# `import cupy` fails in this process, as where CuPy is not installed
WITHOUT_CUPY = r"""
import sys
for name in ("cupy", "cupyx", "cupy_backends"):
    sys.modules[name] = None
import numpy as np
from mpi4py import MPI
import cupy_qknorm
from cupy_qknorm import QKNormError, TPQKNorm, TransportUnavailableError
from cupy_qknorm import reference as ref

comm = MPI.COMM_SELF
for dtype in ("bfloat16", "float32"):
    q, k, qw, kw, qr, kr = ref.make_case(3, 5, 256, 128, dtype)
    with TPQKNorm(comm, 256, 128, dtype, max_tokens=8, transport="auto") as norm:
        assert norm.transport == "mpi", norm.transport
        norm(q, k, qw, kw)
        errs = [ref.compare(o, r, dtype) for o, r in ((q, qr), (k, kr))]
        assert all(n == 0 for _, n in errs), errs
try:
    TPQKNorm(comm, 256, 128, "bfloat16", transport="ipc")
except QKNormError as e:
    print(f"{type(e).__name__}: {e}")
else:
    raise SystemExit("transport 'ipc' without CuPy did not raise")
assert sys.modules["cupy"] is None
"""


def test_numpy_and_mpi_without_cupy():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = _run([sys.executable, "-c", WITHOUT_CUPY], ROOT, env).strip()
    assert out.startswith("TransportUnavailableError: "), out
    assert "pip install" in out and "cupy" in out.lower(), out
