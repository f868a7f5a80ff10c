"""Every shipped specialization compiles with NVRTC for sm_90 (a representative set for
sm_100 too, and the traced build), through cuda.bindings: no GPU, no driver. The build
starts in background processes when the tests are collected and these tests run last
(conftest.py, tests/nvrtc_batch.py); the compiler's report of each kernel is checked:
no spills, no stack, a register budget."""
import re

import pytest

from cupy_qknorm import RoPE
from cupy_qknorm import compile as kc
from cupy_qknorm import params
from cupy_qknorm.tuning import C_TYPES, Spec, shipped_specs
from tests import nvrtc_batch

pytest.importorskip("cuda.bindings.nvrtc", reason="NVRTC: pip install cuda-bindings "
                    "nvidia-cuda-nvrtc (or the package's [cuda13] extra)")
if kc.nvrtc_available() is not None:
    pytest.skip(f"NVRTC: {kc.nvrtc_available()}", allow_module_level=True)

SPECS = shipped_specs()
# sm_100: MiniMax's G=2 in bf16 with RoPE in both layouts, fp16 narrow and fp32 wide
# without, and G=8 bf16 narrow: every dtype, layout and RoPE-or-not once
SM100 = [Spec.plan("bfloat16", "bfloat16", 2, 3072, 512, layout, RoPE.minimax_m2())
         for layout in ("narrow", "wide")] + [
    Spec.plan("float16", "float16", 2, 3072, 512, "narrow"),
    Spec.plan("float32", "float32", 2, 3072, 512, "wide"),
    Spec.plan("bfloat16", "bfloat16", 8, 768, 128, "narrow")]
TRACED = [Spec.plan("bfloat16", "bfloat16", 2, 3072, 512, layout) for layout in
          ("narrow", "wide")]
TRACE_BUILD = (("CUPY_QKNORM_TRACE", 1),)
REGISTER_BUDGET = 192  # every kernel; the fused kernel's highest today is below 160
WORKERS = 2


def names(specs):
    return list(dict.fromkeys(n for s in specs for n in s.names.values()))


def start_build():
    """What this module needs built; conftest.py starts it when the tests are collected."""
    return nvrtc_batch.Build({("sm_90", None): names(SPECS), ("sm_100", None): names(SM100),
                              ("sm_90", TRACE_BUILD): [s.names["fused"] for s in TRACED]},
                             workers=WORKERS)


@pytest.fixture(scope="module")
def built(nvrtc_build):
    """{(arch, build): {name: {"resources", "error"}}} of every kernel of SPECS for sm_90,
    SM100 for sm_100 and TRACED with CUPY_QKNORM_TRACE=1; and the logs of what was
    compiled in this run."""
    build = nvrtc_build(start_build)
    return build.result()


def test_the_sm100_set_is_representative():
    assert {s.dtype for s in SM100} == {"bfloat16", "float16", "float32"}
    assert {s.staged for s in SM100} == {0, 1} and {s.style for s in SM100} == {0, 1}
    assert {s.world for s in SM100} == {2, 8} and len(SM100) <= 5
    assert all(s in SPECS for s in SM100)


def check_kernels(results, spec):
    problems = []
    for kind, name in spec.names.items():
        r = results.get(name)
        if r is None or r["error"]:
            problems.append(f"{kind}: {r['error'] if r else 'not compiled'}")
            continue
        res = r["resources"]
        if res is None:
            problems.append(f"{kind}: no ptxas report")
            continue
        if res["spill_stores"] or res["spill_loads"] or res["stack"]:
            problems.append(f"{kind}: {res['spill_stores']} B spill stores, "
                            f"{res['spill_loads']} B spill loads, {res['stack']} B stack")
        if not 0 < res["registers"] <= REGISTER_BUDGET:
            problems.append(f"{kind}: {res['registers']} registers (budget "
                            f"{REGISTER_BUDGET})")
        if kind == "fused" and res["smem"] < spec.stage_bytes:
            problems.append(f"fused: {res['smem']} B shared, below the staged rows' "
                            f"{spec.stage_bytes}")
    return problems


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_sm90(built, spec):
    assert not check_kernels(built[0][("sm_90", None)], spec)


