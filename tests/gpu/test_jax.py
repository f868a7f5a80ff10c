"""cupy_qknorm.jax on the GPU (JAX's CUDA backend): the FFI target launches our kernels on
XLA's stream. Parity against the float64 reference (norm then MiniMax's RoPE, bf16) under
jit, lax.scan over layers, donation in place and out of place, for every transport; a
jitted function replayed on fresh data and positions (captured by XLA in a command buffer
with "ipc" and "nccl", never with "mpi"); a position outside the table; a peer that never
calls. The paged KV-cache write (JaxQKNorm(kv_cache=)): bf16 and FP8 caches, donated,
bit for bit against reference.expected_cache for every transport, replays with fresh
slots and scales, a cache per layer under lax.scan, store_k=False, a slot outside the
cache. Run by scripts/gpu_suite.sh, like the rest of tests/gpu.

JAX shares the GPU with CuPy: XLA_PYTHON_CLIENT_PREALLOCATE=false (set here before JAX
starts, unless given) keeps XLA from taking most of the memory up front;
XLA_FLAGS=--xla_gpu_graph_min_graph_size=1 (likewise) lets a few calls make a graph."""
import os
import time

import numpy as np
import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_FLAGS", "--xla_gpu_graph_min_graph_size=1")

from cupy_qknorm import (CallMismatchError, KVCache, PeerTimeoutError,  # noqa: E402
                         PositionError, RoPE, SlotError)
from tests.conftest import requires_gpu  # noqa: E402
from tests.gpu.test_rope import rope_case  # noqa: E402
from tests.gpu.test_gpu import dims_for  # noqa: E402
from cupy_qknorm import reference as ref  # noqa: E402

jax = pytest.importorskip("jax", reason="needs jax with its CUDA plugin")
jnp = pytest.importorskip("jax.numpy")
ml_dtypes = pytest.importorskip("ml_dtypes")
from cupy_qknorm.jax import JaxQKNorm  # noqa: E402

pytestmark = [requires_gpu, pytest.mark.mpi(min_size=1)]
MINIMAX = RoPE.minimax_m2()


def jax_device():
    """This rank's JAX GPU: the CuPy device the conftest picked from the node-local rank."""
    import cupy
    gpus = jax.devices("gpu")
    return next(d for d in gpus if d.local_hardware_id == cupy.cuda.Device().id)


def put(a, dev):
    """cupy/numpy (bf16 as uint16 bits) -> jax.Array on `dev`."""
    a = a.get() if hasattr(a, "get") else np.asarray(a)
    return jax.device_put(a.view(ml_dtypes.bfloat16) if a.dtype == np.uint16 else a, dev)


def bf16_bits(x):
    return np.asarray(x).view(np.uint16)


def rope_bad(comm, outs, mine):
    """Elements past tolerance over every rank (collective)."""
    from mpi4py import MPI
    qy, ky, qm, km = mine
    n = sum(ref.compare_rope(bf16_bits(o), y, m, "bfloat16")[1]
            for o, y, m in zip(outs, (qy, ky), (qm, km)))
    return comm.allreduce(n, op=MPI.SUM)


@pytest.mark.parametrize("transport", ["ipc", "nccl", "mpi"])
def test_jit_scan_and_donation_parity(comm, transport):
    dev = jax_device()
    q_dim, k_dim = dims_for(comm.size)
    with JaxQKNorm(comm, q_dim, k_dim, "bfloat16", max_tokens=512, transport=transport,
                   rope=MINIMAX, backend="gpu") as qk:
        out_of_place = jax.jit(lambda q, k, qw, kw, p: qk(q, k, qw, kw, p))
        in_place = jax.jit(lambda q, k, qw, kw, p: qk(q, k, qw, kw, p, in_place=True),
                           donate_argnums=(0, 1))

        @jax.jit
        def layers(q, k, qw, kw, p):
            def step(carry, x):
                return carry, qk(*x, p, in_place=True)
            return jax.lax.scan(step, 0, (q, k, qw, kw))[1]

        for i, tokens in enumerate((1, 64, 1000)):  # 1000 > max_tokens: two chunks
            (qs, ks, qws, kws), pos, mine = rope_case(comm, 10 + i, tokens, "bfloat16")
            args = [put(a, dev) for a in (qs, ks, qws, kws, pos)]
            assert rope_bad(comm, out_of_place(*args), mine) == 0, f"T={tokens} out of place"
            args = [put(a, dev) for a in (qs, ks, qws, kws, pos)]
            assert rope_bad(comm, in_place(*args), mine) == 0, f"T={tokens} in place"
            # three layers: the same case thrice, stacked
            st = [jnp.stack([put(a, dev)] * 3) for a in (qs, ks, qws, kws)]
            qo, ko = layers(*st, put(pos, dev))
            for layer in range(3):
                assert rope_bad(comm, (qo[layer], ko[layer]), mine) == 0, \
                    f"T={tokens} scan layer {layer}"
        qk.synchronize()


