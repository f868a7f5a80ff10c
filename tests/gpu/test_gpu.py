"""GPU suite: run by scripts/gpu_suite.sh at G = 2, 3 and 4 on a GPU host.

Every test compares against the float64 reference (cupy_qknorm.reference) on fresh random
rows of RMS 1e-4..1e3, into outputs poisoned with NaN beforehand."""
import numpy as np
import pytest

from cupy_qknorm import TPQKNorm
from cupy_qknorm import reference as ref
from tests.conftest import requires_gpu

pytestmark = [requires_gpu, pytest.mark.mpi(min_size=1)]

MINIMAX = (6144, 1024)


def dims_for(world):
    """MiniMax's widths where they split evenly (G = 1, 2, 4, 8), else 6144 / 1536
    (G = 3, 6), else 1024 / 128 per rank (G = 5, 7)."""
    from cupy_qknorm.shapes import default_dims
    return default_dims(world)


def shards(arrays, comm):
    import cupy
    return [cupy.asarray(np.ascontiguousarray(ref.shard(a, comm.size, comm.rank)))
            for a in arrays]


def assert_close(comm, outs, refs, dtype, what):
    errs = [ref.compare(o.get(), ref.shard(r, comm.size, comm.rank), dtype)
            for o, r in zip(outs, refs)]
    from mpi4py import MPI
    worst = comm.allreduce(max(e[0] for e in errs), op=MPI.MAX)
    bad = comm.allreduce(sum(e[1] for e in errs), op=MPI.SUM)
    assert bad == 0, f"{what}: {bad} elements past tolerance, max error {worst}"
    return worst


def run_case(norm, comm, seed, tokens, dtype, wdtype=None, eps=1e-6):
    import cupy
    q_dim, k_dim = norm.config.q_dim, norm.config.k_dim
    q, k, qw, kw, qr, kr = ref.make_case(seed, tokens, q_dim, k_dim, dtype, wdtype, eps)
    qs, ks, qws, kws = shards((q, k, qw, kw), comm)
    outs = [cupy.full_like(qs, ref.poison(dtype)), cupy.full_like(ks, ref.poison(dtype))]
    got = norm(qs, ks, qws, kws, out=outs)
    assert got[0] is outs[0] and got[1] is outs[1]
    norm.synchronize()
    return assert_close(comm, outs, (qr, kr), dtype, f"T={tokens} {dtype}/{wdtype}")


@pytest.mark.parametrize("transport", ["ipc", "nccl", "mpi"])
@pytest.mark.parametrize("dtype,wdtype", [("bfloat16", None), ("bfloat16", "float32"),
                                          ("float16", None), ("float32", None)])
def test_parity(comm, transport, dtype, wdtype):
    q_dim, k_dim = dims_for(comm.size)
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=8192, transport=transport) as norm:
        assert norm.transport == transport
        sizes = [0, 1, 2, 7, 64, 1000]
        if dtype == "bfloat16" and wdtype is None:
            sizes += [8192, 20000]  # 20000 > max_tokens: three chunks
        for i, tokens in enumerate(sizes):
            run_case(norm, comm, 100 * i + 7, tokens, dtype, wdtype)


@pytest.mark.parametrize("layout", ["narrow", "wide"])
@pytest.mark.parametrize("dtype,wdtype", [("bfloat16", None), ("bfloat16", "float32"),
                                          ("float16", None), ("float32", None)])
def test_parity_each_layout(comm, dtype, wdtype, layout):
    """Each layout of the fused kernel for every dtype, at small and chunked T: the
    threshold is moved so that one layout takes every launch (by default the wide one,
    whose rows are staged in shared memory, runs only from tuning.wide_from's tokens)."""
    q_dim, k_dim = dims_for(comm.size)
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=1024, transport="ipc") as norm:
        t = norm._transport
        t.wide_from = 1 if layout == "wide" else 10 ** 9
        for i, tokens in enumerate([1, 2, 3, 7, 300, 2500]):  # 2500: three chunks
            run_case(norm, comm, 31 * i + 3, tokens, dtype, wdtype)
        assert {key[1] for key in t._kernels} == {layout}


@pytest.mark.parametrize("transport", ["ipc", "nccl"])
def test_in_place_strided_qkv(comm, transport):
    """q and k are views into one fused qkv buffer (strided rows), normalized in place."""
    import cupy
    dtype = "bfloat16"
    q_dim, k_dim = dims_for(comm.size)
    dq, dk = q_dim // comm.size, k_dim // comm.size
    tokens = 333
    q, k, qw, kw, qr, kr = ref.make_case(5, tokens, q_dim, k_dim, dtype)
    qs, ks, qws, kws = shards((q, k, qw, kw), comm)
    qkv = cupy.zeros((tokens, dq + 2 * dk + 8), cupy.uint16)  # 8 spare: a 16-byte-multiple pad
    qkv[:, :dq] = qs
    qkv[:, dq:dq + dk] = ks
    v = cupy.asarray(np.random.default_rng(comm.rank).integers(0, 2**16, (tokens, dk)),
                     cupy.uint16)
    qkv[:, dq + dk:dq + 2 * dk] = v
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=128, transport=transport) as norm:
        qv, kv = qkv[:, :dq], qkv[:, dq:dq + dk]
        norm(qv, kv, qws, kws)
        norm.synchronize()
    assert_close(comm, [qkv[:, :dq], qkv[:, dq:dq + dk]], (qr, kr), dtype, "strided in place")
    assert bool((qkv[:, dq + dk:dq + 2 * dk] == v).all()), "v was touched"


