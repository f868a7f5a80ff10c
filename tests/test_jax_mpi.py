"""cupy_qknorm.jax across ranks on JAX's CPU backend: the XLA FFI target runs transport
"mpi"'s host path inside jitted functions. Run under
`mpiexec -n G python -m pytest --with-mpi tests/test_jax_mpi.py` (tests/test_launch.py
does, at G = 2 and 3).

Parity against the float64 reference under jit and lax.scan (in place and out of place),
and the faults: a rank whose input is refused at trace time, a T that differs, a rank that
never calls, a KV-cache slot outside the cache or a bad cache shape on one rank. Each
raises a typed error on every rank, within its bound. The paged KV-cache write: each
rank's bf16 and FP8 caches bit for bit against reference.expected_cache (slot -1 holes, a
cache per layer under lax.scan, store_k=False). As in
tests/test_mpi.py, every rank makes every collective step before anything is asserted,
and assertions are collective."""
import time

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="needs jax (pip install -e '.[jax]')")
jnp = pytest.importorskip("jax.numpy")
ml_dtypes = pytest.importorskip("ml_dtypes")

from cupy_qknorm import (CallMismatchError, KVCache, PeerTimeoutError, RoPE,  # noqa: E402
                         SlotError)
from cupy_qknorm import reference as ref  # noqa: E402
from cupy_qknorm.jax import JaxQKNorm  # noqa: E402

pytestmark = pytest.mark.mpi(min_size=2)
TIMEOUT_S = 2.0


def to_jax(a):
    return jnp.asarray(a.view(ml_dtypes.bfloat16) if a.dtype == np.uint16 else a)


def mine(arrays, comm):
    return [np.ascontiguousarray(ref.shard(a, comm.size, comm.rank)) for a in arrays]


def agree(comm, problems):
    found = [f"rank {r}: {p}" for r, ps in enumerate(comm.allgather(list(problems)))
             for p in ps]
    assert not found, "; ".join(found)


def outcome(qk, fn):
    """(typed exception or None, seconds) of fn() run through qk.errors()."""
    t = time.monotonic()
    try:
        with qk.errors():
            fn()
    except Exception as e:  # noqa: BLE001 - checked by the caller
        return e, time.monotonic() - t
    return None, time.monotonic() - t


def test_scan_parity_with_rope(comm):
    g = comm.size
    q_dim, k_dim = g * 256, g * 128
    rope = RoPE(128, 64, theta=5e6, max_position=4096)
    table = ref.rope_table(4096, 64, 5e6)
    layers, tokens, problems = 3, 11, []
    with JaxQKNorm(comm, q_dim, k_dim, "bfloat16", max_tokens=8, rope=rope,
                   backend="cpu") as qk:
        @jax.jit
        def prologue(q, k, qw, kw, pos):
            def step(carry, x):
                return carry, qk(*x, pos, in_place=True)
            return jax.lax.scan(step, 0, (q, k, qw, kw))[1]

        out_of_place = jax.jit(lambda q, k, qw, kw, pos: qk(q, k, qw, kw, pos))
        for seed in (1, 2):
            cases = [ref.make_case(100 * seed + i, tokens, q_dim, k_dim, "bfloat16")
                     for i in range(layers)]
            pos = np.random.default_rng(seed).integers(0, 4096, tokens).astype(np.int32)
            sh = [mine(c[:4], comm) for c in cases]
            stacked = [to_jax(np.stack([s[j] for s in sh])) for j in range(4)]
            qo, ko = prologue(*stacked, jnp.asarray(pos))
            q1, k1 = out_of_place(*(to_jax(a) for a in sh[0]), jnp.asarray(pos))
            for i, (q, k, qw, kw, _, _) in enumerate(cases):
                refs = ref.qk_norm_rope(*(ref.to_f64(a, "bfloat16") for a in (q, k, qw, kw)),
                                        1e-6, pos, table, 128, 64, "neox")
                outs = [(qo[i], 0), (ko[i], 1)] + ([(q1, 0), (k1, 1)] if i == 0 else [])
                for o, j in outs:
                    y, m = (ref.shard(r, g, comm.rank) for r in refs[j::2])
                    err, n = ref.compare_rope(np.asarray(o).view(np.uint16), y, m, "bfloat16")
                    if n:
                        problems.append(f"seed {seed} layer {i}: {n} past tolerance ({err})")
    agree(comm, problems)


