"""The benchmark's table and plot input, its options, and what it says where it cannot run,
on CPU (the timings themselves need GPUs)."""
import argparse
import re
import sys

import numpy as np

import pytest

from cupy_qknorm import bench, cli
from cupy_qknorm.bench import _table, add_parser
from tests.conftest import HAS_GPU, mpiexec, run_mpi

RESULT = {"card": "X", "G": 2, "dtype": "bfloat16", "q_dim": 6144, "k_dim": 1024,
          "commit": "abc", "pdl": True, "date": "2026-11-28",
          "floors": {"empty_kernel_graph_us": 1.3, "one_way_us": 0.6, "copy_GBps": 3000.0},
          "rows": [{"T": 1, "bytes": 14336, "ipc_graph_us": 3.4, "nccl_graph_us": 10.2,
                    "copy_graph_us": 1.7},
                   {"T": 1024, "bytes": 14680064, "ipc_graph_us": 9.2, "nccl_graph_us": 19.0,
                    "copy_graph_us": 7.4}]}


def rows_of(text):
    return [ln for ln in text.splitlines() if ln.strip()[:1].isdigit() and "|" in ln]


def test_table_columns_line_up_with_rows():
    text = _table(RESULT, ["graph"], ["ipc", "nccl"], 1.9)
    head = next(ln for ln in text.splitlines() if ln.lstrip().startswith("T |"))
    for row in rows_of(text):
        assert len(row) == len(head) and row.count("|") == head.count("|"), (head, row)
    assert "copy us" in head and "ipc/copy" in head
    t1024 = rows_of(text)[1].split("|")
    assert t1024[3].strip() == "2.07x"             # nccl / ipc
    assert t1024[4].strip() == "4.89"              # bytes / copy bandwidth beats 1.9 us
    assert t1024[-1].strip() == "1.24x"            # ipc / copy kernel


def test_table_eager_shows_bound_calls_against_cupy_launch():
    rows = [{"T": 1, "bytes": 14336, "ipc_eager_us": 9.0, "ipc_bound_eager_us": 6.0}]
    floors = {**RESULT["floors"], "cupy_launch_us": 6.0}
    text = _table({**RESULT, "rows": rows, "floors": floors}, ["eager"], ["ipc"], 1.9)
    head = next(ln for ln in text.splitlines() if ln.lstrip().startswith("T |"))
    assert [c.strip() for c in head.split("|")] == [
        "T", "ipc us", "ipc bound us", "ipc/launch", "ipc_bound/launch"]
    assert [c.strip() for c in rows_of(text)[0].split("|")] == ["1", "9.00", "6.00", "1.50x",
                                                                "1.00x"]
    assert "CuPy's launch of an empty kernel, back to back: 6.00 us" in text


def test_table_rope_ratios():
    rows = [{"T": 64, "bytes": 1, "ipc_graph_us": 3.0, "ipc+rope_graph_us": 3.15,
             "ipc>rope_graph_us": 5.04}]
    text = _table({**RESULT, "rows": rows, "rope": "RoPE(...)"}, ["graph"],
                  ["ipc", "ipc+rope", "ipc>rope"], 1.9)
    cells = [c.strip() for c in rows_of(text)[0].split("|")]
    assert cells[4:6] == ["1.05x", "1.60x"]        # fused over norm; separate over fused
    assert "ipc>rope: the ipc norm, then a separate RoPE kernel" in text


def test_table_names_the_exchange_floor_when_measured():
    assert "exchange alone" not in _table(RESULT, ["graph"], ["ipc"], 1.9)
    floors = {**RESULT["floors"], "exchange_graph_us": 2.02}
    lines = _table({**RESULT, "floors": floors}, ["graph"], ["ipc"], 1.9).splitlines()
    assert lines[2] == "exchange alone (graph node, no row): 2.02 us"


