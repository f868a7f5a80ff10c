"""The paged KV-cache write in the op's epilogue, on the GPU: for every transport, data
dtype and cache dtype (the data's, FP8 E4M3), the caches hold exactly the k rows the op
stored (after norm and RoPE) and v's rows, converted (FP8 through ml_dtypes: value /
scale, clipped to +-448, round to nearest even), at the tokens' slots; every other byte
of the caches keeps its poison. Layouts NHD, HND (a transposed view) and a token pool;
block sizes 16, 64 and 1; slot -1 holes; chunked T; strided qkv views; store_k=False;
CUDA graph replays with new slots, positions and scales; a slot outside the cache; a
position outside the table; the separate cache write (the bench's baseline) against the
fused one; the FP8 division itself against IEEE fp32 division for every fp32 value.
"ipc" runs both ways of writing the cache: by a second launch after the fused
kernel without the cache (its default in long launches; "ipc" here at every T) and in
the fused kernel's epilogue ("ipc-fused" here at every T). The k outputs are
checked against the float64 reference as in test_rope.py. Run by scripts/gpu_suite.sh."""
import numpy as np
import pytest

from cupy_qknorm import KVCache, SlotError, TPQKNorm
from cupy_qknorm import reference as ref
from cupy_qknorm.bench import separate_cache_write
from tests.conftest import requires_gpu
from tests.gpu.test_gpu import dims_for
from tests.gpu.test_rope import MINIMAX, assert_rope_close, poisoned, rope_case
from tests.kvcache_expect import expected

pytestmark = [requires_gpu, pytest.mark.mpi(min_size=1)]

FP8 = "float8_e4m3fn"
HEAD = 128


NEVER = 10 ** 9  # CUPY_QKNORM_CACHE_SPLIT_FROM past every launch


def transport_of(name, monkeypatch):
    """The transport of a test's name, the knob set for the objects built next: "ipc"
    writes the cache by a second launch at every T, "ipc-fused" in the fused kernel."""
    monkeypatch.setenv("CUPY_QKNORM_CACHE_SPLIT_FROM", str(NEVER if name == "ipc-fused"
                                                           else 1))
    return name.split("-")[0]


def set_layout(norm, layout):
    """Pin the fused kernel's layout of an "ipc" object: "narrow" (the cache written by
    it), "wide" (the cache written by a second launch) or "wide-fused"."""
    norm._transport.wide_from = NEVER if layout == "narrow" else 1
    norm._transport.split_from = 1 if layout == "wide" else None


def agree(comm, ok, what):
    """A collective assertion: every rank passes or fails together (one rank failing
    alone would leave the others in a collective it never joins)."""
    failed = comm.allreduce(0 if ok else 1)
    assert failed == 0, f"{what} (on {failed} rank(s))"


def make_cache(layout, blocks, block, heads, storage, seed):
    """A poisoned cache of `layout` (random bytes, so a stray write shows), its array as
    allocated and the view the op is given."""
    import cupy
    rng = np.random.default_rng(seed)
    shape = {"nhd": (blocks, block, heads, HEAD), "hnd": (blocks, heads, block, HEAD),
             "pool": (blocks * block, heads, HEAD)}[layout]
    nbytes = int(np.prod(shape)) * np.dtype(storage).itemsize
    raw = cupy.asarray(rng.integers(0, 256, nbytes, dtype=np.uint8)).view(storage)
    base = raw.reshape(shape)
    view = base.transpose(0, 2, 1, 3) if layout == "hnd" else base
    return base, view


def slots_for(rng, tokens, num_slots, holes=True):
    """Distinct slots in random order, with -1 holes."""
    slots = rng.permutation(num_slots)[:tokens].astype(np.int64)
    if holes and tokens > 2:
        slots[rng.random(tokens) < 0.2] = -1
    return slots