@pytest.mark.parametrize("transport", ["ipc", "nccl", "mpi"])
def test_replays_on_fresh_data_and_positions(comm, transport, capsys):
    """One jitted function of six calls, run 8 times on fresh inputs and positions, every
    output checked: XLA captures the calls in its command buffers (CUDA graphs) with
    "ipc" and "nccl" (XLA_FLAGS above: any number of commands makes a graph), never with
    "mpi", whose target says it cannot be captured."""
    dev = jax_device()
    q_dim, k_dim = dims_for(comm.size)
    with JaxQKNorm(comm, q_dim, k_dim, "bfloat16", rope=MINIMAX, transport=transport,
                   backend="gpu") as qk:
        @jax.jit
        def six(cases):
            return [qk(*c) for c in cases]
        bad = 0
        for seed in range(8):
            cases = [rope_case(comm, 200 + 6 * seed + j, 64, "bfloat16") for j in range(6)]
            outs = six([[put(x, dev) for x in (*c[0], c[1])] for c in cases])
            bad += sum(rope_bad(comm, o, c[2]) > 0 for o, c in zip(outs, cases))
        qk.synchronize()
        captured = comm.allgather(qk.captured_calls)
        ran = comm.allgather(qk.executions)
    with capsys.disabled():
        if comm.rank == 0:
            print(f"\nJAX-GRAPH G={comm.size} {transport}: the handler ran {ran} times for "
                  f"48 calls, XLA captured {captured} of them (per rank)", flush=True)
    assert bad == 0, f"{bad} replays past tolerance"
    if transport == "mpi":
        assert not any(captured)
    else:
        assert all(captured), "XLA captured none of the calls"


def test_position_outside_the_table_raises_typed_errors(comm):
    dev = jax_device()
    q_dim, k_dim = dims_for(comm.size)
    (qs, ks, qws, kws), pos, _ = rope_case(comm, 7, 8, "bfloat16")
    p = pos.get()
    if comm.rank == 0:
        p[3] = MINIMAX.rows()
    with JaxQKNorm(comm, q_dim, k_dim, "bfloat16", rope=MINIMAX, backend="gpu") as qk:
        f = jax.jit(lambda *a: qk(*a))
        err = None
        try:
            with qk.errors():
                out = f(*(put(a, dev) for a in (qs, ks, qws, kws, p)))
                qk.synchronize(*out)
        except Exception as e:  # noqa: BLE001 - checked below
            err = e
    want = PositionError if comm.rank == 0 else CallMismatchError
    ok = comm.allgather(type(err) is want)
    assert all(ok), f"rank {comm.rank}: {err!r}"


def test_a_peer_that_never_calls_is_bounded(comm):
    if comm.size < 2:
        pytest.skip("needs a peer")
    dev = jax_device()
    q_dim, k_dim = dims_for(comm.size)
    (qs, ks, qws, kws), pos, _ = rope_case(comm, 8, 4, "bfloat16")
    err, took = None, 0.0
    with JaxQKNorm(comm, q_dim, k_dim, "bfloat16", rope=MINIMAX, timeout_s=1.0,
                   backend="gpu") as qk:
        if comm.rank != 0:
            f = jax.jit(lambda *a: qk(*a))
            args = [put(a, dev) for a in (qs, ks, qws, kws, pos)]
            t = time.monotonic()
            try:
                with qk.errors():
                    qk.synchronize(*f(*args))
            except Exception as e:  # noqa: BLE001 - checked below
                err = e
            took = time.monotonic() - t
        comm.Barrier()
    ok = comm.rank == 0 or (type(err) is PeerTimeoutError and took < 30)
    assert all(comm.allgather(ok)), f"rank {comm.rank}: {err!r} after {took:.1f} s"