def test_table_without_copy_rows_or_ipc():
    old = {**RESULT, "rows": [{k: v for k, v in r.items() if k != "copy_graph_us"}
                              for r in RESULT["rows"]]}
    text = _table(old, ["graph"], ["ipc", "nccl"], 1.9)
    assert "copy us" not in text
    nccl_only = _table(old, ["graph"], ["nccl"], 1.9)
    head = next(ln for ln in nccl_only.splitlines() if ln.lstrip().startswith("T |"))
    assert "floor" not in head
    for row in rows_of(nccl_only):
        assert row.count("|") == head.count("|")


@pytest.mark.skipif(HAS_GPU, reason="checks the message of a host without a GPU")
@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (pip install mpich)")
def test_bench_without_gpu_is_one_line_from_rank_0():
    """Every rank finds it has no GPU (an allgather), every rank exits 2, rank 0 says why."""
    r = run_mpi(2, "-m", "cupy_qknorm", "bench", "--tokens", "1")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == "" and r.stderr.splitlines() == [
        "cupy-qknorm bench: timing the GPU transports needs a CUDA GPU on every rank; every "
        "rank: CuPy is installed but this host has no CUDA driver (no libcuda)"]


def test_table_names_the_layouts_when_known():
    from cupy_qknorm.bench import _layouts
    layouts = _layouts("bfloat16", 2, 3072, 512, 2048)
    assert layouts["narrow"] == {"warps": 7, "depth": 2, "staged": False}
    assert layouts["wide"] == {"warps": 2, "depth": 3, "staged": True}
    lines = _table({**RESULT, "layouts": layouts}, ["graph"], ["ipc"], 1.9).splitlines()
    assert lines[1] == ("fused kernel: narrow below 2048 tokens a launch (7 warps a token, "
                        "2 tokens in flight in registers); wide from there (2 warps a token, "
                        "3 tokens in flight in shared memory)")
    assert lines[2].startswith("floors:")
    assert "fused kernel" not in _table(RESULT, ["graph"], ["ipc"], 1.9)  # older JSON
    kv = {**RESULT, "kv_cache": "KVCache(...)", "layouts": {**layouts, "cache_split_from": 1024}}
    assert "ipc from 1024 tokens a launch: then a cache write launch" in \
        _table(kv, ["graph"], ["ipc"], 1.9)
    assert "then a cache write launch" not in _table({**kv, "layouts": layouts}, ["graph"],
                                                     ["ipc"], 1.9)


def test_table_header_names_the_model():
    assert "model=" not in _table(RESULT, ["graph"], ["ipc"], 1.9).splitlines()[0]
    head = _table({**RESULT, "model": "minimax-m2"}, ["graph"], ["ipc"], 1.9).splitlines()[0]
    assert " x2  model=minimax-m2  dtype=" in head, head


def test_table_header_says_in_place():
    assert "in place" not in _table(RESULT, ["graph"], ["ipc"], 1.9).splitlines()[0]
    head = _table({**RESULT, "in_place": True}, ["graph"], ["ipc"], 1.9).splitlines()[0]
    assert head.endswith("pdl=True  in place  2026-11-28"), head


