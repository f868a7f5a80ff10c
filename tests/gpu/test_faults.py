"""Faults between ranks: each must raise on the ranks that see it, fast, with nothing
corrupted and the process still usable. Run by scripts/gpu_suite.sh at G = 2, 3 and 4.

The time each rank took to raise goes, one JSON line per rank and case, to the file named
by CUPY_QKNORM_FAULT_LOG when set (the suite collects it for RELIABILITY.md)."""
import json
import os
import time
import warnings

import numpy as np
import pytest

from cupy_qknorm import (CallMismatchError, ClosedError, PeerTimeoutError, TPQKNorm,
                         TransportUnavailableError)
from cupy_qknorm import reference as ref
from cupy_qknorm.peers import PROBE_ENV
from tests.conftest import requires_gpu
from tests.gpu.test_gpu import assert_close, dims_for, run_case, shards

pytestmark = [requires_gpu, pytest.mark.mpi(min_size=2)]

TIMEOUT_S = 1.0
DTYPE = "bfloat16"


def record(comm, case, **fields):
    path = os.environ.get("CUPY_QKNORM_FAULT_LOG")
    if path:
        import cupy
        card = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
        line = json.dumps({"case": case, "G": comm.size, "rank": comm.rank, "card": card,
                           **fields})
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


def test_tokens_differ_between_ranks(comm):
    """Rank 0 calls with T=5, the others with T=3: every rank sees the peers' token count
    in their slots and raises CallMismatchError at once, writing nothing."""
    dims, (qs, ks, qws, kws), outs, _ = case_arrays(comm, 5)
    t = 5 if comm.rank == 0 else 3
    norm = TPQKNorm(comm, *dims, DTYPE, max_tokens=64, transport="ipc", timeout_s=TIMEOUT_S)
    try:
        warm_up(norm, qs, ks, qws, kws)  # the time to raise must not include compiling
        comm.Barrier()
        t0 = time.perf_counter()
        norm(qs[:t], ks[:t], qws, kws, out=(outs[0][:t], outs[1][:t]))
        err, _ = raise_time(norm.synchronize)
        took = time.perf_counter() - t0
        record(comm, "tokens differ", raised=type(err).__name__, seconds=took)
        assert isinstance(err, CallMismatchError), f"rank {comm.rank}: got {err!r}"
        assert "tokens" in str(err)
        assert took < TIMEOUT_S, f"rank {comm.rank} took {took:.3f} s: waited for a timeout"
        assert untouched(outs), f"rank {comm.rank}: outputs were written"
        with pytest.raises(ClosedError):
            norm(qs[:t], ks[:t], qws, kws)
    finally:
        norm.close()
    after_fault_the_process_works(comm)


def test_rank_skips_a_call(comm):
    """The last rank skips the second call: the others wait for it, time out and raise
    PeerTimeoutError naming it; the last rank's own call completed and raises nothing."""
    dims, (qs, ks, qws, kws), outs, _ = case_arrays(comm, 8)
    skipper = comm.size - 1
    norm = TPQKNorm(comm, *dims, DTYPE, max_tokens=64, transport="ipc", timeout_s=TIMEOUT_S)
    try:
        norm(qs, ks, qws, kws, out=outs)
        norm.synchronize()
        comm.Barrier()
        t0 = time.perf_counter()
        if comm.rank != skipper:
            norm(qs, ks, qws, kws, out=outs)
        err, _ = raise_time(norm.synchronize)
        took = time.perf_counter() - t0
        record(comm, "rank skips a call", raised=type(err).__name__, seconds=took,
               skipper=skipper)
        if comm.rank == skipper:
            assert err is None, f"the rank that skipped raised {err!r}"
        else:
            assert isinstance(err, PeerTimeoutError), f"rank {comm.rank}: got {err!r}"
            assert err.peer == skipper, f"blamed rank {err.peer}, not {skipper}"
            assert TIMEOUT_S * 0.9 < took < TIMEOUT_S + 3, f"raised after {took:.2f} s"
    finally:
        norm.close()
    after_fault_the_process_works(comm)


def test_rank_closes_while_others_call(comm):
    """The last rank closes while the others make a call: they time out and raise
    PeerTimeoutError naming it; then their close() meets its close() (no hang)."""
    dims, (qs, ks, qws, kws), outs, _ = case_arrays(comm, 8)
    closer = comm.size - 1
    norm = TPQKNorm(comm, *dims, DTYPE, max_tokens=64, transport="ipc", timeout_s=TIMEOUT_S)
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
    record(comm, "rank closes while others call", raised=type(err).__name__, seconds=took,
           close_seconds=close_took, closer=closer)
    if comm.rank != closer:
        assert isinstance(err, PeerTimeoutError), f"rank {comm.rank}: got {err!r}"
        assert err.peer == closer
        assert untouched(outs), f"rank {comm.rank}: outputs were written"
    after_fault_the_process_works(comm)


def test_broken_p2p_auto_falls_back_ipc_raises(comm):
    """The P2P write test fails (forced by the environment switch): "auto" warns and runs
    on "nccl", exactly; "ipc" raises TransportUnavailableError on every rank."""
    dims = dims_for(comm.size)
    old = os.environ.get(PROBE_ENV)
    os.environ[PROBE_ENV] = "1"
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
        if old is None:
            os.environ.pop(PROBE_ENV, None)
        else:
            os.environ[PROBE_ENV] = old
    record(comm, "P2P write test fails", ipc_raise_seconds=ipc_took, auto="nccl")


def test_timeout_bounds_a_lone_rank(comm):
    """Only rank 0 calls (the others do not call at all): rank 0 raises after about
    timeout_s, and the error names a peer that never wrote."""
    dims, (qs, ks, qws, kws), outs, _ = case_arrays(comm, 2)
    norm = TPQKNorm(comm, *dims, DTYPE, max_tokens=64, transport="ipc", timeout_s=TIMEOUT_S)
    try:
        if comm.rank == 0:
            t0 = time.perf_counter()
            norm(qs, ks, qws, kws, out=outs)
            err, _ = raise_time(norm.synchronize)
            took = time.perf_counter() - t0
            record(comm, "lone rank", raised=type(err).__name__, seconds=took)
            assert isinstance(err, PeerTimeoutError)
            assert 1 <= err.peer < comm.size
            assert TIMEOUT_S * 0.9 < took < TIMEOUT_S + 3
            assert untouched(outs)
    finally:
        norm.close()
    after_fault_the_process_works(comm)


def after_fault_the_process_works(comm):
    """A fresh object on the same GPUs is exact after the fault."""
    dims = dims_for(comm.size)
    with TPQKNorm(comm, *dims, DTYPE, max_tokens=64, transport="ipc") as norm:
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
        with pytest.raises(TypeError, match="device"):
            norm(q_elsewhere, ks, qws, kws, out=outs)
        assert untouched(outs)
        run_case(norm, comm, 5, 9, DTYPE)  # every rank still makes the same calls
