"""The benchmark's table and plot input, its options, and what it says where it cannot run,
on CPU (the timings themselves need GPUs)."""
import argparse
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