def test_refused_input_at_trace_time_raises_on_every_rank(comm):
    """Rank 0 passes a k of the wrong width: it raises ValueError at trace time and tells
    its peers, whose jitted call raises CallMismatchError quoting it, well before the
    timeout."""
    q_dim, k_dim = comm.size * 256, comm.size * 128
    q, k, qw, kw, _, _ = ref.make_case(3, 4, q_dim, k_dim, "float32")
    q, k, qw, kw = mine((q, k, qw, kw), comm)
    if comm.rank == 0:
        k = k[:, :-4]
    with JaxQKNorm(comm, q_dim, k_dim, "float32", timeout_s=TIMEOUT_S, backend="cpu") as qk:
        f = jax.jit(lambda *a: qk(*a))
        err, seconds = outcome(qk, lambda: f(q, k, qw, kw)[0].block_until_ready())
    if comm.rank == 0:
        ok = type(err) is ValueError and str(err).startswith("k: shape must be")
    else:
        ok = type(err) is CallMismatchError and "k: shape must be" in str(err)
    agree(comm, ([] if ok else [f"got {err!r}"]) +
          ([f"{seconds:.2f} s: waited for the timeout"] if seconds > TIMEOUT_S / 2 else []))


def test_tokens_that_differ_raise_call_mismatch_everywhere(comm):
    q_dim, k_dim = comm.size * 256, comm.size * 128
    tokens = 3 if comm.rank == 0 else 5
    q, k, qw, kw, _, _ = ref.make_case(4, tokens, q_dim, k_dim, "float32")
    q, k, qw, kw = mine((q, k, qw, kw), comm)
    with JaxQKNorm(comm, q_dim, k_dim, "float32", timeout_s=TIMEOUT_S, backend="cpu") as qk:
        f = jax.jit(lambda *a: qk(*a))
        err, seconds = outcome(qk, lambda: f(q, k, qw, kw)[0].block_until_ready())
        closed, _ = outcome(qk, lambda: f(q, k, qw, kw)[0].block_until_ready())
    ok = type(err) is CallMismatchError and "tokens" in str(err) and \
        type(closed).__name__ == "ClosedError"
    agree(comm, ([] if ok else [f"got {err!r}, then {closed!r}"]) +
          ([f"{seconds:.2f} s: waited for the timeout"] if seconds > TIMEOUT_S / 2 else []))


def test_calls_in_another_order_on_one_rank_raise_call_mismatch(comm):
    """Two calls without tags, traced in the same order on every rank, take tags 0 and 1
    on every rank: the same program passes. Where rank 0 makes them in the other order
    (as XLA may run two calls with no data between them), each rank's first call meets
    the other tag: CallMismatchError naming both on every rank, not the wrong sums."""
    q_dim, k_dim = comm.size * 256, comm.size * 128
    q, k, qw, kw, qr, kr = ref.make_case(6, 3, q_dim, k_dim, "float32")
    q, k, qw, kw, qr, kr = mine((q, k, qw, kw, qr, kr), comm)
    with JaxQKNorm(comm, q_dim, k_dim, "float32", timeout_s=TIMEOUT_S, backend="cpu") as qk:
        def same(q, k):  # the second call reads the first's q: ordered by data
            a = qk(q, k, qw, kw)
            return qk(a[0], k, qw, kw)
        out = jax.jit(same)(q, k)
        ok = ref.compare(np.asarray(out[1]), kr, "float32")[1] == 0

        def first(q, k):
            return qk(q, k, qw, kw)

        def second(q, k):
            return qk(q, k, qw, kw)
        f1, f2 = jax.jit(first), jax.jit(second)
        f1.lower(q, k), f2.lower(q, k)  # traced in this order everywhere: tags 2 and 3
        order = (f2, f1) if comm.rank == 0 else (f1, f2)
        err, seconds = outcome(qk, lambda: [f(q, k)[0].block_until_ready() for f in order])
    ok = ok and type(err) is CallMismatchError and "tag=2" in str(err) and \
        "tag=3" in str(err)
    agree(comm, ([] if ok else [f"got {err!r}"]) +
          ([f"{seconds:.2f} s: waited for the timeout"] if seconds > TIMEOUT_S / 2 else []))


