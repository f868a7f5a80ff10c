"""The cupy-qknorm command on one rank, in this process (mpiexec runs: test_launch.py):
--version, help with defaults, and usage errors as one line with exit 2 before any work;
and every command where CuPy, the CUDA driver or the MPI library is missing (in a process
that lacks it: tests/conftest.py's cli_without)."""
import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cupy_qknorm
from cupy_qknorm import cli
from cupy_qknorm import compile as kc
from cupy_qknorm import knobs, tuning
from tests.conftest import HAS_GPU, cli_without

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
def test_every_option_shows_its_default_once(command):
    sub = subparsers()[command]
    formatter = sub._get_formatter()
    wrong = []
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = formatter._expand_help(action) if action.help else ""
        if len(re.findall(r"\bdefault\b", text, re.IGNORECASE)) != 1:
            wrong.append(f"{'/'.join(action.option_strings)}: {text!r}")
    assert not wrong, wrong
    assert "(default: None)" not in sub.format_help()


def test_the_default_formatter_would_print_two_defaults():
    """What the test above guards against: argparse's own formatter appends a default to a
    help text that already says it, and prints None for options without one."""
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--x", default=3, help="a number (default: three)")
    p.add_argument("--y", help="a file")
    text = " ".join(p.format_help().split())
    assert "(default: three) (default: 3)" in text and "(default: None)" in text
    p.formatter_class = cli._Formatter
    text = " ".join(p.format_help().split())
    assert text.count("default") == 1 and "None" not in text


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
    """CuPy is installed here, the driver is not: say so, and name no extra to install."""
    for transport in ("ipc", "nccl"):
        rc, out, err = run(capsys, "check", "--transport", transport)
        assert rc == 2 and out == ""
        assert one_line(err, "check") == (
            f"cupy-qknorm check: transport '{transport}' needs a CUDA GPU on every rank; "
            f"CuPy is installed but this host has no CUDA driver (no libcuda)")


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
        assert lines[5].startswith("GPUs: none; ")
    assert "Traceback" not in err


# -- every command where a piece is missing -----------------------------------------------
COMMANDS = [("--version",), ("info",), ("compile", "--cupy-cache"),
            ("compile", "--jobs", "1"), ("check", "--transport", "ipc"),
            ("check", "--transport", "nccl"), ("check", "--tokens", "0,3"),
            ("check", "--transport", "mpi", "--tokens", "3"), ("bench", "--tokens", "1"),
            ("bench", "--help")]
# one small specialization, so that `compile` proves it builds without what is missing
ONE_SPEC = ("from cupy_qknorm import tuning\n"
            "spec = tuning.Spec.plan('float32', 'float32', 8, 768, 128, 'narrow')\n"
            "tuning.shipped_specs = lambda: [spec]\n")
CUPY_EXTRA = "pip install 'cupy-qknorm[cuda13]' or '[cuda12]'"
MPI_EXTRA = "pip install 'cupy-qknorm[mpich]'"
NO_DRIVER = "CuPy is installed but this host has no CUDA driver (no libcuda)"
NVRTC = kc.nvrtc_available() is None


@pytest.fixture(scope="module")
def without():
    """{missing: {command: (exit code, stdout, stderr)}} for "cupy", "driver" and "mpi"."""
    return {m: cli_without(m, *COMMANDS, setup=ONE_SPEC) for m in ("cupy", "driver", "mpi")}


def line_of(result, command):
    """The one stderr line of a command that could not run: exit 2, nothing on stdout."""
    rc, out, err = result
    assert rc == 2 and out == "", result
    return one_line(err, command)


def passed(result):
    rc, out, err = result
    assert rc == 0 and "Traceback" not in err, result
    return out


# ids without the bare word "mpi", which pytest-mpi takes for its mark
@pytest.mark.parametrize("missing", ["cupy", "driver", "mpi"],
                         ids=["no-cupy", "no-driver", "no-libmpi"])
def test_no_command_ends_in_a_traceback(without, missing):
    for command, (rc, out, err) in without[missing].items():
        assert rc in (0, 2) and "Traceback" not in out + err, (command, rc, out, err)
    assert passed(without[missing]["--version"]) == VERSION_LINE + "\n"
    assert passed(without[missing]["bench --help"]).startswith("usage: cupy-qknorm bench")


