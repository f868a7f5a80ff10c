"""Faults between ranks, for the GPU transports: each must raise a QKNormError on the ranks
that see it within timeout_s (+ 1 s), with nothing corrupted and the process still
usable. Run by scripts/gpu_suite.sh at G = 2, 3 and 4.

The time each rank took to raise goes, one JSON line per rank and case, to the file named
by QKNORM_TEST_FAULT_LOG when set (the suite collects it for RELIABILITY.md)."""
import json
import os
import time
import warnings

import pytest

from cupy_qknorm import (CallMismatchError, ClosedError, PeerTimeoutError, QKNormError,
                         TPQKNorm, TransportUnavailableError)
from cupy_qknorm import reference as ref
from cupy_qknorm.peers import PeerBuffers
from tests.conftest import requires_gpu
from tests.gpu.test_gpu import dims_for, run_case, shards

pytestmark = [requires_gpu, pytest.mark.mpi(min_size=2)]

TIMEOUT_S = 1.0
DTYPE = "bfloat16"
GPU_TRANSPORTS = ["ipc", "nccl"]


def record(comm, case, transport, **fields):
    path = os.environ.get("QKNORM_TEST_FAULT_LOG")
    if path:
        import cupy
        card = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
        line = json.dumps({"case": case, "transport": transport, "G": comm.size,
                           "rank": comm.rank, "card": card, **fields})
        with open(path, "a") as f:
            f.write(line + "\n")


def case_arrays(comm, tokens, seed=3):
    import cupy
    q_dim, k_dim = dims_for(comm.size)
    q, k, qw, kw, qr, kr = ref.make_case(seed, tokens, q_dim, k_dim, DTYPE)
    qs, ks, qws, kws = shards((q, k, qw, kw), comm)
    outs = [cupy.full_like(qs, ref.poison(DTYPE)), cupy.full_like(ks, ref.poison(DTYPE))]
    return (q_dim, k_dim), (qs, ks, qws, kws), outs, (qr, kr)


def warm_up(norm, qs, ks, qws, kws):
    """One correct call (same T everywhere) into scratch outputs: compiles and loads."""
    import cupy
    scratch = (cupy.empty_like(qs[:1]), cupy.empty_like(ks[:1]))
    norm(qs[:1], ks[:1], qws, kws, out=scratch)
    norm.synchronize()


def untouched(outs):
    p = ref.poison(DTYPE)
    return all(bool((o == p).all()) for o in outs)


def raise_time(fn):
    """(exception or None, seconds until fn() returned or raised)."""
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the caller asserts the type
        return e, time.perf_counter() - t0
    return None, time.perf_counter() - t0


def make(comm, transport, dims, **kw):
    return TPQKNorm(comm, *dims, DTYPE, max_tokens=64, transport=transport,
                    timeout_s=TIMEOUT_S, **kw)


@pytest.mark.parametrize("transport", GPU_TRANSPORTS)
def test_tokens_differ_between_ranks(comm, transport):
    """Rank 0 calls with T=5, the others with T=3. "ipc": every rank sees the peers' token
    count in their slots and raises CallMismatchError at once. "nccl": the token counts
    travel with the sums (CallMismatchError), or the all-reduce of unequal sizes stalls and
    the watchdog ends it (PeerTimeoutError). Nothing is written either way."""
    dims, (qs, ks, qws, kws), outs, _ = case_arrays(comm, 5)
    t = 5 if comm.rank == 0 else 3
    norm = make(comm, transport, dims)
    try:
        warm_up(norm, qs, ks, qws, kws)  # the time to raise must not include compiling
        comm.Barrier()
        t0 = time.perf_counter()
        norm(qs[:t], ks[:t], qws, kws, out=(outs[0][:t], outs[1][:t]))
        err, _ = raise_time(norm.synchronize)
        took = time.perf_counter() - t0
        closed, _ = raise_time(lambda: norm(qs[:t], ks[:t], qws, kws))
    finally:
        close_and_start_again(comm, norm, transport)
    record(comm, "tokens differ", transport, raised=type(err).__name__, seconds=took)
    assert isinstance(err, QKNormError), f"rank {comm.rank}: got {err!r}"
    if transport == "ipc":
        assert isinstance(err, CallMismatchError) and "tokens" in str(err)
        assert took < TIMEOUT_S, f"rank {comm.rank} took {took:.3f} s: waited for a timeout"
    else:
        assert isinstance(err, (CallMismatchError, PeerTimeoutError))
        assert took < TIMEOUT_S + 1, f"rank {comm.rank} took {took:.2f} s"
    assert untouched(outs), f"rank {comm.rank}: outputs were written"
    assert isinstance(closed, ClosedError)


