"""The norm followed by RoPE, on the GPU, against the float64 reference (norm, then the
rotation with the same fp32 cos/sin values, rounded once): every transport, dtype and
layout, chunked T, strided qkv views, in place and out of place, positions up to the end
of MiniMax M2's table, CUDA graph replays with new positions, and a position outside the
table. Outputs are poisoned before each run. Run by scripts/gpu_suite.sh."""
import functools

import numpy as np
import pytest

from cupy_qknorm import ClosedError, PositionError, RoPE, TPQKNorm
from cupy_qknorm import reference as ref
from cupy_qknorm.bench import separate_rope
from tests.conftest import requires_gpu
from tests.gpu.test_gpu import dims_for, shards

pytestmark = [requires_gpu, pytest.mark.mpi(min_size=1)]

MINIMAX = RoPE.minimax_m2()


@functools.lru_cache(maxsize=None)
def table_of(rows, rotary_dim, theta):
    return ref.rope_table(rows, rotary_dim, theta)


def rope_case(comm, seed, tokens, dtype, rope=MINIMAX, wdtype=None, eps=1e-6, weights=None,
              positions=None):
    """Shards of (q, k, q_weight, k_weight), positions on the device, and this rank's
    slices of the reference (y, magnitude) for q and k. `weights`: the full (q_weight,
    k_weight) to use instead of the seed's; `positions`: the tokens' (numpy) instead of
    the seed's."""
    import cupy
    q_dim, k_dim = dims_for(comm.size)
    q, k, qw, kw, _, _ = ref.make_case(seed, tokens, q_dim, k_dim, dtype, wdtype, eps)
    if weights is not None:
        qw, kw = weights
    rows = rope.rows()
    rng = np.random.default_rng(seed + 1)
    pos = rng.integers(0, rows, tokens)
    if tokens:
        pos[0] = rows - 1           # the table's last row
    if tokens > 1:
        pos[1] = 0
    if positions is not None:
        pos = np.asarray(positions)
    table = rope.table.get() if rope.table is not None else \
        table_of(rows, rope.rotary_dim, float(rope.theta))
    wdt = wdtype or dtype
    qy, ky, qm, km = ref.qk_norm_rope(
        ref.to_f64(q, dtype), ref.to_f64(k, dtype), ref.to_f64(qw, wdt), ref.to_f64(kw, wdt),
        eps, pos, table, rope.head_dim, rope.rotary_dim, rope.style)
    mine = [ref.shard(a, comm.size, comm.rank) for a in (qy, ky, qm, km)]
    return shards((q, k, qw, kw), comm), cupy.asarray(pos), mine


def poisoned(like, dtype):
    import cupy
    return cupy.full_like(like, ref.poison(dtype))


def assert_rope_close(comm, outs, mine, dtype, what):
    from mpi4py import MPI
    qy, ky, qm, km = mine
    errs = [ref.compare_rope(o.get(), y, m, dtype) for o, y, m in zip(outs, (qy, ky), (qm, km))]
    worst = comm.allreduce(max(e[0] for e in errs), op=MPI.MAX)
    bad = comm.allreduce(sum(e[1] for e in errs), op=MPI.SUM)
    assert bad == 0, f"{what}: {bad} elements past tolerance, max error {worst}"


def run_rope(norm, comm, seed, tokens, dtype, wdtype=None, rope=MINIMAX):
    (qs, ks, qws, kws), pos, mine = rope_case(comm, seed, tokens, dtype, rope, wdtype)
    outs = [poisoned(qs, dtype), poisoned(ks, dtype)]
    got = norm(qs, ks, qws, kws, out=outs, positions=pos)
    assert got[0] is outs[0] and got[1] is outs[1]
    norm.synchronize()
    assert_rope_close(comm, outs, mine, dtype, f"T={tokens} {dtype}/{wdtype}")


@pytest.mark.parametrize("transport", ["ipc", "nccl", "mpi"])
@pytest.mark.parametrize("dtype,wdtype", [("bfloat16", None), ("bfloat16", "float32"),
                                          ("float16", None), ("float32", None)])
