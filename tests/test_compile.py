"""The kernels compile with NVRTC, through cuda.bindings: no GPU, no driver. CI builds a
representative set of the shipped specializations for sm_90 (tuning.representative_specs:
every kernel template, dtype, weight dtype, layout, RoPE layout and a spread of G; the
full matrix is `cupy-qknorm compile`'s), the tools module's kernels, a set for sm_100 and
the traced build. The build starts in background processes when the tests are collected
and these tests run last (conftest.py, tests/nvrtc_batch.py); the compiler's report of
each kernel is checked: no spills, no stack, a register budget, no warning.

And struct qknorm::Params against params.FIELDS, field by field, through a probe program
of static_asserts generated from the Python table."""
import re

import pytest

from cupy_qknorm import RoPE
from cupy_qknorm import compile as kc
from cupy_qknorm import params
from cupy_qknorm.tuning import (C_TYPES, LAYOUTS, Spec, representative_specs,
                                shipped_specs)
from tests import nvrtc_batch

pytest.importorskip("cuda.bindings.nvrtc", reason="NVRTC: pip install cuda-bindings "
                    "nvidia-cuda-nvrtc (or the package's [cuda13] extra)")
if kc.nvrtc_available() is not None:
    pytest.skip(f"NVRTC: {kc.nvrtc_available()}", allow_module_level=True)

SHIPPED = shipped_specs()
SPECS = representative_specs()
# sm_100: MiniMax's G=2 in bf16 with RoPE in both layouts, fp16 narrow and fp32 wide
# without, and G=8 bf16 narrow: every dtype, layout and RoPE-or-not once
SM100 = [Spec.plan("bfloat16", "bfloat16", 2, 3072, 512, layout, RoPE.minimax_m2())
         for layout in ("narrow", "wide")] + [
    Spec.plan("float16", "float16", 2, 3072, 512, "narrow"),
    Spec.plan("float32", "float32", 2, 3072, 512, "wide"),
    Spec.plan("bfloat16", "bfloat16", 8, 768, 128, "narrow")]
# the fused kernel of each layout at G=2, the cheapest of the set's to build
TRACED = [Spec.plan("bfloat16", "bfloat16", 2, 3072, 512, "narrow"),
          Spec.plan("float32", "float32", 2, 3072, 512, "wide")]
TRACE_BUILD = (("CUPY_QKNORM_TRACE", 1),)
# the widest cache-writing fused kernel (G=1, wide, RoPE, FP8 cache) built for 3 blocks an SM
CAPPED = Spec.plan("bfloat16", "bfloat16", 1, 6144, 1024, "wide", RoPE.minimax_m2(),
                   cache=(2, 128))
CAPPED_BUILD = (("CUPY_QKNORM_CACHE_BLOCKS", 3),)
PLAIN = tuple((kc.TOOLS_MODULE, name) for name in kc.PLAIN_KERNELS)
REGISTER_BUDGET = 192  # every kernel; the fused kernel's highest today is below 160
# the fused and apply kernels that write a KV cache: the widest (G=1, wide, RoPE) take
# 192-217 (the per-slot cache offsets, the token's slot, FP8's fp64 reciprocal)
CACHE_REGISTER_BUDGET = 224
WORKERS = 2


def kernels(specs):
    """[(module, name)] of every kernel of `specs`, each once."""
    return list(dict.fromkeys((module, name) for s in specs
                              for module, kinds in kc.modules(s) for name in kinds.values()))


def kinds(spec):
    """{kind: name} of every kernel of `spec`, across its modules."""
    return {kind: name for _, k in kc.modules(spec) for kind, name in k.items()}


def start_build():
    """What this module needs built; conftest.py starts it when the tests are collected."""
    return nvrtc_batch.Build({("sm_90", None): kernels(SPECS) + list(PLAIN),
                              ("sm_100", None): kernels(SM100),
                              ("sm_90", TRACE_BUILD): [(kc.OP_MODULE, s.names["fused"])
                                                       for s in TRACED],
                              ("sm_90", CAPPED_BUILD): [(kc.OP_MODULE,
                                                         CAPPED.names["fused"])]},
                             workers=WORKERS)


@pytest.fixture(scope="module")
def built(nvrtc_build):
    """{(arch, build): {name: {"resources", "error"}}} of every kernel of SPECS and the
    tools module for sm_90, SM100 for sm_100 and TRACED with CUPY_QKNORM_TRACE=1; and the
    logs of what was compiled in this run."""
    build = nvrtc_build(start_build)
    return build.result()