@pytest.mark.parametrize("transport", GPU_TRANSPORTS)
def test_rank_skips_a_call(comm, transport):
    """The last rank skips the second call: the others wait for it and raise
    PeerTimeoutError after the timeout; the last rank's own calls completed."""
    dims, (qs, ks, qws, kws), outs, _ = case_arrays(comm, 8)
    skipper = comm.size - 1
    norm = make(comm, transport, dims)
    try:
        norm(qs, ks, qws, kws, out=outs)
        norm.synchronize()
        comm.Barrier()
        t0 = time.perf_counter()
        if comm.rank != skipper:
            norm(qs, ks, qws, kws, out=outs)
        err, _ = raise_time(norm.synchronize)
        took = time.perf_counter() - t0
    finally:
        close_and_start_again(comm, norm, transport)
    record(comm, "rank skips a call", transport, raised=type(err).__name__,
           seconds=took, skipper=skipper)
    if comm.rank == skipper:
        assert err is None, f"the rank that skipped raised {err!r}"
    else:
        assert isinstance(err, PeerTimeoutError), f"rank {comm.rank}: got {err!r}"
        if transport == "ipc":
            assert err.peer == skipper, f"blamed rank {err.peer}, not {skipper}"
        assert TIMEOUT_S * 0.9 < took < TIMEOUT_S + 1, f"raised after {took:.2f} s"


@pytest.mark.parametrize("transport", GPU_TRANSPORTS)
def test_rank_skips_a_graph_replay(comm, transport):
    """The same call captured in a CUDA graph on every rank; the last rank skips one
    replay: the others raise PeerTimeoutError within timeout_s + 1 s of theirs."""
    import cupy
    dims, (qs, ks, qws, kws), outs, _ = case_arrays(comm, 8)
    skipper = comm.size - 1
    norm = make(comm, transport, dims)
    stream = cupy.cuda.Stream(non_blocking=True)
    graph, err, took = None, None, 0.0
    try:
        with stream:
            norm(qs, ks, qws, kws, out=outs)
            stream.synchronize()
            comm.Barrier()
            stream.begin_capture()
            norm(qs, ks, qws, kws, out=outs)
            graph = stream.end_capture()
            graph.launch(stream)
            stream.synchronize()
            comm.Barrier()
            t0 = time.perf_counter()
            if comm.rank != skipper:
                graph.launch(stream)
            err, _ = raise_time(lambda: norm.synchronize(stream))
            took = time.perf_counter() - t0
    finally:
        del graph
        close_and_start_again(comm, norm, transport)
    record(comm, "rank skips a graph replay", transport, raised=type(err).__name__,
           seconds=took)
    if comm.rank != skipper:
        assert isinstance(err, PeerTimeoutError), f"rank {comm.rank}: got {err!r}"
        assert took < TIMEOUT_S + 1, f"raised after {took:.2f} s"