@pytest.mark.parametrize("spec", SM100, ids=str)
def test_sm100(built, spec):
    assert not check_kernels(built[0][("sm_100", None)], spec)


@pytest.mark.parametrize("spec", TRACED, ids=str)
def test_traced_build(built, spec):
    """CUPY_QKNORM_TRACE=1 builds the fused kernel with per-block cycle counts."""
    r = built[0][("sm_90", TRACE_BUILD)][spec.names["fused"]]
    assert r["error"] is None, r["error"]
    plain = built[0][("sm_90", None)][spec.names["fused"]]["resources"]
    assert r["resources"]["smem"] > plain["smem"]  # the trace record lives in shared memory


def test_no_compiler_warnings(built):
    warnings = [ln for log in built[1] for ln in log.splitlines() if "warning" in ln.lower()]
    assert not warnings, "\n".join(warnings[:20])


def test_batches_build_what_nvrtc_compile_builds(built):
    """The batched build has the package's options and source: one spec through
    compile.nvrtc_compile reports the same resources for every kernel."""
    spec = next(s for s in SPECS if s.world == 8 and s.style == 1 and s.dtype == "bfloat16")
    r = kc.nvrtc_compile(spec, "sm_90")
    assert r["cubin_bytes"] > 1000 and set(r["lowered"]) == set(spec.names)
    batched = built[0][("sm_90", None)]
    for kind, name in spec.names.items():
        assert r["resources"][kind] == batched[name]["resources"], kind


def test_a_failure_is_attributed_to_its_kernel():
    good = TRACED[0].names["reject"]
    bad = "qknorm::partial_sums<float, 3073, 512, 4>"  # not a whole number of vectors
    out, _, _ = nvrtc_batch.compile_names([good, bad], "sm_90")
    assert all(r["error"] for r in out.values())    # one program: both fail together
    _, out, log, _ = nvrtc_batch._batch(([good, bad], ("sm_90", None)))
    assert out[good]["error"] is None and "NVRTC" in out[bad]["error"]


def test_batches_are_balanced():
    batches = nvrtc_batch.plan(names(SPECS), 8)
    assert sorted(n for b in batches for n in b) == sorted(names(SPECS))
    loads = [sum(map(nvrtc_batch.weight, b)) for b in batches]
    assert max(loads) - min(loads) <= 1.6


