"""cupy_qknorm.jax on JAX's CPU backend, one process (G=1, MPI.COMM_SELF): the XLA FFI
target's plumbing (jit, lax.scan over layers, donation and in place, out of place, RoPE
positions int32 and int64), parity against the float64 reference, the trace-time checks
(TPQKNorm's messages) and the errors of a call. tests/test_jax_mpi.py runs the same
target across ranks; tests/gpu/test_jax.py on a GPU."""
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

from cupy_qknorm import (ClosedError, PositionError, RoPE, TPQKNorm)  # noqa: E402
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


def test_cpu_backend_runs_transport_mpi_only():
    with pytest.raises(ValueError, match="JAX's CPU backend runs transport 'mpi'"):
        JaxQKNorm(MPI.COMM_SELF, Q, K, transport="ipc", backend="cpu")
