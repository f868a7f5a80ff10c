"""The paged KV cache on the host: the FP8 E4M3 conversion against ml_dtypes, the checks of
caches, slot mappings and scales (what is accepted, and every refusal's one line), the
host's cache write against the reference's, and the bad-slot finder. CPU only."""
import dataclasses

import ml_dtypes
import numpy as np
import pytest

from cupy_qknorm import host
from cupy_qknorm import reference as ref
from cupy_qknorm.kvcache import (CACHE_FP8, FP8_MAX, CacheView, KVCache, cache_view,
                                 scale_arg, slot_view)
from tests.conftest import requires_gpu

FP8 = ml_dtypes.float8_e4m3fn


def library_fp8(x) -> np.ndarray:
    """ml_dtypes' E4M3 (fn) bits of float32 x, saturated as the cache's conversion is, every
    NaN as 0x7F (the GPU's canonical NaN; ml_dtypes keeps the sign)."""
    x = np.asarray(x, np.float32)
    with np.errstate(all="ignore"):
        bits = np.clip(x, -FP8_MAX, FP8_MAX).astype(FP8).view(np.uint8)
    return np.where(np.isnan(x), np.uint8(0x7F), bits)


def assert_same_bits(x):
    x = np.asarray(x, np.float32)
    got, want = host.fp8_e4m3_bits(x), library_fp8(x)
    bad = np.flatnonzero(got.ravel() != want.ravel())
    assert bad.size == 0, [(hex(int(x.ravel().view(np.uint32)[i])), hex(got.ravel()[i]),
                            hex(want.ravel()[i])) for i in bad[:8]]


# ---------------------------------------------------------------------------------------
# fp8_e4m3_bits


def test_fp8_every_float32_upper_half_with_random_lower_bits():
    """All 2^16 sign/exponent/high-mantissa patterns of float32 (every class: zeros,
    subnormals, normals, infinities, NaNs), each with its lower half 0, 0xFFFF, 0x8000
    (often a tie) and 6 random ones."""
    rng = np.random.default_rng(22)
    upper = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    lower = np.concatenate([np.array([[0, 0xFFFF, 0x8000]] * (1 << 16), np.uint32),
                            rng.integers(0, 1 << 16, (1 << 16, 6), dtype=np.uint32)], axis=1)
    assert_same_bits((upper[:, None] | lower).view(np.float32))


def test_fp8_every_rounding_boundary():
    """Between every two neighbouring E4M3 values (and past 448): the midpoint, and the
    float32 values on either side of it; both signs. Midpoints go to the even pattern."""
    values = np.arange(0x7F, dtype=np.uint8).view(FP8).astype(np.float64)  # 0 .. 448
    assert values[-1] == FP8_MAX and np.all(np.diff(values) > 0)
    upper = np.append(values[1:], 480.0)  # 480: the spacing past 448 (encoding NaN)
    mid = ((values + upper) / 2).astype(np.float32)
    assert np.array_equal(mid.astype(np.float64), (values + upper) / 2)  # exact in fp32
    near = np.concatenate([mid, np.nextafter(mid, np.float32(0)),
                           np.nextafter(mid, np.float32(np.inf))])
    assert_same_bits(np.concatenate([near, -near]))
    bits = host.fp8_e4m3_bits(mid)
    below = np.arange(0x7F, dtype=np.uint8)
    assert np.all(np.where(below % 2 == 0, bits == below, bits == below + 1)[:-1])
    assert bits[-1] == 0x7E  # 464, between 448 and 480: even, and 448 anyway


