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