def test_the_representative_set_covers_what_ships():
    """Every kernel template, dtype, weight dtype, layout, RoPE layout and G = 1, 2, 3, 8
    at least once, all of it shipped; the sm_100 set shipped, the traced one in the set."""
    assert all(s in SHIPPED for s in SPECS + SM100) and all(s in SPECS for s in TRACED)
    assert {kind for s in SPECS for kind in kinds(s)} == \
        {"fused", "partial_sums", "apply", "reject", "rope", "cache_write"}
    assert {s.dtype for s in SPECS} == set(C_TYPES)
    assert {s.weight_dtype == s.dtype for s in SPECS if s.dtype != "float32"} == {True, False}
    assert {"float32"} < {s.weight_dtype for s in SPECS}
    narrow, wide = (LAYOUTS[name] for name in ("narrow", "wide"))
    assert {(s.depth, s.staged) for s in SPECS} >= {(narrow[2], int(narrow[1])),
                                                    (wide[2], int(wide[1]))}
    assert {s.world for s in SPECS} >= {1, 2, 3, 8}
    styles = {(s.style, s.rot == s.head) for s in SPECS}
    assert styles >= {(0, True), (1, False), (1, True), (2, False)}  # none, NeoX, full, GPT-J
    # NeoX pairs in one thread (MiniMax at G=2), and across lanes (G=8's widths)
    paired = [s for s in SPECS if s.style == 1 and s.rot < s.head and s.world == 2]
    across = [s for s in SPECS if s.style == 1 and s.world == 8]
    assert paired and across and _probe([_paired(s) for s in paired] +
                                        [f"!{_paired(s)}" for s in across], "sm_90") is None
    # the KV cache: the data's dtype and FP8, from 16-bit and fp32 data, staged and not
    assert {(s.cache, s.dtype == "float32", s.staged) for s in SPECS if s.cache} == \
        {(1, False, 0), (2, False, 1), (2, True, 0)}
    assert len(SPECS) <= 13  # CI's time: the full matrix is `cupy-qknorm compile`'s


def test_the_sm100_set_is_representative():
    assert {s.dtype for s in SM100} == {"bfloat16", "float16", "float32"}
    assert {s.staged for s in SM100} == {0, 1} and {s.style for s in SM100} == {0, 1}
    assert {s.world for s in SM100} == {2, 8} and len(SM100) <= 5


def check_kernels(results, spec):
    problems = []
    for kind, name in kinds(spec).items():
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
        if not 0 < res["registers"] <= (CACHE_REGISTER_BUDGET if spec.cache and kind in (
                "fused", "apply") else REGISTER_BUDGET):
            problems.append(f"{kind}: {res['registers']} registers (budget "
                            f"{CACHE_REGISTER_BUDGET if spec.cache else REGISTER_BUDGET})")
        if kind == "fused" and res["smem"] < spec.stage_bytes:
            problems.append(f"fused: {res['smem']} B shared, below the staged rows' "
                            f"{spec.stage_bytes}")
    return problems


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_sm90(built, spec):
    assert not check_kernels(built[0][("sm_90", None)], spec)


def test_tools_module(built):
    """The P2P probe and the benchmark's floors build; none spills. (qknorm_exchange keeps
    its eight peer pointers in a 64-byte stack frame: a benchmark floor, not the op.)"""
    results = built[0][("sm_90", None)]
    for _, name in PLAIN:
        r = results[name]
        assert r["error"] is None, r["error"]
        res = r["resources"]
        assert not res["spill_stores"] and not res["spill_loads"], name
        assert res["stack"] == 0 or name == "qknorm_exchange", name


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


def test_cache_blocks_caps_the_wide_cache_kernels_registers(built):
    """CUPY_QKNORM_CACHE_BLOCKS=3 builds the wide cache-writing fused kernel for 3 blocks
    of 4 warps an SM: at most 168 registers (65536 / (3 * 128), in 8-register steps)."""
    assert CAPPED.staged and CAPPED.warps == 4
    r = built[0][("sm_90", CAPPED_BUILD)][CAPPED.names["fused"]]
    assert r["error"] is None, r["error"]
    plain = built[0][("sm_90", None)].get(CAPPED.names["fused"])
    assert r["resources"]["registers"] <= 168
    if plain is not None:  # the default build leaves them to ptxas
        assert plain["resources"]["registers"] > 168