def test_bench_refuses_unknown_transports_and_tokens(capsys):
    sub = argparse.ArgumentParser().add_subparsers(dest="cmd")
    p = add_parser(sub)
    assert p.parse_args(["--transports", "nccl,ipc,nccl"]).transports == ["nccl", "ipc"]
    for bad in (["--transports", "bogus"], ["--transports", ""], ["--tokens", "0,4"],
                ["--tokens", "x"], ["--transports", "ipc,mpi"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    assert "transports must be" in capsys.readouterr().err


def test_help_lists_only_the_transports_bench_times(capsys):
    """bench times the GPU transports: "mpi" (host sums, not capturable in a graph) is
    neither offered nor accepted; check offers every transport."""
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--transports TRANSPORTS comma-separated, of ipc, nccl (default: ipc,nccl)" in text
    assert "mpi" not in text.split("--transports TRANSPORTS")[1].split("--rope")[0]
    with pytest.raises(SystemExit):
        cli.main(["bench", "--transports", "mpi"])
    assert "transports must be a comma-separated list of ipc, nccl; got 'mpi'" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["check", "--help"])
    assert "--transport {auto,ipc,nccl,mpi}" in capsys.readouterr().out


def test_rope_without_whole_heads_is_a_value_error_before_any_timing(monkeypatch):
    """run() refuses --rope at widths that do not split into whole heads, on every rank
    alike (cli prints it as one line); nothing is allocated or timed before."""
    cupy = pytest.importorskip("cupy")
    from cupy_qknorm import bench
    monkeypatch.setattr(bench, "floor_empty_kernel_us", None)  # called: a TypeError
    monkeypatch.setattr(cupy.cuda, "Stream", None)
    args = cli.parser().parse_args(["bench", "--rope", "--k-dim", "192"])
    with pytest.raises(ValueError, match=r"^--rope: q_dim=6144, k_dim=192 do not split into "
                                         r"whole heads of 128 over 1 ranks$"):
        bench.run(args)


def test_random_positions_stay_inside_the_models_rope_table(monkeypatch):
    """bench --model NAME --rope draws positions from that model's table (OLMo 2: 4096
    rows), not MiniMax's 196608."""
    import types

    from cupy_qknorm.models import get
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(
        asarray=np.asarray, zeros=np.zeros, empty_like=np.empty_like))
    comm = types.SimpleNamespace(rank=0)
    olmo = get("olmo-2-7b").rope
    sets, _ = bench._inputs(comm, "bfloat16", 8, 8, 4096, 2, rope=olmo)
    assert max(int(s[4].max()) for s in sets) < olmo.rows() == 4096
    sets, _ = bench._inputs(comm, "bfloat16", 8, 8, 4096, 2)
    assert max(int(s[4].max()) for s in sets) >= 4096  # MiniMax M2's table by default


# -- bench --jax ------------------------------------------------------------------------
def bench_args(*argv):
    return cli.parser().parse_args(["bench", *argv])


def test_jax_option_parses_and_its_help_names_the_columns(capsys):
    assert bench_args().jax is False
    assert bench_args("--jax", "--mode", "graph").jax is True
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--jax also, per T (graph mode), our call inside jax.jit" in text
    assert "'<transport> jit us'" in text
    assert "'xla us' (at G >= 2 with a psum of the sums of squares across the processes, " \
        "through jax.distributed)" in text


@pytest.mark.parametrize("argv,why", [
    (("--mode", "eager"), "--jax times jitted chains beside the CuPy graph numbers: it "
                          "needs --mode graph or both"),
    (("--rope", "--kv-cache", "bf16"), "--jax with --kv-cache is not supported yet (it "
                                       "times the norm, + RoPE with --rope)")])
def test_jax_refusals_are_one_line_before_any_timing(monkeypatch, capsys, argv, why):
    assert bench.jax_refusal(bench_args("--jax", *argv)) == why
    assert bench.jax_refusal(bench_args(*argv)) is None  # without --jax: not refused
    monkeypatch.setattr(bench, "floor_empty_kernel_us", None)  # called: a TypeError
    with pytest.raises(ValueError) as e:
        bench.run(bench_args("--jax", *argv))
    assert str(e.value) == why
    # the command says it in one line and exits 2, before it looks for MPI or a GPU
    assert cli.main(["bench", "--jax", *argv]) == cli.USAGE_ERROR
    assert capsys.readouterr().err.splitlines() == [f"cupy-qknorm bench: {why}"]


@pytest.mark.parametrize("mode", ["graph", "both"])
def test_jax_runs_in_graph_mode(mode):
    assert bench.jax_refusal(bench_args("--jax", "--rope", "--mode", mode)) is None