def test_a_rank_that_never_calls_is_bounded_by_the_timeout(comm):
    q_dim, k_dim = comm.size * 256, comm.size * 128
    q, k, qw, kw, _, _ = ref.make_case(5, 2, q_dim, k_dim, "float32")
    q, k, qw, kw = mine((q, k, qw, kw), comm)
    err, seconds = None, 0.0
    with JaxQKNorm(comm, q_dim, k_dim, "float32", timeout_s=0.5, backend="cpu") as qk:
        if comm.rank != 0:
            f = jax.jit(lambda *a: qk(*a))
            err, seconds = outcome(qk, lambda: f(q, k, qw, kw)[0].block_until_ready())
    if comm.rank == 0:
        problems = []
    else:
        problems = [] if type(err) is PeerTimeoutError and 0.4 < seconds < 5 else \
            [f"got {err!r} after {seconds:.2f} s"]
    agree(comm, problems)


FP8 = "float8_e4m3fn"


def poisoned(seed, shape, storage):
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape)) * np.dtype(storage).itemsize
    return rng.integers(0, 256, n, dtype=np.uint8).view(storage).reshape(shape)


@pytest.mark.parametrize("cache_dtype", [None, FP8])
def test_kv_cache_parity_under_scan(comm, cache_dtype):
    """Two layers under lax.scan, each with its own caches (the rank's one kv head);
    every rank's slots its own, every fourth -1. Then the same first layer with
    store_k=False: no k output, the same caches."""
    g = comm.size
    q_dim, k_dim = g * 256, g * 128
    rope = RoPE(128, 64, theta=5e6, max_position=4096)
    table = ref.rope_table(4096, 64, 5e6)
    kv = KVCache(8, 128, cache_dtype)
    storage = kv.storage_dtype("bfloat16")
    layers, tokens, shape, problems = 2, 13, (3, 8, 1, 128), []
    with JaxQKNorm(comm, q_dim, k_dim, "bfloat16", max_tokens=8, rope=rope, backend="cpu",
                   kv_cache=kv) as qk:
        def call(x, pos, slots, **kw):
            q, k, qw, kw_, v, kc, vc = x
            return qk(q, k, qw, kw_, pos, v=v, k_cache=kc, v_cache=vc, slot_mapping=slots,
                      k_scale=0.625, v_scale=jnp.float32(1.5), **kw)

        @jax.jit
        def prologue(*x):
            *xs, pos, slots = x
            return jax.lax.scan(lambda c, x: (c, call(x, pos, slots, in_place=True)), 0,
                                tuple(xs))[1]

        no_k = jax.jit(lambda *x: call(x[:7], x[7], x[8], store_k=False))
        cases = [ref.make_case(300 + i, tokens, q_dim, k_dim, "bfloat16") for i in range(layers)]
        vs = [ref.make_case(400 + i, tokens, q_dim, k_dim, "bfloat16")[1] for i in range(layers)]
        rng = np.random.default_rng(comm.rank)
        pos = np.random.default_rng(9).integers(0, 4096, tokens).astype(np.int32)
        slots = rng.permutation(24)[:tokens].astype(np.int32)
        slots[::4] = -1
        sh = [mine(c[:4], comm) + mine([vv], comm) for c, vv in zip(cases, vs)]
        kcs = np.stack([poisoned(10 * comm.rank + i, shape, storage) for i in range(layers)])
        vcs = np.stack([poisoned(50 + 10 * comm.rank + i, shape, storage)
                        for i in range(layers)])
        stacked = [to_jax(np.stack([s[j] for s in sh])) for j in range(5)]
        qo, ko, kco, vco = prologue(*stacked, jnp.asarray(kcs), jnp.asarray(vcs),
                                    jnp.asarray(pos), jnp.asarray(slots))
        qo1, none, kc1, vc1 = no_k(*(to_jax(a) for a in sh[0]), jnp.asarray(kcs[0]),
                                   jnp.asarray(vcs[0]), jnp.asarray(pos), jnp.asarray(slots))
        for i, (q, k, qw, kw, _, _) in enumerate(cases):
            refs = ref.qk_norm_rope(*(ref.to_f64(a, "bfloat16") for a in (q, k, qw, kw)),
                                    1e-6, pos, table, 128, 64, "neox")
            for o, j in ((qo[i], 0), (ko[i], 1)):
                y, m = (ref.shard(r, g, comm.rank) for r in refs[j::2])
                if ref.compare_rope(np.asarray(o).view(np.uint16), y, m, "bfloat16")[1]:
                    problems.append(f"layer {i}: output {j} past tolerance")
            k_rows = np.asarray(ko[i]).view(np.uint16)
            want_k = ref.expected_cache(kcs[i], k_rows, slots, kv, 1, "bfloat16", 0.625)
            want_v = ref.expected_cache(vcs[i], sh[i][4], slots, kv, 1, "bfloat16", 1.5)
            if not np.array_equal(np.asarray(kco[i]), want_k):
                problems.append(f"layer {i}: k_cache differs")
            if not np.array_equal(np.asarray(vco[i]), want_v):
                problems.append(f"layer {i}: v_cache differs")
        if none is not None or not np.array_equal(np.asarray(qo1), np.asarray(qo[0])):
            problems.append("store_k=False: q's output or the missing k output")
        if not (np.array_equal(np.asarray(kc1), np.asarray(kco[0])) and
                np.array_equal(np.asarray(vc1), np.asarray(vco[0]))):
            problems.append("store_k=False: the caches differ")
    agree(comm, problems)