@pytest.mark.parametrize("transport", ["ipc", "nccl"])
def test_zero_nan_inf_rows(comm, transport):
    """Zero rows with eps = 0 give NaN (0/0, as the reference); NaN and Inf stay in their
    row; no hang, and the next call is exact."""
    import cupy
    dtype = "float32"
    q_dim, k_dim = dims_for(comm.size)
    q, k, qw, kw, qr, kr = ref.make_case(11, 16, q_dim, k_dim, dtype, eps=0.0)
    q[3] = 0.0
    k[3] = 0.0
    q[5, 0] = np.nan
    k[7, -1] = np.inf
    qr, kr = ref.qk_norm(q, k, qw, kw, 0.0)
    with TPQKNorm(comm, q_dim, k_dim, dtype, eps=0.0, max_tokens=64,
                  transport=transport) as norm:
        qs, ks, qws, kws = shards((q, k, qw, kw), comm)
        outs = [cupy.full_like(qs, np.nan), cupy.full_like(ks, np.nan)]
        norm(qs, ks, qws, kws, out=outs)
        norm.synchronize()
        assert_close(comm, outs, (qr, kr), dtype, "zero/NaN/Inf rows")
        o = outs[0].get()
        assert np.isnan(o[3]).all() and np.isnan(o[5]).all()
        bad = np.isnan(o).any(axis=1)
        assert list(np.nonzero(bad)[0]) == [3, 5]
        run_case(norm, comm, 12, 40, dtype, eps=0.0)


def test_back_to_back_random_tokens(comm):
    """10,000 calls with a random T each (the same on every rank), checked along the way
    and at the end: the slot halves and counters stay consistent across any T sequence,
    with launches of both layouts back to back (chunks of wide_from tokens take the wide one)."""
    import cupy
    from cupy_qknorm.tuning import wide_from
    WIDE_FROM = wide_from(comm.size)
    dtype = "bfloat16"
    q_dim, k_dim = dims_for(comm.size)
    q, k, qw, kw, qr, kr = ref.make_case(21, 5000, q_dim, k_dim, dtype)
    qs, ks, qws, kws = shards((q, k, qw, kw), comm)
    rng = np.random.default_rng(99)
    sizes = np.where(rng.random(10_000) < 0.9, rng.integers(1, 65, 10_000),
                     rng.integers(1, 5001, 10_000))
    outs = [cupy.empty_like(qs), cupy.empty_like(ks)]
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=WIDE_FROM,
                  transport="ipc") as norm:
        for i, t in enumerate(sizes):
            t = int(t)
            if i % 1000 == 999 or i == len(sizes) - 1:
                outs[0].fill(ref.poison(dtype))
                outs[1].fill(ref.poison(dtype))
                norm(qs[:t], ks[:t], qws, kws, out=(outs[0][:t], outs[1][:t]))
                norm.synchronize()
                assert_close(comm, [outs[0][:t], outs[1][:t]], (qr[:t], kr[:t]), dtype,
                             f"call {i} (T={t})")
            else:
                norm(qs[:t], ks[:t], qws, kws, out=(outs[0][:t], outs[1][:t]))


@pytest.mark.parametrize("transport", ["ipc", "nccl"])
def test_cuda_graph_replay(comm, transport):
    """Capture calls of three sizes in one CUDA graph; 100 replays; exact every time."""
    import cupy
    dtype = "bfloat16"
    q_dim, k_dim = dims_for(comm.size)
    q, k, qw, kw, qr, kr = ref.make_case(31, 600, q_dim, k_dim, dtype)
    qs, ks, qws, kws = shards((q, k, qw, kw), comm)
    outs = [cupy.empty_like(qs), cupy.empty_like(ks)]
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=512, transport=transport) as norm:
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            norm(qs[:8], ks[:8], qws, kws, out=(outs[0][:8], outs[1][:8]))  # warm up
            stream.synchronize()
            stream.begin_capture()
            for t in (1, 600, 64):  # 600 > max_tokens: two launches inside the graph
                norm(qs[:t], ks[:t], qws, kws, out=(outs[0][:t], outs[1][:t]))
            graph = stream.end_capture()
            for rep in range(100):
                if rep % 25 == 0:
                    outs[0].fill(ref.poison(dtype))
                    outs[1].fill(ref.poison(dtype))
                graph.launch(stream)
                if rep % 25 == 0:
                    stream.synchronize()
                    assert_close(comm, outs, (qr, kr), dtype, f"replay {rep}")
            stream.synchronize()
        norm.synchronize()
        # NCCL's teardown waits until every graph holding its collectives is destroyed
        # (the "nccl" test hung in close() while `graph` was alive, H100, 2026-11-27)
        del graph
    assert_close(comm, outs, (qr, kr), dtype, "after 100 replays")