def test_jax_missing_is_a_value_error_before_any_timing(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax", None)  # `import jax` raises ImportError
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    monkeypatch.setattr(bench, "floor_empty_kernel_us", None)
    with pytest.raises(ValueError, match=r"^--jax needs JAX \(pip install "
                                         r"'cupy-qknorm\[jax\]'.*\): .*jax"):
        bench.run(bench_args("--jax"))
    import os
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"  # before JAX starts


def test_importing_bench_never_imports_jax():
    import subprocess

    from tests.conftest import ROOT
    code = ("import sys, cupy_qknorm.bench, cupy_qknorm.bench_jax, cupy_qknorm.cli\n"
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


JAX_RESULT = {**RESULT, "G": 1, "rope": "RoPE(...)",
              "jax": {"version": "0.11.2", "calls": [16, 64], "reps": 15,
                      "transports": ["ipc"], "xla": "local"},
              "rows": [{"T": 64, "bytes": 1, "ipc_graph_us": 2.0, "ipc+rope_graph_us": 2.32,
                        "ipc_jit_us": 3.66, "xla_us": 16.95},
                       {"T": 1024, "bytes": 1, "ipc_graph_us": 9.0, "ipc+rope_graph_us": 10.03,
                        "ipc_jit_us": 12.57, "xla_us": 36.66}]}


def test_table_shows_jit_and_xla_columns_with_their_ratios():
    text = _table(JAX_RESULT, ["graph"], ["ipc", "ipc+rope"], 1.9)
    head = next(ln for ln in text.splitlines() if ln.lstrip().startswith("T |"))
    titles = [c.strip() for c in head.split("|")]
    at = titles.index("ipc jit us")
    assert titles[at:] == ["ipc jit us", "ipc jit/graph", "xla us", "xla/ipc jit"]
    for row in rows_of(text):
        assert len(row) == len(head) and row.count("|") == head.count("|"), (head, row)
    t64, t1024 = ([c.strip() for c in row.split("|")] for row in rows_of(text))
    assert t64[at:] == ["3.66", "1.58x", "16.95", "4.63x"]  # jit over ipc+rope's graph
    assert t1024[at:] == ["12.57", "1.25x", "36.66", "2.92x"]
    assert ("jit us: our call (ipc+rope) inside jax.jit (jax 0.11.2), per call = "
            "(wall(64) - wall(16)) / 48 over chains of 16 and 64 dependent calls") in text
    assert "xla us: XLA's own jitted norm + RoPE timed alike" in text


def test_table_jit_without_rope_and_at_g2_without_xla():
    rows = [{"T": 64, "bytes": 1, "ipc_graph_us": 3.0, "nccl_graph_us": 9.0,
             "ipc_jit_us": 4.5, "nccl_jit_us": 9.9}]
    why = "jax.distributed could not be initialized: RuntimeError: no coordinator"
    r = {**JAX_RESULT, "G": 2, "rope": None, "rows": rows,
         "jax": {**JAX_RESULT["jax"], "transports": ["ipc", "nccl"], "xla": None,
                 "xla_why": why}}
    text = _table(r, ["graph"], ["ipc", "nccl"], 1.9)
    head = next(ln for ln in text.splitlines() if ln.lstrip().startswith("T |"))
    titles = [c.strip() for c in head.split("|")]
    assert "xla us" not in titles and titles[-4:] == [
        "ipc jit us", "ipc jit/graph", "nccl jit us", "nccl jit/graph"]
    assert [c.strip() for c in rows_of(text)[0].split("|")][-4:] == [
        "4.50", "1.50x", "9.90", "1.10x"]                 # over the plain ipc and nccl
    assert f"xla: no psum baseline across the processes: {why}" in text.splitlines()
    assert "jit us: our call (ipc, nccl) inside jax.jit" in text
    assert "jit us" not in _table(RESULT, ["graph"], ["ipc"], 1.9)  # without --jax


def test_table_at_g2_names_the_psum_baseline():
    r = {**JAX_RESULT, "G": 2, "jax": {**JAX_RESULT["jax"], "xla": "psum"}}
    text = _table(r, ["graph"], ["ipc", "ipc+rope"], 1.9)
    head = next(ln for ln in text.splitlines() if ln.lstrip().startswith("T |"))
    assert [c.strip() for c in head.split("|")][-2:] == ["xla us", "xla/ipc jit"]
    assert ("xla us: XLA's jitted norm + RoPE with a psum of the sums of squares across the "
            "2 processes (jax.distributed, shard_map; one psum for q and k), timed alike; "
            "xla/jit: XLA's over ours") in text.splitlines()


def test_slope_is_the_cost_of_one_more_call():
    from cupy_qknorm import bench_jax
    walls = {16: 100.0, 64: 244.0}
    assert bench_jax.per_call_us(walls.__getitem__) == 3.0     # (244 - 100) / 48
    assert bench_jax.per_call_us({2: 10.0, 6: 30.0}.__getitem__, 2, 6) == 5.0
    with pytest.raises(ValueError, match="0 < n1 < n2"):
        bench_jax.per_call_us(walls.__getitem__, 64, 16)


def test_chain_timing_on_a_fake_clock():
    """chain_us builds each chain, then the barrier, then warm-up calls (untimed) and
    timed ones, each call synced; per call from the medians of the two chains."""
    from cupy_qknorm import bench_jax
    now, log = [0.0], []

    def chain(n):
        log.append(f"build {n}")

        def fn(x):
            now[0] += n * 2e-6 + 40e-6  # 2 us a call, 40 us of dispatch and sync
            log.append(f"call {n}")
            return x
        return fn

    def sync(x):
        log.append("sync")
    us = bench_jax.chain_us(chain, (1,), sync, barrier=lambda: log.append("barrier"),
                            calls=(16, 64), reps=5, clock=lambda: now[0])
    assert us == pytest.approx(2.0)
    first = log[:log.index("build 64")]
    assert first[:2] == ["build 16", "barrier"]
    assert first[2:] == ["call 16", "sync"] * (bench_jax.WARMUP + 5)
    # one slow outlier among the timed calls: the median ignores it
    times = iter([0.0, 1.0, 2.0, 2.000050, 3.0, 3.000050, 4.0, 4.000060, 5.0, 5.000050])
    wall = bench_jax.median_wall_us(lambda: None, (), lambda x: None, reps=5, warmup=2,
                                    clock=lambda: next(times))
    assert wall == pytest.approx(50.0)


def test_jit_and_xla_chains_on_jax_cpu():
    """The same chains on JAX's CPU backend (JaxQKNorm runs transport "mpi" there): the
    handler runs once a call, and XLA's norm + RoPE gives our call's rows (NeoX and GPT-J,
    within one bf16 unit)."""
    jax = pytest.importorskip("jax")
    from mpi4py import MPI

    from cupy_qknorm import RoPE
    from cupy_qknorm import reference as ref
    from cupy_qknorm.bench_jax import jit_us, ours, theirs, to_jax, xla_us
    from cupy_qknorm.host import from_f64
    from cupy_qknorm.jax import JaxQKNorm
    from cupy_qknorm.rope import host_table
    dev = jax.devices("cpu")[0]
    rng = np.random.default_rng(3)
    q, k = (from_f64(rng.standard_normal((5, n)) * 3, "bfloat16") for n in (256, 128))
    qw, kw = (from_f64(1 + 0.25 * rng.standard_normal(n), "bfloat16") for n in (256, 128))
    jargs = to_jax(jax, dev, q, k, qw, kw, rng.integers(0, 512, 5))
    assert jargs[4].dtype == np.int32
    for style in ("neox", "gptj"):
        rope = RoPE(128, 64, theta=5e6, max_position=512, style=style)
        with JaxQKNorm(MPI.COMM_SELF, 256, 128, "bfloat16", max_tokens=8, rope=rope,
                       backend="cpu") as qk:
            mine = jax.jit(ours(qk, 2, True))(*jargs)
            table = jax.device_put(host_table(rope), dev)
            xla = jax.jit(theirs(2, qk.config.eps, rope))(*jargs, table)
            for a, b in zip(mine, xla):
                ulps = ref.ulp_distance(np.asarray(a).view(np.uint16),
                                        np.asarray(b).view(np.uint16), "bfloat16")
                assert ulps.max() <= 1, (style, ulps.max())
            us, (captured, runs) = jit_us(jax, qk, jargs, False, None, calls=(1, 3), reps=2)
            assert np.isfinite(us) and captured == 0
            assert runs == (3 + 2) * (1 + 3)           # warm-up and timed calls of both
        assert np.isfinite(xla_us(jax, jargs, 1e-6, rope, dev, calls=(1, 3), reps=2))
    assert np.isfinite(xla_us(jax, jargs, 1e-6, None, dev, calls=(1, 3), reps=2))


def test_jax_without_a_gpu_backend_is_one_line(monkeypatch):
    """bench_jax.device on a JAX that has no GPU: ValueError, one line (bench.run
    gathers it from every rank before any collective allocation)."""
    import types
    jax = pytest.importorskip("jax")
    from cupy_qknorm import bench_jax
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(
        Device=lambda: types.SimpleNamespace(id=0))))
    monkeypatch.setattr(jax, "local_devices", lambda backend=None: (_ for _ in ()).throw(
        RuntimeError("Unknown backend: 'gpu' requested")))
    before = jax.config.values.get("jax_cuda_visible_devices", "all")
    try:
        with pytest.raises(ValueError, match=r"^--jax: JAX has no GPU backend \(JAX's CUDA "
                                             r"plugin: pip install 'jax\[cuda13\]'\): "
                                             r"Unknown backend"):
            bench_jax.device(jax)
    finally:
        jax.config.update("jax_cuda_visible_devices", before)