@pytest.mark.parametrize("fault", ["slot", "cache shape"])
def test_a_bad_slot_or_cache_on_one_rank_raises_on_every_rank(comm, fault):
    """The last rank passes a slot outside its cache (SlotError there, when the call runs)
    or a cache of the wrong block size (ValueError there, at trace time); the peers'
    calls raise CallMismatchError quoting it, well before the timeout."""
    q_dim, k_dim = comm.size * 256, comm.size * 128
    q, k, qw, kw, _, _ = ref.make_case(7, 6, q_dim, k_dim, "bfloat16")
    q, k, qw, kw = mine((q, k, qw, kw), comm)
    last = comm.rank == comm.size - 1
    kv = KVCache(4, 128, FP8)
    kc = np.zeros((2, 2 if last and fault == "cache shape" else 4, 1, 128), np.uint8)
    slots = np.array([0, 1, -1, 5, 2, 3], np.int32)
    if last and fault == "slot":
        slots[3] = 8
    with JaxQKNorm(comm, q_dim, k_dim, "bfloat16", timeout_s=TIMEOUT_S, backend="cpu",
                   kv_cache=kv) as qk:
        f = jax.jit(lambda q, k, qw, kw, kc, vc, s: qk(q, k, qw, kw, v=k, k_cache=kc,
                                                       v_cache=vc, slot_mapping=s))
        args = [to_jax(a) for a in (q, k, qw, kw)] + [jnp.asarray(kc), jnp.asarray(kc),
                                                      jnp.asarray(slots)]
        err, seconds = outcome(qk, lambda: f(*args)[2].block_until_ready())
    if fault == "slot":
        want, text = SlotError, "token 3 has slot_mapping 8, outside the KV cache's 8 slots"
    else:
        want, text = ValueError, "k_cache: shape must be [num_blocks, 4, 1, 128], got"
    if last:
        ok = type(err) is want and text in str(err)
    else:
        ok = type(err) is CallMismatchError and text in str(err)
    agree(comm, ([] if ok else [f"got {err!r}"]) +
          ([f"{seconds:.2f} s: waited for the timeout"] if seconds > TIMEOUT_S / 2 else []))
