"""The float64 reference and its helpers, against hand computations."""
import math

import numpy as np
import pytest

from cupy_qknorm import reference as ref


def test_rms_norm_by_hand():
    x = np.array([[3.0, 4.0]])  # mean square 12.5
    w = np.array([1.0, 2.0])
    eps = 0.5
    s = 1 / math.sqrt(12.5 + eps)
    np.testing.assert_allclose(ref.rms_norm(x, w, eps), [[3 * s, 8 * s]], rtol=1e-15)


def test_eps_is_added_once_to_the_full_row_mean():
    """Not SGLang's eps/G per partial, which makes the effective eps eps/D: for a row of
    small RMS the two differ by far more than rounding."""
    d, world, eps = 6144, 4, 1e-6
    x = np.full((1, d), 1e-4)  # mean square 1e-8, well under eps
    w = np.ones(d)
    ours = ref.rms_norm(x, w, eps)[0, 0]
    assert ours == pytest.approx(1e-4 / math.sqrt(1e-8 + 1e-6), rel=1e-14)
    sglang_like = 1e-4 / math.sqrt(1e-8 + eps / d)  # eps/G added to each of G partials
    assert abs(sglang_like / ours - 1) > 1.0
    # the row's norm is the same however it is split over ranks
    parts = [ref.shard(x, world, r) for r in range(world)]
    assert ref.gather(parts).shape == x.shape


def test_zero_row_eps_zero_is_nan():
    out = ref.rms_norm(np.zeros((1, 8)), np.ones(8), 0.0)
    assert np.isnan(out).all()


def test_shard_gather_round_trip():
    x = np.arange(24.0).reshape(2, 12)
    parts = [ref.shard(x, 3, r) for r in range(3)]
    assert parts[1].tolist() == [[4, 5, 6, 7], [16, 17, 18, 19]]
    np.testing.assert_array_equal(ref.gather(parts), x)
    with pytest.raises(ValueError, match="does not split evenly"):
        ref.shard(x, 5, 0)


def test_shard_heads_replicates_and_gather_heads_counts_each_once():
    """Two heads of 3 over 4 ranks: rank r holds head r * 2 // 4 (0, 0, 1, 1); gathering
    keeps each distinct head once. Over 2 ranks it is shard()."""
    x = np.arange(12.0).reshape(2, 6)
    parts = [ref.shard_heads(x, 4, r, 2) for r in range(4)]
    assert [p[0].tolist() for p in parts] == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]
    np.testing.assert_array_equal(ref.gather_heads(parts, 2), x)
    np.testing.assert_array_equal(ref.shard_heads(x, 2, 1, 2), ref.shard(x, 2, 1))
    with pytest.raises(ValueError, match="2 heads neither split nor replicate evenly over 3"):
        ref.shard_heads(x, 3, 0, 2)


def test_bf16_round_to_nearest_even():
    one = 0x3F80
    cases = {
        1.0: one,
        1.0 + 2.0**-8: one,              # exactly halfway: ties to even (down)
        1.0 + 3 * 2.0**-8: one + 2,      # halfway, odd below: up
        1.0 + 2.0**-8 + 2.0**-20: one + 1,  # just past halfway: up
        -2.0: 0xC000,
        float("inf"): 0x7F80,
        3.4e38: 0x7F80,                  # rounds past the largest bf16 to inf
    }
    for v, bits in cases.items():
        assert int(ref.f32_to_bf16(np.float32(v))) == bits, v
    nan = ref.f32_to_bf16(np.float32("nan"))
    assert np.isnan(ref.bf16_to_f32(nan))


def test_bf16_exact_round_trip():
    bits = np.arange(0, 1 << 16, dtype=np.uint32).astype(np.uint16)
    f = ref.bf16_to_f32(bits)
    finite = np.isfinite(f)
    np.testing.assert_array_equal(ref.f32_to_bf16(f[finite]), bits[finite])