def test_no_compiler_warnings(built):
    warnings = [ln for log in built[1] for ln in log.splitlines() if "warning" in ln.lower()]
    assert not warnings, "\n".join(warnings[:20])


def test_batches_build_what_nvrtc_compile_builds(built):
    """The batched build has the package's options and source: one spec through
    compile.nvrtc_compile reports the same resources for every kernel."""
    spec = next(s for s in SPECS if s.world == 8 and s.style == 1)
    r = kc.nvrtc_compile(spec, "sm_90")
    assert r["cubin_bytes"] > 1000 and set(r["lowered"]) == set(spec.names) | {"rope"}
    batched = built[0][("sm_90", None)]
    for kind, name in kinds(spec).items():
        assert r["resources"][kind] == batched[name]["resources"], kind


def test_nvrtc_build_passes_what_cupy_adds():
    """CuPy's RawModule, the build that runs, adds --device-as-default-execution-space and
    -ftz=true (fp32 subnormals flushed) to the package's options; compile.nvrtc_build,
    the build CI and scripts/sass_diff.py compile, passes both, so the registers and
    machine code they report are those that run. Fails when CuPy stops adding either."""
    import inspect
    compiler = pytest.importorskip("cupy.cuda.compiler")
    cupy_source, ours = inspect.getsource(compiler), inspect.getsource(kc.nvrtc_build)
    for flag in ("--device-as-default-execution-space", "-ftz=true"):
        assert f"'{flag}'" in cupy_source, f"CuPy no longer adds {flag}"
        assert f'b"{flag}"' in ours, flag


@pytest.fixture
def stub_modules(monkeypatch):
    """cupy.RawModule recording (code, name_expressions) of each build, on device 0."""
    cupy = pytest.importorskip("cupy")
    built = []

    class Module:
        def __init__(self, code, options, name_expressions=()):
            built.append((code, tuple(name_expressions)))

        def get_function(self, name):
            return name

    class Device:
        id = 0

    caches = (kc._module, kc._plain_module, kc._rope_module)
    monkeypatch.setattr(cupy, "RawModule", Module)
    monkeypatch.setattr(cupy.cuda, "Device", Device)
    for cache in caches:
        cache.cache_clear()
    yield built
    for cache in caches:
        cache.cache_clear()


def test_loaders_take_each_kernel_from_its_module(stub_modules):
    """load builds the op's module with the spec's names; load_rope the tools' with the
    spec's RoPE kernel alone, load_plain the tools' with none: each kernel from the one
    module that holds it, and no module holds what it does not need."""
    spec = next(s for s in SPECS if s.style)
    assert kc.load(spec) == spec.names and "rope" not in spec.names
    assert kc.load_rope(spec) == spec.rope_name
    assert kc.load_plain("qknorm_probe") == "qknorm_probe"
    assert stub_modules == [(kc.SOURCE, tuple(spec.names.values())),
                            (kc.TOOLS_SOURCE, (spec.rope_name,)), (kc.TOOLS_SOURCE, ())]
    with pytest.raises(ValueError, match="no RoPE"):
        kc.load_rope(next(s for s in SPECS if not s.style))


def test_a_failure_is_attributed_to_its_kernel():
    good = TRACED[0].names["reject"]
    # not a whole number of vectors
    bad = "qknorm::partial_sums<float, qknorm::Widths<3073, 512>, 4>"
    out, _, _ = nvrtc_batch.compile_names([good, bad], "sm_90")
    assert all(r["error"] for r in out.values())    # one program: both fail together
    _, out, log, _ = nvrtc_batch._batch((kc.OP_MODULE, [good, bad], ("sm_90", None)))
    assert out[good]["error"] is None and "NVRTC" in out[bad]["error"]


def test_batches_are_balanced():
    op = [name for module, name in kernels(SHIPPED) if module == kc.OP_MODULE]
    batches = nvrtc_batch.plan(op, 8)
    assert sorted(n for b in batches for n in b) == sorted(op)
    loads = [sum(map(nvrtc_batch.weight, b)) for b in batches]
    assert max(loads) - min(loads) <= 1.6


