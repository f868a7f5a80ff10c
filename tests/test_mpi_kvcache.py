"""The KV-cache write of transport "mpi" with numpy arrays over several ranks: run under
`mpiexec -n G python -m pytest --with-mpi tests/test_mpi_kvcache.py` (tests/test_launch.py
does, at 2 and 3 ranks).

Each rank's caches hold exactly its k rows as the op stored them (after norm and RoPE,
checked against the float64 reference) and its v rows, converted to the cache's dtype
(FP8 through ml_dtypes: value / scale, clipped to +-448, round to nearest even), at the
tokens' slots, for bf16, fp16 and fp32 data, NHD, HND and token-pool caches; every other
byte keeps its poison. A slot outside the cache on one rank refuses the call on every
rank with nothing written. Assertions are collective (every rank passes or fails
together)."""
import numpy as np
import pytest
from mpi4py import MPI

from cupy_qknorm import CallMismatchError, KVCache, RoPE, SlotError, TPQKNorm
from cupy_qknorm import reference as ref
from cupy_qknorm.shapes import default_dims
from tests.kvcache_expect import expected

pytestmark = pytest.mark.mpi(min_size=2)

FP8 = "float8_e4m3fn"
HEAD = 128
ROPE = RoPE(128, 64, theta=5e6, max_position=4096)


def caches(layout, blocks, block, heads, storage, seed):
    """(base, view) of a cache filled with random bytes; the view is what the op gets."""
    rng = np.random.default_rng(seed)
    shape = {"nhd": (blocks, block, heads, HEAD), "hnd": (blocks, heads, block, HEAD),
             "pool": (blocks * block, heads, HEAD)}[layout]
    base = rng.integers(0, 256, int(np.prod(shape)) * np.dtype(storage).itemsize,
                        dtype=np.uint8).view(storage).reshape(shape)
    return base, base.transpose(0, 2, 1, 3) if layout == "hnd" else base


def case(comm, seed, tokens, dtype):
    q_dim, k_dim = default_dims(comm.size)
    q, k, qw, kw, _, _ = ref.make_case(seed, tokens, q_dim, k_dim, dtype)
    rng = np.random.default_rng(seed + 1)
    pos = rng.integers(0, ROPE.rows(), tokens)
    table = ref.rope_table(ROPE.rows(), ROPE.rotary_dim, float(ROPE.theta))
    qy, ky, qm, km = ref.qk_norm_rope(
        ref.to_f64(q, dtype), ref.to_f64(k, dtype), ref.to_f64(qw, dtype),
        ref.to_f64(kw, dtype), 1e-6, pos, table, ROPE.head_dim, ROPE.rotary_dim, ROPE.style)
    mine = [np.ascontiguousarray(ref.shard(a, comm.size, comm.rank))
            for a in (q, k, qw, kw, qy, ky, qm, km)]
    return mine, pos