def run_cache(norm, comm, seed, tokens, dtype, kv, layout="nhd", blocks=None, scale=(0.7, 3.0),
              slot_dtype="int64", store_k=True, holes=True, caches=None, values=None):
    """One call with a cache against the expectations: k's outputs against the float64
    reference, the caches byte for byte. `caches`: ((k base, view), (v base, view)) that
    an earlier call wrote (default: new poisoned ones). Returns them. `values`: v's rows
    (numpy, in the dtype's storage; default: k's rows in another order)."""
    import cupy
    heads = kv.kv_heads(norm.config.k_local)
    block = kv.block_size
    blocks = blocks or max(2, -(-2 * max(tokens, 1) // block))
    storage = kv.storage_dtype(dtype)
    cdt = kv.cache_dtype(dtype)
    (qs, ks, qws, kws), pos, mine = rope_case(comm, seed, tokens, dtype)
    rng = np.random.default_rng(seed + 7)
    if values is None:
        values = ks.get()[rng.permutation(tokens)] if tokens else ks.get()
    v = cupy.asarray(values)
    if caches is None:
        caches = (make_cache(layout, blocks, block, heads, storage, seed),
                  make_cache(layout, blocks, block, heads, storage, seed + 1))
    (kb, kview), (vb, vview) = caches
    blocks = kview.shape[0] // (block if layout == "pool" else 1)
    k_before, v_before = kb.get(), vb.get()
    slots = slots_for(rng, tokens, blocks * block, holes)
    outs = [poisoned(qs, dtype), poisoned(ks, dtype)]
    k_poison = outs[1].get()
    norm(qs, ks, qws, kws, out=outs, positions=pos, v=v, k_cache=kview, v_cache=vview,
         slot_mapping=cupy.asarray(slots, slot_dtype), k_scale=scale[0], v_scale=scale[1],
         store_k=store_k)
    norm.synchronize()
    what = f"T={tokens} {dtype} cache={cdt} {layout} block={block}"
    if store_k:
        assert_rope_close(comm, outs, mine, dtype, what)
        k_rows = outs[1].get()
    else:
        agree(comm, np.array_equal(outs[1].get().view(np.uint8), k_poison.view(np.uint8)),
              f"{what}: k's output was written with store_k=False")
        k_rows = None  # the caller compares with the same call storing k
    if k_rows is not None:
        want_k = expected(k_before, k_rows, slots, layout, block, heads, dtype, cdt, scale[0])
        agree(comm, np.array_equal(kb.get().view(np.uint8), want_k.view(np.uint8)),
              f"{what}: k_cache differs")
    want_v = expected(v_before, v.get(), slots, layout, block, heads, dtype, cdt, scale[1])
    agree(comm, np.array_equal(vb.get().view(np.uint8), want_v.view(np.uint8)),
          f"{what}: v_cache differs")
    return caches


@pytest.mark.parametrize("transport", ["ipc", "ipc-fused", "nccl", "mpi"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("cache", [None, FP8])
def test_cache_parity(comm, transport, dtype, cache, monkeypatch):
    q_dim, k_dim = dims_for(comm.size)
    kv = KVCache(16, HEAD, cache)
    transport = transport_of(transport, monkeypatch)
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=1024, transport=transport,
                  rope=MINIMAX, kv_cache=kv) as norm:
        sizes = [1, 2, 7, 64, 700]
        if dtype == "bfloat16":
            sizes += [2500]  # three chunks, each with its own slots
        for i, tokens in enumerate(sizes):
            run_cache(norm, comm, 100 * i + 3, tokens, dtype, kv,
                      slot_dtype="int32" if i % 2 else "int64")


def boundary_values(scale, shape, rng):
    """float32 values (`shape`) whose quotients by `scale` lie within 5 fp32 steps of a
    rounding boundary of FP8 E4M3 (the midpoint of two neighbouring values, both signs,
    subnormals to 448), where a multiply by 1 / scale and the division can round to
    different bytes; then zeros, +-Inf, NaN, and values that overflow, underflow or are
    subnormal after the division; the rest standard normals; shuffled."""
    import ml_dtypes
    fp8 = np.arange(0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    mids = (fp8[:-1] + fp8[1:]) / 2
    near = np.concatenate([mids, -mids]) * scale
    steps = np.arange(-5, 6, dtype=np.int32)
    bits = near.astype(np.float32).view(np.int32)[:, None] + steps[None, :]
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3e38, -3e38, 1e-30, -1e-30,
                        1e-40, -1e-40, 448.0 * scale, 464.0 * scale, -480.0 * scale],
                       np.float32)
    chosen = np.concatenate([bits.ravel().view(np.float32), special])
    out = rng.standard_normal(int(np.prod(shape))).astype(np.float32)
    out[:chosen.size] = chosen[:out.size]
    return rng.permutation(out).reshape(shape)


@pytest.mark.parametrize("transport", ["ipc", "ipc-fused", "nccl", "mpi"])
def test_fp8_bytes_at_rounding_boundaries(comm, transport, monkeypatch):
    """The FP8 cache's v bytes are those of IEEE fp32 division bit for bit where a quotient
    lies a few fp32 steps from an FP8 rounding boundary (where a multiply by 1 / scale
    gives another byte for up to 124 of these values a scale) and at zero, Inf, NaN,
    overflow and underflow, for scales that are not powers of two; 7 and 700 tokens (at
    G=1 both layouts of the fused kernel)."""
    q_dim, k_dim = dims_for(comm.size)
    kv = KVCache(16, HEAD, FP8)
    transport = transport_of(transport, monkeypatch)
    k_local = k_dim // comm.size
    rng = np.random.default_rng(41 + comm.rank)
    with TPQKNorm(comm, q_dim, k_dim, "float32", max_tokens=1024, transport=transport,
                  rope=MINIMAX, kv_cache=kv) as norm:
        for i, (tokens, scale) in enumerate([(7, 0.7), (7, 1 / 3), (700, 117.3),
                                              (700, 0.0123)]):
            run_cache(norm, comm, 50 + i, tokens, "float32", kv, scale=(scale, scale),
                      values=boundary_values(scale, (tokens, k_local), rng))


@pytest.mark.parametrize("layout,block", [("nhd", 64), ("hnd", 16), ("hnd", 64), ("pool", 1),
                                          ("nhd", 1)])
@pytest.mark.parametrize("cache", [None, FP8])
def test_cache_layouts(comm, layout, block, cache):
    q_dim, k_dim = dims_for(comm.size)
    kv = KVCache(block, HEAD, cache)
    with TPQKNorm(comm, q_dim, k_dim, "bfloat16", max_tokens=512, transport="ipc",
                  rope=MINIMAX, kv_cache=kv) as norm:
        for i, tokens in enumerate([1, 33, 600]):
            run_cache(norm, comm, 11 * i + 1, tokens, "bfloat16", kv, layout)


@pytest.mark.parametrize("layout", ["narrow", "wide", "wide-fused"])
@pytest.mark.parametrize("cache", [None, FP8])
@pytest.mark.parametrize("store_k", [True, False])
def test_cache_each_layout_with_fewer_slots_than_max_tokens(comm, layout, cache, store_k,
                                                             monkeypatch):
    """Both layouts of the fused kernel, the wide one with its cache written apart and
    fused; a cache smaller than max_tokens; store_k=False (where the cache is written
    apart, k's rows go through the transport's scratch rows, made at the first need)."""
    q_dim, k_dim = dims_for(comm.size)
    kv = KVCache(16, HEAD, cache)
    monkeypatch.setenv("CUPY_QKNORM_CACHE_SPLIT_FROM", str(NEVER))  # no scratch made yet
    with TPQKNorm(comm, q_dim, k_dim, "bfloat16", max_tokens=4096, transport="ipc",
                  rope=MINIMAX, kv_cache=kv) as norm:
        set_layout(norm, layout)
        for i, tokens in enumerate([3, 300, 1500]):
            if store_k:
                run_cache(norm, comm, 5 * i + 2, tokens, "bfloat16", kv)
            else:  # the same call storing k gives the cache bytes to expect
                skipped = run_cache(norm, comm, 5 * i + 2, tokens, "bfloat16", kv,
                                    store_k=False)
                stored = run_cache(norm, comm, 5 * i + 2, tokens, "bfloat16", kv)
                agree(comm, bool((skipped[0][0] == stored[0][0]).all()),
                      f"T={tokens}: store_k=False wrote another k_cache")
        layouts = {(lay, cached) for _, lay, cached in norm._transport._kernels}
        assert layouts == {(layout.split("-")[0], layout != "wide")}
        assert (norm._transport._k_scratch is not None) == (layout == "wide" and not store_k)


@pytest.mark.parametrize("transport", ["ipc", "nccl", "mpi"])
def test_cache_store_k_false_and_repeated_slots(comm, transport):
    """store_k=False writes the cache and not k's output; a second call to the same slots
    overwrites them."""
    q_dim, k_dim = dims_for(comm.size)
    kv = KVCache(16, HEAD, FP8)
    with TPQKNorm(comm, q_dim, k_dim, "bfloat16", max_tokens=256, transport=transport,
                  rope=MINIMAX, kv_cache=kv) as norm:
        skipped = run_cache(norm, comm, 1, 100, "bfloat16", kv, store_k=False)
        stored = run_cache(norm, comm, 1, 100, "bfloat16", kv)  # the same call, k stored
        agree(comm, bool((skipped[0][0] == stored[0][0]).all()),
              "store_k=False wrote another k_cache")
        # every slot again, in another order, over the earlier call's rows
        caches = None
        for seed in (2, 3, 4):
            caches = run_cache(norm, comm, seed, 64, "bfloat16", kv, blocks=4, holes=False,
                               caches=caches)


@pytest.mark.parametrize("transport", ["ipc", "nccl"])
@pytest.mark.parametrize("cache", [None, FP8])
def test_cache_strided_qkv_in_place(comm, transport, cache):
    """q, k and v are views into one fused qkv buffer; q and k normalized in place, v
    read from its view and left as it was."""
    import cupy
    dtype = "bfloat16"
    q_dim, k_dim = dims_for(comm.size)
    dq, dk = q_dim // comm.size, k_dim // comm.size
    kv = KVCache(16, HEAD, cache)
    heads = kv.kv_heads(dk)
    tokens = 333
    (qs, ks, qws, kws), pos, mine = rope_case(comm, 5, tokens, dtype)
    qkv = cupy.zeros((tokens, dq + 2 * dk + 8), cupy.uint16)
    qkv[:, :dq] = qs
    qkv[:, dq:dq + dk] = ks
    v = cupy.asarray(np.random.default_rng(comm.rank).integers(0, 0x7f00, (tokens, dk)),
                     cupy.uint16)
    qkv[:, dq + dk:dq + 2 * dk] = v
    kb, kview = make_cache("nhd", 32, 16, heads, kv.storage_dtype(dtype), 3)
    vb, vview = make_cache("nhd", 32, 16, heads, kv.storage_dtype(dtype), 4)
    k_before, v_before = kb.get(), vb.get()
    slots = slots_for(np.random.default_rng(9), tokens, 512)
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=128, transport=transport,
                  rope=MINIMAX, kv_cache=kv) as norm:
        norm(qkv[:, :dq], qkv[:, dq:dq + dk], qws, kws, positions=pos.astype(cupy.int32),
             v=qkv[:, dq + dk:dq + 2 * dk], k_cache=kview, v_cache=vview,
             slot_mapping=cupy.asarray(slots), k_scale=0.25, v_scale=0.5)
        norm.synchronize()
    assert_rope_close(comm, [qkv[:, :dq], qkv[:, dq:dq + dk]], mine, dtype, "strided")
    agree(comm, bool((qkv[:, dq + dk:dq + 2 * dk] == v).all()), "v was touched")
    cdt = kv.cache_dtype(dtype)
    want_k = expected(k_before, qkv[:, dq:dq + dk].get(), slots, "nhd", 16, heads, dtype,
                      cdt, 0.25)
    want_v = expected(v_before, v.get(), slots, "nhd", 16, heads, dtype, cdt, 0.5)
    agree(comm, np.array_equal(kb.get().view(np.uint8), want_k.view(np.uint8)),
          "k_cache differs")
    agree(comm, np.array_equal(vb.get().view(np.uint8), want_v.view(np.uint8)),
          "v_cache differs")


@pytest.mark.parametrize("transport", ["ipc", "nccl"])
def test_cache_graph_replays_with_new_slots_positions_scales(comm, transport):
    """A bound call captured in a CUDA graph reads slot_mapping, positions and the device
    scalar scales at every replay: new values written between replays land where they
    say, converted with the new scales."""
    import cupy
    dtype = "bfloat16"
    q_dim, k_dim = dims_for(comm.size)
    kv = KVCache(16, HEAD, FP8)
    heads = kv.kv_heads(k_dim // comm.size)
    tokens, blocks = 300, 64  # 300 > max_tokens: two launches in the graph
    _, _, qw, kw, _, _ = ref.make_case(1, 1, q_dim, k_dim, dtype)
    (qs, ks, qws, kws), pos, _ = rope_case(comm, 1, tokens, dtype, weights=(qw, kw))
    qin, kin, vin = cupy.zeros_like(qs), cupy.zeros_like(ks), cupy.zeros_like(ks)
    pin = cupy.zeros_like(pos)
    sin = cupy.full(tokens, -1, cupy.int32)  # the warm-up call writes no cache row
    ks_dev, vs_dev = cupy.ones((), cupy.float32), cupy.ones((1,), cupy.float32)
    outs = [cupy.empty_like(qs), cupy.empty_like(ks)]
    kb, kview = make_cache("nhd", blocks, 16, heads, np.uint8, 1)
    vb, vview = make_cache("nhd", blocks, 16, heads, np.uint8, 2)
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=256, transport=transport,
                  rope=MINIMAX, kv_cache=kv) as norm:
        call = norm.bind(qin, kin, qws, kws, out=outs, positions=pin, v=vin, k_cache=kview,
                         v_cache=vview, slot_mapping=sin, k_scale=ks_dev, v_scale=vs_dev)
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            call(stream)  # warm
            stream.synchronize()
            stream.begin_capture()
            call(stream)
            graph = stream.end_capture()
        for i, (kscale, vscale) in enumerate([(0.5, 2.0), (1.5, 0.125), (0.01, 7.0)]):
            (q, k, _, _), p, mine = rope_case(comm, 40 + i, tokens, dtype, weights=(qw, kw))
            rng = np.random.default_rng(60 + i)
            v = rng.integers(0, 0x7f00, (tokens, k_dim // comm.size)).astype(np.uint16)
            slots = slots_for(rng, tokens, blocks * 16)
            k_before, v_before = kb.get(), vb.get()
            with stream:
                qin[...] = q
                kin[...] = k
                vin[...] = cupy.asarray(v)
                pin[...] = p
                sin[...] = cupy.asarray(slots, cupy.int32)
                ks_dev.fill(kscale)
                vs_dev.fill(vscale)
                outs[0].fill(ref.poison(dtype))
                outs[1].fill(ref.poison(dtype))
                graph.launch(stream)
                stream.synchronize()
            norm.synchronize(stream)
            assert_rope_close(comm, outs, mine, dtype, f"replay {i}")
            want_k = expected(k_before, outs[1].get(), slots, "nhd", 16, heads, dtype, FP8,
                              kscale)
            want_v = expected(v_before, v, slots, "nhd", 16, heads, dtype, FP8, vscale)
            agree(comm, np.array_equal(kb.get(), want_k), f"replay {i}: k_cache differs")
            agree(comm, np.array_equal(vb.get(), want_v), f"replay {i}: v_cache differs")
        del graph


@pytest.mark.parametrize("transport", ["ipc", "nccl", "mpi"])
def test_cache_slot_outside_raises_slot_error(comm, transport):
    """A slot past the cache: the next synchronize() raises SlotError naming the token on
    the rank whose slot it is; that token's cache rows are not written, every other row
    is; no byte outside the written slots changes."""
    import cupy
    dtype = "bfloat16"
    q_dim, k_dim = dims_for(comm.size)
    kv = KVCache(16, HEAD, None)
    heads = kv.kv_heads(k_dim // comm.size)
    tokens, blocks, bad_token = 40, 4, 17
    (qs, ks, qws, kws), pos, _ = rope_case(comm, 3, tokens, dtype)
    kb, kview = make_cache("nhd", blocks, 16, heads, np.uint16, 5)
    vb, vview = make_cache("nhd", blocks, 16, heads, np.uint16, 6)
    k_before, v_before = kb.get(), vb.get()
    slots = slots_for(np.random.default_rng(1), tokens, blocks * 16)
    v = ks.copy()
    if comm.rank == 0:
        slots[bad_token] = blocks * 16  # one past the last slot
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=64, transport=transport,
                  rope=MINIMAX, kv_cache=kv) as norm:
        outs = [poisoned(qs, dtype), poisoned(ks, dtype)]
        raised = None
        try:
            norm(qs, ks, qws, kws, out=outs, positions=pos, v=v, k_cache=kview,
                 v_cache=vview, slot_mapping=cupy.asarray(slots))
            norm.synchronize()
        except SlotError as e:
            raised = e
        if comm.rank == 0:
            agree(comm, raised is not None and raised.token == bad_token and
                  raised.slot == blocks * 16, f"rank 0 raised {raised!r}")
        else:
            agree(comm, raised is None, f"rank {comm.rank} raised {raised!r}")
        written = slots.copy()
        if comm.rank == 0:  # the peers' slot of that token is in their caches: written
            written[bad_token] = -1
        want_k = expected(k_before, outs[1].get(), written, "nhd", 16, heads, dtype, dtype,
                          1.0)
        want_v = expected(v_before, v.get(), written, "nhd", 16, heads, dtype, dtype, 1.0)
        agree(comm, np.array_equal(kb.get(), want_k), "k_cache differs")
        agree(comm, np.array_equal(vb.get(), want_v), "v_cache differs")


@pytest.mark.parametrize("layout", ["narrow", "wide", "wide-fused"])
def test_cache_bad_position_leaves_its_rows_unwritten(comm, layout, monkeypatch):
    """A token whose position is outside the table (on every rank): PositionError names
    it; its k output row and its cache rows keep their poison, every other token's are
    written (the narrow layout, the wide one with its cache written apart, and fused)."""
    import cupy
    from cupy_qknorm import PositionError
    dtype = "bfloat16"
    q_dim, k_dim = dims_for(comm.size)
    kv = KVCache(16, HEAD, FP8)
    heads = kv.kv_heads(k_dim // comm.size)
    tokens, bad, blocks = 600, 77, 64
    (qs, ks, qws, kws), pos, _ = rope_case(comm, 4, tokens, dtype)
    pos[bad] = MINIMAX.rows()
    rng = np.random.default_rng(12)
    v = cupy.asarray(rng.integers(0, 0x7f00, ks.shape), cupy.uint16)
    kb, kview = make_cache("nhd", blocks, 16, heads, np.uint8, 13)
    vb, vview = make_cache("nhd", blocks, 16, heads, np.uint8, 14)
    k_before, v_before = kb.get(), vb.get()
    slots = slots_for(rng, tokens, blocks * 16, holes=False)
    outs = [poisoned(qs, dtype), poisoned(ks, dtype)]
    err = None
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=1024, transport="ipc",
                  rope=MINIMAX, kv_cache=kv) as norm:
        set_layout(norm, layout)
        try:
            norm(qs, ks, qws, kws, out=outs, positions=pos, v=v, k_cache=kview,
                 v_cache=vview, slot_mapping=cupy.asarray(slots), k_scale=0.5, v_scale=2.0)
            norm.synchronize()
        except PositionError as e:
            err = e
    agree(comm, err is not None and err.token == bad, f"{layout}: raised {err!r}")
    k_rows = outs[1].get()
    agree(comm, bool((k_rows[bad] == ref.poison(dtype)).all()), "the bad row was stored")
    written = slots.copy()
    written[bad] = -1
    want_k = expected(k_before, k_rows, written, "nhd", 16, heads, dtype, FP8, 0.5)
    want_v = expected(v_before, v.get(), written, "nhd", 16, heads, dtype, FP8, 2.0)
    agree(comm, np.array_equal(kb.get(), want_k), f"{layout}: k_cache differs")
    agree(comm, np.array_equal(vb.get(), want_v), f"{layout}: v_cache differs")


@pytest.mark.parametrize("cache", [None, FP8])
def test_separate_cache_write_matches_the_fused_one(comm, cache):
    """The bench's baseline (norm + RoPE, then the separate cache write) writes the same
    cache bytes as the fused prologue."""
    import cupy
    dtype = "bfloat16"
    q_dim, k_dim = dims_for(comm.size)
    kv = KVCache(16, HEAD, cache)
    heads = kv.kv_heads(k_dim // comm.size)
    tokens = 200
    (qs, ks, qws, kws), pos, _ = rope_case(comm, 8, tokens, dtype)
    v = cupy.asarray(np.random.default_rng(2).integers(0, 0x7f00, ks.shape), cupy.uint16)
    slots = cupy.asarray(slots_for(np.random.default_rng(3), tokens, 32 * 16))
    storage = kv.storage_dtype(dtype)
    caches = [make_cache("nhd", 32, 16, heads, storage, 9)[0] for _ in range(4)]
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=128, transport="ipc", rope=MINIMAX,
                  kv_cache=kv) as fused, \
            TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=128, transport="ipc",
                     rope=MINIMAX) as plain:
        o1 = [cupy.empty_like(qs), cupy.empty_like(ks)]
        o2 = [cupy.empty_like(qs), cupy.empty_like(ks)]
        fused(qs, ks, qws, kws, out=o1, positions=pos, v=v, k_cache=caches[0],
              v_cache=caches[1], slot_mapping=slots, k_scale=0.3, v_scale=0.6)
        plain(qs, ks, qws, kws, out=o2, positions=pos)
        separate_cache_write(fused, o2[1], v, caches[2], caches[3], slots, 0.3, 0.6)(
            cupy.cuda.get_current_stream())
        fused.synchronize()
        plain.synchronize()
    agree(comm, bool((o1[1] == o2[1]).all()), "the k outputs differ")
    agree(comm, bool((caches[0] == caches[2]).all()) and bool((caches[1] == caches[3]).all()),
          "the separate cache write wrote other bytes")


DIVISION_CHECK = r"""
#include "kvcache.cuh"
// counts[0]: fp32 quotients other than IEEE division's (NaN as NaN), outside fp32's
// subnormal quotients; counts[1]: FP8 bytes other than those of IEEE division's quotient;
// each for the reciprocal a device scale gets (as CacheScales) and for the host's
// (r_host), both summed. IEEE's quotient: fp32(fp64(x) / fp64(s)), one rounding to fp64
// then one to fp32, the same outside fp32's subnormal quotients (the argument of
// Fp8Divisor); not __fdiv_rn, which -ftz=true (CuPy's) flushes subnormals in.
extern "C" __global__ void division_check(float s, double r_host, unsigned long long* counts) {
  const qknorm::Fp8Divisor divisors[2] = {{__drcp_rn(qknorm::widen(s))}, {r_host}};
  unsigned long long quotients = 0, bytes = 0;
  const unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
       i < (1ull << 32); i += step) {
    const float x = __uint_as_float((unsigned int)i);
    const float e = __double2float_rn(__ddiv_rn(qknorm::widen(x), qknorm::widen(s)));
    for (const qknorm::Fp8Divisor& d : divisors) {
      const float q = d.divide(x);
      const bool same = __float_as_uint(q) == __float_as_uint(e) || (isnan(q) && isnan(e));
      if (!same && !(fabsf(e) < 0x1p-126f)) ++quotients;
      if (qknorm::fp8x2(q, 0.f) != qknorm::fp8x2(e, 0.f)) ++bytes;
    }
  }
  atomicAdd(&counts[0], quotients);
  atomicAdd(&counts[1], bytes);
}
"""


def test_fp8_division_every_fp32_value(comm):
    """The FP8 cache's division (kvcache.cuh's Fp8Divisor: fp32(fp64(x) * r), r = 1 / scale
    rounded to fp64, by __drcp_rn for a device scale, by Python's division on the host for
    a scale passed as a value, as CacheCall.fields packs it) against IEEE fp32 division
    (through fp64, subnormals kept) on the GPU, for every one of the 2^32 fp32 values x: the same quotient outside fp32's
    subnormal quotients, and the same FP8 byte for every x, at 28 scales: powers of two and
    not, the extremes of fp32, a subnormal, and what a device scale may hold besides (0, a
    negative, Inf, NaN)."""
    import cupy
    from cupy_qknorm.params import KERNEL_DIR
    kernel = cupy.RawModule(code=DIVISION_CHECK, options=("-std=c++17", f"-I{KERNEL_DIR}"),
                            ).get_function("division_check")
    rng = np.random.default_rng(11)
    scales = np.concatenate([
        [1.0, 3.0, 0.1, 448.0, 1 / 448, 7.123456, 2.0 ** -64, 2.0 ** 64, 1e-30, 1e30,
         3.4e38, 1.2e-38, 1e-40, 0.0, -2.5, np.inf, np.nan],
        rng.uniform(1e-3, 1e3, 6), 2.0 ** rng.uniform(-40, 40, 5)]).astype(np.float32)
    off = []
    for s in scales:
        counts = cupy.zeros(2, cupy.uint64)
        with np.errstate(divide="ignore", invalid="ignore"):
            r_host = np.float64(1.0) / np.float64(s)  # as CacheCall.fields: 1.0 / float
        kernel((132 * 8,), (256,), (np.float32(s), r_host, counts))
        quotients, fp8 = (int(c) for c in counts.get())
        if quotients or fp8:
            off.append(f"scale {s!r}: {quotients} quotients, {fp8} FP8 bytes")
    agree(comm, not off, "; ".join(off[:4]))
