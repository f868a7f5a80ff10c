"""tuning.py: the spec of each layout, the kernel names NVRTC instantiates, the tuning
knobs' effects, and which specializations ship. Pure: no GPU, no NVRTC."""
import pytest

from cupy_qknorm import knobs
from cupy_qknorm.rope import RoPE
from cupy_qknorm.shapes import DTYPES, MAX_WORLD
from cupy_qknorm.tuning import (LAYOUTS, STAGE_BYTES_MAX, Spec, layout_for, wide_from,
                                shipped_specs)

BF16 = "qknorm::bf16_t"
MINIMAX = RoPE.minimax_m2()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in knobs.KNOBS:
        monkeypatch.delenv(name, raising=False)


def test_narrow_layout_bf16_g2():
    # 448 vectors of 16 bytes a row: 2 a thread -> 7 warps; 2 rows in flight, in registers
    s = Spec.plan("bfloat16", "float32", 2, 3072, 512)
    assert (s.warps, s.threads, s.depth, s.staged, s.stage_bytes) == (7, 224, 2, 0, 0)
    assert (s.head, s.rot, s.style) == (0, 0, 0)
    assert str(s) == "bfloat16/w:float32 G=2 q=3072 k=512 warps=7 depth=2"


def test_wide_layout_bf16_g2():
    # 8 vectors a thread -> 2 warps; 3 rows staged in shared memory, whole vectors a thread
    w = Spec.plan("bfloat16", "bfloat16", 2, 3072, 512, "wide")
    assert (w.warps, w.depth, w.staged) == (2, 3, 1)
    assert w.stage_bytes == 3 * 7 * 64 * 16
    assert str(w) == "bfloat16/w:bfloat16 G=2 q=3072 k=512 warps=2 depth=3 staged"


W2 = "qknorm::Widths<3072, 512>"


def test_names_without_rope():
    s = Spec.plan("bfloat16", "float32", 2, 3072, 512)
    assert s.names == {
        "fused": f"qknorm::fused<{BF16}, float, 2, {W2}, qknorm::Tiling<7, 2, 0>, "
                 f"qknorm::NoRope>",
        "partial_sums": f"qknorm::partial_sums<{BF16}, {W2}, 7>",
        "apply": f"qknorm::apply<{BF16}, float, {W2}, 7, qknorm::NoRope>",
        "reject": "qknorm::reject<2>",
    }
    assert s.rope_name is None


def test_names_with_rope_neox_and_gptj():
    w = Spec.plan("bfloat16", "bfloat16", 2, 3072, 512, "wide", MINIMAX)
    assert (w.head, w.rot, w.style) == (128, 64, 1)
    assert w.names == {
        "fused": f"qknorm::fused<{BF16}, {BF16}, 2, {W2}, qknorm::Tiling<2, 3, 1>, "
                 f"qknorm::NeoX<128, 64>>",
        "partial_sums": f"qknorm::partial_sums<{BF16}, {W2}, 2>",
        "apply": f"qknorm::apply<{BF16}, {BF16}, {W2}, 2, qknorm::NeoX<128, 64>>",
        "reject": "qknorm::reject<2>",
    }
    assert w.rope_name == f"qknorm::rope<{BF16}, {W2}, 2, qknorm::NeoX<128, 64>>"
    assert str(w).endswith("depth=3 staged rope=128/64/neox")
    g = Spec.plan("float16", "float32", 4, 1536, 256, rope=RoPE(128, 32, style="gptj",
                                                                 max_position=8))
    assert g.rope_name == \
        "qknorm::rope<qknorm::f16_t, qknorm::Widths<1536, 256>, 4, qknorm::GptJ<128, 32>>"
    assert g.names["fused"].endswith(f", qknorm::Tiling<{g.warps}, 2, 0>, "
                                     f"qknorm::GptJ<128, 32>>")
    assert str(g).endswith("rope=128/32/gptj")