@pytest.mark.parametrize("dtype", ref.DTYPES)
def test_ulp_distance(dtype):
    a = ref.from_f64(np.array([1.0, -0.0, 1e-3, np.nan, 2.0]), dtype)
    if dtype == "float32":
        b = np.nextafter(a, np.float32(np.inf))
    elif dtype == "float16":
        b = np.nextafter(a, np.float16(np.inf))
    else:
        b = a + np.uint16(1)
    d = ref.ulp_distance(a, b, dtype)
    assert d[0] == 1 and d[2] == 1 and d[4] == 1
    assert d[3] == 0  # NaN meets NaN
    assert ref.ulp_distance(a[:1], ref.from_f64(np.array([np.nan]), dtype), dtype)[0] == np.inf
    zero = ref.from_f64(np.array([0.0]), dtype)
    assert ref.ulp_distance(a[1:2], zero, dtype)[0] == 0  # -0 and +0


@pytest.mark.parametrize("dtype", ref.DTYPES)
def test_compare_catches_one_wrong_element(dtype):
    q, k, qw, kw, qr, kr = ref.make_case(3, 5, 64, 16, dtype)
    good = ref.from_f64(qr, dtype)
    err, bad = ref.compare(good, qr, dtype)
    assert bad == 0 and err <= ref.TOLERANCE[dtype][1]
    wrong = good.copy()
    if dtype == "bfloat16":
        wrong[2, 3] ^= np.uint16(0x0004)   # 4 ulps
    else:
        wrong[2, 3] *= 1.001
    assert ref.compare(wrong, qr, dtype)[1] == 1
    poisoned = np.full_like(good, ref.poison(dtype))
    assert ref.compare(poisoned, qr, dtype)[1] == good.size


def test_make_case_rows_span_magnitudes():
    q, *_ = ref.make_case(0, 200, 256, 64, "float32")
    rms = np.sqrt((q.astype(np.float64) ** 2).mean(axis=1))
    assert rms.min() < 1e-3 and rms.max() > 1e2


# ---------------------------------------------------------------------------------------
# RoPE


def _one_row_table(angles):
    """A table of one position whose angles are `angles` (fp32 cos, then sin)."""
    a = np.asarray(angles, dtype=np.float64)
    return np.concatenate([np.cos(a), np.sin(a)])[None, :].astype(np.float32)


def test_rope_neox_by_hand():
    x = np.arange(1.0, 9.0)[None, :]  # one head of 8, rotary_dim 4: pairs (0, 2), (1, 3)
    table = _one_row_table([0.3, 0.7])
    c0, c1, s0, s1 = (float(v) for v in table[0])
    y, mag = ref.apply_rope(x, np.array([0]), table, 8, 4, "neox")
    expect = [1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 3 * c0 + 1 * s0, 4 * c1 + 2 * s1, 5, 6, 7, 8]
    np.testing.assert_allclose(y[0], expect, rtol=1e-15)
    assert y[0, 4:].tolist() == [5, 6, 7, 8]  # past rotary_dim: untouched
    np.testing.assert_allclose(mag[0, :4], [1 * c0 + 3 * s0, 2 * c1 + 4 * s1,
                                            3 * c0 + 1 * s0, 4 * c1 + 2 * s1], rtol=1e-15)
    assert mag[0, 4:].tolist() == [5, 6, 7, 8]


def test_rope_gptj_by_hand():
    x = np.arange(1.0, 9.0)[None, :]  # pairs (0, 1), (2, 3)
    table = _one_row_table([0.3, 0.7])
    c0, c1, s0, s1 = (float(v) for v in table[0])
    y, _ = ref.apply_rope(x, np.array([0]), table, 8, 4, "gptj")
    expect = [1 * c0 - 2 * s0, 2 * c0 + 1 * s0, 3 * c1 - 4 * s1, 4 * c1 + 3 * s1, 5, 6, 7, 8]
    np.testing.assert_allclose(y[0], expect, rtol=1e-15)


def test_rope_rotates_every_head_by_its_rows_position():
    rng = np.random.default_rng(0)
    table = ref.rope_table(10, 4, 100.0)
    x = rng.standard_normal((2, 24))  # 3 heads of 8
    pos = np.array([7, 2])
    y, _ = ref.apply_rope(x, pos, table, 8, 4, "neox")
    for t in range(2):
        for h in range(3):
            head = x[t:t + 1, 8 * h:8 * h + 8]
            alone, _ = ref.apply_rope(head, pos[t:t + 1], table, 8, 4, "neox")
            np.testing.assert_array_equal(y[t, 8 * h:8 * h + 8], alone[0])
    assert not np.allclose(y[0], ref.apply_rope(x, pos[::-1], table, 8, 4, "neox")[0][0])