@pytest.mark.parametrize("transport", GPU_TRANSPORTS)
def test_bad_input_on_one_rank(comm, transport):
    """The last rank passes a q of the wrong width: it raises its own ValueError at once,
    writing nothing, and tells its peers through the transport ("ipc": token 0's slot;
    "nccl": its header in the all-reduce), which raise CallMismatchError naming that rank
    in milliseconds."""
    dims, (qs, ks, qws, kws), outs, _ = case_arrays(comm, 6)
    bad = comm.size - 1
    norm = make(comm, transport, dims)
    try:
        warm_up(norm, qs, ks, qws, kws)
        comm.Barrier()
        q = qs[:, :-8] if comm.rank == bad else qs
        t0 = time.perf_counter()
        err, _ = raise_time(lambda: norm(q, ks, qws, kws, out=(outs[0], outs[1])))
        if err is None:
            err, _ = raise_time(norm.synchronize)
        took = time.perf_counter() - t0
        closed, _ = raise_time(lambda: norm(qs, ks, qws, kws))
    finally:
        close_and_start_again(comm, norm, transport)
    record(comm, "bad input on one rank", transport, raised=type(err).__name__,
           seconds=took, bad=bad)
    if comm.rank == bad:
        assert isinstance(err, ValueError) and "shape must be" in str(err)
        assert not isinstance(err, QKNormError)
    else:
        assert isinstance(err, CallMismatchError), f"rank {comm.rank}: got {err!r}"
        assert err.peer == bad and "refused its input" in str(err)
        assert took < TIMEOUT_S / 2, f"rank {comm.rank} took {took:.3f} s"
    assert untouched(outs), f"rank {comm.rank}: outputs were written"
    assert isinstance(closed, ClosedError)


@pytest.mark.parametrize("transport", GPU_TRANSPORTS)
def test_rank_closes_while_others_call(comm, transport):
    """The last rank closes while the others make a call: they time out and raise
    PeerTimeoutError; then their close() works too (no hang)."""
    dims, (qs, ks, qws, kws), outs, _ = case_arrays(comm, 8)
    closer = comm.size - 1
    norm = make(comm, transport, dims)
    warm_up(norm, qs, ks, qws, kws)
    comm.Barrier()
    err, took = None, 0.0
    try:
        if comm.rank != closer:
            t0 = time.perf_counter()
            norm(qs, ks, qws, kws, out=outs)
            err, _ = raise_time(norm.synchronize)
            took = time.perf_counter() - t0
    finally:
        t0 = time.perf_counter()
        norm.close()
        close_took = time.perf_counter() - t0
    comm.Barrier()
    after_fault_the_process_works(comm, transport)
    record(comm, "rank closes while others call", transport, raised=type(err).__name__,
           seconds=took, close_seconds=close_took, closer=closer)
    if comm.rank != closer:
        assert isinstance(err, PeerTimeoutError), f"rank {comm.rank}: got {err!r}"
        assert took < TIMEOUT_S + 1
        assert untouched(outs), f"rank {comm.rank}: outputs were written"


@pytest.mark.parametrize("transport", GPU_TRANSPORTS)
def test_timeout_bounds_a_lone_rank(comm, transport):
    """Only rank 0 calls (the others do not call at all): rank 0 raises after about
    timeout_s."""
    dims, (qs, ks, qws, kws), outs, _ = case_arrays(comm, 2)
    norm = make(comm, transport, dims)
    warm_up(norm, qs, ks, qws, kws)
    comm.Barrier()
    err, took = None, 0.0
    try:
        if comm.rank == 0:
            t0 = time.perf_counter()
            norm(qs, ks, qws, kws, out=outs)
            err, _ = raise_time(norm.synchronize)
            took = time.perf_counter() - t0
    finally:
        close_and_start_again(comm, norm, transport)
    if comm.rank == 0:
        record(comm, "lone rank", transport, raised=type(err).__name__, seconds=took)
        assert isinstance(err, PeerTimeoutError)
        if transport == "ipc":
            assert 1 <= err.peer < comm.size
        assert TIMEOUT_S * 0.9 < took < TIMEOUT_S + 1
        assert untouched(outs)