# -- the paged KV-cache write ------------------------------------------------------------
FP8 = "float8_e4m3fn"


def cache_inputs(comm, seed, tokens, kv, blocks=None):
    """A rope_case with v (k's rows permuted), poisoned numpy caches [blocks, block_size,
    heads, 128] and slots (distinct, every fifth -1)."""
    q_dim, k_dim = dims_for(comm.size)
    heads = kv.kv_heads(k_dim // comm.size)
    (qs, ks, qws, kws), pos, mine = rope_case(comm, seed, tokens, "bfloat16")
    rng = np.random.default_rng(seed + 3)
    v = ks.get()[rng.permutation(tokens)]
    blocks = blocks or -(-2 * tokens // kv.block_size)
    shape = (blocks, kv.block_size, heads, 128)
    storage = kv.storage_dtype("bfloat16")
    kc, vc = (rng.integers(0, 256, int(np.prod(shape)) * storage.itemsize, dtype=np.uint8)
              .view(storage).reshape(shape) for _ in range(2))
    slots = rng.permutation(blocks * kv.block_size)[:tokens].astype(np.int32)
    slots[::5] = -1
    return (qs, ks, qws, kws, pos), v, kc, vc, slots, mine, heads


def caches_match(comm, kv, heads, got, before, rows, slots, scales):
    """Whether each cache of `got` equals reference.expected_cache (collective)."""
    ok = all(np.array_equal(np.asarray(g).view(b.dtype),  # a bf16 cache's bits
                            ref.expected_cache(b, r, slots, kv, heads, "bfloat16", s))
             for g, b, r, s in zip(got, before, rows, scales))
    return all(comm.allgather(ok))


def cache_transport(name, monkeypatch):
    """"ipc-apart": "ipc" writing the cache by a second launch at every T (its default
    from knobs.CACHE_SPLIT_FROM's tokens a launch; CUPY_QKNORM_CACHE_SPLIT_FROM, read at
    construction)."""
    if name == "ipc-apart":
        monkeypatch.setenv("CUPY_QKNORM_CACHE_SPLIT_FROM", "1")
    return name.split("-")[0]


@pytest.mark.parametrize("transport", ["ipc", "ipc-apart", "nccl", "mpi"])
@pytest.mark.parametrize("cache_dtype", [None, FP8])
def test_kv_cache_parity_donated_and_replayed(comm, transport, cache_dtype, monkeypatch):
    """One jitted call with donated caches: the caches come back in the same buffers,
    bit for bit; replayed at T=64 with fresh slots, data and device scale (XLA's command
    buffer with "ipc" and "nccl"); T=1000 in two chunks."""
    dev = jax_device()
    transport = cache_transport(transport, monkeypatch)
    q_dim, k_dim = dims_for(comm.size)
    kv = KVCache(16, 128, cache_dtype)
    with JaxQKNorm(comm, q_dim, k_dim, "bfloat16", max_tokens=512, transport=transport,
                   rope=MINIMAX, backend="gpu", kv_cache=kv) as qk:
        step = jax.jit(lambda q, k, qw, kw, p, v, kc, vc, s, vs: qk(
            q, k, qw, kw, p, v=v, k_cache=kc, v_cache=vc, slot_mapping=s, k_scale=0.7,
            v_scale=vs), donate_argnums=(6, 7))
        for i, tokens in enumerate((1, 64, 64, 64, 1000)):
            args, v, kc, vc, slots, mine, heads = cache_inputs(comm, 30 + i, tokens, kv)
            vscale = 0.5 + i
            jkc, jvc = put(kc, dev), put(vc, dev)
            addr = (jkc.unsafe_buffer_pointer(), jvc.unsafe_buffer_pointer())
            qo, ko, kco, vco = step(*(put(a, dev) for a in args), put(v, dev), jkc, jvc,
                                    put(slots, dev), put(np.float32(vscale), dev))
            qk.synchronize(qo, ko, kco, vco)
            what = f"T={tokens} {transport} cache={kv.cache_dtype('bfloat16')}"
            assert rope_bad(comm, (qo, ko), mine) == 0, what
            same = (kco.unsafe_buffer_pointer(), vco.unsafe_buffer_pointer()) == addr
            assert all(comm.allgather(same)), f"{what}: the caches were not written in place"
            assert caches_match(comm, kv, heads, (kco, vco), (kc, vc),
                                (bf16_bits(ko), v), slots, (0.7, vscale)), what


@pytest.mark.parametrize("transport", ["ipc", "ipc-apart", "nccl", "mpi"])
def test_kv_cache_per_layer_under_scan_and_store_k_false(comm, transport, monkeypatch):
    dev = jax_device()
    transport = cache_transport(transport, monkeypatch)
    q_dim, k_dim = dims_for(comm.size)
    kv = KVCache(16, 128, FP8)
    with JaxQKNorm(comm, q_dim, k_dim, "bfloat16", max_tokens=512, transport=transport,
                   rope=MINIMAX, backend="gpu", kv_cache=kv) as qk:
        def call(x, p, s, **kw):
            q, k, qw, kw_, v, kc, vc = x
            return qk(q, k, qw, kw_, p, v=v, k_cache=kc, v_cache=vc, slot_mapping=s,
                      k_scale=0.7, v_scale=3.0, **kw)

        @jax.jit
        def layers(x, p, s):
            return jax.lax.scan(lambda c, x: (c, call(x, p, s, in_place=True)), 0, x)[1]

        no_k = jax.jit(lambda x, p, s: call(x, p, s, store_k=False))
        args, v, kc, vc, slots, mine, heads = cache_inputs(comm, 50, 100, kv)
        pos = put(args[4], dev)
        x = tuple(jnp.stack([put(a, dev)] * 2) for a in (*args[:4], v, kc, vc))
        qo, ko, kco, vco = layers(x, pos, put(slots, dev))
        qk.synchronize(qo, ko, kco, vco)
        # XLA hands the scan body's call slices of the stacked results, not the operands:
        # the handler's copy path ran (docs/jax.md), so these parities test it
        assert qk.cache_copies > 0, "the scan body's caches were not copied into results"
        one = tuple(put(a, dev) for a in (*args[:4], v, kc, vc))
        qo1, none, kc1, vc1 = no_k(one, pos, put(slots, dev))
        qk.synchronize(qo, ko, kco, vco, qo1, kc1, vc1)
        for layer in range(2):
            assert rope_bad(comm, (qo[layer], ko[layer]), mine) == 0, f"layer {layer}"
            assert caches_match(comm, kv, heads, (kco[layer], vco[layer]), (kc, vc),
                                (bf16_bits(ko[layer]), v), slots, (0.7, 3.0)), f"layer {layer}"
        ok = none is None and np.array_equal(bf16_bits(qo1), bf16_bits(qo[0])) and \
            np.array_equal(np.asarray(kc1).view(np.uint8), np.asarray(kco[0]).view(np.uint8)) \
            and np.array_equal(np.asarray(vc1).view(np.uint8), np.asarray(vco[0]).view(np.uint8))
        assert all(comm.allgather(ok)), "store_k=False"


def test_kv_cache_slot_outside_raises_slot_error(comm):
    """Rank 0's token 7 has a slot past its cache: synchronize() raises SlotError there,
    naming it (the device checks it); the peers' calls succeed."""
    dev = jax_device()
    q_dim, k_dim = dims_for(comm.size)
    kv = KVCache(16, 128, None)
    args, v, kc, vc, slots, _, _ = cache_inputs(comm, 60, 20, kv)
    if comm.rank == 0:
        slots[7] = kc.shape[0] * 16
    err = None
    with JaxQKNorm(comm, q_dim, k_dim, "bfloat16", rope=MINIMAX, backend="gpu",
                   kv_cache=kv) as qk:
        f = jax.jit(lambda q, k, qw, kw, p, v, kc, vc, s: qk(
            q, k, qw, kw, p, v=v, k_cache=kc, v_cache=vc, slot_mapping=s))
        try:
            with qk.errors():
                qk.synchronize(*f(*(put(a, dev) for a in (*args, v, kc, vc, slots))))
        except Exception as e:  # noqa: BLE001 - checked below
            err = e
        comm.Barrier()
    if comm.rank == 0:
        ok = type(err) is SlotError and (err.token, err.slot) == (7, kc.shape[0] * 16)
    else:
        ok = err is None
    assert all(comm.allgather(ok)), f"rank {comm.rank}: {err!r}"
