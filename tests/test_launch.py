"""mpiexec runs, as a user starts them: the MPI test files (tests/test_mpi.py,
tests/test_mpi_kvcache.py, and tests/test_jax_mpi.py where jax is installed) at 2 and 3
ranks (the replicated-head and preset tests at 4 too), and the check command (with
MiniMax's RoPE at 2 ranks, a quick smoke at 8, MiniMax's preset at 16 with its KV heads
replicated, a model at a G it does not fit, a GPU transport asked for on a machine
without one). Every rank must pass (CuPy's distributed tests' pattern).
The fault times the MPI tests print are listed at the end of the run; a plain run's skip
of the MPI tests says that they run here."""
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import (HAS_GPU, MPI_RANKS, PYTEST_MPI_SKIP, ROOT, mpi_skip_reason,
                            mpiexec, run_mpi)

needs_mpiexec = pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (pip install mpich)")


def run_mpi_suite(ranks, *args, passed=r"\d+ passed", bad="failed|errors?|xpassed"):
    """pytest --with-mpi `args` on `ranks` ranks: every rank exits 0, the output counts
    `passed` and no count of `bad`. Returns the run."""
    r = run_mpi(ranks, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--with-mpi", *args)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"mpiexec -n {ranks} failed:\n{out[-6000:]}"
    # mpiexec's exit code is the worst rank's; the ranks' lines may interleave
    assert re.search(passed, r.stdout) and not re.search(rf"\d+ ({bad})", r.stdout), \
        out[-3000:]
    return r


@needs_mpiexec
@pytest.mark.parametrize("ranks", MPI_RANKS)
def test_mpi_suite_under_mpiexec(ranks, fault_times):
    r = run_mpi_suite(ranks, "tests/test_mpi.py")
    out = r.stdout + r.stderr
    times = [ln for ln in r.stdout.splitlines() if ln.startswith("FAULT-TIME")]
    assert len(times) == 6, out[-3000:]  # one line for each fault test_mpi.py times
    fault_times += times


@needs_mpiexec
@pytest.mark.parametrize("ranks", MPI_RANKS)
def test_jax_suite_under_mpiexec(ranks):
    """tests/test_jax_mpi.py: the XLA FFI target inside jitted functions across ranks."""
    pytest.importorskip("jax", reason="needs jax (pip install -e '.[jax]')")
    run_mpi_suite(ranks, "tests/test_jax_mpi.py", bad="failed|errors?|xpassed|skipped")


@needs_mpiexec
@pytest.mark.parametrize("ranks", MPI_RANKS)
def test_mpi_kvcache_under_mpiexec(ranks):
    run_mpi_suite(ranks, "tests/test_mpi_kvcache.py")


@needs_mpiexec
def test_check_command_with_rope():
    r = run_mpi(2, "-m", "cupy_qknorm", "check", "--transport", "mpi", "--rope",
               "--tokens", "0,1,33")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rope=MiniMax M2" in r.stdout and r.stdout.rstrip().splitlines()[-1].startswith(
        "PASS")


@needs_mpiexec
def test_check_command_through_jax():
    pytest.importorskip("jax", reason="needs jax (pip install -e '.[jax]')")
    r = run_mpi(2, "-m", "cupy_qknorm", "check", "--jax", "--transport", "mpi", "--rope",
               "--tokens", "0,1,33")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "transport=mpi max_tokens=2048 jax.jit (cpu) rope=MiniMax M2" in r.stdout
    assert r.stdout.rstrip().splitlines()[-1].startswith("PASS")


@needs_mpiexec
def test_check_command_through_jax_with_an_fp8_cache():
    pytest.importorskip("jax", reason="needs jax (pip install -e '.[jax]')")
    r = run_mpi(2, "-m", "cupy_qknorm", "check", "--jax", "--transport", "mpi", "--rope",
                "--kv-cache", "fp8", "--tokens", "1,33")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "jax.jit (cpu)" in r.stdout and "kv_cache=float8_e4m3fn" in r.stdout
    assert r.stdout.rstrip().splitlines()[-1].startswith("PASS")
    assert r.stdout.rstrip().splitlines()[-1].endswith("0 cache bytes differ")