def test_one_rank_has_no_reject_kernel():
    s = Spec.plan("float32", "float32", 1, 6144, 1024, rope=MINIMAX)
    assert set(s.names) == {"fused", "partial_sums", "apply"}
    assert s.names["fused"] == "qknorm::fused<float, float, 1, qknorm::Widths<6144, 1024>, " \
                               "qknorm::Tiling<28, 2, 0>, qknorm::NeoX<128, 64>>"
    for world in range(2, MAX_WORLD + 1):
        assert Spec.plan("float32", "float32", world, 1024, 128).names["reject"] == \
            f"qknorm::reject<{world}>"


def test_warps_cover_the_row_and_are_capped():
    assert Spec.plan("float32", "float32", 1, 6144, 1024).warps == 28
    assert Spec.plan("float32", "float32", 1, 12288, 2048).warps == 32
    assert Spec.plan("bfloat16", "bfloat16", 8, 768, 128).warps == 2   # 112 vectors


def test_staged_rows_too_big_for_shared_memory_stay_in_registers():
    # G=1 fp32 wide: 7 warps of 8 vectors, 28 KB a row; three rows do not fit 44 KB
    s = Spec.plan("float32", "float32", 1, 6144, 1024, "wide")
    assert (s.warps, s.staged, s.depth, s.stage_bytes) == (7, 0, 2, 0)
    fits = Spec.plan("bfloat16", "bfloat16", 1, 6144, 1024, "wide")
    assert fits.staged and fits.stage_bytes == 43008 <= STAGE_BYTES_MAX


@pytest.mark.parametrize("args,match", [
    (("bf16", "bf16", 2, 3072, 512), "dtype must be one of"),
    (("float32", "bfloat16", 2, 3072, 512), "weight dtype must be 'float32', got 'bfloat16'"),
    (("bfloat16", "float16", 2, 3072, 512), "weight dtype must be 'bfloat16'"),
    (("bfloat16", "bfloat16", 0, 3072, 512), "world size must be 1..16, got 0"),
    (("bfloat16", "bfloat16", 17, 3072, 512), "world size must be 1..16, got 17"),
    (("float16", "float16", 2, 3076, 512), "local q width 3076 must be a positive multiple of 8"),
    (("float32", "float32", 2, 3072, 0), "local k width 0 must be a positive multiple of 4"),
    (("bfloat16", "bfloat16", 2, 3072, 512, "deep"), "layout must be one of"),
])
def test_plan_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        Spec.plan(*args)


def test_plan_checks_the_rope():
    with pytest.raises(ValueError, match="whole heads"):
        Spec.plan("bfloat16", "bfloat16", 8, 768, 64, rope=MINIMAX)


def test_depth_knob(monkeypatch):
    monkeypatch.setenv("CUPY_QKNORM_DEPTH", "4")
    assert Spec.plan("bfloat16", "bfloat16", 2, 3072, 512).depth == 4
    w = Spec.plan("bfloat16", "bfloat16", 2, 3072, 512, "wide")
    assert (w.depth, w.staged, w.stage_bytes) == (4, 1, 4 * 7 * 64 * 16)
    monkeypatch.setenv("CUPY_QKNORM_DEPTH", "8")  # 8 staged rows exceed 44 KB: registers, 8
    big = Spec.plan("bfloat16", "bfloat16", 1, 6144, 1024, "wide")
    assert (big.staged, big.depth) == (0, 8)


def test_staged_knob(monkeypatch):
    monkeypatch.setenv("CUPY_QKNORM_STAGED", "0")
    w = Spec.plan("bfloat16", "bfloat16", 2, 3072, 512, "wide")
    assert (w.warps, w.depth, w.staged) == (2, 3, 0)  # the layout's depth, in registers
    assert Spec.plan("bfloat16", "bfloat16", 2, 3072, 512).staged == 0


def test_vectors_per_thread_knob(monkeypatch):
    monkeypatch.setenv("CUPY_QKNORM_VECTORS_PER_THREAD", "1")  # 448 vectors: 14 warps
    assert Spec.plan("bfloat16", "bfloat16", 2, 3072, 512).warps == 14
    assert Spec.plan("bfloat16", "bfloat16", 2, 3072, 512, "wide").warps == 14
    monkeypatch.setenv("CUPY_QKNORM_VECTORS_PER_THREAD", "32")
    assert Spec.plan("bfloat16", "bfloat16", 2, 3072, 512).warps == 1