def test_cache_key_covers_what_a_compile_depends_on(tmp_path, monkeypatch):
    target = ("sm_90", None)
    key = nvrtc_batch.cache_key(target)
    assert key != nvrtc_batch.cache_key(("sm_100", None))
    assert key != nvrtc_batch.cache_key(("sm_90", TRACE_BUILD))
    assert key != nvrtc_batch.cache_key(("sm_90", CAPPED_BUILD))
    monkeypatch.setattr(nvrtc_batch, "toolchain", lambda: "another NVRTC")
    assert nvrtc_batch.cache_key(target) != key
    for f in params.KERNEL_DIR.glob("*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(kc, "KERNEL_DIR", tmp_path)  # -I names it: a key of its own
    copy = nvrtc_batch.cache_key(target)
    assert copy == nvrtc_batch.cache_key(target)
    with open(tmp_path / "vec.cuh", "ab") as f:
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


def test_source_hash_covers_every_kernel_file(tmp_path, monkeypatch):
    assert kc.SOURCES_HASH in kc.SOURCE and kc.SOURCES_HASH in kc.TOOLS_SOURCE
    for f in params.KERNEL_DIR.glob("*.cu*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(kc, "KERNEL_DIR", tmp_path)
    assert kc._sources_hash() == kc.SOURCES_HASH
    header = tmp_path / "layout.cuh"
    header.write_bytes(header.read_bytes() + b"\n// edited\n")
    assert kc._sources_hash() != kc.SOURCES_HASH  # an edited header is a new build


def test_every_header_compiles_alone():
    """Each header includes what it uses: any of them can be a reader's first."""
    headers = sorted(f.name for f in params.KERNEL_DIR.glob("*.cuh"))
    assert len(headers) >= 10
    failed = {h: log for h in headers if (log := _probe([], "sm_90", f'#include "{h}"\n'))}
    assert not failed, failed


def _probe(asserts, arch, prelude='#include "qknorm.cu"\n'):
    """Compile a program of static_asserts over the kernels' types for `arch`: None where
    it compiles, else NVRTC's log."""
    src = prelude + "".join(f"static_assert({a}, \"{a}\");\n" for a in asserts)
    try:
        kc.nvrtc_build([], arch, source=src)
    except kc.QKNormError as e:
        return str(e)
    return None


def _paired(spec):
    return (f"qknorm::LayoutFor<{C_TYPES[spec.dtype]}, qknorm::Widths<{spec.q_local}, "
            f"{spec.k_local}>, {spec.threads}, {spec.rotary}>::type::kPaired")


def test_minimax_rope_takes_the_paired_layout_on_sm90_only():
    """Every shipped NeoX specialization at MiniMax's widths for G = 1, 2, 4 holds each
    rotated pair in one thread on sm_90 (no shuffles); G=8's widths, the norm alone and
    sm_100 keep the plain layout. A layout that stopped fitting would only be slower, so
    this is what notices it."""
    minimax = RoPE.minimax_m2()
    paired = [s for s in SHIPPED if s.style == 1 and s.head == 128 and s.rot == 64
              and s.world in (1, 2, 4)]
    assert len(paired) >= 24
    plain = [Spec.plan("bfloat16", "bfloat16", 8, 768, 128, layout, minimax)
             for layout in ("narrow", "wide")] + [Spec.plan("bfloat16", "bfloat16", 2, 3072,
                                                            512, "wide")]
    assert _probe([_paired(s) for s in paired] + [f"!{_paired(s)}" for s in plain],
                  "sm_90") is None
    assert _probe([f"!{_paired(s)}" for s in paired[:2]], "sm_100") is None
    assert "static assertion failed" in _probe([f"!{_paired(paired[0])}"], "sm_90")


# -- struct qknorm::Params, field by field ------------------------------------------------
# A field's kind from its C type, as the struct code names it: a pointer or unsigned 64-bit
# word "Q", long long "q", int "i", unsigned "I", float "f"; an array's, its element's.
PARAMS_PRELUDE = """#include "params.cuh"
#include "exchange.cuh"
#include "trace.cuh"
#include "unfused.cuh"
template <class Type> struct Kind { static constexpr char value = '?'; };
template <class Type> struct Kind<Type*> { static constexpr char value = 'Q'; };
template <class Type, int Count> struct Kind<Type[Count]> {
  static constexpr char value = Kind<Type>::value;
};
template <> struct Kind<unsigned long long> { static constexpr char value = 'Q'; };
template <> struct Kind<long long> { static constexpr char value = 'q'; };
template <> struct Kind<int> { static constexpr char value = 'i'; };
template <> struct Kind<unsigned int> { static constexpr char value = 'I'; };
template <> struct Kind<float> { static constexpr char value = 'f'; };
template <> struct Kind<double> { static constexpr char value = 'd'; };
"""


def params_asserts(fields=params.FIELDS, size=None, constants=params.DEVICE_CONSTANTS):
    """static_asserts that struct qknorm::Params is `fields` (params.Field: name, struct
    code, offset), each field's offset, size and kind, and `size` bytes in all; and that
    the kernels' constants are `constants`."""
    out = []
    for f in fields:
        member = f"qknorm::Params::{f.name}"
        out += [f"__builtin_offsetof(qknorm::Params, {f.name}) == {f.offset}",
                f"sizeof({member}) == {f.size}",
                f"Kind<decltype({member})>::value == '{f.code[-1]}'"]
    end = max(f.offset + f.size for f in fields)
    out.append(f"sizeof(qknorm::Params) == {size if size is not None else end}")
    out += [f"(unsigned long long)qknorm::{name} == {value}ull"
            for name, value in constants.items()]
    return out


def test_params_fields_match_the_header():
    """params.FIELDS is struct qknorm::Params, field by field (and the constants the host
    shares with the kernels are theirs)."""
    assert params.PARAMS.size == params.HEAD.size + params.STATIC.size == 424
    assert _probe(params_asserts(size=params.PARAMS.size), "sm_90", PARAMS_PRELUDE) is None


def _swapped(fields, a, b):
    """`fields` with fields a and b swapped in order, offsets still increasing: a mistaken
    edit of the table that keeps its shape."""
    out = list(fields)
    i, j = sorted((next(k for k, f in enumerate(out) if f.name == n) for n in (a, b)))
    first, second = out[i].offset, out[j].offset
    out[i], out[j] = out[j]._replace(offset=first), out[i]._replace(offset=second)
    return out


@pytest.mark.parametrize("a, b", [("eps", "rank"), ("q_dim", "k_dim"),
                                  ("q_stride", "k_stride")])
def test_a_swapped_pair_in_the_table_fails_the_probe(a, b):
    swapped = _swapped(params.FIELDS, a, b)
    assert [f.size for f in swapped] == [f.size for f in params.FIELDS]  # same-size pairs
    log = _probe(params_asserts(swapped), "sm_90", PARAMS_PRELUDE)
    assert log is not None and "static assertion failed" in log
    assert f"offsetof(qknorm::Params, {a})" in log and f"offsetof(qknorm::Params, {b})" in log


def test_a_swapped_pair_in_the_header_fails_its_build(tmp_path, monkeypatch):
    for f in params.KERNEL_DIR.glob("*.cu*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    header = tmp_path / "params.cuh"
    text = header.read_text()
    rank = re.search(r"\n  int rank;[^\n]*", text)
    eps = re.search(r"\n  float eps;[^\n]*", text)
    header.write_text(text[:rank.start()] + eps.group() + rank.group() + text[eps.end():])
    monkeypatch.setattr(kc, "KERNEL_DIR", tmp_path)
    log = _probe([], "sm_90", '#include "params.cuh"\n')
    assert log is not None and "Params::eps is not where cupy_qknorm/params.py packs it" in log


def test_adding_a_field_is_one_entry_on_each_side(tmp_path, monkeypatch):
    """The recipe of params.py: a row in FIELDS; a declaration, its QKNORM_FIELD line and
    kParamsBytes in params.cuh. An int after the last field leaves the struct rounded up
    to its pointers' alignment, and the host's layout pads the same."""
    last = params.FIELDS[-1]
    at = last.offset + last.size
    fields = params.FIELDS + (params.Field("extra", "i", at),)
    head, static, whole = params.layouts(fields)
    assert whole.size == -(-(at + 4) // 8) * 8 and head.size == params.HEAD.size
    for f in params.KERNEL_DIR.glob("*.cu*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    header = tmp_path / "params.cuh"
    text = header.read_text()
    decl = re.search(rf"\n  \w+ {last.name};[^\n]*", text).group()
    line = f"QKNORM_FIELD({last.name}, {last.offset}, {last.size});"
    for old, new in ((decl, decl + "\n  int extra;"),
                     (line, line + f"\nQKNORM_FIELD(extra, {at}, 4);"),
                     (f"kParamsBytes = {params.PARAMS.size}", f"kParamsBytes = {whole.size}")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    header.write_text(text)
    monkeypatch.setattr(kc, "KERNEL_DIR", tmp_path)
    constants = dict(params.DEVICE_CONSTANTS, kParamsBytes=whole.size)
    assert _probe(params_asserts(fields, whole.size, constants), "sm_90",
                  PARAMS_PRELUDE) is None