def agree(comm, problems):
    everyone = comm.allgather(problems)
    assert not any(everyone), everyone


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("cache", [None, FP8])
@pytest.mark.parametrize("layout,block", [("nhd", 16), ("hnd", 64), ("pool", 1)])
def test_cache_parity(comm, dtype, cache, layout, block):
    q_dim, k_dim = default_dims(comm.size)
    kv = KVCache(block, HEAD, cache)
    heads = kv.kv_heads(k_dim // comm.size)
    cdt, storage = kv.cache_dtype(dtype), kv.storage_dtype(dtype)
    problems = []
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=64, transport="mpi", rope=ROPE,
                  kv_cache=kv) as norm:
        for i, tokens in enumerate([1, 9, 100]):
            (q, k, qw, kw, qy, ky, qm, km), pos = case(comm, 10 * i + 1, tokens, dtype)
            rng = np.random.default_rng(100 * i + comm.rank)
            v = k[rng.permutation(tokens)]
            blocks = -(-2 * tokens // block)
            (kb, kview), (vb, vview) = (caches(layout, blocks, block, heads, storage, s)
                                        for s in (i, i + 50))
            k_before, v_before = kb.copy(), vb.copy()
            slots = rng.permutation(blocks * block)[:tokens]
            slots[rng.random(tokens) < 0.2] = -1
            outs = [np.full_like(q, ref.poison(dtype)), np.full_like(k, ref.poison(dtype))]
            norm(q, k, qw, kw, out=outs, positions=pos.astype(np.int32), v=v, k_cache=kview,
                 v_cache=vview, slot_mapping=slots.astype(np.int32 if i % 2 else np.int64),
                 k_scale=0.75, v_scale=np.float32(2.5))
            for o, y, m in zip(outs, (qy, ky), (qm, km)):
                if ref.compare_rope(o, y, m, dtype)[1]:
                    problems.append(f"T={tokens}: an output past tolerance")
            want_k = expected(k_before, outs[1], slots, layout, block, heads, dtype, cdt, 0.75)
            want_v = expected(v_before, v, slots, layout, block, heads, dtype, cdt, 2.5)
            if not np.array_equal(kb.view(np.uint8), want_k.view(np.uint8)):
                problems.append(f"T={tokens}: k_cache differs")
            if not np.array_equal(vb.view(np.uint8), want_v.view(np.uint8)):
                problems.append(f"T={tokens}: v_cache differs")
    agree(comm, problems)


def test_store_k_false_writes_the_cache_only(comm):
    q_dim, k_dim = default_dims(comm.size)
    kv = KVCache(16, HEAD, FP8)
    heads = kv.kv_heads(k_dim // comm.size)
    (q, k, qw, kw, *_), pos = case(comm, 3, 40, "bfloat16")
    slots = np.random.default_rng(comm.rank).permutation(64)[:40]
    got = []
    with TPQKNorm(comm, q_dim, k_dim, "bfloat16", max_tokens=64, transport="mpi", rope=ROPE,
                  kv_cache=kv) as norm:
        for store_k in (False, True):
            (kb, kview), (vb, vview) = (caches("nhd", 4, 16, heads, np.uint8, s) for s in (1, 2))
            outs = [np.full_like(q, 0x7FA5), np.full_like(k, 0x7FA5)]
            norm(q, k, qw, kw, out=outs, positions=pos, v=k, k_cache=kview, v_cache=vview,
                 slot_mapping=slots, store_k=store_k)
            got.append((kb, outs[1]))
    problems = []
    if not np.all(got[0][1] == 0x7FA5):
        problems.append("store_k=False wrote k's output")
    if not np.array_equal(got[0][0], got[1][0]):
        problems.append("store_k=False wrote another k_cache")
    agree(comm, problems)


def test_a_slot_outside_the_cache_refuses_the_call_on_every_rank(comm):
    q_dim, k_dim = default_dims(comm.size)
    kv = KVCache(16, HEAD, None)
    heads = kv.kv_heads(k_dim // comm.size)
    (q, k, qw, kw, *_), pos = case(comm, 4, 20, "bfloat16")
    slots = np.arange(20)
    if comm.rank == comm.size - 1:
        slots[13] = 32  # the cache holds 2 blocks of 16
    (kb, kview), (vb, vview) = (caches("nhd", 2, 16, heads, np.uint16, s) for s in (1, 2))
    before = kb.copy(), vb.copy()
    outs = [np.full_like(q, 0x7FA5), np.full_like(k, 0x7FA5)]
    raised = None
    with TPQKNorm(comm, q_dim, k_dim, "bfloat16", max_tokens=64, transport="mpi", rope=ROPE,
                  kv_cache=kv) as norm:
        try:
            norm(q, k, qw, kw, out=outs, positions=pos, v=k, k_cache=kview, v_cache=vview,
                 slot_mapping=slots)
        except (SlotError, CallMismatchError) as e:
            raised = e
    problems = []
    last = comm.rank == comm.size - 1
    if last and not (isinstance(raised, SlotError) and raised.token == 13 and
                     raised.slot == 32):
        problems.append(f"the rank with the bad slot raised {raised!r}")
    if not last and not isinstance(raised, CallMismatchError):
        problems.append(f"a peer raised {raised!r}")
    if not (np.all(outs[0] == 0x7FA5) and np.all(outs[1] == 0x7FA5)):
        problems.append("an output was written")
    if not (np.array_equal(kb, before[0]) and np.array_equal(vb, before[1])):
        problems.append("a cache was written")
    agree(comm, problems)