@pytest.mark.mpi(min_size=4)
def test_two_groups_side_by_side(comm):
    """Two TP groups of 2 from Split, each with its own object, called at the same time."""
    sub = comm.Split(comm.rank // 2, comm.rank)
    try:
        with TPQKNorm(sub, *MINIMAX, "bfloat16", max_tokens=256, transport="ipc") as norm:
            for i, tokens in enumerate((1, 100, 700)):
                run_case(norm, sub, 40 + i + 1000 * (comm.rank // 2), tokens, "bfloat16")
    finally:
        sub.Free()


@pytest.mark.parametrize("transport,tokens", [
    ("ipc", (9, 2048, 3000)), ("nccl", (9, 3000)), ("mpi", (9,))])
def test_bound_call(comm, transport, tokens):
    """bind() validates once; each call normalizes the buffers' current contents. Bound
    calls of both layouts (9: narrow, 2048: wide) and a chunked one (3000 > max_tokens)
    alternate, each with its own packed parameters, eager and captured in a graph."""
    import cupy
    dtype = "bfloat16"
    q_dim, k_dim = dims_for(comm.size)
    top = max(tokens)
    q, k, qw, kw, qr, kr = ref.make_case(71, top, q_dim, k_dim, dtype)
    qs, ks, qws, kws = shards((q, k, qw, kw), comm)
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=2048, transport=transport) as norm:
        cases = []
        for t in tokens:
            qin, kin = cupy.empty_like(qs[:t]), cupy.empty_like(ks[:t])
            outs = [cupy.empty_like(qin), cupy.empty_like(kin)]
            cases.append((t, qin, kin, outs, norm.bind(qin, kin, qws, kws, out=outs)))
        for rep in range(30):
            for t, qin, kin, outs, call in cases:
                qin[...] = qs[:t]
                kin[...] = ks[:t]
                if rep % 10 == 9:
                    outs[0].fill(ref.poison(dtype))
                    outs[1].fill(ref.poison(dtype))
                got = call()
                assert got[0] is outs[0] and got[1] is outs[1]
                if rep % 10 == 9:
                    norm.synchronize()
                    assert_close(comm, outs, (qr[:t], kr[:t]), dtype, f"bound T={t} rep {rep}")
        if transport == "mpi":
            return  # its launch synchronizes with the host: not capturable
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            for _, _, _, _, call in cases:
                call(stream)
            graph = stream.end_capture()
            for _, _, _, outs, _ in cases:
                outs[0].fill(ref.poison(dtype))
                outs[1].fill(ref.poison(dtype))
            for rep in range(3):
                graph.launch(stream)
            stream.synchronize()
        for t, _, _, outs, _ in cases:
            assert_close(comm, outs, (qr[:t], kr[:t]), dtype, f"bound T={t} in a graph")
        del graph


def test_auto_picks_ipc(comm):
    with TPQKNorm(comm, *dims_for(comm.size), "bfloat16", max_tokens=16) as norm:
        assert norm.transport == "ipc"


class DLPackOnly:
    """Offers only the DLPack protocol, as a JAX or torch tensor does."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kw):
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_dlpack_producers(comm):
    """Inputs and outputs seen only through DLPack: CuPy arrays behind a wrapper, and
    torch bfloat16 tensors where torch is installed (they offer both protocols; the
    array interface has no bf16 typestr of its own, so DLPack's dtype must win). Exact,
    and written in place through the zero-copy views."""
    import cupy
    dtype = "bfloat16"
    q_dim, k_dim = dims_for(comm.size)
    q, k, qw, kw, qr, kr = ref.make_case(61, 37, q_dim, k_dim, dtype)
    qs, ks, qws, kws = shards((q, k, qw, kw), comm)
    outs = [cupy.full_like(qs, ref.poison(dtype)), cupy.full_like(ks, ref.poison(dtype))]
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=64, transport="ipc") as norm:
        norm(*[DLPackOnly(a) for a in (qs, ks, qws, kws)],
             out=(DLPackOnly(outs[0]), DLPackOnly(outs[1])))
        norm.synchronize()
        assert_close(comm, outs, (qr, kr), dtype, "cupy through DLPack")
        try:
            import torch
        except ImportError:
            return
        dev = torch.device("cuda", cupy.cuda.Device().id)
        tq, tk, tqw, tkw = [torch.from_numpy(a.get().view(np.int16)).to(dev).view(torch.bfloat16)
                            for a in (qs, ks, qws, kws)]
        to = [torch.empty_like(tq), torch.empty_like(tk)]
        for t in to:
            t.view(torch.int16).fill_(int(np.uint16(ref.poison(dtype)).view(np.int16)))
        torch.cuda.synchronize(dev)
        norm(tq, tk, tqw, tkw, out=to)
        norm.synchronize()
        torch.cuda.synchronize(dev)
        got = [cupy.asarray(t.view(torch.int16).cpu().numpy().view(np.uint16)) for t in to]
        assert_close(comm, got, (qr, kr), dtype, "torch bfloat16 tensors")