def test_rope_table_against_math():
    rd, theta = 64, 5e6
    table = ref.rope_table(196608, rd, theta)
    assert table.shape == (196608, rd) and table.dtype == np.float32
    for pos in (0, 1, 4097, 196607):
        for i in (0, 1, 17, 31):
            angle = pos * theta ** (-2 * i / rd)
            assert abs(float(table[pos, i]) - math.cos(angle)) <= 6e-8, (pos, i)
            assert abs(float(table[pos, 32 + i]) - math.sin(angle)) <= 6e-8, (pos, i)


def test_rope_preserves_pair_norms_and_is_identity_at_position_zero():
    rng = np.random.default_rng(1)
    table = ref.rope_table(1000, 64, 1e4)
    x = rng.standard_normal((3, 256))  # 2 heads of 128
    pos = np.array([0, 500, 999])
    for style in ref.ROPE_STYLES:
        y, _ = ref.apply_rope(x, pos, table, 128, 64, style)
        a, b = ((np.arange(32), np.arange(32) + 32) if style == "neox"
                else (2 * np.arange(32), 2 * np.arange(32) + 1))
        for h in (0, 128):
            before = x[:, h + a] ** 2 + x[:, h + b] ** 2
            after = y[:, h + a] ** 2 + y[:, h + b] ** 2
            np.testing.assert_allclose(after, before, rtol=3e-7)  # fp32 cos^2 + sin^2
            np.testing.assert_array_equal(y[:, h + 64:h + 128], x[:, h + 64:h + 128])
        np.testing.assert_array_equal(y[0], x[0])  # cos 0 = 1, sin 0 = 0 exactly
        assert np.abs(y[1:, :64] - x[1:, :64]).max() > 0.1


def test_rope_rejects_bad_arguments():
    table = ref.rope_table(4, 4, 10.0)
    x = np.zeros((1, 8))
    with pytest.raises(ValueError, match="positions"):
        ref.apply_rope(x, np.array([4]), table, 8, 4, "neox")
    with pytest.raises(ValueError, match="positions"):
        ref.apply_rope(x, np.array([-1]), table, 8, 4, "neox")
    with pytest.raises(ValueError, match="style"):
        ref.apply_rope(x, np.array([0]), table, 8, 4, "rotate")
    with pytest.raises(ValueError, match="multiple of head_dim"):
        ref.apply_rope(np.zeros((1, 12)), np.array([0]), table, 8, 4, "neox")


def test_ulp_at():
    assert ref.ulp_at(1.0, "bfloat16") == 2.0**-7
    assert ref.ulp_at(1.99, "bfloat16") == 2.0**-7
    assert ref.ulp_at(2.0, "bfloat16") == 2.0**-6
    assert ref.ulp_at(0.75, "float16") == 2.0**-11
    assert ref.ulp_at(1e-6, "float16") == 2.0**-24      # fp16 subnormals
    assert ref.ulp_at(0.0, "float16") == 2.0**-24
    assert ref.ulp_at(1e-40, "bfloat16") == 2.0**-133   # below bf16's smallest normal


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_compare_rope_counts_ulps_of_the_magnitude(dtype):
    ulp = 2.0**-7 if dtype == "bfloat16" else 2.0**-10  # at magnitudes in [1, 2)
    y = np.array([0.5, 0.5, 1e-4, 1e-4])
    mag = np.array([1.5, 1.5, 1.5, 1.5])
    out = ref.from_f64(np.array([0.5 + ulp, 0.5 + 2 * ulp, 0.0, 1e-4 + 0.9 * ulp]), dtype)
    err, bad = ref.compare_rope(out, y, mag, dtype)
    assert bad == 1 and err == pytest.approx(2.0)  # only the 2-ulp error fails
    # the cancellation case: y is tiny, its error within one ulp of the terms' size;
    # counted in ulps of y itself it is thousands off
    ok = out[2:]
    assert ref.compare_rope(ok, y[2:], mag[2:], dtype)[1] == 0
    assert ref.compare(ok, y[2:], dtype)[1] == 2