@pytest.mark.parametrize("x, bits", [
    (1.0, 0x38), (-2.0, 0xC0), (0.0, 0x00), (-0.0, 0x80), (FP8_MAX, 0x7E), (-FP8_MAX, 0xFE),
    (463.99, 0x7E), (464.0, 0x7E), (465.0, 0x7E), (1e30, 0x7E), (-3.4e38, 0xFE),
    (np.inf, 0x7E), (-np.inf, 0xFE), (np.nan, 0x7F), (-np.nan, 0x7F),
    (2.0**-6, 0x08), (2.0**-6 - 2.0**-30, 0x08),     # the smallest normal, and from below
    (2.0**-9, 0x01), (7 * 2.0**-9, 0x07),            # subnormals m * 2^-9
    (2.0**-10, 0x00), (3 * 2.0**-10, 0x02),          # subnormal ties: to even
    (2.0**-10 + 2.0**-30, 0x01), (-2.0**-10 - 2.0**-30, 0x81),
    (1e-45, 0x00), (-1e-45, 0x80),                   # float32 subnormals: signed zeros
    (1.0 + 2.0**-4, 0x38), (1.0 + 3 * 2.0**-4, 0x3A),  # normal ties: to even
])
def test_fp8_by_hand(x, bits):
    x32 = np.float32(x)
    if np.isnan(x):  # -np.nan's sign survives float32 conversion only through the bits
        x32 = np.array([0xFFC00000 if np.signbit(x) else 0x7FC00000], np.uint32).view(
            np.float32)[0]
    assert int(host.fp8_e4m3_bits(x32)) == bits
    assert int(library_fp8(x32)) == bits


# the instruction the kernels convert with (sm_89+), as cuda_fp8.h's __nv_cvt_float_to_fp8
# issues it: x into the low byte
_CVT = r"""extern "C" __global__ void cvt(const float* x, unsigned char* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.0f), "f"(x[i]));
    y[i] = (unsigned char)(r & 0xFF);
  }
}"""


