"""cupy_qknorm.jax across ranks on JAX's CPU backend: the XLA FFI target runs transport
"mpi"'s host path inside jitted functions. Run under
`mpiexec -n G python -m pytest --with-mpi tests/test_jax_mpi.py` (tests/test_launch.py
does, at G = 2 and 3).

Parity against the float64 reference under jit and lax.scan (in place and out of place),
and the faults: a rank whose input is refused at trace time, a T that differs, a rank that
never calls. Each raises a typed error on every rank, within its bound. As in
tests/test_mpi.py, every rank makes every collective step before anything is asserted,
and assertions are collective."""
import time

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="needs jax (pip install -e '.[jax]')")
jnp = pytest.importorskip("jax.numpy")
ml_dtypes = pytest.importorskip("ml_dtypes")

from cupy_qknorm import CallMismatchError, PeerTimeoutError, RoPE  # noqa: E402
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