def test_jax_device_is_cupys(monkeypatch):
    """JAX's GPU of CuPy's device index; the only one where JAX was given just that GPU
    (jax_cuda_visible_devices, which bench sets to CuPy's index)."""
    import types

    from cupy_qknorm import bench_jax
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(
        Device=lambda: types.SimpleNamespace(id=2))))
    set_to = []

    def fake_jax(ids):
        gpus = [types.SimpleNamespace(local_hardware_id=i) for i in ids]
        return types.SimpleNamespace(
            local_devices=lambda backend: gpus,
            config=types.SimpleNamespace(update=lambda k, v: set_to.append((k, v))))
    assert bench_jax.device(fake_jax([0, 1, 2, 3])).local_hardware_id == 2
    assert set_to == [("jax_cuda_visible_devices", "2")]
    assert bench_jax.device(fake_jax([0])).local_hardware_id == 0
    with pytest.raises(ValueError, match=r"^--jax: JAX has no GPU that is CuPy's device 2 "
                                         r"\(JAX sees \[0, 1\]\)$"):
        bench_jax.device(fake_jax([0, 1]))


def test_jax_row_on_jax_cpu_fills_the_table():
    """bench's per-T step of --jax (_jax_row) on JAX's CPU backend, G=1, our target on
    transport "mpi": the slowest rank's numbers under the keys the table reads."""
    jax = pytest.importorskip("jax")
    from mpi4py import MPI

    from cupy_qknorm import RoPE
    from cupy_qknorm.host import from_f64
    from cupy_qknorm.jax import JaxQKNorm
    rope = RoPE(128, 64, theta=5e6, max_position=64)
    rng = np.random.default_rng(5)
    q, k = (from_f64(rng.standard_normal((4, n)), "bfloat16") for n in (256, 128))
    w = tuple(from_f64(np.ones(n), "bfloat16") for n in (256, 128))
    inputs = (q, k, None, None, rng.integers(0, 64, 4), None)
    with JaxQKNorm(MPI.COMM_SELF, 256, 128, "bfloat16", max_tokens=8, rope=rope,
                   backend="cpu") as qk:
        row = bench._jax_row(jax, MPI.COMM_SELF, {"mpi": qk}, jax.devices("cpu")[0],
                             inputs, w, rope, True, 4)
    assert sorted(row) == ["mpi_jit_us", "xla_us"] and all(np.isfinite(list(row.values())))
    result = {**JAX_RESULT, "jax": {**JAX_RESULT["jax"], "transports": ["mpi"]},
              "rows": [{"T": 4, "bytes": 1, "mpi+rope_graph_us": 1.0, **row}]}
    head = next(ln for ln in _table(result, ["graph"], ["mpi+rope"], 1.9).splitlines()
                if ln.lstrip().startswith("T |"))
    assert [c.strip() for c in head.split("|")][-4:] == [
        "mpi jit us", "mpi jit/graph", "xla us", "xla/mpi jit"]


