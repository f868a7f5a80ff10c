"""Every shipped specialization compiles with NVRTC (through cuda.bindings: no GPU, no
driver needed), for Hopper and Blackwell."""
import re

import pytest

from cupy_qknorm import compile as kc

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="pip install cuda-bindings "
                            "nvidia-cuda-nvrtc")

SPECS = kc.shipped_specs()


def test_shipped_specs_cover_every_world_size_and_dtype():
    assert {s.world for s in SPECS} == set(range(1, 9))
    assert {s.dtype for s in SPECS} == {"bfloat16", "float16", "float32"}
    minimax = {(s.world, s.q_local, s.k_local) for s in SPECS}
    for g in (1, 2, 4, 8):
        assert (g, 6144 // g, 1024 // g) in minimax


@pytest.mark.parametrize("arch", ["sm_90", "sm_100"])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_nvrtc_compiles(spec, arch):
    r = kc.nvrtc_compile(spec, arch)
    assert r["cubin_bytes"] > 1000
    assert set(r["lowered"]) == {"fused", "partial_sums", "apply"}
    assert "warning" not in r["log"].lower(), r["log"]
    for kind, res in r["resources"].items():  # the compiler's report, for every kernel
        assert res is not None, f"{kind}: no ptxas report in\n{r['log']}"
        assert 0 < res["registers"] <= 255 and res["spill_stores"] >= 0, (kind, res)


@pytest.mark.parametrize("layout", ["narrow", "wide"])
@pytest.mark.parametrize("knobs", [{kc.TRACE_ENV: "1"}, {kc.AHEAD_ENV: "2"},
                                   {kc.AHEAD_ENV: "2", kc.DEPTH_ENV: "4"}], ids=str)
def test_experiment_builds_compile(monkeypatch, layout, knobs):
    """The experiment builds compile for both layouts: the one that records where the
    fused kernel's time goes (CUPY_QKNORM_TRACE=1, scripts/trace_fused.py; its record
    width matches the header's) and pushing two tokens ahead (CUPY_QKNORM_AHEAD=2)."""
    for name, value in knobs.items():
        monkeypatch.setenv(name, value)
    spec = kc.Spec.plan("bfloat16", "bfloat16", 2, 3072, 512, layout)
    r = kc.nvrtc_compile(spec, "sm_90")
    assert "warning" not in r["log"].lower(), r["log"]
    text = (kc.KERNEL_DIR / "qknorm.cuh").read_text()
    assert int(re.search(r"kTraceWords\s*=\s*(\d+)", text).group(1)) == kc.TRACE_WORDS


PTXAS_LOG = """ptxas info    : 65 bytes gmem
ptxas info    : Compiling entry function '_Z5fusedv' for 'sm_90'
ptxas info    : Function properties for _Z5fusedv
ptxas         .     8 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 56 registers, used 1 barriers, 136 bytes smem
ptxas info    : Compiling entry function 'qknorm_empty' for 'sm_90'
ptxas info    : Function properties for qknorm_empty
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 4 registers, used 0 barriers
"""


def test_ptxas_report_is_parsed_per_kernel():
    assert kc.ptxas_resources(PTXAS_LOG) == {
        "_Z5fusedv": {"stack": 8, "spill_stores": 16, "spill_loads": 12, "registers": 56,
                      "smem": 136},
        "qknorm_empty": {"stack": 0, "spill_stores": 0, "spill_loads": 0, "registers": 4,
                         "smem": 0}}


def test_blocks_per_sm_from_registers():
    from cupy_qknorm.cli import _blocks_per_sm
    assert _blocks_per_sm(64, 224) == 4     # 7 warps of 2048 registers: 65536 // 14336
    assert _blocks_per_sm(148, 64) == 6     # 152 a thread allocated: 65536 // 9728
    assert _blocks_per_sm(16, 32) == 32     # the 32-block limit
    assert _blocks_per_sm(None, 64) == "?"
    assert _blocks_per_sm(122, 64, 21600) == 8   # wide staged, G=2: registers bind
    assert _blocks_per_sm(122, 32, 10816) == 16  # wide staged, G=4: registers (smem: 19)
    assert _blocks_per_sm(64, 128, 43008) == 5   # 43 KB of staged rows: shared memory


def test_compile_error_is_reported():
    bad = kc.Spec("bfloat16", "bfloat16", 2, 3072, 512, 4)
    object.__setattr__(bad, "q_local", 3073)  # not a whole number of vectors
    with pytest.raises(kc.QKNormError, match="NVRTC"):
        kc.nvrtc_compile(bad, "sm_90")


def test_params_layout_matches_header():
    text = (kc.KERNEL_DIR / "qknorm.cuh").read_text()
    assert int(re.search(r"kParamsBytes\s*=\s*(\d+)", text).group(1)) == \
        kc.PARAMS_DTYPE.itemsize == 208


def test_source_hash_is_in_the_code_string():
    assert kc.SOURCES_HASH in kc.SOURCE


def test_cupy_cache_warming_needs_a_gpu(capsys):
    from cupy_qknorm import cli
    from tests.conftest import HAS_GPU
    if HAS_GPU:
        pytest.skip("a GPU is present: warming would compile every specialization")
    assert cli._warm_cupy_cache(kc, kc.shipped_specs()[:1]) == 1
    assert "--cupy-cache needs a GPU" in capsys.readouterr().out