def test_rope_parity(comm, transport, dtype, wdtype):
    q_dim, k_dim = dims_for(comm.size)
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=1024, transport=transport,
                  rope=MINIMAX) as norm:
        sizes = [0, 1, 2, 7, 64, 1000]
        if dtype == "bfloat16" and wdtype is None:
            sizes += [2500]  # three chunks, each with its own positions
        for i, tokens in enumerate(sizes):
            run_rope(norm, comm, 100 * i + 9, tokens, dtype, wdtype)


@pytest.mark.parametrize("layout", ["narrow", "wide"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_rope_each_layout(comm, dtype, layout):
    q_dim, k_dim = dims_for(comm.size)
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=1024, transport="ipc",
                  rope=MINIMAX) as norm:
        t = norm._transport
        t.wide_from = 1 if layout == "wide" else 10 ** 9
        for i, tokens in enumerate([1, 3, 300, 2500]):
            run_rope(norm, comm, 31 * i + 5, tokens, dtype)
        assert {key[1] for key in t._kernels} == {layout}


@pytest.mark.parametrize("transport", ["ipc", "nccl"])
@pytest.mark.parametrize("rope", [RoPE(128, 64, theta=1e4, style="gptj", max_position=4096),
                                  RoPE(128, 128, theta=5e6, max_position=4096)],
                         ids=["gptj", "full"])
def test_rope_styles(comm, transport, rope):
    """GPT-J pairs and a rotation of the whole head (rotary_dim = head_dim)."""
    q_dim, k_dim = dims_for(comm.size)
    with TPQKNorm(comm, q_dim, k_dim, "bfloat16", max_tokens=512, transport=transport,
                  rope=rope) as norm:
        for i, tokens in enumerate([1, 33, 700]):
            run_rope(norm, comm, 7 * i + 1, tokens, "bfloat16", rope=rope)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_rope_pairs_across_lanes(comm, dtype):
    """The NeoX layout whose pairs sit in two lanes of a warp (a shuffle; lower-half lanes
    keep -sin), which MiniMax's shapes no longer take on sm_90: a whole-head rotation in
    the wide layout does not fit the paired one. The fused call, and in fp32 (one rounding
    more stays within its tolerance) the separate RoPE kernel after the norm alone."""
    import cupy
    rope = RoPE(128, 128, theta=5e6, max_position=4096)
    q_dim, k_dim = dims_for(comm.size)
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=512, transport="ipc",
                  rope=rope) as norm, \
            TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=512, transport="ipc") as plain:
        norm._transport.wide_from = 1
        for i, tokens in enumerate([1, 33, 700]):
            run_rope(norm, comm, 5 * i + 2, tokens, dtype, rope=rope)
        assert {key[1] for key in norm._transport._kernels} == {"wide"}
        if dtype != "float32":
            return
        (qs, ks, qws, kws), pos, mine = rope_case(comm, 77, 40, dtype, rope)
        outs = [poisoned(qs, dtype), poisoned(ks, dtype)]
        plain(qs, ks, qws, kws, out=outs)
        plain.synchronize()
        separate_rope(norm, outs[0], outs[1], pos)(cupy.cuda.get_current_stream())
        norm.synchronize()
        assert_rope_close(comm, outs, mine, dtype, "norm, then the RoPE kernel across lanes")


def test_rope_user_table(comm):
    """An engine's own table (here: angles rounded the way engines compute them, in
    fp32), given as a CuPy array, is used as given."""
    import cupy
    rows, rot = 8192, 64
    inv = (5e6 ** (-np.arange(0, rot, 2, dtype=np.float32) / np.float32(rot))).astype(np.float32)
    ang = np.arange(rows, dtype=np.float32)[:, None] * inv[None, :]
    table = np.concatenate([np.cos(ang), np.sin(ang)], axis=1).astype(np.float32)
    rope = RoPE(128, rot, table=cupy.asarray(table))
    q_dim, k_dim = dims_for(comm.size)
    with TPQKNorm(comm, q_dim, k_dim, "bfloat16", max_tokens=256, transport="ipc",
                  rope=rope) as norm:
        run_rope(norm, comm, 3, 100, "bfloat16", rope=rope)