def test_without_cupy(without):
    r = without["cupy"]
    info = passed(r["info"]).splitlines()
    assert info[1] == f"CuPy: unavailable: CuPy is not installed ({CUPY_EXTRA})"
    assert info[3] == "NCCL: unavailable (it comes with CuPy)"
    assert info[5] == f"GPUs: none; CuPy is not installed ({CUPY_EXTRA})"
    for t in ("ipc", "nccl"):
        assert line_of(r[f"check --transport {t}"], "check") == (
            f"cupy-qknorm check: transport '{t}' needs a CUDA GPU on every rank; CuPy is not "
            f"installed ({CUPY_EXTRA})")
    assert line_of(r["bench --tokens 1"], "bench") == (
        f"cupy-qknorm bench: timing the GPU transports needs a CUDA GPU on every rank; CuPy "
        f"is not installed ({CUPY_EXTRA})")
    assert CUPY_EXTRA in line_of(r["compile --cupy-cache"], "compile")
    # numpy arrays on transport "mpi" need no CuPy; nor does NVRTC
    for check in ("check --tokens 0,3", "check --transport mpi --tokens 3"):
        out = passed(r[check])
        assert "transport=mpi" in out and out.splitlines()[-1].startswith("PASS")
    if NVRTC:
        assert passed(r["compile --jobs 1"]).splitlines()[-1].startswith(
            "compiled 1/1 specializations for sm_90")


def test_without_a_driver(without):
    """CuPy is installed: say that the driver is missing, and name no extra."""
    r = without["driver"]
    info = passed(r["info"]).splitlines()
    assert info[1].startswith("CuPy: ") and "unavailable" not in info[1]
    assert info[5] == f"GPUs: none; {NO_DRIVER}"
    lines = [line_of(r[c], c.split()[0]) for c in ("check --transport ipc",
                                                   "check --transport nccl",
                                                   "bench --tokens 1", "compile --cupy-cache")]
    assert lines[0] == ("cupy-qknorm check: transport 'ipc' needs a CUDA GPU on every rank; "
                        + NO_DRIVER)
    assert lines[2] == ("cupy-qknorm bench: timing the GPU transports needs a CUDA GPU on "
                        "every rank; " + NO_DRIVER)
    assert lines[3] == ("cupy-qknorm compile: --cupy-cache needs a GPU (CuPy compiles for the "
                        "GPU it sees): " + NO_DRIVER)
    for line in lines:
        assert NO_DRIVER in line and "pip install" not in line, line
    assert passed(r["check --tokens 0,3"]).splitlines()[-1].startswith("PASS")


def test_without_an_mpi_library(without):
    r = without["mpi"]
    mpi = (f"mpi4py finds no MPI library (libmpi.so: cannot open shared object file: No such "
           f"file or directory): {MPI_EXTRA}, or load this host's own MPI")
    info = passed(r["info"]).splitlines()
    assert len(info) >= 6 and info[4] == f"MPI: unavailable: {mpi}"
    for check in ("check --tokens 0,3", "check --transport mpi --tokens 3"):
        assert line_of(r[check], "check") == f"cupy-qknorm check: {mpi}"
    for command in ("check --transport ipc", "bench --tokens 1"):
        line = line_of(r[command], command.split()[0])
        assert line.startswith(f"cupy-qknorm {command.split()[0]}: {mpi}; "), line
        assert "also needs a GPU: " in line  # what else is missing, in the same line
    if NVRTC:  # compile needs no MPI
        assert passed(r["compile --jobs 1"]).splitlines()[-1].startswith("compiled 1/1 ")


def test_a_missing_piece_with_the_debug_knob_adds_the_traceback(monkeypatch):
    monkeypatch.setenv("CUPY_QKNORM_DEBUG", "1")
    rc, out, err = cli_without("cupy", ("bench",))["bench"]
    assert rc == 2 and err.startswith("cupy-qknorm bench: timing the GPU transports needs ")
    assert "Traceback" in err and "_UsageError" in err


@pytest.mark.parametrize("status,driver,runtime,want", [
    (35, 0, 13020, NO_DRIVER),
    (35, 12040, 13020, "the CUDA driver (12.4) is older than CuPy's CUDA runtime (13.2): "
                       "update the driver, or use the CuPy of its CUDA version "
                       "(cupy-qknorm[cuda12] in place of [cuda13])"),
    (100, 13000, 13020, "CuPy is installed but sees no CUDA device"),
    (999, 13000, 13020, "CuPy is installed but cannot reach a GPU (CUDARuntimeError: "),
])
def test_no_gpu_reason_says_which_piece_is_missing(monkeypatch, status, driver, runtime,
                                                   want):
    cupy = pytest.importorskip("cupy")
    from cupy_backends.cuda.api.runtime import CUDARuntimeError

    from cupy_qknorm.placement import no_gpu_reason

    def fail():
        raise CUDARuntimeError(status)
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", fail)
    monkeypatch.setattr(cupy.cuda.runtime, "driverGetVersion", lambda: driver)
    monkeypatch.setattr(cupy.cuda.runtime, "runtimeGetVersion", lambda: runtime)
    assert no_gpu_reason().startswith(want)
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", lambda: 0)
    assert no_gpu_reason() == "CuPy is installed but sees no CUDA device"
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", lambda: 1)
    assert no_gpu_reason() is None
