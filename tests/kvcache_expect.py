"""The cache a test expects after a call, for a cache of any layout the tests allocate:
reference.expected_cache, with an HND cache ([num_blocks, kv heads, block_size,
head_dim], given to the op as its transposed view) seen through that view."""
from cupy_qknorm import KVCache
from cupy_qknorm import reference as ref


def expected(before, rows, slots, layout, block, heads, dtype, cache_dtype, scale):
    """`before` (numpy, as allocated: "nhd", "hnd" or the token pool "pool") with each
    token's row of `rows` written at its slot (-1: none), in `cache_dtype`'s bits."""
    kv = KVCache(block, before.shape[-1], None if cache_dtype == dtype else cache_dtype)
    if layout == "hnd":
        nhd = before.transpose(0, 2, 1, 3)
        return ref.expected_cache(nhd, rows, slots, kv, heads, dtype, scale).transpose(
            0, 2, 1, 3)
    return ref.expected_cache(before, rows, slots, kv, heads, dtype, scale)