@requires_gpu
def test_fp8_equals_the_gpu_instruction():
    """fp8_e4m3_bits is the host's copy of the device's conversion: bit for bit with
    cvt.rn.satfinite.e4m3x2.f32 over every float32 upper half with random lower halves,
    NaNs of both signs, infinities and the saturation boundary (on sm_89 and later)."""
    import cupy
    arch = int(cupy.cuda.Device().compute_capability)  # "90" on an H100 or H200
    if arch < 89:
        pytest.skip(f"cvt to e4m3 needs sm_89 or later, this GPU is sm_{arch}")
    rng = np.random.default_rng(89)
    upper = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    bits = (upper[:, None] | rng.integers(0, 1 << 16, (1 << 16, 8), dtype=np.uint32)).ravel()
    special = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7F800000,
                        0xFF800000, 0x43E80000, 0x43E7FFFF, 0x43E80001], np.uint32)
    x = np.concatenate([bits, special]).view(np.float32)
    kernel = cupy.RawKernel(_CVT, "cvt")
    y = cupy.empty(x.size, cupy.uint8)
    kernel(((x.size + 255) // 256,), (256,), (cupy.asarray(x), y, np.int32(x.size)))
    got, want = y.get(), host.fp8_e4m3_bits(x)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, (f"{bad.size} differ ({int(np.isnan(x[bad]).sum())} NaN inputs); "
                           f"first: " + ", ".join(f"{x.view(np.uint32)[i]:#010x}: gpu "
                                                  f"{got[i]:#04x} host {want[i]:#04x}"
                                                  for i in bad[:6]))


def test_fp8_keeps_shapes_and_takes_strided_input():
    x = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2] - 5.5
    out = host.fp8_e4m3_bits(x)
    assert out.shape == (4, 3) and out.dtype == np.uint8
    assert np.array_equal(out, library_fp8(np.ascontiguousarray(x)))
    assert host.fp8_e4m3_bits(np.float32(3.0)).shape == ()


def test_cache_values_divide_in_fp32_then_convert():
    rng = np.random.default_rng(5)
    f32 = (rng.standard_normal((7, 64)) * 10.0 ** rng.uniform(-4, 4, (7, 1))).astype(np.float32)
    for dtype in ref.DTYPES:
        rows = ref.from_f64(f32, dtype)
        x = ref.bf16_to_f32(rows) if dtype == "bfloat16" else rows.astype(np.float32)
        for scale in (1.0, 0.37, 3e-3, 250.0):
            got = host.cache_values(rows, dtype, CACHE_FP8, scale)
            assert np.array_equal(got, library_fp8(x / np.float32(scale))), (dtype, scale)
        assert host.cache_values(rows, dtype, dtype, 0.37) is rows  # same dtype: as is
    with pytest.raises(ValueError, match="cache dtype"):
        host.cache_values(rows, "float32", "float16", 1.0)


# ---------------------------------------------------------------------------------------
# KVCache


def test_kvcache_config():
    kv = KVCache(16)
    assert (kv.block_size, kv.head_dim, kv.dtype) == (16, 128, None)
    assert kv.cache_dtype("bfloat16") == "bfloat16" and kv.cache_dtype("float32") == "float32"
    assert kv.storage_dtype("bfloat16") == np.uint16
    assert kv.storage_dtype("float16") == np.float16 and not kv.is_fp8()
    fp8 = KVCache(block_size=64, head_dim=64, dtype=CACHE_FP8)
    assert fp8.cache_dtype("float16") == CACHE_FP8 and fp8.storage_dtype("bfloat16") == np.uint8
    assert fp8.is_fp8()
    assert KVCache(1, 128, "float16").cache_dtype("float16") == "float16"
    assert kv.kv_heads(1024) == 8 and kv.kv_heads(128) == 1
    assert KVCache(np.int64(16)).block_size == 16 and type(KVCache(np.int64(16)).block_size) \
        is int
    assert KVCache(16) == KVCache(16, 128, None) and len({KVCache(16), KVCache(16)}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        kv.block_size = 32


@pytest.mark.parametrize("args, message", [
    ((0,), "kv_cache.block_size must be a positive int, got 0"),
    ((True,), "kv_cache.block_size must be a positive int, got True"),
    ((16.0,), "kv_cache.block_size must be a positive int"),
    ((16, 100), "kv_cache.head_dim must be a multiple of 16"),
    ((16, -128), "kv_cache.head_dim must be a positive int"),
    ((16, 128, "int8"), "kv_cache.dtype must be None or one of"),
    ((16, 128, "fp8"), "kv_cache.dtype must be None or one of"),
])
def test_kvcache_refuses(args, message):
    with pytest.raises(ValueError) as e:
        KVCache(*args)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_kvcache_refuses_per_data_dtype():
    with pytest.raises(ValueError, match="kv_cache.dtype 'float16' differs from the data's "
                       "'bfloat16'"):
        KVCache(16, 128, "float16").cache_dtype("bfloat16")
    with pytest.raises(ValueError, match="data dtype must be one of"):
        KVCache(16).cache_dtype("int32")
    with pytest.raises(ValueError, match=r"kv_cache: the rank's k width 1000 is not a whole "
                       r"number of heads of 128 \(head_dim\)"):
        KVCache(16).kv_heads(1000)
    with pytest.raises(ValueError, match="k width must be a positive int"):
        KVCache(16).kv_heads(0)


# ---------------------------------------------------------------------------------------
# cache_view

STORE = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32, CACHE_FP8: np.uint8}


def nhd(blocks, block_size, heads, head_dim, dtype, fill=0):
    return np.full((blocks, block_size, heads, head_dim), fill, STORE[dtype])


def hnd(blocks, block_size, heads, head_dim, dtype, fill=0):
    """An HND cache [blocks, heads, block_size, head_dim] as the transposed view."""
    return np.full((blocks, heads, block_size, head_dim), fill, STORE[dtype]).transpose(0, 2, 1, 3)


def pool(slots, heads, head_dim, dtype, fill=0):
    return np.full((slots, heads, head_dim), fill, STORE[dtype])


@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("cache", ["bfloat16", CACHE_FP8])
def test_cache_view_nhd_and_hnd(block_size, cache):
    kv = KVCache(block_size, 128, None if cache == "bfloat16" else cache)
    a = nhd(3, block_size, 2, 128, cache)
    v = cache_view(a, "k_cache", kv, 2, "bfloat16")
    b1 = 0 if block_size == 1 else 256
    assert v == CacheView(a.ctypes.data, 3, block_size, 2, 128, (block_size * 256, b1, 128))
    assert v.slots == 3 * block_size
    h = hnd(3, block_size, 2, 128, cache)
    v = cache_view(h, "v_cache", kv, 2, "bfloat16")
    b1 = 0 if block_size == 1 else 128
    assert v == CacheView(h.ctypes.data, 3, block_size, 2, 128,
                          (block_size * 256, b1, block_size * 128))


def test_cache_view_token_pool_is_block_size_one():
    kv = KVCache(1, 64, CACHE_FP8)
    a = pool(10, 4, 64, CACHE_FP8)
    v = cache_view(a, "k_cache", kv, 4, "float16")
    assert v == CacheView(a.ctypes.data, 10, 1, 4, 64, (256, 0, 64)) and v.slots == 10
    one = pool(1, 1, 64, CACHE_FP8)  # every outer axis of extent 1
    assert cache_view(one, "k_cache", kv, 1, "float16").strides == (0, 0, 0)


def test_cache_view_takes_views_into_larger_buffers_and_library_dtypes():
    # one layer's k of a [layers, 2, blocks, block, heads, dim] allocation
    big = np.zeros((3, 2, 5, 16, 2, 128), np.uint16)
    layer_k = big[1, 0]
    v = cache_view(layer_k, "k_cache", KVCache(16), 2, "bfloat16")
    assert v.ptr == big.ctypes.data + (2 * 5 * 16 * 2 * 128) * 2 and v.strides == (4096, 256, 128)
    # a cache with padded rows: each head row 144 elements apart
    padded = np.zeros((4, 16, 2, 144), np.float32)[..., :128]
    assert cache_view(padded, "k_cache", KVCache(16), 2, "float32").strides == (4608, 288, 144)
    # ml_dtypes' own types hold the same bits
    assert cache_view(np.zeros((2, 16, 1, 128), ml_dtypes.bfloat16), "k_cache", KVCache(16), 1,
                      "bfloat16").num_blocks == 2
    assert cache_view(np.zeros((2, 16, 1, 128), FP8), "k_cache", KVCache(16, 128, CACHE_FP8),
                      1, "bfloat16").num_blocks == 2


def _writable_strided(shape, strides, dtype):
    base = np.zeros(4096 * 64, dtype)
    return np.lib.stride_tricks.as_strided(base, shape, strides, writeable=True)


def _misaligned(dtype, shape):
    """A cache whose address is one element past a 16-byte boundary."""
    flat = np.zeros(int(np.prod(shape)) + 16, STORE[dtype])
    return flat[1:1 + int(np.prod(shape))].reshape(shape)


def _read_only():
    a = nhd(2, 16, 2, 128, "bfloat16")
    a.flags.writeable = False
    return a


BF16 = KVCache(16)
REFUSED = [
    ("2-D", np.zeros((32, 256), np.uint16), BF16, "must be 4-D [num_blocks, 16, 2, 128] (or "
     "3-D [slots, heads, head_dim] with block_size 1), got 2-D [32, 256]"),
    ("5-D", np.zeros((1, 2, 16, 2, 128), np.uint16), BF16, "must be 4-D"),
    ("block_size", nhd(2, 8, 2, 128, "bfloat16"), BF16,
     "shape must be [num_blocks, 16, 2, 128], got [2, 8, 2, 128]"),
    ("heads", nhd(2, 16, 4, 128, "bfloat16"), BF16, "shape must be [num_blocks, 16, 2, 128]"),
    ("head_dim", nhd(2, 16, 2, 64, "bfloat16"), BF16, "shape must be [num_blocks, 16, 2, 128]"),
    ("pool shape", pool(8, 2, 64, "bfloat16"), KVCache(1), "shape must be [slots, 2, 128], "
     "got [8, 2, 64]"),
    ("3-D needs block_size 1", pool(8, 2, 128, "bfloat16"), BF16,
     "a 3-D cache [slots, heads, head_dim] is a token pool and needs block_size 1, not 16"),
    ("dtype", nhd(2, 16, 2, 128, "float16"), BF16,
     "dtype must be uint16 for a bfloat16 cache, got float16"),
    ("fp8 dtype", nhd(2, 16, 2, 128, "bfloat16"), KVCache(16, 128, CACHE_FP8),
     "dtype must be uint8 for a float8_e4m3fn cache, got uint16"),
    ("int8 for fp8", np.zeros((2, 16, 2, 128), np.int8), KVCache(16, 128, CACHE_FP8),
     "dtype must be uint8 for a float8_e4m3fn cache, got int8"),
    ("cache dtype", nhd(2, 16, 2, 128, "float16"), KVCache(16, 128, "float16"),
     "kv_cache.dtype 'float16' differs from the data's 'bfloat16'"),
    ("empty", nhd(0, 16, 2, 128, "bfloat16"), BF16, "the cache is empty (0 blocks)"),
    ("read-only", _read_only(), BF16, "the array is read-only"),
    ("head_dim strided", np.zeros((2, 16, 2, 256), np.uint16)[..., ::2], BF16,
     "the head_dim axis must be contiguous (stride 4 bytes, expected 2)"),
    ("negative", nhd(2, 16, 2, 128, "bfloat16")[::-1], BF16,
     "negative strides [-8192, 512, 256, 2] are not supported"),
    ("row misaligned", np.zeros((2, 16, 2, 132), np.uint16)[..., :128], BF16,
     "every (block, row, head) row must start 16-byte aligned; strides [8448, 528, 264, 2] "
     "bytes"),
    ("address", _misaligned("bfloat16", (2, 16, 2, 128)), BF16,
     "data must be 16-byte aligned (address % 16 = 2)"),
    ("broadcast blocks", _writable_strided((2, 16, 2, 128), (0, 512, 256, 2), np.uint16), BF16,
     "its elements overlap (strides [0, 512, 256, 2] bytes, shape [2, 16, 2, 128])"),
    ("heads alias", _writable_strided((2, 16, 2, 128), (8192, 512, 128, 2), np.uint16), BF16,
     "its elements overlap"),
    ("rows alias blocks", _writable_strided((2, 16, 2, 128), (512, 512, 256, 2), np.uint16),
     BF16, "its elements overlap"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_cache_view_refuses(case):
    _, arr, kv, message = case
    with pytest.raises(ValueError) as e:
        cache_view(arr, "v_cache", kv, 2, "bfloat16")
    text = str(e.value)
    assert text.startswith("v_cache: " + message) or (
        message.startswith("kv_cache.") and text.startswith(message)), text
    assert "\n" not in text


# ---------------------------------------------------------------------------------------
# slot_view and scale_arg


def test_slot_view():
    for dt in (np.int32, np.int64):
        s = np.array([3, -1, 0], dt)
        assert slot_view(s, 3) == (s.ctypes.data, s.itemsize)
    assert slot_view(np.zeros(0, np.int32), 0)[1] == 4


@pytest.mark.parametrize("arr, tokens, message", [
    (np.zeros(3, np.float32), 3, "dtype must be int32 or int64, got float32"),
    (np.zeros(3, np.uint32), 3, "dtype must be int32 or int64, got uint32"),
    (np.zeros((3, 1), np.int32), 3, "shape must be [3] (one slot per token), got [3, 1]"),
    (np.zeros(4, np.int64), 3, "shape must be [3] (one slot per token), got [4]"),
    (np.zeros(6, np.int32)[::2], 3, "must be contiguous"),
    (np.frombuffer(bytearray(40), np.int64, 3, 4), 3, "data must be 8-byte aligned"),
])
def test_slot_view_refuses(arr, tokens, message):
    with pytest.raises(ValueError) as e:
        slot_view(arr, tokens)
    assert str(e.value) == "slot_mapping: " + message


def test_scale_arg():
    assert scale_arg(None, "k_scale") == (1.0, 0)
    assert scale_arg(0.5, "k_scale") == (0.5, 0)
    assert scale_arg(2, "v_scale") == (2.0, 0)
    assert scale_arg(np.float64(0.1), "k_scale") == (float(np.float32(0.1)), 0)  # fp32's value
    for arr in (np.ones((), np.float32), np.ones(1, np.float32)):
        assert scale_arg(arr, "v_scale") == (1.0, arr.ctypes.data)


@pytest.mark.parametrize("x, message", [
    (0.0, "must be finite and > 0 in fp32, got 0.0"),
    (-1.0, "must be finite and > 0 in fp32, got -1.0"),
    (float("nan"), "must be finite and > 0 in fp32, got nan"),
    (float("inf"), "must be finite and > 0 in fp32, got inf"),
    (1e-50, "must be finite and > 0 in fp32, got 1e-50"),    # 0 in fp32
    (1e39, "must be finite and > 0 in fp32, got 1e+39"),     # inf in fp32
    (True, "must be a number > 0 or an fp32 scalar array, got a bool"),
    ("1.0", "must be a number > 0 or an fp32 scalar array, got str"),
    (np.ones(2, np.float32), "an array scale must be float32 of shape () or (1,), got "
     "float32 [2]"),
    (np.ones((), np.float64), "an array scale must be float32 of shape () or (1,), got "
     "float64 []"),
])
def test_scale_arg_refuses(x, message):
    with pytest.raises(ValueError) as e:
        scale_arg(x, "k_scale")
    assert str(e.value) == "k_scale: " + message


# ---------------------------------------------------------------------------------------
# write_cache against expected_cache, on poisoned caches


def layouts(layout, blocks, block_size, heads, head_dim, dtype, fill):
    """(cache as the caller passes it, the buffer that holds it, to check every byte)."""
    if layout == "nhd":
        a = nhd(blocks, block_size, heads, head_dim, dtype, fill)
        return a, a
    if layout == "hnd":
        a = hnd(blocks, block_size, heads, head_dim, dtype, fill)
        return a, a.base
    if layout == "pool":
        a = pool(blocks * block_size, heads, head_dim, dtype, fill)
        return a, a
    # one layer's v of a [layers, 2 (k, v), blocks, block, heads, dim] allocation
    big = np.full((2, 2, blocks, block_size, heads, head_dim), fill, STORE[dtype])
    return big[1, 1], big


POISON = {"bfloat16": 0x7FA5, "float16": np.float16(np.nan), "float32": np.float32(np.nan),
          CACHE_FP8: 0xA5}


def case_rows(rng, tokens, width, dtype, strided):
    """k-like rows of varied magnitude (some past 448 and some tiny), or a strided view."""
    f64 = ref.random_rows(rng, tokens, width, (-4.0, 3.0))
    f64[0, :4] = [np.inf, -np.inf, np.nan, 1e-9]
    rows = ref.from_f64(f64, dtype)
    if not strided:
        return rows
    qkv = np.zeros((tokens, 3 * width), rows.dtype)
    qkv[:, 2 * width:] = rows
    return qkv[:, 2 * width:]   # v's view of a qkv buffer


@pytest.mark.parametrize("data", ref.DTYPES)
@pytest.mark.parametrize("cache", ["same", CACHE_FP8])
@pytest.mark.parametrize("layout, block_size", [("nhd", 16), ("hnd", 16), ("nhd", 64),
                                                ("pool", 1), ("nhd", 1), ("layer", 16)])
def test_write_cache_matches_the_reference(data, cache, layout, block_size):
    rng = np.random.default_rng([22, ref.DTYPES.index(data), block_size, len(layout)])
    heads, head_dim, tokens = 2, 64, 23
    blocks = max(5, 48 // block_size)  # more slots than tokens
    kv = KVCache(block_size, head_dim, None if cache == "same" else cache)
    cdt = kv.cache_dtype(data)
    arr, buffer = layouts(layout, blocks, block_size, heads, head_dim, cdt, POISON[cdt])
    view = cache_view(arr, "k_cache", kv, heads, data)
    assert view.slots == blocks * block_size
    slots = np.append(rng.permutation(view.slots - 1)[:tokens - 1], view.slots - 1)
    slots[:-1][rng.random(tokens - 1) < 0.25] = -1     # holes: padding tokens
    assert len(set(slots[slots >= 0].tolist())) == (slots >= 0).sum()  # none repeats
    rows = case_rows(rng, tokens, heads * head_dim, data, strided=layout != "nhd")
    before = buffer.copy()
    scale = 1.0 if cache == "same" else 0.0625 * (1 + rng.random())
    want = ref.expected_cache(arr, rows, slots, kv, heads, data, scale)
    host.write_cache(arr, rows, slots, heads, head_dim, block_size, data, cdt, scale)
    assert np.array_equal(np.ascontiguousarray(arr).view(np.uint8), want.view(np.uint8))
    # every written cell holds its row; every byte elsewhere in the buffer is unchanged
    changed = (buffer.view(np.uint8) != before.view(np.uint8))
    marker = np.zeros(buffer.shape, np.uint8)
    mark = np.zeros(arr.shape, bool)
    for s in slots[slots >= 0]:
        if arr.ndim == 3:
            mark[s] = True
        else:
            mark[s // block_size, s % block_size] = True
    if layout == "layer":
        marker[1, 1] = mark
    elif layout == "hnd":
        marker[...] = mark.transpose(0, 2, 1, 3)
    else:
        marker[...] = mark
    outside = np.repeat(marker.reshape(-1) == 0, buffer.itemsize).reshape(changed.shape)
    assert not changed[outside].any()
    stored = host.cache_values(rows, data, cdt, scale).reshape(tokens, heads, head_dim)
    for t in np.flatnonzero(slots >= 0):
        s = slots[t]
        cell = arr[s] if arr.ndim == 3 else arr[s // block_size, s % block_size]
        assert np.array_equal(cell.view(np.uint8), stored[t].view(np.uint8)), t
    if cache == CACHE_FP8:
        assert changed.any() and arr.dtype == np.uint8


def test_write_cache_repeated_slots_across_calls():
    """A second call's rows replace the first's at the slots they share, and nothing else."""
    kv = KVCache(16, 128, CACHE_FP8)
    rng = np.random.default_rng(7)
    arr = nhd(4, 16, 1, 128, CACHE_FP8, 0xA5)
    want = arr.copy()
    for call in range(3):
        slots = rng.choice(np.arange(-1, 64), size=10, replace=False).astype(np.int32)
        rows = case_rows(rng, 10, 128, "bfloat16", strided=False)
        scale = [1.0, 0.5, 4.0][call]
        want = ref.expected_cache(want, rows, slots, kv, 1, "bfloat16", scale)
        host.write_cache(arr, rows, slots, 1, 128, 16, "bfloat16", CACHE_FP8, scale)
        assert np.array_equal(arr, want), call


def test_write_cache_with_library_dtypes_and_nothing_to_write():
    rows = ref.from_f64(np.linspace(-3, 3, 2 * 128).reshape(2, 128), "bfloat16")
    arr = np.zeros((2, 16, 1, 128), ml_dtypes.bfloat16)
    host.write_cache(arr, rows, np.array([17, -1]), 1, 128, 16, "bfloat16", "bfloat16", 1.0)
    assert np.array_equal(arr.view(np.uint16)[1, 1, 0], rows[0])
    f8 = np.zeros((2, 16, 1, 128), FP8)
    host.write_cache(f8, rows, np.array([-1, 3]), 1, 128, 16, "bfloat16", CACHE_FP8, 0.5)
    assert np.array_equal(f8[0, 3, 0].astype(np.float32),
                          np.clip(ref.bf16_to_f32(rows[1]) / 0.5, -448, 448).astype(FP8)
                          .astype(np.float32))
    before = f8.copy()
    host.write_cache(f8, rows, np.array([-1, -1]), 1, 128, 16, "bfloat16", CACHE_FP8, 0.5)
    host.write_cache(f8, rows[:0], np.zeros(0, np.int64), 1, 128, 16, "bfloat16", CACHE_FP8,
                     0.5)
    assert np.array_equal(f8.view(np.uint8), before.view(np.uint8))


def test_write_cache_refuses_a_slot_outside_before_writing():
    arr = nhd(2, 16, 1, 128, "bfloat16", 0x7FA5)
    rows = np.ones((3, 128), np.uint16)
    for slots, message in (([0, 32, 1], "token 1: slot 32 is outside the cache's 32 slots"),
                           ([0, 1, -2], "token 2: slot -2 is outside the cache's 32 slots")):
        with pytest.raises(ValueError, match=message):
            host.write_cache(arr, rows, np.array(slots), 1, 128, 16, "bfloat16", "bfloat16",
                             1.0)
        assert (arr == 0x7FA5).all()
    with pytest.raises(ValueError, match="token 0: slot 5 is outside the cache's 5 slots"):
        host.write_cache(pool(5, 1, 128, CACHE_FP8), rows[:1], [5], 1, 128, 1, "bfloat16",
                         CACHE_FP8, 1.0)


def test_expected_cache_by_hand():
    kv = KVCache(2, 16, CACHE_FP8)
    rows = np.array([[1.0] * 16 + [-500.0] * 16, [2.0 ** -10] * 32], np.float32)
    out = ref.expected_cache(np.full((2, 2, 2, 16), 0xA5, np.uint8), rows, [3, 0], kv, 2,
                             "float32", 0.5)
    assert (out[1, 1, 0] == 0x40).all() and (out[1, 1, 1] == 0xFE).all()  # 2.0; -448
    assert (out[0, 0] == 0x01).all()  # 2^-9: the smallest subnormal
    assert (out[0, 1] == 0xA5).all() and (out[1, 0] == 0xA5).all()
    # a later token wins a repeated slot in the reference
    same = ref.expected_cache(np.zeros((2, 2, 2, 16), np.float32), rows, [1, 1],
                              KVCache(2, 16), 2, "float32", 1.0)
    assert (same[0, 1] == 2.0 ** -10).all()
    with pytest.raises(ValueError, match="token 1: slot 4 is outside the cache"):
        ref.expected_cache(np.zeros((2, 2, 2, 16), np.float32), rows, [0, 4], KVCache(2, 16),
                           2, "float32", 1.0)


def test_first_bad_slot():
    assert host.first_bad_slot(np.array([0, -1, 63, 5], np.int32), 64) == -1
    assert host.first_bad_slot(np.array([0, -1, 64, -2], np.int64), 64) == 2
    assert host.first_bad_slot(np.array([0, -2, 64]), 64) == 1
    assert host.first_bad_slot(np.zeros(0, np.int32), 64) == -1
    assert host.first_bad_slot([2**40], 64) == 0


def test_checks_run_where_cupy_cannot_be_imported():
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys\n"
            "sys.modules['cupy'] = None\n"
            "import numpy as np\n"
            "from cupy_qknorm.kvcache import KVCache, cache_view, scale_arg, slot_view\n"
            "from cupy_qknorm import host\n"
            "kv = KVCache(16, 128, 'float8_e4m3fn')\n"
            "c = np.zeros((2, 16, 1, 128), np.uint8)\n"
            "v = cache_view(c, 'k_cache', kv, 1, 'bfloat16')\n"
            "slot_view(np.zeros(3, np.int32), 3); scale_arg(np.ones(1, np.float32), 'k')\n"
            "host.write_cache(c, np.ones((1, 128), np.uint16), [3], 1, 128, 16, 'bfloat16',\n"
            "                 'float8_e4m3fn', 1.0)\n"
            "print(v.slots, 'ml_dtypes' in sys.modules, sys.modules['cupy'])\n")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["32", "False", "None"], r.stdout + r.stderr