def test_cache_key_covers_what_a_compile_depends_on(tmp_path, monkeypatch):
    target = ("sm_90", None)
    key = nvrtc_batch.cache_key(target)
    assert key != nvrtc_batch.cache_key(("sm_100", None))
    assert key != nvrtc_batch.cache_key(("sm_90", TRACE_BUILD))
    monkeypatch.setattr(nvrtc_batch, "toolchain", lambda: "another NVRTC")
    assert nvrtc_batch.cache_key(target) != key
    for f in params.KERNEL_DIR.glob("*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(kc, "KERNEL_DIR", tmp_path)  # -I names it: a key of its own
    copy = nvrtc_batch.cache_key(target)
    assert copy == nvrtc_batch.cache_key(target)
    with open(tmp_path / "qknorm.cuh", "ab") as f:
        f.write(b"\n")
    assert nvrtc_batch.cache_key(target) != copy


def test_cache_keeps_clean_compiles(tmp_path, monkeypatch):
    monkeypatch.setenv("QKNORM_TEST_NVRTC_CACHE", str(tmp_path))
    target = ("sm_90", None)
    assert nvrtc_batch.cache_read(target) == {}
    nvrtc_batch.cache_write(target, {"a": {"registers": 1}})
    nvrtc_batch.cache_write(target, {"b": {"registers": 2}})
    assert nvrtc_batch.cache_read(target) == {"a": {"registers": 1}, "b": {"registers": 2}}
    assert nvrtc_batch.cache_read(("sm_100", None)) == {}
    monkeypatch.setenv("QKNORM_TEST_NVRTC_CACHE", "0")
    assert nvrtc_batch.cache_dir() is None and nvrtc_batch.cache_read(target) == {}
    monkeypatch.delenv("QKNORM_TEST_NVRTC_CACHE")
    assert nvrtc_batch.cache_dir() is None  # off unless asked for: every run compiles


def test_compile_error_is_reported():
    bad = Spec("bfloat16", "bfloat16", 2, 3072, 512, 4)
    object.__setattr__(bad, "q_local", 3073)  # not a whole number of vectors
    with pytest.raises(kc.QKNormError, match="NVRTC"):
        kc.nvrtc_compile(bad, "sm_90")


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


def test_supported_archs_start_at_the_minimum():
    archs = kc.supported_archs()
    assert "sm_90" in archs and "sm_100" in archs
    assert all(int(a[3:]) >= 80 for a in archs)


def test_params_layout_matches_header():
    text = (params.KERNEL_DIR / "qknorm.cuh").read_text()
    assert int(re.search(r"kParamsBytes\s*=\s*(\d+)", text).group(1)) == params.PARAMS.size
    assert int(re.search(r"kTraceWords\s*=\s*(\d+)", text).group(1)) == params.TRACE_WORDS


def test_source_hash_covers_every_kernel_file(tmp_path, monkeypatch):
    assert kc.SOURCES_HASH in kc.SOURCE
    for f in params.KERNEL_DIR.glob("*.cu*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(kc, "KERNEL_DIR", tmp_path)
    assert kc._sources_hash() == kc.SOURCES_HASH
    header = tmp_path / "qknorm.cuh"
    header.write_bytes(header.read_bytes() + b"\n// edited\n")
    assert kc._sources_hash() != kc.SOURCES_HASH  # an edited header is a new build


def _probe(asserts, arch):
    """Compile a program of static_asserts over qknorm.cuh's types for `arch`: None where
    it compiles, else NVRTC's log."""
    src = '#include "qknorm.cuh"\n' + "".join(f"static_assert({a}, \"{a}\");\n"
                                               for a in asserts)
    try:
        kc.nvrtc_build([], arch, source=src)
    except kc.QKNormError as e:
        return str(e)
    return None


def _paired(spec):
    return (f"qknorm::LayoutFor<{C_TYPES[spec.dtype]}, {spec.q_local}, {spec.k_local}, "
            f"{spec.threads}, {spec.head}, {spec.rot}, {spec.style}>::type::kPaired")


def test_minimax_rope_takes_the_paired_layout_on_sm90_only():
    """Every shipped NeoX specialization at MiniMax's widths for G = 1, 2, 4 holds each
    rotated pair in one thread on sm_90 (no shuffles); G=8's widths, the norm alone and
    sm_100 keep the plain layout. A layout that stopped fitting would only be slower, so
    this is what notices it."""
    minimax = RoPE.minimax_m2()
    paired = [s for s in SPECS if s.style == 1 and s.head == 128 and s.rot == 64
              and s.world in (1, 2, 4)]
    assert len(paired) >= 24
    plain = [Spec.plan("bfloat16", "bfloat16", 8, 768, 128, layout, minimax)
             for layout in ("narrow", "wide")] + [Spec.plan("bfloat16", "bfloat16", 2, 3072,
                                                            512, "wide")]
    assert _probe([_paired(s) for s in paired] + [f"!{_paired(s)}" for s in plain],
                  "sm_90") is None
    assert _probe([f"!{_paired(s)}" for s in paired[:2]], "sm_100") is None
    assert "static assertion failed" in _probe([f"!{_paired(paired[0])}"], "sm_90")