def test_broken_p2p_auto_falls_back_ipc_raises(comm):
    """The P2P write test fails (forced): "auto" warns and runs on "nccl", exactly;
    "ipc" raises TransportUnavailableError on every rank."""
    dims = dims_for(comm.size)
    PeerBuffers.corrupt_probe = True
    try:
        t0 = time.perf_counter()
        with pytest.raises(TransportUnavailableError, match="P2P write test failed"):
            TPQKNorm(comm, *dims, DTYPE, max_tokens=64, transport="ipc")
        ipc_took = time.perf_counter() - t0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            norm = TPQKNorm(comm, *dims, DTYPE, max_tokens=64, transport="auto")
        try:
            assert norm.transport == "nccl"
            assert any("falling back to transport 'nccl'" in str(w.message) for w in caught)
            run_case(norm, comm, 77, 33, DTYPE)
        finally:
            norm.close()
    finally:
        PeerBuffers.corrupt_probe = False
    record(comm, "P2P write test fails", "ipc", ipc_raise_seconds=ipc_took, auto="nccl")


def test_ranks_sharing_a_gpu(comm):
    """Every rank on GPU 0 (a workstation with one card): "auto" picks "mpi" and is exact;
    "ipc" and "nccl" refuse on every rank with one line naming the ranks and the GPU."""
    import cupy
    if os.environ.get("QKNORM_TEST_SHARED_GPU") == "1":
        pytest.skip("the shared-GPU emulation lets the GPU transports run there")
    before = cupy.cuda.Device().id
    cupy.cuda.Device(0).use()
    try:
        dims = dims_for(comm.size)
        for transport in GPU_TRANSPORTS:
            t0 = time.perf_counter()
            with pytest.raises(TransportUnavailableError, match="share GPU 0") as info:
                TPQKNorm(comm, *dims, DTYPE, max_tokens=64, transport=transport)
            assert "\n" not in str(info.value)
            record(comm, "ranks share a GPU", transport, raised="TransportUnavailableError",
                   seconds=time.perf_counter() - t0)
        with TPQKNorm(comm, *dims, DTYPE, max_tokens=64) as norm:
            assert norm.transport == "mpi"
            run_case(norm, comm, 81, 20, DTYPE)
        record(comm, "ranks share a GPU", "mpi", auto="mpi")
    finally:
        cupy.cuda.Device(before).use()


def close_and_start_again(comm, norm, transport):
    """Every rank's collective steps after a fault, whatever it asserts afterwards: close
    together, then a fresh object on the same GPUs must be exact."""
    comm.Barrier()
    norm.close()
    after_fault_the_process_works(comm, transport)


def after_fault_the_process_works(comm, transport="ipc"):
    """A fresh object on the same GPUs is exact after the fault."""
    dims = dims_for(comm.size)
    with TPQKNorm(comm, *dims, DTYPE, max_tokens=64, transport=transport) as norm:
        run_case(norm, comm, 123, 17, DTYPE)


def test_array_on_another_device_is_refused(comm):
    """An input on another GPU of the node: TypeError before anything is launched."""
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
    if n < 2:
        pytest.skip("needs two GPUs visible to the process")
    dims, (qs, ks, qws, kws), outs, _ = case_arrays(comm, 4)
    other = (cupy.cuda.Device().id + 1) % n
    with cupy.cuda.Device(other):
        q_elsewhere = cupy.asarray(qs.get())
    with TPQKNorm(comm, *dims, DTYPE, max_tokens=64, transport="ipc") as norm:
        err, _ = raise_time(lambda: norm(q_elsewhere, ks, qws, kws, out=outs))
        assert isinstance(err, TypeError) and "device" in str(err)
        assert untouched(outs)
        # a refused input closes the object on every rank (the peers learn it at once)
        with pytest.raises(ClosedError):
            norm(qs, ks, qws, kws, out=outs)