@pytest.mark.parametrize("transport", ["ipc", "nccl"])
def test_rope_in_place_strided_qkv(comm, transport):
    """q and k are views into one fused qkv buffer (strided rows), normalized and rotated
    in place; v is not touched."""
    import cupy
    dtype = "bfloat16"
    q_dim, k_dim = dims_for(comm.size)
    dq, dk = q_dim // comm.size, k_dim // comm.size
    tokens = 333
    (qs, ks, qws, kws), pos, mine = rope_case(comm, 5, tokens, dtype)
    qkv = cupy.zeros((tokens, dq + 2 * dk + 8), cupy.uint16)
    qkv[:, :dq] = qs
    qkv[:, dq:dq + dk] = ks
    v = cupy.asarray(np.random.default_rng(comm.rank).integers(0, 2**16, (tokens, dk)),
                     cupy.uint16)
    qkv[:, dq + dk:dq + 2 * dk] = v
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=128, transport=transport,
                  rope=MINIMAX) as norm:
        norm(qkv[:, :dq], qkv[:, dq:dq + dk], qws, kws, positions=pos.astype(cupy.int32))
        norm.synchronize()
    assert_rope_close(comm, [qkv[:, :dq], qkv[:, dq:dq + dk]], mine, dtype, "strided")
    assert bool((qkv[:, dq + dk:dq + 2 * dk] == v).all()), "v was touched"


@pytest.mark.parametrize("transport", ["ipc", "nccl"])
def test_rope_graph_replays_with_new_positions(comm, transport):
    """Calls captured in one CUDA graph read the positions buffer at every replay: new
    positions (and new rows) written between replays give new, exact results."""
    import cupy
    dtype = "bfloat16"
    q_dim, k_dim = dims_for(comm.size)
    sizes = (1, 600, 64)  # 600 > max_tokens: two launches inside the graph
    top = max(sizes)
    q_dim, k_dim = dims_for(comm.size)
    _, _, qw, kw, _, _ = ref.make_case(1, 1, q_dim, k_dim, dtype)
    (qs, ks, qws, kws), pos, _ = rope_case(comm, 1, top, dtype, weights=(qw, kw))
    qin, kin = cupy.empty_like(qs), cupy.empty_like(ks)
    pin = cupy.empty_like(pos)
    outs = [cupy.empty_like(qs), cupy.empty_like(ks)]
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=512, transport=transport,
                  rope=MINIMAX) as norm:
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            qin[...] = qs
            kin[...] = ks
            pin[...] = pos
            norm(qin[:8], kin[:8], qws, kws, out=(outs[0][:8], outs[1][:8]),
                 positions=pin[:8])
            stream.synchronize()
            stream.begin_capture()
            for t in sizes:
                norm(qin[:t], kin[:t], qws, kws, out=(outs[0][:t], outs[1][:t]),
                     positions=pin[:t])
            graph = stream.end_capture()
            for rep in range(4):
                # new rows and positions, the weights the graph was captured with
                (q2, k2, _, _), p2, mine = rope_case(comm, 50 + rep, top, dtype,
                                                     weights=(qw, kw))
                qin[...] = q2
                kin[...] = k2
                pin[...] = p2
                outs[0].fill(ref.poison(dtype))
                outs[1].fill(ref.poison(dtype))
                graph.launch(stream)
                stream.synchronize()
                # the rows each call covers; the last call (64) leaves 64..599 of the 600
                assert_rope_close(comm, outs, mine, dtype, f"replay {rep}")
            stream.synchronize()
        norm.synchronize()
        del graph


