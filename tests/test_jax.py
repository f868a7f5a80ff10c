"""cupy_qknorm.jax on JAX's CPU backend, one process (G=1, MPI.COMM_SELF): the XLA FFI
target's plumbing (jit, lax.scan over layers, donation and in place, out of place, RoPE
positions int32 and int64), parity against the float64 reference, the trace-time checks
(TPQKNorm's messages) and the errors of a call; the paged KV-cache write (bf16 and FP8
caches bit for bit against reference.expected_cache, slot -1 holes, a cache per layer
under lax.scan, store_k=False, a slot outside the cache, bad cache arguments).
tests/test_jax_mpi.py runs the same target across ranks; tests/gpu/test_jax.py on a GPU."""
import functools
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT


def test_importing_the_package_never_imports_jax():
    code = ("import sys, cupy_qknorm\n"
            "from cupy_qknorm import TPQKNorm, RoPE, xla_ffi\n"
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


jax = pytest.importorskip("jax", reason="needs jax (pip install -e '.[jax]')")
jnp = pytest.importorskip("jax.numpy")
ml_dtypes = pytest.importorskip("ml_dtypes")
from mpi4py import MPI  # noqa: E402

from cupy_qknorm import (ClosedError, KVCache, PositionError, RoPE, SlotError,  # noqa: E402
                         TPQKNorm)
from cupy_qknorm import reference as ref  # noqa: E402
from cupy_qknorm.jax import JaxQKNorm  # noqa: E402

Q, K = 256, 128  # two heads of 128 and one


def to_jax(a):
    """numpy (bf16 as uint16 bits) -> jax.Array."""
    return jnp.asarray(a.view(ml_dtypes.bfloat16) if a.dtype == np.uint16 else a)


def to_np(x, dtype):
    a = np.asarray(x)
    return a.view(np.uint16) if dtype == "bfloat16" else a


def bad(out, want, dtype):
    return ref.compare(to_np(out, dtype), want, dtype)[1]


@pytest.fixture(scope="module")
def norms():
    made = {}

    def get(dtype, rope=None):
        key = (dtype, rope)
        if key not in made:
            made[key] = JaxQKNorm(MPI.COMM_SELF, Q, K, dtype, max_tokens=16, rope=rope,
                                  backend="cpu")
        return made[key]
    yield get
    for n in made.values():
        n.close()


@pytest.mark.parametrize("dtype,wdtype", [("bfloat16", None), ("bfloat16", "float32"),
                                          ("float16", None), ("float32", None)])
def test_jit_parity_out_of_place_and_in_place(norms, dtype, wdtype):
    qk = norms(dtype)
    out_of_place = jax.jit(lambda q, k, qw, kw: qk(q, k, qw, kw))
    in_place = jax.jit(lambda q, k, qw, kw: qk(q, k, qw, kw, in_place=True),
                       donate_argnums=(0, 1))
    for i, tokens in enumerate((0, 1, 7, 40)):  # 40 > max_tokens: chunks
        q, k, qw, kw, qr, kr = ref.make_case(10 + i, tokens, Q, K, dtype, wdtype)
        jq, jk = to_jax(q), to_jax(k)
        qo, ko = out_of_place(jq, jk, to_jax(qw), to_jax(kw))
        assert bad(qo, qr, dtype) == 0 and bad(ko, kr, dtype) == 0
        assert np.array_equal(to_np(jq, dtype), q)  # the inputs stay as they were
        jq, jk = to_jax(q), to_jax(k)
        addr = (jq.unsafe_buffer_pointer(), jk.unsafe_buffer_pointer()) if tokens else None
        qo, ko = in_place(jq, jk, to_jax(qw), to_jax(kw))
        assert bad(qo, qr, dtype) == 0 and bad(ko, kr, dtype) == 0
        if addr:  # donated: the results live in the inputs' buffers
            assert (qo.unsafe_buffer_pointer(), ko.unsafe_buffer_pointer()) == addr


@pytest.mark.parametrize("positions_dtype", ["int32", "int64"])
def test_scan_over_layers_with_rope(norms, positions_dtype):
    """Several layers under lax.scan in one jit, each with its own weights, the norm and
    RoPE of each layer's q and k at the same positions; replayed on fresh data."""
    rope = RoPE(128, 64, theta=5e6, max_position=4096)
    table = ref.rope_table(4096, 64, 5e6)
    qk = norms("bfloat16", rope)
    layers, tokens = 3, 9

    @jax.jit
    def prologue(q, k, qw, kw, pos):
        def step(carry, x):
            return carry, qk(*x, pos, in_place=True)
        return jax.lax.scan(step, 0, (q, k, qw, kw))[1]

    with jax.enable_x64(positions_dtype == "int64"):
        for seed in (1, 2):
            cases = [ref.make_case(100 * seed + i, tokens, Q, K, "bfloat16")
                     for i in range(layers)]
            pos = np.random.default_rng(seed).integers(0, 4096, tokens)
            pos[0] = 4095
            stacked = [np.stack([c[j] for c in cases]) for j in range(4)]
            jpos = jnp.asarray(pos.astype(positions_dtype))
            assert jpos.dtype == positions_dtype
            qo, ko = prologue(*(to_jax(a) for a in stacked), jpos)
            for i, (q, k, qw, kw, _, _) in enumerate(cases):
                qy, ky, qm, km = ref.qk_norm_rope(
                    ref.to_f64(q, "bfloat16"), ref.to_f64(k, "bfloat16"),
                    ref.to_f64(qw, "bfloat16"), ref.to_f64(kw, "bfloat16"), 1e-6, pos, table,
                    128, 64, "neox")
                for o, y, m in ((qo[i], qy, qm), (ko[i], ky, km)):
                    assert ref.compare_rope(to_np(o, "bfloat16"), y, m, "bfloat16")[1] == 0


def _tpqknorm_error(q, k, qw, kw, pos, rope):
    with TPQKNorm(MPI.COMM_SELF, Q, K, "bfloat16", rope=rope, transport="mpi") as n:
        try:
            n(q, k, qw, kw, positions=pos)
        except (TypeError, ValueError) as e:
            return e
    raise AssertionError("TPQKNorm took the input")


def test_bad_shapes_and_dtypes_raise_at_trace_time_with_tpqknorms_messages(norms):
    rope = RoPE(128, 64, max_position=64)
    q, k, qw, kw, _, _ = ref.make_case(5, 4, Q, K, "bfloat16")
    pos = np.arange(4, dtype=np.int32)
    f32 = lambda a: ref.to_f64(a, "bfloat16").astype(np.float32)  # noqa: E731
    cases = {
        "k too narrow": (q, k[:, :64], qw, kw, pos),
        "q float32": (f32(q), k, qw, kw, pos),
        "k 1-D": (q, k[0], qw, kw, pos),
        "rows differ": (q, k[:3], qw, kw, pos),
        "weight length": (q, k, qw[:128], kw, pos),
        "weights' dtypes differ": (q, k, qw, f32(kw), pos),
        "positions float": (q, k, qw, kw, pos.astype(np.float32)),
        "positions length": (q, k, qw, kw, pos[:3]),
        "positions missing": (q, k, qw, kw, None),
    }
    qk = norms("bfloat16", rope)
    for name, args in cases.items():
        want = _tpqknorm_error(*args, rope)
        traced = jax.jit(lambda *a: qk(*a[:4], a[4] if len(a) > 4 else None))
        with pytest.raises(type(want)) as got:
            traced(*(to_jax(a) for a in args if a is not None))
        assert str(got.value) == str(want), name
    qk(*(to_jax(a) for a in (q, k, qw, kw, pos)))  # G=1: still usable after refusals
    plain = norms("bfloat16")
    with pytest.raises(TypeError, match="positions given, but this object was built without"):
        jax.jit(plain)(*(to_jax(a) for a in (q, k, qw, kw, pos)))


def test_a_call_error_is_typed_and_closes_the_object():
    """A position outside the table fails the jitted call: XLA raises its error with the
    type in the message; errors() and synchronize() raise PositionError itself; later
    calls raise ClosedError."""
    rope = RoPE(128, 64, max_position=16)
    q, k, qw, kw, _, _ = ref.make_case(6, 3, Q, K, "float32")
    with JaxQKNorm(MPI.COMM_SELF, Q, K, "float32", rope=rope, backend="cpu") as qk:
        f = jax.jit(lambda q, k, qw, kw, p: qk(q, k, qw, kw, p))
        f(q, k, qw, kw, jnp.array([0, 15, 3], jnp.int32))[0].block_until_ready()
        with pytest.raises(Exception) as raw:
            f(q, k, qw, kw, jnp.array([0, 16, 3], jnp.int32))[0].block_until_ready()
        assert "cupy_qknorm PositionError: rank 0: token 1 has position 16" in str(raw.value)
        assert type(qk._take_error()) is PositionError
        with pytest.raises(ClosedError):
            with qk.errors():
                f(q, k, qw, kw, jnp.array([0, 1, 3], jnp.int32))[0].block_until_ready()
        with pytest.raises(ClosedError):
            qk.synchronize()
        with pytest.raises(ClosedError):  # an eager call: the typed error directly
            qk(q, k, qw, kw, jnp.array([0, 1, 3], jnp.int32))


def test_eager_call_and_closed_object():
    q, k, qw, kw, qr, kr = ref.make_case(7, 2, Q, K, "float32")
    qk = JaxQKNorm(MPI.COMM_SELF, Q, K, "float32", backend="cpu")
    assert qk.transport == "mpi" and qk.backend == "cpu"
    qo, ko = qk(jnp.asarray(q), jnp.asarray(k), jnp.asarray(qw), jnp.asarray(kw))
    assert bad(qo, qr, "float32") == 0 and bad(ko, kr, "float32") == 0
    qk.synchronize(qo, ko)
    f = jax.jit(lambda *a: qk(*a))
    f(q, k, qw, kw)
    qk.close()
    qk.close()
    with pytest.raises(ClosedError):
        with qk.errors():
            f(q, k, qw, kw)[0].block_until_ready()
    with pytest.raises(ClosedError):
        qk(q, k, qw, kw)


def test_calls_without_a_tag_take_one_each_in_trace_order():
    """Every call site traced without a tag gets the object's next tag (a lax.scan body's
    one call: one tag for its iterations); an explicit tag is kept and takes none."""
    import re
    q, k, qw, kw, _, _ = (jnp.asarray(a) for a in ref.make_case(8, 4, Q, K, "float32"))
    with JaxQKNorm(MPI.COMM_SELF, Q, K, "float32", max_tokens=16, backend="cpu") as qk:
        def two(q, k):
            a = qk(q, k, qw, kw)
            return a, qk(a[0], a[1], qw, kw), qk(q, k, qw, kw, tag=9)

        def scan(q, k):
            return jax.lax.scan(lambda c, x: (c, qk(x, k, qw, kw)), 0, jnp.stack([q] * 3))[1]

        def tags(f):
            return [int(t) for t in re.findall(r"tag = (-?\d+)", jax.jit(f).lower(q, k).as_text())]
        assert tags(two) == [0, 1, 9]
        assert tags(scan) == [2]
        assert qk.auto_tag() == 3
        qk._sites = 32767  # MAX_TAG + 1 tags, then the first again
        assert (qk.auto_tag(), qk.auto_tag()) == (0, 1)


def test_cpu_backend_runs_transport_mpi_only():
    with pytest.raises(ValueError, match="JAX's CPU backend runs transport 'mpi'"):
        JaxQKNorm(MPI.COMM_SELF, Q, K, transport="ipc", backend="cpu")


# -- the paged KV-cache write ------------------------------------------------------------
FP8 = "float8_e4m3fn"
KV_ROPE = RoPE(128, 64, theta=5e6, max_position=4096)


def poisoned_cache(seed, shape, storage):
    """A cache of random bytes (every slot not written must keep them)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape)) * np.dtype(storage).itemsize
    return rng.integers(0, 256, n, dtype=np.uint8).view(storage).reshape(shape)


def cache_case(seed, tokens, slots_total):
    """(q, k, qw, kw, v, positions, slots): bf16 data at widths Q, K; every fifth token's
    slot -1 (a hole), the others distinct."""
    q, k, qw, kw, _, _ = ref.make_case(seed, tokens, Q, K, "bfloat16")
    rng = np.random.default_rng(seed + 1)
    v = ref.make_case(seed + 2, tokens, Q, K, "bfloat16")[1]
    pos = rng.integers(0, 4096, tokens).astype(np.int32)
    slots = rng.permutation(slots_total)[:tokens].astype(np.int32)
    slots[::5] = -1
    return q, k, qw, kw, v, pos, slots


def k_reference(q, k, qw, kw, pos):
    """The float64 reference of q's and k's outputs after the norm and KV_ROPE."""
    table = ref.rope_table(4096, 64, 5e6)
    return ref.qk_norm_rope(*(ref.to_f64(a, "bfloat16") for a in (q, k, qw, kw)), 1e-6, pos,
                            table, 128, 64, "neox")


@pytest.mark.parametrize("cache_dtype", [None, FP8])
@pytest.mark.parametrize("layout", ["nhd", "pool"])
@pytest.mark.parametrize("scales", ["floats", "arrays"])
def test_kv_cache_bit_for_bit_in_place(cache_dtype, layout, scales):
    """bf16 data; a bf16 (uint16 bits) or FP8 (uint8 bits) cache, NHD or a token pool, the
    scales as static floats or fp32 scalar arrays. The caches come back in the donated
    buffers, equal bit for bit to reference.expected_cache of the k output (checked against
    the float64 reference) and of v; every other byte keeps its poison."""
    block = 4 if layout == "nhd" else 1
    kv = KVCache(block, 128, cache_dtype)
    storage = kv.storage_dtype("bfloat16")
    shape = (6, block, 1, 128) if layout == "nhd" else (24, 1, 128)
    ks, vs = (0.375, 2.5) if scales == "floats" else (jnp.float32(0.375),
                                                       jnp.ones((1,), jnp.float32) * 2.5)
    with JaxQKNorm(MPI.COMM_SELF, Q, K, "bfloat16", max_tokens=8, rope=KV_ROPE,
                   backend="cpu", kv_cache=kv) as qk:
        @functools.partial(jax.jit, donate_argnums=(5, 6))
        def step(q, k, qw, kw, v, kc, vc, pos, slots):
            return qk(q, k, qw, kw, pos, v=v, k_cache=kc, v_cache=vc, slot_mapping=slots,
                      k_scale=ks, v_scale=vs)
        for i, tokens in enumerate((1, 7, 19)):  # 19 > max_tokens: chunks
            q, k, qw, kw, v, pos, slots = cache_case(20 + i, tokens, 24)
            kc, vc = poisoned_cache(i, shape, storage), poisoned_cache(i + 9, shape, storage)
            # the token pool's caches as ml_dtypes' bfloat16 / float8_e4m3fn: the same bits
            typed = {np.dtype(np.uint16): ml_dtypes.bfloat16,
                     np.dtype(np.uint8): ml_dtypes.float8_e4m3fn}[storage]
            jkc, jvc = (jnp.asarray(c.view(typed) if layout == "pool" else c) for c in (kc, vc))
            addr = (jkc.unsafe_buffer_pointer(), jvc.unsafe_buffer_pointer())
            qo, ko, kco, vco = step(*(to_jax(a) for a in (q, k, qw, kw, v)), jkc, jvc,
                                    jnp.asarray(pos), jnp.asarray(slots))
            qy, ky, qm, km = k_reference(q, k, qw, kw, pos)
            assert ref.compare_rope(to_np(qo, "bfloat16"), qy, qm, "bfloat16")[1] == 0
            assert ref.compare_rope(to_np(ko, "bfloat16"), ky, km, "bfloat16")[1] == 0
            assert (kco.unsafe_buffer_pointer(), vco.unsafe_buffer_pointer()) == addr
            assert kco.dtype == (typed if layout == "pool" else storage) and kco.shape == shape
            kco, vco = (np.asarray(c).view(storage) for c in (kco, vco))
            want_k = ref.expected_cache(kc, to_np(ko, "bfloat16"), slots, kv, 1, "bfloat16",
                                        0.375)
            want_v = ref.expected_cache(vc, v, slots, kv, 1, "bfloat16", 2.5)
            assert np.array_equal(kco, want_k), f"T={tokens}: k_cache"
            assert np.array_equal(vco, want_v), f"T={tokens}: v_cache"
            assert not np.array_equal(want_k, kc) or tokens == 1  # rows were written


def test_kv_cache_per_layer_under_scan_and_store_k_false():
    """Three layers under lax.scan in one jit, each with its own FP8 caches (stacked) and
    the same slots; then store_k=False: no k output, the caches as with store_k=True."""
    kv = KVCache(4, 128, FP8)
    layers, tokens, shape = 3, 9, (5, 4, 1, 128)
    with JaxQKNorm(MPI.COMM_SELF, Q, K, "bfloat16", max_tokens=16, rope=KV_ROPE,
                   backend="cpu", kv_cache=kv) as qk:
        @jax.jit
        def prologue(q, k, qw, kw, v, kc, vc, pos, slots):
            def step(carry, x):
                q, k, qw, kw, v, kc, vc = x
                return carry, qk(q, k, qw, kw, pos, in_place=True, v=v, k_cache=kc,
                                 v_cache=vc, slot_mapping=slots, k_scale=0.5, v_scale=0.25)
            return jax.lax.scan(step, 0, (q, k, qw, kw, v, kc, vc))[1]

        cases = [cache_case(40 + i, tokens, 20) for i in range(layers)]
        pos, slots = cases[0][5], cases[0][6]
        stacked = [np.stack([c[j] for c in cases]) for j in range(5)]
        kc = np.stack([poisoned_cache(60 + i, shape, np.uint8) for i in range(layers)])
        vc = np.stack([poisoned_cache(70 + i, shape, np.uint8) for i in range(layers)])
        qo, ko, kco, vco = prologue(*(to_jax(a) for a in stacked), jnp.asarray(kc),
                                    jnp.asarray(vc), jnp.asarray(pos), jnp.asarray(slots))
        for i, (q, k, qw, kw, v, _, _) in enumerate(cases):
            qy, ky, qm, km = k_reference(q, k, qw, kw, pos)
            assert ref.compare_rope(to_np(qo[i], "bfloat16"), qy, qm, "bfloat16")[1] == 0
            assert ref.compare_rope(to_np(ko[i], "bfloat16"), ky, km, "bfloat16")[1] == 0
            want_k = ref.expected_cache(kc[i], to_np(ko[i], "bfloat16"), slots, kv, 1,
                                        "bfloat16", 0.5)
            want_v = ref.expected_cache(vc[i], v, slots, kv, 1, "bfloat16", 0.25)
            assert np.array_equal(np.asarray(kco[i]), want_k), f"layer {i}: k_cache"
            assert np.array_equal(np.asarray(vco[i]), want_v), f"layer {i}: v_cache"

        q, k, qw, kw, v, pos, slots = cases[0]
        no_k = jax.jit(lambda q, k, qw, kw, v, kc, vc, pos, slots: qk(
            q, k, qw, kw, pos, v=v, k_cache=kc, v_cache=vc, slot_mapping=slots, k_scale=0.5,
            v_scale=0.25, store_k=False))
        jk = to_jax(k)
        qo2, ko2, kco2, vco2 = no_k(to_jax(q), jk, to_jax(qw), to_jax(kw), to_jax(v),
                                    jnp.asarray(kc[0]), jnp.asarray(vc[0]), jnp.asarray(pos),
                                    jnp.asarray(slots))
        assert ko2 is None
        assert np.array_equal(to_np(qo2, "bfloat16"), to_np(qo[0], "bfloat16"))
        assert np.array_equal(to_np(jk, "bfloat16"), k)  # k as it was
        assert np.array_equal(np.asarray(kco2), np.asarray(kco[0]))
        assert np.array_equal(np.asarray(vco2), np.asarray(vco[0]))


def run_handler(qk, inputs, caches, store_k, scales):
    """One call through the handler with a call frame laid out as XLA lays it out, whose
    cache results are buffers of their own (zeros): the results, [q_out, (k_out,)
    k_cache_out, v_cache_out]."""
    import ctypes

    from cupy_qknorm import xla_ffi
    from cupy_qknorm.jax import KV, KV_K_SCALE_ARRAY, KV_STORE_K, KV_V_SCALE_ARRAY
    from tests.test_xla_ffi import frame_of
    q, k, qw, kw, v, pos, slots = inputs
    kc, vc = caches
    operands = [q, k, qw, kw, pos, v, kc, vc, slots]
    flags = KV | (KV_STORE_K if store_k else 0)
    attrs = {"handle": (5, qk._handle), "tag": (4, -1)}
    if scales == "arrays":
        operands += [np.full((1,), 0.5, np.float32), np.full((1,), 0.25, np.float32)]
        flags |= KV_K_SCALE_ARRAY | KV_V_SCALE_ARRAY
    else:
        attrs.update(k_scale=(11, 0.5), v_scale=(11, 0.25))
    attrs["kv"] = (4, flags)
    outs = [np.zeros_like(q)] + ([np.zeros_like(k)] if store_k else []) + \
        [np.zeros_like(kc), np.zeros_like(vc)]
    buffers = operands + outs
    codes = {np.dtype(np.uint16): 16, np.dtype(np.uint8): 6, np.dtype(np.int32): 4,
             np.dtype(np.int64): 5, np.dtype(np.float32): 11}
    frame, _keep = frame_of([b.shape for b in buffers], [codes[b.dtype] for b in buffers],
                            len(operands), attrs, ptrs=[b.ctypes.data for b in buffers])
    f = xla_ffi.frame_at(ctypes.addressof(frame))
    qk._execute(f, xla_ffi.scalar_attrs(f))
    return outs


@pytest.mark.parametrize("scales", ["floats", "arrays"])
def test_cache_results_in_buffers_of_their_own_hold_the_cache_and_the_rows(scales):
    """XLA may hand the call cache results that are not the operands' buffers (on a GPU,
    under lax.scan over stacked caches): the handler copies each cache into its result
    first, then writes the rows; the operands are left as they were. With k's output,
    then without (store_k=False: the same caches, k as it was); the scales as attributes
    or as fp32 operands."""
    kv = KVCache(4, 128, FP8)
    shape = (5, 4, 1, 128)
    with JaxQKNorm(MPI.COMM_SELF, Q, K, "bfloat16", max_tokens=16, rope=KV_ROPE,
                   backend="cpu", kv_cache=kv) as qk:
        inputs = cache_case(90, 9, 20)
        q, k, qw, kw, v, pos, slots = inputs
        kc, vc = poisoned_cache(91, shape, np.uint8), poisoned_cache(92, shape, np.uint8)
        before = k.copy(), kc.copy(), vc.copy()
        qo, ko, kco, vco = run_handler(qk, inputs, (kc, vc), True, scales)
        assert qk.cache_copies == 2
        qy, ky, qm, km = k_reference(q, k, qw, kw, pos)
        assert ref.compare_rope(qo, qy, qm, "bfloat16")[1] == 0
        assert ref.compare_rope(ko, ky, km, "bfloat16")[1] == 0
        assert np.array_equal(kco, ref.expected_cache(kc, ko, slots, kv, 1, "bfloat16", 0.5))
        assert np.array_equal(vco, ref.expected_cache(vc, v, slots, kv, 1, "bfloat16", 0.25))
        assert not np.array_equal(kco, kc)  # rows were written
        qo2, kco2, vco2 = run_handler(qk, inputs, (kc, vc), False, scales)
        assert qk.cache_copies == 4
        assert np.array_equal(qo2, qo) and np.array_equal(kco2, kco) and \
            np.array_equal(vco2, vco)
        assert np.array_equal(k, before[0])  # k as it was
        assert np.array_equal(kc, before[1]) and np.array_equal(vc, before[2])


def test_a_slot_outside_the_cache_raises_slot_error_and_closes():
    kv = KVCache(4, 128)
    q, k, qw, kw, v, _, slots = cache_case(80, 5, 12)
    kc = vc = np.zeros((3, 4, 1, 128), np.uint16)
    with JaxQKNorm(MPI.COMM_SELF, Q, K, "bfloat16", backend="cpu", kv_cache=kv) as qk:
        f = jax.jit(lambda q, k, qw, kw, v, kc, vc, s: qk(q, k, qw, kw, v=v, k_cache=kc,
                                                          v_cache=vc, slot_mapping=s))
        args = [to_jax(a) for a in (q, k, qw, kw, v)] + [jnp.asarray(kc), jnp.asarray(vc)]
        f(*args, jnp.asarray(slots))[2].block_until_ready()
        slots[3] = 12
        with pytest.raises(Exception) as raw:
            f(*args, jnp.asarray(slots))[2].block_until_ready()
        assert "cupy_qknorm SlotError: rank 0: token 3 has slot_mapping 12, outside the KV " \
            "cache's 12 slots" in str(raw.value)
        err = qk._take_error()
        assert type(err) is SlotError and (err.token, err.slot) == (3, 12)
        with pytest.raises(ClosedError):
            with qk.errors():
                f(*args, jnp.asarray(slots))[2].block_until_ready()


def _tpqknorm_cache_error(kv, arrays, kwargs):
    with TPQKNorm(MPI.COMM_SELF, Q, K, "bfloat16", transport="mpi", kv_cache=kv) as n:
        try:
            n(*arrays, **kwargs)
        except (TypeError, ValueError) as e:
            return e
    raise AssertionError("TPQKNorm took the input")


def test_bad_cache_arguments_raise_at_trace_time_with_tpqknorms_messages():
    kv = KVCache(4, 128, FP8)
    q, k, qw, kw, v, _, slots = cache_case(90, 4, 12)
    kc = np.zeros((3, 4, 1, 128), np.uint8)
    good = dict(v=v, k_cache=kc, v_cache=kc.copy(), slot_mapping=slots)
    cases = {
        "block size": dict(good, k_cache=np.zeros((6, 2, 1, 128), np.uint8)),
        "head_dim": dict(good, v_cache=np.zeros((3, 4, 1, 64), np.uint8)),
        "HND as its own array": dict(good, k_cache=np.zeros((3, 1, 4, 128), np.uint8)),
        "2-D": dict(good, k_cache=np.zeros((12, 128), np.uint8)),
        "3-D at block_size 4": dict(good, k_cache=np.zeros((12, 1, 128), np.uint8)),
        "bf16 bits for FP8": dict(good, k_cache=np.zeros((3, 4, 1, 128), np.uint16)),
        "blocks differ": dict(good, v_cache=np.zeros((2, 4, 1, 128), np.uint8)),
        "empty": dict(good, k_cache=np.zeros((0, 4, 1, 128), np.uint8),
                      v_cache=np.zeros((0, 4, 1, 128), np.uint8)),
        "v width": dict(good, v=q[:, :64]),
        "v rows": dict(good, v=v[:3]),
        "slots float": dict(good, slot_mapping=slots.astype(np.float32)),
        "slots length": dict(good, slot_mapping=slots[:3]),
        "k_scale negative": dict(good, k_scale=-1.0),
        "v_scale int array": dict(good, v_scale=np.array([2], np.int32)),
        "k_scale 2 values": dict(good, k_scale=np.ones(2, np.float32)),
        "v_cache missing": dict(good, v_cache=None),
        "store_k not a bool": dict(good, store_k=1),
    }
    with JaxQKNorm(MPI.COMM_SELF, Q, K, "bfloat16", backend="cpu", kv_cache=kv) as qk:
        for name, kwargs in cases.items():
            want = _tpqknorm_cache_error(kv, (q, k, qw, kw), kwargs)
            arrs = {n: a for n, a in kwargs.items() if isinstance(a, np.ndarray)}
            static = {n: a for n, a in kwargs.items() if n not in arrs}
            traced = jax.jit(lambda a, arrs: qk(*a, **arrs, **static))
            with pytest.raises(type(want)) as got:  # caches as their own dtype (uint16)
                traced([to_jax(x) for x in (q, k, qw, kw)],
                       {n: jnp.asarray(x) if "cache" in n else to_jax(x)
                        for n, x in arrs.items()})
            assert str(got.value) == str(want), name
        # G=1: still usable after the refusals
        qk(*(to_jax(x) for x in (q, k, qw, kw)), **{n: to_jax(x) for n, x in good.items()})
    plain = JaxQKNorm(MPI.COMM_SELF, Q, K, "bfloat16", backend="cpu")
    with pytest.raises(TypeError, match="but this object was built without kv_cache="):
        plain(*(to_jax(x) for x in (q, k, qw, kw)), **{n: to_jax(x) for n, x in good.items()})
    plain.close()
