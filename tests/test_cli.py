"""The cupy-qknorm command on one rank, in this process (mpiexec runs: test_launch.py):
--version, help with defaults, and usage errors as one line with exit 2 before any work."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest

import cupy_qknorm
from cupy_qknorm import cli
from cupy_qknorm import compile as kc
from cupy_qknorm import knobs, tuning
from tests.conftest import HAS_GPU

ROOT = Path(__file__).resolve().parents[1]
VERSION_LINE = f"cupy-qknorm {cupy_qknorm.__version__}"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in knobs.KNOBS:
        monkeypatch.delenv(name, raising=False)


def run(capsys, *argv):
    """(exit code, stdout, stderr) of the command in this process."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse: --version, --help, a malformed argument
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err, command):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"cupy-qknorm {command}: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def no_compiling(monkeypatch):
    """Fails the test if anything is compiled."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("compiled before validating")
    monkeypatch.setattr(kc, "nvrtc_compile", refuse)
    monkeypatch.setattr(kc, "load", refuse)
    return calls


def test_version(capsys):
    assert run(capsys, "--version") == (0, VERSION_LINE + "\n", "")


def test_version_from_the_module_and_the_console_script():
    commands = [[sys.executable, "-m", "cupy_qknorm", "--version"]]
    script = Path(sys.executable).parent / "cupy-qknorm"
    if script.exists():  # installed with pip install -e
        commands.append([str(script), "--version"])
    for cmd in commands:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stdout, r.stderr) == (0, VERSION_LINE + "\n", ""), cmd


def test_prog_name_everywhere(capsys):
    assert cli.parser().prog == "cupy-qknorm"
    rc, out, _ = run(capsys, "check", "--help")
    assert rc == 0 and out.startswith("usage: cupy-qknorm check ")
    rc, _, err = run(capsys)
    assert rc == 2 and err.startswith("usage: cupy-qknorm ")


def subparsers():
    p = cli.parser()
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", ["compile", "check", "info", "bench"])
def test_every_option_has_help_that_shows_its_default(command):
    sub = subparsers()[command]
    formatter = sub._get_formatter()
    missing = []
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = formatter._get_help_string(action) or ""
        if not action.help or "default" not in text.lower():
            missing.append(f"{'/'.join(action.option_strings)}: {text!r}")
    assert not missing, missing


def test_help_shows_this_machines_defaults(capsys):
    _, out, _ = run(capsys, "compile", "--help")
    assert "(default: sm_90)" in out and "(default: " in out.split("--jobs")[1]
    _, out, _ = run(capsys, "check", "--help")
    for text in ("(default: auto)", "(default: bfloat16)", "(default: 0,1,7,64,1000,3000)",
                 "(default: 2048)", "(default: 5.0)", "default: 6144"):
        assert text in " ".join(out.split()), text


def test_unknown_architecture(capsys, no_compiling):
    rc, out, err = run(capsys, "compile", "--arch", "sm_90", "--arch", "foo")
    line = one_line(err, "compile")
    assert rc == 2 and out == "" and not no_compiling
    supported = ", ".join(kc.supported_archs())
    assert line == f"cupy-qknorm compile: unknown architecture 'foo'; this NVRTC supports " \
                   f"{supported}"
    assert supported.startswith("sm_80")


def test_nvrtc_missing(capsys, monkeypatch, no_compiling):
    monkeypatch.setattr(kc, "nvrtc_available", lambda: "ImportError: no libnvrtc (pip "
                        "install 'cupy-qknorm[cuda13]' or '[cuda12]', which bring NVRTC)")
    rc, out, err = run(capsys, "compile")
    line = one_line(err, "compile")
    assert rc == 2 and out == "" and not no_compiling
    assert line.startswith("cupy-qknorm compile: NVRTC is not available: ImportError") and \
        "pip install 'cupy-qknorm[cuda13]'" in line


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_cupy_cache_without_a_gpu_fails_before_compiling(capsys, no_compiling):
    rc, out, err = run(capsys, "compile", "--cupy-cache")
    line = one_line(err, "compile")
    assert rc == 2 and out == "" and not no_compiling
    assert line.startswith("cupy-qknorm compile: --cupy-cache needs a GPU")


def test_bad_knob_fails_before_compiling(capsys, monkeypatch, no_compiling):
    monkeypatch.setenv("CUPY_QKNORM_DEPTH", "9")
    rc, out, err = run(capsys, "compile")
    assert rc == 2 and out == "" and not no_compiling
    assert one_line(err, "compile") == \
        "cupy-qknorm compile: CUPY_QKNORM_DEPTH must be in 2..8, got 9"


def test_debug_knob_adds_the_traceback(capsys, monkeypatch, no_compiling):
    monkeypatch.setenv("CUPY_QKNORM_DEBUG", "1")
    rc, _, err = run(capsys, "compile", "--arch", "foo")
    assert rc == 2 and err.startswith("cupy-qknorm compile: unknown architecture 'foo'")
    assert "Traceback" in err


@pytest.mark.parametrize("argv,match", [
    (("compile", "--jobs", "0"), "argument --jobs/-j: expected a finite number > 0"),
    (("check", "--tokens", "1,x"), "argument --tokens: expected comma-separated ints >= 0"),
    (("check", "--tokens", "-1"), "argument --tokens"),
    (("check", "--timeout", "nan"), "argument --timeout: expected a finite number > 0"),
    (("check", "--max-tokens", "0"), "argument --max-tokens"),
    (("check", "--transport", "tcp"), "argument --transport: invalid choice: 'tcp'"),
])
def test_malformed_arguments(capsys, argv, match):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == "" and match in err


def fake_compile(spec, arch):
    if spec.world == 3:
        raise kc.QKNormError("NVRTC: NVRTC_ERROR_COMPILATION\nqknorm.cuh(1): error: no")
    return {"cubin_bytes": 12345, "lowered": {}, "log": "",
            "resources": {"fused": {"registers": 64, "spill_stores": 0, "spill_loads": 0,
                                    "stack": 0, "smem": 248}}}


def test_compile_prints_a_line_per_spec_and_a_summary(capsys, monkeypatch):
    specs = [tuning.Spec.plan("bfloat16", "bfloat16", g, 1024, 128, "narrow")
             for g in (2, 3)]
    monkeypatch.setattr(tuning, "shipped_specs", lambda: specs)
    monkeypatch.setattr(kc, "nvrtc_compile", fake_compile)
    rc, out, err = run(capsys, "compile", "--jobs", "1", "--arch", "sm_90", "--arch", "sm_100")
    lines = out.splitlines()
    assert rc == 1 and len(lines) == 5
    assert lines[0].startswith(f"[  1/4] sm_90 {specs[0]}: ok     12345 B; fused kernel: 64 "
                               f"registers, 0 B spilled, 248 B shared, ")
    assert lines[1].startswith(f"[  2/4] sm_90 {specs[1]}: FAIL NVRTC: NVRTC_ERROR_COMPILATION")
    assert lines[4].startswith("compiled 2/4 specializations for sm_90, sm_100 in ")
    assert f"with 1 process; sources {kc.SOURCES_HASH}; register spills: none" in lines[4]
    assert "qknorm.cuh(1): error: no" in err  # the compiler's log of a failure


def test_compile_in_parallel_processes(capsys, monkeypatch):
    """--jobs 2 compiles in two spawned processes, for real, and reports in order."""
    specs = [tuning.Spec.plan("float32", "float32", g, 1024, 128, "narrow") for g in (7, 8)]
    monkeypatch.setattr(tuning, "shipped_specs", lambda: specs)
    rc, out, err = run(capsys, "compile", "--jobs", "2")
    lines = out.splitlines()
    assert rc == 0, out + err
    assert [ln.split(": ok ")[0] for ln in lines[:2]] == \
        [f"[  {i}/2] sm_90 {s}" for i, s in enumerate(specs, 1)]
    assert "with 2 processes" in lines[2] and lines[2].startswith("compiled 2/2 ")


def test_blocks_per_sm_from_registers():
    assert cli._blocks_per_sm(64, 224) == 4     # 7 warps of 2048 registers: 65536 // 14336
    assert cli._blocks_per_sm(148, 64) == 6     # 152 a thread allocated: 65536 // 9728
    assert cli._blocks_per_sm(16, 32) == 32     # the 32-block limit
    assert cli._blocks_per_sm(None, 64) == "?"
    assert cli._blocks_per_sm(122, 64, 21600) == 8   # wide staged, G=2: registers bind
    assert cli._blocks_per_sm(122, 32, 10816) == 16  # wide staged, G=4: registers (smem: 19)
    assert cli._blocks_per_sm(64, 128, 43008) == 5   # 43 KB of staged rows: shared memory


# -- check, on one rank --------------------------------------------------------------------
def test_check_on_the_cpu(capsys):
    rc, out, err = run(capsys, "check", "--transport", "mpi", "--tokens", "0,3", "--dtype",
                       "float32")
    assert rc == 0, out + err
    lines = out.splitlines()
    assert lines[0] == "check: G=1 dtype=float32 q_dim=6144 k_dim=1024 transport=mpi " \
                       "max_tokens=2048"
    assert lines[-1].startswith("PASS: max error ")


def test_check_rope_needs_whole_heads(capsys):
    rc, out, err = run(capsys, "check", "--transport", "mpi", "--rope", "--k-dim", "192")
    assert rc == 2 and out == ""
    assert one_line(err, "check") == (
        "cupy-qknorm check: RoPE needs whole heads on every rank: k_dim=192 over 1 ranks is "
        "192 a rank, not a multiple of head_dim=128")


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_check_gpu_transport_without_a_gpu(capsys):
    for transport in ("ipc", "nccl"):
        rc, out, err = run(capsys, "check", "--transport", transport)
        assert rc == 2 and out == ""
        assert one_line(err, "check") == (
            f"cupy-qknorm check: transport '{transport}': {transport} needs a GPU on every "
            f"rank; rank 0 has none (CuPy with a CUDA device: pip install "
            f"'cupy-qknorm[cuda13]' or 'cupy-qknorm[cuda12]')")


def test_check_bad_config_is_one_line(capsys):
    rc, out, err = run(capsys, "check", "--transport", "mpi", "--eps", "-1")
    assert rc == 2 and out == ""
    assert one_line(err, "check") == \
        "cupy-qknorm check: rank 0: eps must be a finite number >= 0, got -1.0"


def test_info(capsys):
    rc, out, err = run(capsys, "info")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == f"cupy_qknorm {cupy_qknorm.__version__}; kernels {kc.KERNEL_DIR} " \
                       f"({kc.SOURCES_HASH})"
    for i, name in enumerate(("CuPy", "NVRTC", "NCCL", "MPI"), 1):
        assert lines[i].startswith(f"{name}: "), lines
    assert lines[2].startswith(f"NVRTC: {'unavailable' if kc.nvrtc_available() else ''}")
    assert "mpi4py" in lines[4] and "1 rank(s) here" in lines[4]
    assert any(ln.startswith("GPU") for ln in lines[5:])
    if not HAS_GPU:
        assert lines[5].startswith("GPUs: none")
    assert "Traceback" not in err