def test_distributed_that_cannot_start_is_one_line_and_a_mesh_needs_one_device_a_process():
    """bench at G >= 2 leaves the xla column out, saying why in one line, where
    jax.distributed cannot start or a process has other than one device; it initializes
    jax.distributed only where it is not yet."""
    import types

    from cupy_qknorm import bench_jax

    def fake_jax(initialized, devices=(), processes=1):
        def initialize(**kw):
            calls.append(kw)
            raise RuntimeError("jax.distributed.initialize() must be called before any JAX "
                               "computations are executed.\nsecond line")
        return types.SimpleNamespace(
            distributed=types.SimpleNamespace(is_initialized=lambda: initialized,
                                              initialize=initialize),
            devices=lambda platform: list(devices), process_count=lambda: processes)
    calls = []
    assert bench_jax.start_distributed(fake_jax(False)) == (
        "jax.distributed could not be initialized: RuntimeError: jax.distributed.initialize"
        "() must be called before any JAX computations are executed.")
    assert calls == [{"cluster_detection_method": "mpi4py", "initialization_timeout": 60}]
    assert bench_jax.start_distributed(fake_jax(True)) is None and len(calls) == 1
    gpus = [types.SimpleNamespace(platform="gpu", process_index=p) for p in (0, 0, 1, 1)]
    with pytest.raises(ValueError, match=r"^the psum baseline needs one gpu device a "
                                         r"process: JAX has 4 over 2 processes$"):
        bench_jax.process_mesh(fake_jax(True, gpus, 2), gpus[0])