def test_compare_rope_on_a_real_cancellation():
    """x_first c = x_second s (up to the inputs' rounding): y_first is ~0 while its terms
    are ~1; an output of 0 is within one bf16 ulp of them."""
    angle = 0.6
    table = _one_row_table([angle])
    c, s = (float(v) for v in table[0])
    x = ref.to_f64(ref.from_f64(np.array([[s, c]]), "bfloat16"), "bfloat16")
    y, mag = ref.apply_rope(x, np.array([0]), table, 2, 2, "neox")
    assert abs(y[0, 0]) < 1e-2 * mag[0, 0]
    zero = ref.from_f64(np.zeros((1, 2)), "bfloat16")
    zero[0, 1] = ref.from_f64(y[:, 1], "bfloat16")[0]
    assert ref.compare_rope(zero, y, mag, "bfloat16")[1] == 0


def test_compare_rope_float32_nan_and_inf():
    y = np.array([1.0, 1.0, np.nan, np.inf, 0.0])
    mag = np.array([1.0, 1.0, np.nan, np.inf, 0.0])
    out = np.array([1.0 + 3e-6, 1.0 + 5e-6, np.nan, np.inf, 0.0], dtype=np.float32)
    err, bad = ref.compare_rope(out, y, mag, "float32")
    assert bad == 1 and 4e-6 < err < 6e-6
    wrong = out.copy()
    wrong[2], wrong[3], wrong[4] = 1.0, -np.inf, 1e-30
    assert ref.compare_rope(wrong, y, mag, "float32")[1] == 4
    nan16 = ref.from_f64(np.array([np.nan, 1.0]), "bfloat16")
    assert ref.compare_rope(nan16, np.array([np.nan, np.nan]), np.array([np.nan, 1.0]),
                            "bfloat16")[1] == 1


@pytest.mark.parametrize("style", ref.ROPE_STYLES)
@pytest.mark.parametrize("dtype", ref.DTYPES)
def test_make_rope_case(dtype, style):
    case = ref.make_rope_case(2, 6, 256, 128, dtype, style=style, max_position=1000)
    assert case.positions.dtype == np.int64 and case.positions[-1] == 999
    assert case.positions.min() >= 0 and case.positions.max() < 1000
    assert case.table.shape == (1000, 64) and not case.table.flags.writeable
    # the norm alone (make_case) matches outside the rotated elements
    q, k, qw, kw, qr, kr = ref.make_case(2, 6, 256, 128, dtype)
    np.testing.assert_array_equal(case.q, q)
    np.testing.assert_array_equal(case.q_ref[:, 64:128], qr[:, 64:128])
    np.testing.assert_array_equal(case.k_ref[:, 64:128], kr[:, 64:128])
    assert np.abs(case.q_ref[:, :64] - qr[:, :64]).max() > 0
    # the reference rounded to the dtype passes; a wrong position does not
    for out, y, mag in ((case.q_ref, case.q_ref, case.q_mag), (case.k_ref, case.k_ref,
                                                                 case.k_mag)):
        err, bad = ref.compare_rope(ref.from_f64(out, dtype), y, mag, dtype)
        assert bad == 0 and err <= ref.TOLERANCE[dtype][1]
    shifted = ref.qk_norm_rope(ref.to_f64(q, dtype), ref.to_f64(k, dtype),
                               ref.to_f64(qw, dtype), ref.to_f64(kw, dtype), 1e-6,
                               (case.positions + 1) % 1000, case.table, 128, 64, style)
    assert ref.compare_rope(ref.from_f64(shifted[0], dtype), case.q_ref, case.q_mag,
                            dtype)[1] > 0


def test_production_code_does_not_import_the_truth():
    """The float64 truth checks the product; the product must not lean on it. Only the
    check command, whose job is to compare against it, imports it."""
    import ast
    from pathlib import Path
    package = Path(ref.__file__).parent
    offenders = []
    for f in sorted(package.rglob("*.py")):
        if f.name in ("reference.py", "cli.py"):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n == "reference" or n.endswith(".reference") for n in names):
                offenders.append(f"{f.relative_to(package)}:{node.lineno}")
    assert not offenders, offenders
