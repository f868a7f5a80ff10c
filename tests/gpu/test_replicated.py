"""KV heads fewer than the ranks, on the GPU: one KV head of 128 on every rank (at G=2,
TP16's path for MiniMax: each head on two ranks), against the float64 truth that counts
each distinct head once, on every transport, with and without RoPE, chunked T; and the
model presets at the G this host runs. Outputs are poisoned before each run. Run by
scripts/gpu_suite.sh (at G=1 the head is not replicated: the plain path, the same
assertions)."""
import functools

import numpy as np
import pytest

from cupy_qknorm import RoPE, TPQKNorm
from cupy_qknorm import reference as ref
from cupy_qknorm.models import get
from tests.conftest import requires_gpu

pytestmark = [requires_gpu, pytest.mark.mpi(min_size=1)]

TRANSPORTS = ["ipc", "nccl", "mpi"]
IDS = ["ipc", "nccl", "mpi-gpu"]
HEAD = 128


@functools.lru_cache(maxsize=16)
def case(q_dim, k_dim, seed, tokens, dtype, rope, eps):
    """Full rows, positions (or None) and the float64 truth (y and, with RoPE, the
    magnitudes), computed once for every transport."""
    q, k, qw, kw, qr, kr = ref.make_case(seed, tokens, q_dim, k_dim, dtype, eps=eps)
    pos, mags = None, (None, None)
    if rope is not None:
        pos = np.random.default_rng(seed).integers(0, rope.max_position, tokens)
        if tokens:
            pos[0] = rope.max_position - 1
        qr, kr, *mags = ref.qk_norm_rope(
            ref.to_f64(q, dtype), ref.to_f64(k, dtype), ref.to_f64(qw, dtype),
            ref.to_f64(kw, dtype), eps, pos,
            ref.shared_table(rope.max_position, rope.rotary_dim, rope.theta), rope.head_dim,
            rope.rotary_dim, rope.style)
    return (q, k, qw, kw), pos, (qr, kr), mags


def run(comm, norm, seed, tokens, dtype, kv_heads, rope=None, eps=1e-6):
    """One call on this rank's slices (q split, k's heads split or replicated) into
    poisoned outputs; returns this rank's problems against the float64 truth."""
    import cupy
    g, r, cfg = comm.size, comm.rank, norm.config
    (q, k, qw, kw), pos, (qr, kr), mags = case(cfg.q_dim, cfg.k_dim, seed, tokens, dtype,
                                               rope, eps)
    kwargs = {} if pos is None else {"positions": cupy.asarray(pos)}

    def mine(x, is_k):
        return ref.shard_heads(x, g, r, kv_heads) if is_k else ref.shard(x, g, r)
    qs, ks, qws, kws = (cupy.asarray(np.ascontiguousarray(mine(a, i % 2)))
                        for i, a in enumerate((q, k, qw, kw)))
    outs = [cupy.full_like(qs, ref.poison(dtype)), cupy.full_like(ks, ref.poison(dtype))]
    norm(qs, ks, qws, kws, out=outs, **kwargs)
    norm.synchronize()
    problems = []
    for i, (o, y, m) in enumerate(zip(outs, (qr, kr), mags)):
        want = mine(y, i)
        got = o.get()
        err, bad = ref.compare(got, want, dtype) if m is None else \
            ref.compare_rope(got, want, mine(m, i), dtype)
        if bad:
            problems.append(f"T={tokens} {'qk'[i]}: {bad} past tolerance, max error {err}")
    return problems


def agree(comm, problems):
    found = [f"rank {r}: {p}" for r, ps in enumerate(comm.allgather(problems)) for p in ps]
    assert not found, "; ".join(found)


@pytest.mark.parametrize("rope", [None, RoPE.minimax_m2()], ids=["norm", "rope"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("transport", TRANSPORTS, ids=IDS)
def test_one_kv_head_on_every_rank(comm, transport, dtype, rope):
    """k is one head of 128 that every rank holds; q 2 heads a rank. Chunks of 1024."""
    g = comm.size
    with TPQKNorm(comm, 2 * HEAD * g, HEAD, dtype, max_tokens=1024, transport=transport,
                  rope=rope, kv_heads=1, head_dim=HEAD) as norm:
        assert norm.transport == transport and norm.config.k_local == HEAD
        assert norm.config.k_replicas == g
        problems = []
        for i, tokens in enumerate([1, 2, 7, 64, 1000, 2500]):  # 2500: three chunks
            problems += run(comm, norm, 41 + i, tokens, dtype, 1, rope)
    agree(comm, problems)


@pytest.mark.parametrize("name", ["minimax-m2", "olmo-3-7b", "olmoe-1b-7b"])
@pytest.mark.parametrize("transport", TRANSPORTS, ids=IDS)
def test_model_preset(comm, transport, name):
    """TPQKNorm.for_model at this host's G, with the model's RoPE where it has one (MiniMax
    M2's partial NeoX, OLMoE's full rotation, OLMo 3's none)."""
    model = get(name)
    if not model.layout(comm.size):
        pytest.skip(f"{name} does not run at G={comm.size}")
    with TPQKNorm.for_model(name, comm, max_tokens=1024, transport=transport) as norm:
        assert norm.transport == transport
        problems = []
        for i, tokens in enumerate([1, 33, 1100]):  # 1100: two chunks
            problems += run(comm, norm, 61 + i, tokens, "bfloat16", model.kv_heads,
                            model.rope, model.eps)
    agree(comm, problems)