# Run under mpiexec -n 2 by the test below: jax.distributed (gloo on JAX's CPU backend)
# must start before JAX's backend, so in a process of its own. Each rank holds its slice
# of every row; every rank makes every collective step before anything is judged, and
# prints its problems; the exit code is 1 on every rank where any rank has one.
XLA_PSUM_RANKS = r"""
import sys
import numpy as np
from mpi4py import MPI
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from cupy_qknorm import RoPE, bench, bench_jax
from cupy_qknorm import reference as ref
from cupy_qknorm.jax import JaxQKNorm
from cupy_qknorm.rope import host_table
comm = MPI.COMM_WORLD
g, me = comm.size, comm.rank
problems = []
why = bench_jax.start_distributed(jax)
assert why is None and bench_jax.start_distributed(jax) is None, why  # once, then a no-op
dev = jax.local_devices()[0]
mesh = bench_jax.process_mesh(jax, dev)
for style in (None, "neox", "gptj"):
    rope = None if style is None else RoPE(128, 64, theta=5e6, max_position=512, style=style)
    c = ref.make_rope_case(11, 5, g * 256, g * 128, "bfloat16", max_position=512,
                           style=style or "neox")
    mine = [np.ascontiguousarray(ref.shard(a, g, me)) for a in c[:4]]
    jargs = bench_jax.to_jax(jax, dev, *mine, c.positions)
    table = [] if rope is None else [jax.device_put(host_table(rope), dev)]
    args = bench_jax.across(jax, mesh, jargs + table)
    out = jax.jit(bench_jax.theirs_across(1, 1e-6, rope, mesh))(*args)
    got = [np.asarray(o.addressable_data(0)).view(np.uint16) for o in out]
    if rope is None:
        refs = ref.qk_norm(*(ref.to_f64(a, "bfloat16") for a in c[:4]), 1e-6)
        errs = [ref.compare(o, ref.shard(y, g, me), "bfloat16") for o, y in zip(got, refs)]
    else:
        errs = [ref.compare_rope(o, ref.shard(y, g, me), ref.shard(m, g, me), "bfloat16")
                for o, y, m in zip(got, (c.q_ref, c.k_ref), (c.q_mag, c.k_mag))]
    problems += [f"{style or 'no rope'} {name}: {e} ulps, {n} past"
                 for name, (e, n) in zip("qk", errs) if n]
    us = bench_jax.xla_us(jax, jargs, 1e-6, rope, dev, calls=(1, 3), reps=2, mesh=mesh,
                          barrier=comm.Barrier)
    if not np.isfinite(us):
        problems.append(f"{style}: xla_us {us}")
rope = RoPE(128, 64, theta=5e6, max_position=64)
w = tuple(np.ascontiguousarray(ref.shard(np.full(n, 0x3F80, np.uint16), g, me))
          for n in (g * 256, g * 128))  # bf16 ones
case = ref.make_case(3, 4, g * 256, g * 128, "bfloat16")
q, k = (np.ascontiguousarray(ref.shard(a, g, me)) for a in case[:2])
for name in ("jit_us", "xla_us"):  # short chains: _jax_row's plumbing, not its numbers
    setattr(bench_jax, name, lambda *a, _f=getattr(bench_jax, name), **kw: _f(
        *a, calls=(1, 3), reps=2, **kw))
with JaxQKNorm(comm, g * 256, g * 128, "bfloat16", max_tokens=8, rope=rope,
               backend="cpu") as qk:
    row = bench._jax_row(jax, comm, {"mpi": qk}, dev, (q, k, None, None,
                         np.arange(4), None), w, rope, True, 4, mesh)
if sorted(row) != ["mpi_jit_us", "xla_us"] or not all(np.isfinite(list(row.values()))):
    problems.append(f"_jax_row: {row}")
found = [f"rank {r}: {p}" for r, ps in enumerate(comm.allgather(problems)) for p in ps]
print(f"rank {me}: " + ("; ".join(found) or "ok"), flush=True)
sys.exit(1 if found else 0)
"""