@needs_mpiexec
def test_check_command_at_eight_ranks():
    r = run_mpi(8, "-m", "cupy_qknorm", "check", "--transport", "mpi", "--tokens", "0,1,33")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "G=8 dtype=bfloat16 q_dim=6144 k_dim=1024" in r.stdout
    assert r.stdout.rstrip().splitlines()[-1].startswith("PASS")


@needs_mpiexec
def test_check_command_minimax_at_sixteen_ranks():
    """MiniMax M2 at TP16: each of its 8 KV heads on two ranks, RoPE included."""
    r = run_mpi(16, "-m", "cupy_qknorm", "check", "--model", "minimax-m2", "--transport",
                "mpi", "--tokens", "0,1,33", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "model=minimax-m2 G=16 dtype=bfloat16 q_dim=6144 k_dim=1024 kv_heads=8x128 " \
           "replicated" in r.stdout
    assert r.stdout.rstrip().splitlines()[-1].startswith("PASS")


@needs_mpiexec
def test_replicated_heads_and_presets_at_four_ranks():
    """tests/test_mpi.py's replicated-head, preset and refused-layout tests at G=4, where
    two KV heads each lie on two ranks (the suite's other runs are G=2 and 3)."""
    run_mpi_suite(4, "tests/test_mpi.py", "-k", "replicated or preset or does_not_fit",
                  passed=r"\b13 passed", bad="failed|errors?")


@needs_mpiexec
def test_check_command_refuses_a_model_at_a_g_it_does_not_fit():
    r = run_mpi(3, "-m", "cupy_qknorm", "check", "--model", "minimax-m2", "--transport",
                "mpi")
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.splitlines() == [
        "cupy-qknorm check: minimax-m2 (48 q heads, 8 KV heads of 128) does not run at G=3: "
        "its heads neither split nor replicate evenly there; G = 1, 2, 4, 8, 16 do"]


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
    for name in ("test_mpi.py", "test_jax_mpi.py"):
        assert mpi_skip_reason(ROOT / "tests" / name).startswith(
            f"runs under mpiexec -n {MPI_RANKS[0]} ")


# -- the GPU suite (scripts/gpu_suite.sh), checked here without a GPU ----------------------
NCCL_PROBES = """========= COMPUTE-SANITIZER
========= Program hit CUDA_ERROR_NOT_FOUND (error 500) due to "named symbol not found" on CUDA API call to cuGetProcAddress.
=========     Saved host backtrace up to driver entry point at error
=========     Host Frame: [0x2d1e3a]
=========                in /lib64/libcuda.so.1
=========     Host Frame:misc/cudawrap.cc:149:cudaLibraryInit() [0x5ae6f]
=========                in /usr/local/lib/python3.12/dist-packages/nvidia/nccl/lib/libnccl.so.2
=========
========= Program hit cudaErrorPeerAccessUnsupported (error 217) due to "peer access is not supported between these two devices" on CUDA API call to cudaDeviceCanAccessPeer.
=========     Saved host backtrace up to driver entry point at error
=========     Host Frame:ncclTopoGetSystem(ncclComm*, ncclTopoSystem**) [0x8d12f]
=========                in /usr/local/lib/python3.12/dist-packages/nvidia/nccl/lib/libnccl.so.2
=========
"""
OUR_READ = """========= Invalid __global__ read of size 16 bytes
=========     at void qknorm::fused<qknorm::Spec<(int)2, (int)7>>(qknorm::Params)+0x1a30
=========     by thread (32,0,0) in block (3,0,0)
=========     Address 0x7f0e69430200 is out of bounds
=========     Saved host backtrace up to driver entry point at kernel launch time
=========     Host Frame: [0x2e8fa0]
=========                in /usr/lib/x86_64-linux-gnu/libcuda.so.1
=========
"""
OUR_RACE = """========= Error: Race reported between Write access at void qknorm::fused<qknorm::Spec<(int)2, (int)3>>(qknorm::Params)+0x9a0
=========     and Read access at void qknorm::fused<qknorm::Spec<(int)2, (int)3>>(qknorm::Params)+0xa10 [1024 hazards]
=========
========= Warning: Race reported between Read access at qknorm_copy+0x20
=========     and Write access at qknorm_copy+0x40 [4 hazards]
=========
"""
API_ERROR = """========= Program hit cudaErrorInvalidValue (error 1) due to "invalid argument" on CUDA API call to cudaMemcpyAsync.
=========     Saved host backtrace up to driver entry point at error
=========     Host Frame: [0x2e8fa0]
=========                in /usr/local/lib/python3.12/dist-packages/cupy_backends/cuda/api/runtime.so
=========
"""


def rank_pytest():
    import importlib.util
    spec = importlib.util.spec_from_file_location("rank_pytest",
                                                  ROOT / "scripts" / "rank_pytest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary(n):
    return f"========= ERROR SUMMARY: {n} error{'s' if n != 1 else ''}\n"


@pytest.mark.parametrize("log,want", [
    (NCCL_PROBES + summary(2), dict(ours=0, nccl=2, other=0, warnings=0, unprinted=0)),
    (NCCL_PROBES + OUR_READ + summary(3), dict(ours=1, nccl=2, other=0, unprinted=0)),
    (OUR_RACE + "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n"
     + summary(1), dict(ours=1, nccl=0, other=0, warnings=1, unprinted=0)),
    (API_ERROR + summary(1), dict(ours=0, nccl=0, other=1)),
    # the print limit left 5 out: nobody can be named for them
    (NCCL_PROBES + summary(7), dict(ours=0, nccl=2, other=0, unprinted=5)),
    ("========= COMPUTE-SANITIZER\n========= Target application returned an error\n"
     + summary(0), dict(ours=0, nccl=0, other=0, unprinted=0, summary="ERROR SUMMARY: 0 errors")),
], ids=["nccl-probes", "ours-and-nccl", "racecheck", "api-error", "unprinted", "clean"])
def test_sanitizer_counts_by_whose_kernel(log, want):
    counts = rank_pytest().sanitizer_counts(log)
    assert {k: counts[k] for k in want} == want, counts


def test_sanitizer_exit_status_excludes_only_nccl(tmp_path, capsys):
    rp = rank_pytest()
    probes, ours = tmp_path / "memcheck-rank0.log", tmp_path / "memcheck-rank1.log"
    probes.write_text(NCCL_PROBES + summary(2))
    ours.write_text(OUR_READ + summary(1))
    assert rp.sanitizer_main([str(probes)]) == 0
    assert capsys.readouterr().out == (
        "memcheck-rank0.log: 0 error(s) counted: 0 in qknorm kernels, 0 elsewhere, 0 "
        "unprinted; 2 in NCCL, excluded (NCCL's own); 0 warning(s); ERROR SUMMARY: 2 errors\n")
    assert rp.sanitizer_main([str(probes), str(ours)]) == 1
    assert rp.sanitizer_main([str(tmp_path / "missing.log")]) == 1  # the tool never ran


# stand-ins for a GPU host's tools: nvidia-smi lists FAKE_GPUS GPUs; mpiexec records each
# launch (with the shared-GPU switch it got) and prints what the ranks would, writing each
# rank's sanitizer log from FAKE_SANITIZER_LOG; python3 fakes the NVRTC build, and is
# this interpreter otherwise
NVIDIA_SMI = """#!/bin/sh
i=0
while [ $i -lt "$FAKE_GPUS" ]; do
  if [ "$1" = -L ]; then echo "GPU $i: NVIDIA H200 (UUID: GPU-$i)"
  else echo "$i, NVIDIA H200, 143771 MiB"; fi
  i=$((i + 1))
done
"""
MPIEXEC = """#!{python}
import os, sys
args = sys.argv[1:]
n = int(args[args.index("-n") + 1])
cmd = args[args.index("-n") + 2:]
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(f"-n {{n}} shared={{os.environ.get('QKNORM_TEST_SHARED_GPU', '')}} "
            f"{{' '.join(cmd)}}\\n")
if cmd[0] == "compute-sanitizer":
    log = cmd[cmd.index("--log-file") + 1]
    for r in range(n):
        with open(log.replace("%q{{OMPI_COMM_WORLD_RANK}}", str(r)), "w") as f:
            f.write(open(os.environ["FAKE_SANITIZER_LOG"]).read())
if "scripts/rank_pytest.py" in cmd:
    tag = cmd[cmd.index("scripts/rank_pytest.py") + 2]
    for r in range(n):
        print(f"{{tag}} G={{n}} rank {{r}}: 5 passed (exit 0)")
elif "check" in cmd:
    print("PASS: max error 0.5 ulp (tolerance 1), 0 elements past it")
elif "scripts/fault_kill.py" in cmd:
    print("rank 0: PeerTimeoutError after 1.0 s")
    sys.exit(137)
"""
PYTHON3 = """#!/bin/sh
if [ "$1 $2 $3" = "-m cupy_qknorm compile" ]; then
  echo "python3 $*" >> "$FAKE_CALLS"
  echo "compiled 92/92 specializations for sm_90 in 41.0 s with 16 processes"
  exit "${{FAKE_COMPILE_RC:-0}}"
fi
[ "$1" = -c ] && exit 1  # no pytest_timeout
exec {python} "$@"
"""


def gpu_suite(tmp_path, gpus, *ranks, sanitizer_log=NCCL_PROBES + summary(2), **env):
    """(exit code, output, [launch lines]) of scripts/gpu_suite.sh on a fake host."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    for name, text in (("nvidia-smi", NVIDIA_SMI), ("mpiexec", MPIEXEC), ("python3", PYTHON3)):
        (bin_ / name).write_text(text.format(python=sys.executable))
        (bin_ / name).chmod(0o755)
    (tmp_path / "sanitizer.log").write_text(sanitizer_log)
    calls = tmp_path / "calls"
    calls.write_text("")
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    environ = {k: v for k, v in os.environ.items() if k != "QKNORM_TEST_SHARED_GPU"}
    environ.update(PATH=f"{bin_}:{os.environ['PATH']}", FAKE_GPUS=str(gpus),
                   FAKE_CALLS=str(calls), FAKE_SANITIZER_LOG=str(tmp_path / "sanitizer.log"),
                   GPU_LOGS=str(tmp_path / "logs"), OUT=str(out), **env)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_suite.sh"), *map(str, ranks)],
                       env=environ, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr, calls.read_text().splitlines()


def test_gpu_suite_on_one_gpu_shares_it_beyond_one_rank(tmp_path):
    rc, out, calls = gpu_suite(tmp_path, 1)
    assert rc == 0 and out.rstrip().endswith("GPU SUITE PASSED"), out
    assert "G = 1 2 3 on 1 GPU(s)" in out
    assert calls[0] == "python3 -m cupy_qknorm compile"
    tests = [c for c in calls if "rank_pytest.py" in c and " gpu -- " in c]
    assert [c.split(" tests/gpu")[0].split(" python3")[0] for c in tests] == [
        "-n 1 shared=", "-n 2 shared=1", "-n 3 shared=1"]
    # each rank's line, for every G
    for g in (1, 2, 3):
        assert all(f"gpu G={g} rank {r}: 5 passed (exit 0)" in out for r in range(g)), out
    # what needs a GPU per rank runs at G=1 only, and says why not beyond
    assert {c.split()[1] for c in calls if " check " in c} == {"1"}
    assert not [c for c in calls if "fault_kill" in c]
    for g in (2, 3):
        assert f"SKIPPED G={g} check (ipc, nccl) and SIGKILL: they need a GPU per rank" in out
        assert any(c.startswith(f"-n {g} shared=1 compute-sanitizer --tool memcheck")
                   for c in calls)
    assert "SKIPPED compute-sanitizer at G=2: it needs a GPU per rank; 1 GPU(s) here, so G=1" \
        in out
    sanitized = [c for c in calls if "compute-sanitizer" in c and " check " in c]
    assert len(sanitized) == 6 and all(c.startswith("-n 1 shared= ") for c in sanitized)
    assert sum("--kv-cache fp8" in c for c in sanitized) == 2  # memcheck and racecheck
    checks = [c for c in calls if " check " in c and "compute-sanitizer" not in c]
    assert {c.split("check ", 1)[1] for c in checks} == {
        f"--transport {t}{what}" for t in ("ipc", "nccl") for what in (
            "", " --rope", " --rope --kv-cache bf16", " --rope --kv-cache fp8",
            " --model minimax-m2")}
    assert "SKIPPED G=1 check --jax: no jax here" in out
    # NCCL's probes in every log: listed, excluded, and the suite passes
    assert "memcheck shared G=2: memcheck-shared-G2-rank1.log: 0 error(s) counted: 0 in " \
           "qknorm kernels, 0 elsewhere, 0 unprinted; 2 in NCCL, excluded" in out
    assert (tmp_path / "out" / "gpu-logs.tgz").exists()


def test_gpu_suite_fails_on_an_error_in_our_kernel(tmp_path):
    rc, out, _ = gpu_suite(tmp_path, 1, 1, sanitizer_log=NCCL_PROBES + OUR_READ + summary(3))
    assert rc == 1 and out.rstrip().endswith("GPU SUITE FAILED"), out
    assert "1 error(s) counted: 1 in qknorm kernels" in out


def test_gpu_suite_fails_when_the_build_fails(tmp_path):
    rc, out, _ = gpu_suite(tmp_path, 1, 1, FAKE_COMPILE_RC="1")
    assert rc == 1 and "compile: FAILED (exit 1;" in out and "GPU SUITE FAILED" in out


def test_gpu_suite_with_a_gpu_per_rank_shares_nothing(tmp_path):
    rc, out, calls = gpu_suite(tmp_path, 4, SANITIZE="0", COMPILE="0")
    assert rc == 0 and "GPU SUITE PASSED" in out, out
    assert "G = 2 3 4 on 4 GPU(s)" in out and not [c for c in calls if "shared=1" in c]
    assert not [c for c in calls if "compute-sanitizer" in c or "compile" in c]
    assert sorted(c.split()[1] for c in calls if "fault_kill" in c) == \
        ["2", "2", "3", "3", "4", "4"]
    # a G beyond the GPUs may be skipped instead of shared
    rc, out, calls = gpu_suite(tmp_path, 1, 2, QKNORM_TEST_SHARED_GPU="0", COMPILE="0",
                               SANITIZE="0")
    assert "SKIPPED G=2: only 1 GPU(s) here, and QKNORM_TEST_SHARED_GPU=0" in out
    assert rc == 1 and "nothing was tested" in out and not calls


# lists each collected test with the reasons of its skip marks
LIST_SKIPS = """import pytest


@pytest.hookimpl(hookwrapper=True)  # after every other hook has marked the items
def pytest_collection_modifyitems(items):
    yield
    for item in items:
        reasons = [m.kwargs.get("reason", "") for m in item.iter_markers("skip")]
        print("ITEM", item.nodeid, "|", " // ".join(reasons))
"""


@pytest.mark.parametrize("shared", ["1", ""])
def test_shared_gpu_mode_skips_exactly_what_needs_nccl(tmp_path, shared):
    """tests/gpu/conftest.py: with QKNORM_TEST_SHARED_GPU=1, a test run on transport
    "nccl" (its id says so) or one that reaches it through "auto" skips with the reason;
    nothing else does, and nothing does without the switch."""
    from tests.gpu.conftest import NCCL_REFUSES
    (tmp_path / "list_skips.py").write_text(LIST_SKIPS)
    env = {k: v for k, v in os.environ.items() if k != "QKNORM_TEST_SHARED_GPU"}
    env.update(PYTHONPATH=f"{tmp_path}:{ROOT}", QKNORM_TEST_SHARED_GPU=shared)
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                        "no:cacheprovider", "-p", "list_skips", "tests/gpu"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    items = [ln[len("ITEM "):].split(" | ") for ln in r.stdout.splitlines()
             if ln.startswith("ITEM ")]
    assert r.returncode == 0 and len(items) > 50, r.stdout[-3000:] + r.stderr[-3000:]
    for nodeid, reasons in items:
        ids = nodeid.partition("[")[2].rstrip("]")
        needs = "nccl" in ids.split("-") or "test_broken_p2p_auto_falls_back" in nodeid
        assert (NCCL_REFUSES in reasons) == (needs and shared == "1"), (nodeid, reasons)
    assert sum(NCCL_REFUSES in reasons for _, reasons in items) >= (25 if shared else 0)