def test_wide_from_knob(monkeypatch):
    assert (wide_from(1), wide_from(1, rope=True)) == (512, 512)
    assert [(wide_from(g), wide_from(g, rope=True)) for g in (2, 3, 8)] == [(2048, 1024)] * 3
    start = wide_from(2)
    assert [layout_for(t, start) for t in (1, start - 1, start, 10 ** 6)] == \
        ["narrow", "narrow", "wide", "wide"]
    assert layout_for(5000, 10 ** 9) == "narrow" and layout_for(1, 1) == "wide"
    monkeypatch.setenv("CUPY_QKNORM_WIDE_FROM", "64")
    assert wide_from(1) == wide_from(2, rope=True) == 64
    monkeypatch.setenv("CUPY_QKNORM_WIDE_FROM", "0")
    with pytest.raises(ValueError, match="CUPY_QKNORM_WIDE_FROM must be 1 or more, got 0"):
        wide_from(2)


@pytest.mark.parametrize("name,value", [("CUPY_QKNORM_DEPTH", "1"),
                                        ("CUPY_QKNORM_STAGED", "2"),
                                        ("CUPY_QKNORM_VECTORS_PER_THREAD", "x")])
def test_bad_tuning_knob_fails_the_plan(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        Spec.plan("bfloat16", "bfloat16", 2, 3072, 512, "wide")


SHIPPED = shipped_specs()


def test_shipped_specs_cover_worlds_dtypes_and_weights():
    """Every dtype and weight dtype at G = 1, 2, 4, 8, 16 (MiniMax's heads); G = 3, 5, 6, 7
    at the widths shapes.default_dims gives them, in bf16."""
    from cupy_qknorm.shapes import default_dims
    assert len(SHIPPED) == len(set(SHIPPED))
    for dtype in DTYPES:
        for wdt in {dtype, "float32"}:
            worlds = {s.world for s in SHIPPED if (s.dtype, s.weight_dtype) == (dtype, wdt)}
            assert worlds >= {1, 2, 4, 8, 16}, (dtype, wdt)
    for world in (3, 5, 6, 7):
        q, k = default_dims(world)
        for rope in (None,):
            for layout in LAYOUTS:
                want = Spec.plan("bfloat16", "bfloat16", world, q // world, k // world, layout,
                                 rope)
                assert want in SHIPPED, want


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16])
def test_shipped_specs_hold_minimax_with_and_without_rope(world):
    q, k = 6144 // world, max(128, 1024 // world)  # G=16: a KV head on two ranks
    for dtype in DTYPES:
        for wdt in {dtype, "float32"}:
            for layout in LAYOUTS:
                for rope in (None, MINIMAX):
                    want = Spec.plan(dtype, wdt, world, q, k, layout, rope)
                    assert want in SHIPPED, want


def test_shipped_specs_hold_both_layouts_and_every_rope_style():
    assert {s.staged for s in SHIPPED} == {0, 1}
    assert {s.style for s in SHIPPED} == {0, 1, 2}
    assert any(s.rot == s.head == 128 for s in SHIPPED)       # full rotation
    assert all(s.head == 128 for s in SHIPPED if s.style)
    assert all(s.stage_bytes <= STAGE_BYTES_MAX for s in SHIPPED)


def test_shipped_specs_are_what_the_runtime_plans():
    """Each shipped spec is Spec.plan's answer for its own shape and some layout, so the
    runtime's kernels are among those built (not hand-made variants)."""
    styles = {1: "neox", 2: "gptj"}
    for s in SHIPPED:
        rope = RoPE(s.head, s.rot, style=styles[s.style], max_position=1) if s.style else None
        plans = {Spec.plan(s.dtype, s.weight_dtype, s.world, s.q_local, s.k_local, layout,
                           rope, cache=(s.cache, s.cache_head)) for layout in LAYOUTS}
        assert s in plans, s