def test_xla_psum_across_two_processes_on_jax_cpu():
    """bench --jax's XLA baseline at G=2 on JAX's CPU backend (jax.distributed over MPI,
    gloo): each process's slices of q and k as shards of global arrays, one psum of the
    rows' sums of squares; every rank's output within one bf16 unit of the float64
    reference of the full rows (no RoPE, NeoX, GPT-J); its chain timed, and bench's per-T
    step (_jax_row) with the mesh fills the xla column beside our call."""
    pytest.importorskip("jax")
    if mpiexec() is None:
        pytest.skip("no mpiexec (pip install mpich)")
    r = run_mpi(2, "-c", XLA_PSUM_RANKS, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    # the ranks' lines may interleave
    assert sorted(re.findall(r"rank \d+: ok", r.stdout)) == ["rank 0: ok", "rank 1: ok"], \
        out[-3000:]


def test_the_commit_says_dirty_where_the_tree_is_not_it(tmp_path):
    import subprocess
    from cupy_qknorm.bench import checkout_commit
    assert checkout_commit(tmp_path) == "unknown"  # not a checkout
    env = ["-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a").write_text("1")
    subprocess.run(["git", *env, "-C", str(tmp_path), "add", "a"], check=True)
    subprocess.run(["git", *env, "-C", str(tmp_path), "commit", "-qm", "a"], check=True)
    clean = checkout_commit(tmp_path)
    assert len(clean) >= 7 and not clean.endswith("-dirty")
    (tmp_path / "b").write_text("untracked")  # not part of any commit: still clean
    assert checkout_commit(tmp_path) == clean
    (tmp_path / "a").write_text("2")
    assert checkout_commit(tmp_path) == clean + "-dirty"