@pytest.mark.parametrize("transport", ["ipc", "nccl"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_positions_written_just_before_each_call(comm, transport, tokens):
    """Each call's positions are written into one buffer by the kernel launched just
    before it on the same stream (a copy, no synchronization). The fused kernel may start
    while that copy runs (PDL) and reads its first position before its wait, to prefetch
    the angles: it rotates by the positions written, never by those they replace."""
    import cupy
    dtype = "bfloat16"
    q_dim, k_dim = dims_for(comm.size)
    _, _, qw, kw, _, _ = ref.make_case(3, 1, q_dim, k_dim, dtype)
    rows = MINIMAX.rows()
    picks = np.random.default_rng(90).permutation(rows)[:6 * tokens].reshape(6, tokens)
    cases = [rope_case(comm, 70 + i, tokens, dtype, weights=(qw, kw), positions=picks[i])
             for i in range(6)]  # every call's first position differs from the last's
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=64, transport=transport,
                  rope=MINIMAX) as norm:
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            pin = cupy.empty_like(cases[0][1])
            outs = [(poisoned(qs, dtype), poisoned(ks, dtype)) for (qs, ks, _, _), _, _ in cases]
            for ((qs, ks, qws, kws), pos, _), out in zip(cases, outs):
                pin[...] = pos  # a copy kernel, then the call at once
                norm(qs, ks, qws, kws, out=out, positions=pin)
            stream.synchronize()
        norm.synchronize()
    for i, ((_, _, mine), out) in enumerate(zip(cases, outs)):
        assert_rope_close(comm, list(out), mine, dtype, f"call {i}")


@pytest.mark.parametrize("transport", ["ipc", "nccl"])
def test_rope_bound_call(comm, transport):
    dtype = "bfloat16"
    q_dim, k_dim = dims_for(comm.size)
    (qs, ks, qws, kws), pos, mine = rope_case(comm, 8, 77, dtype)
    outs = [poisoned(qs, dtype), poisoned(ks, dtype)]
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=128, transport=transport,
                  rope=MINIMAX) as norm:
        call = norm.bind(qs, ks, qws, kws, out=outs, positions=pos)
        for _ in range(3):
            outs[0].fill(ref.poison(dtype))
            call()
            norm.synchronize()
            assert_rope_close(comm, outs, mine, dtype, "bound")


def test_separate_rope_kernel_matches_the_fused_call(comm):
    """The benchmark's baseline (the norm, then the separate RoPE kernel in place) gives
    the reference too (it rounds twice: within 1 ulp of the magnitude, plus one)."""
    import cupy
    dtype = "float32"
    q_dim, k_dim = dims_for(comm.size)
    (qs, ks, qws, kws), pos, mine = rope_case(comm, 4, 300, dtype)
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=512, transport="ipc") as plain, \
            TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=512, transport="ipc",
                     rope=MINIMAX) as rope:
        outs = [poisoned(qs, dtype), poisoned(ks, dtype)]
        plain(qs, ks, qws, kws, out=outs)
        separate_rope(rope, outs[0], outs[1], pos)(cupy.cuda.get_current_stream())
        rope.synchronize()
        plain.synchronize()
        assert_rope_close(comm, outs, mine, dtype, "norm, then the RoPE kernel")
        fused = [poisoned(qs, dtype), poisoned(ks, dtype)]
        rope(qs, ks, qws, kws, out=fused, positions=pos)
        rope.synchronize()
        for a, b in zip(outs, fused):
            assert float(cupy.abs(a - b).max()) <= 1e-5 * float(cupy.abs(b).max())


@pytest.mark.parametrize("transport", ["ipc", "nccl"])
def test_position_outside_the_table(comm, transport):
    """Token 3 has position max_position: the device catches it, reads nothing out of
    bounds (the suite runs this under compute-sanitizer memcheck) and leaves its row
    unwritten; synchronize() raises PositionError naming the token, on every rank."""
    dtype = "bfloat16"
    q_dim, k_dim = dims_for(comm.size)
    (qs, ks, qws, kws), pos, mine = rope_case(comm, 2, 10, dtype)
    pos[3] = MINIMAX.rows()
    outs = [poisoned(qs, dtype), poisoned(ks, dtype)]
    norm = TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=64, transport=transport,
                    timeout_s=2.0, rope=MINIMAX)
    try:
        norm(qs, ks, qws, kws, out=outs, positions=pos)
        with pytest.raises(PositionError, match="token 3") as info:
            norm.synchronize()
        assert info.value.token == 3 and info.value.position == MINIMAX.rows()
        p = ref.poison(dtype)
        assert bool((outs[0][3] == p).all()) and bool((outs[1][3] == p).all())
        good = np.array([i for i in range(10) if i != 3])
        assert_rope_close(comm, [outs[0][good], outs[1][good]],
                          [m[good] for m in mine], dtype, "the other rows")
        with pytest.raises(ClosedError):
            norm(qs, ks, qws, kws, positions=pos)
    finally:
        comm.Barrier()
        norm.close()
