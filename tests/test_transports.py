"""The GPU transports on the CPU, over tests/fake_cuda.py: what a call launches (kernels,
chunks, grids, the packed pointers and strides), the Python frames between a cached call
and the driver, the NCCL calls between the kernels, and what each error record raises."""
import contextlib
import re

import numpy as np
import pytest
from mpi4py import MPI

from cupy_qknorm import (CallMismatchError, ClosedError, PeerTimeoutError, PositionError,
                         QKNormError, RoPE, TransportUnavailableError)
from cupy_qknorm.params import ERROR_PEER_POSITION, ERROR_POSITION, ERROR_REJECTED, \
    ERROR_FAILED, ERROR_SEQUENCE, ERROR_TAG, ERROR_TIMEOUT, ERROR_TOKENS, FLAG_K_REPLICA, \
    FLAG_REFUSED, SUMS_HEADER
from tests.fake_cuda import FakeCuda, HostMemory, Stream, fake_norm

cupy = pytest.importorskip("cupy")

Q, K = 256, 64
TRANSPORTS = ["ipc", "nccl", "mpi"]
IDS = ["ipc", "nccl", "mpi-gpu"]  # an id "mpi" would be pytest-mpi's mark


@pytest.fixture
def mem():
    return HostMemory(cupy, 1 << 22)


@contextlib.contextmanager
def fake(transport, q=Q, k=K, **kwargs):
    """(norm, cuda) of fake_norm on one rank, closed at the end."""
    n, cuda = fake_norm(MPI.COMM_SELF, transport, q, k, **kwargs)
    try:
        yield n, cuda
    finally:
        n.close()


def arrays(mem, tokens, q=Q, k=K, dtype=np.float32):
    return (mem.array((tokens, q), dtype), mem.array((tokens, k), dtype),
            mem.array((q,), dtype), mem.array((k,), dtype))


@pytest.mark.parametrize("transport", TRANSPORTS, ids=IDS)
def test_a_cached_call_is_at_most_three_frames_from_the_driver(transport, mem):
    """norm(...) of cached arrays, and a bound call: __call__, the transport's launch
    function, then at most the bound kernel's, before cuLaunchKernelEx."""
    n, cuda = fake_norm(MPI.COMM_SELF, transport, Q, K)
    try:
        q, k, qw, kw = arrays(mem, 3)
        n(q, k, qw, kw)
        cuda.launches.clear()
        n(q, k, qw, kw)
        n(q, k, qw, kw, out=(q, k))
        n.bind(q, k, qw, kw)()
        frames = [launch["frames"] for launch in cuda.launches]
        assert frames and max(frames) <= 3, frames
        if transport == "ipc":
            assert frames == [2, 2, 2]  # the fused kernel's launch is the call
    finally:
        n.close()


def test_chunks_launch_in_order_with_their_rows(mem):
    """T past max_tokens: one launch a chunk, each with its rows' addresses (strided
    views), its token count, the layout its length calls for and a grid capped by the
    blocks resident at once."""
    cuda = FakeCuda(sms=2, blocks_per_sm=3)
    n, cuda = fake_norm(MPI.COMM_SELF, "ipc", Q, K, cuda=cuda, max_tokens=16)
    try:
        n._transport.wide_from = 16
        qkv = mem.array((40, Q + 2 * K))
        q, k = qkv[:, :Q], qkv[:, Q:Q + K]
        _, _, qw, kw = arrays(mem, 1)
        n(q, k, qw, kw)
        row = qkv.strides[0]
        got = [(c["tokens"], c["q"] - q.data.ptr, c["k"] - k.data.ptr, c["q_stride"],
                c["grid"], c["first_token"], c["call_tokens"], c["tag"], c["flags"])
               for c in cuda.launches]
        assert got == [(16, 0, 0, Q + 2 * K, 6, 0, 40, 0, 0),
                       (16, 16 * row, 16 * row, Q + 2 * K, 6, 16, 40, 0, 0),
                       (8, 32 * row, 32 * row, Q + 2 * K, 6, 32, 40, 0, 0)]
        cuda.launches.clear()
        n(q, k, qw, kw, tag=0)
        n(q, k, qw, kw, tag=32766)
        assert [c["tag"] for c in cuda.launches] == [1] * 3 + [32767] * 3
        layouts = [spec.staged for spec in cuda.loads]
        assert [c["name"] for c in cuda.launches][:2] == [cuda.launches[0]["name"]] * 2
        assert len(cuda.loads) == 2 and layouts == [1, 0]  # wide for 16, narrow for 8
        assert all(c["pdl"] for c in cuda.launches)        # the fused kernel waits first
    finally:
        n.close()


def test_positions_follow_their_chunk(mem):
    rope = RoPE(128, 64, max_position=64)
    n, cuda = fake_norm(MPI.COMM_SELF, "nccl", 256, 128, max_tokens=4, rope=rope)
    try:
        q, k, qw, kw = arrays(mem, 10, 256, 128)
        pos = mem.array((10,), np.int64)
        n(q, k, qw, kw, positions=pos)
        starts = [(c["kind"], c["positions"] - pos.data.ptr, c["position_bytes"])
                  for c in cuda.launches]
        assert starts == [("partial_sums", 0, 8), ("apply", 0, 8), ("partial_sums", 32, 8),
                          ("apply", 32, 8), ("partial_sums", 64, 8), ("apply", 64, 8)]
    finally:
        n.close()


def test_nccl_all_reduces_each_chunks_sums_between_its_kernels(mem):
    n, cuda = fake_norm(MPI.COMM_SELF, "nccl", Q, K, world=2, max_tokens=8)
    try:
        warm = len(cuda.nccl_calls)
        q, k, qw, kw = arrays(mem, 11, Q // 2, K // 2)
        stream = Stream(0x42)
        events = []
        cuda.nccl_comm.calls = events
        real = cuda._launch_ex

        def launch(*args):
            rc = real(*args)
            events.append(cuda.launches[-1]["kind"])
            return rc
        cuda._launch_ex = launch
        n._transport._launch._launch_ex = launch
        n(q, k, qw, kw, stream=stream)
        assert warm >= 1 and events == [
            "partial_sums", ("allReduce", SUMS_HEADER + 16, 0x42), "apply",
            "partial_sums", ("allReduce", SUMS_HEADER + 6, 0x42), "apply"]
        assert {c["stream"] for c in cuda.launches} == {0x42}
    finally:
        n.close()
    assert cuda.nccl_comm.aborted  # close ends the communicator (no graph holds it)


def test_a_bound_call_packs_once(mem):
    """A bound call's parameters are packed when it is bound: later calls launch them as
    they are, with no validation and no repacking."""
    n, cuda = fake_norm(MPI.COMM_SELF, "ipc", Q, K)
    try:
        q, k, qw, kw = arrays(mem, 5)
        qo, ko = mem.array((5, Q)), mem.array((5, K))
        call = n.bind(q, k, qw, kw, out=(qo, ko))
        validations = n._validations
        for _ in range(3):
            assert call() == (qo, ko)
        assert n._validations == validations
        assert len({c["raw"] for c in cuda.launches}) == 1
        assert (cuda.launches[0]["q_out"], cuda.launches[0]["tokens"]) == (qo.data.ptr, 5)
    finally:
        n.close()


def test_zero_tokens_launch_nothing(mem):
    for transport in TRANSPORTS:
        with fake(transport) as (n, cuda):
            q, k, qw, kw = arrays(mem, 0)
            assert n(q, k, qw, kw) == (q, k)
            n.bind(q, k, qw, kw)()
            assert cuda.launches == []


def test_a_failed_launch_raises_naming_the_kernel_and_closes(mem):
    n, cuda = fake_norm(MPI.COMM_SELF, "ipc", Q, K)
    try:
        q, k, qw, kw = arrays(mem, 2)
        cuda.rc = 700
        n._transport._launch._error_name = lambda rc, out: 0
        with pytest.raises(QKNormError, match=r"launch of qknorm::fused<.*> failed: \? \(700\)"):
            n(q, k, qw, kw)
        with pytest.raises(ClosedError):
            n(q, k, qw, kw)
    finally:
        n.close()


# -- "mpi" with GPU arrays -------------------------------------------------------------------
def test_mpi_says_at_the_capture_that_it_cannot_be_captured(mem):
    n, cuda = fake_norm(MPI.COMM_SELF, "mpi", Q, K)
    try:
        q, k, qw, kw = arrays(mem, 2)
        n(q, k, qw, kw)
        launched = len(cuda.launches)
        with pytest.raises(TransportUnavailableError) as e:
            n(q, k, qw, kw, stream=Stream(capturing=True))
        assert str(e.value) == (
            "transport 'mpi' cannot be captured in a CUDA graph (it brings the sums to the "
            "host); capture calls of an object with transport 'ipc' or 'nccl'")
        assert len(cuda.launches) == launched and not n._transport.capturable
        with pytest.raises(ClosedError):
            n(q, k, qw, kw)
    finally:
        n.close()


def test_mpi_reads_the_positions_back_and_writes_the_valid_rows(mem):
    """On GPU arrays "mpi" reads the positions to the host for the call's agreement: a
    bad one raises in the call itself, after the kernels (which store the valid rows)."""
    rope = RoPE(128, 64, max_position=64)
    n, cuda = fake_norm(MPI.COMM_SELF, "mpi", 256, 128, rope=rope)
    try:
        q, k, qw, kw = arrays(mem, 4, 256, 128)
        pos = mem.array((4,), np.int32)
        mem.numpy(pos)[:] = [0, 63, 64, 1]
        with pytest.raises(PositionError, match="rank 0: token 2 has position 64, outside "
                                                "the RoPE table's 64 rows") as e:
            n(q, k, qw, kw, positions=pos)
        assert (e.value.token, e.value.position) == (2, 64)
        assert cuda.kinds() == ["partial_sums", "apply"]
    finally:
        n.close()


# -- the error record ------------------------------------------------------------------------
RECORDS = [
    ((ERROR_TIMEOUT, 1, 7, 0, 0, 0), PeerTimeoutError,
     "rank 0 waited longer than 5 s for the partial sums of rank 1 (token 7 of a call)"),
    ((ERROR_TIMEOUT, -1, 0, 0, 0, 0), PeerTimeoutError, "of the other ranks"),
    ((ERROR_TOKENS, 1, 0, 0, 5, 3), CallMismatchError,
     "rank 0 called with 3 tokens where rank 1 called with 5"),
    ((ERROR_SEQUENCE, 1, 2, 0, 9, 8), CallMismatchError,
     "rank 0 found use 9 of token 2's slot from rank 1 where it expected use 8"),
    ((ERROR_TAG, 1, 0, 0, 4, 3), CallMismatchError,
     "rank 0 made a call with tag=2 where rank 1 made it with tag=3"),
    ((ERROR_TAG, 1, 0, 0, 0, 1), CallMismatchError,
     "rank 0 made a call with tag=0 where rank 1 made it with no tag"),
    ((ERROR_REJECTED, 1, 0, 0, 0, 4), CallMismatchError, "rank 1 refused its input"),
    ((ERROR_POSITION, -1, 3, 0, 99, 64), PositionError,
     "rank 0: token 3 has position 99, outside the RoPE table's 64 rows"),
    ((ERROR_PEER_POSITION, 1, 3, 0, 0, 0), CallMismatchError,
     "rank 1: token 3 has a position outside the RoPE table"),
]


@pytest.mark.parametrize("record,exc,text", RECORDS, ids=[str(r[0]) for r in RECORDS])
def test_each_error_record_raises_its_error(record, exc, text, mem):
    n, cuda = fake_norm(MPI.COMM_SELF, "ipc", Q, K)
    try:
        q, k, qw, kw = arrays(mem, 2)
        n(q, k, qw, kw)
        words = n._transport.error
        words[1:6] = record[1:]
        words[0] = record[0]
        with pytest.raises(exc, match=re.escape(text)) as e:
            n.synchronize(Stream())
        assert str(e.value).endswith("the object is closed for use")
        if record[1] >= 0 and exc is not PositionError:
            assert e.value.peer == record[1]
        with pytest.raises(ClosedError):
            n(q, k, qw, kw)
    finally:
        n.close()


def test_the_benchmarks_separate_rope_launches_its_kernel_per_chunk(mem):
    """bench.separate_rope: the RoPE kernel of the tools module alone, in place on the
    rows, chunk by chunk with the object's layouts; no weight read."""
    from cupy_qknorm.bench import separate_rope
    rope = RoPE(128, 64, max_position=64)
    n, cuda = fake_norm(MPI.COMM_SELF, "ipc", 256, 128, max_tokens=4, rope=rope)
    try:
        q, k, _, _ = arrays(mem, 10, 256, 128)
        pos = mem.array((10,), np.int32)
        separate_rope(n, q, k, pos)(Stream())
        got = [(c["kind"], c["tokens"], c["q"] - q.data.ptr, c["q_out"] - q.data.ptr,
                c["positions"] - pos.data.ptr) for c in cuda.launches]
        row = q.strides[0]
        assert got == [("rope", 4, 0, 0, 0), ("rope", 4, 4 * row, 4 * row, 16),
                       ("rope", 2, 8 * row, 8 * row, 32)]
        assert {c["name"] for c in cuda.launches} == {cuda.loads[0].rope_name}
    finally:
        n.close()
    plain, _ = fake_norm(MPI.COMM_SELF, "ipc", 256, 128)
    try:
        with pytest.raises(TypeError, match="separate_rope needs an object built with rope="):
            separate_rope(plain, q, k, pos)
    finally:
        plain.close()


def test_nccl_refusal_takes_part_with_no_row(mem):
    """A rank that refused its input of a call its peers make takes part in their
    all-reduces, chunk by chunk, with the T its q has and its refusal in the header (so
    their apply fails the call at once), reading no row; then the object is closed."""
    n, cuda = fake_norm(MPI.COMM_SELF, "nccl", Q, K, world=2, max_tokens=8)
    try:
        q, k, qw, kw = arrays(mem, 11, Q // 2, K // 2)
        cuda.nccl_calls.clear()
        with pytest.raises(ValueError, match="q: shape must be"):
            n(q[:, :-4], k, qw, kw, tag=3)
        got = [(c["kind"], c["tokens"], c["call_tokens"], c["flags"], c["tag"], c["q"])
               for c in cuda.launches]
        assert got == [("partial_sums", 8, 11, FLAG_REFUSED, 4, 0), ("apply", 8, 11, 1, 4, 0),
                       ("partial_sums", 3, 11, 1, 4, 0), ("apply", 3, 11, 1, 4, 0)]
        assert [c[1] for c in cuda.nccl_calls] == [SUMS_HEADER + 16, SUMS_HEADER + 6]
        with pytest.raises(ClosedError):
            n(q, k, qw, kw)
    finally:
        n.close()


@pytest.mark.parametrize("transport", TRANSPORTS, ids=IDS)
def test_a_replica_of_a_kv_head_launches_with_its_k_partial_off(transport, mem, monkeypatch):
    """One KV head of K over two ranks (replicated): both ranks pass k [T, K]; rank 1's
    slice repeats rank 0's head, so each of its launches (every kernel, every chunk)
    carries FLAG_K_REPLICA and the kernels count its k partial 0; rank 0's carry none."""
    import types

    from cupy_qknorm.transports import ipc

    def buffers(comm, nbytes):
        room = np.zeros(2 * nbytes, np.uint8)
        return types.SimpleNamespace(ptrs=[room.ctypes.data, room.ctypes.data + nbytes],
                                     close=lambda: None, room=room)
    monkeypatch.setattr(ipc, "PeerBuffers", buffers)
    for rank, want in ((0, 0), (1, FLAG_K_REPLICA)):
        n, cuda = fake_norm(MPI.COMM_SELF, transport, Q, K, world=2, rank=rank, max_tokens=8,
                            kv_heads=1, head_dim=K)
        try:
            assert (n.config.q_local, n.config.k_local, n.config.k_replicas) == (Q // 2, K, 2)
            if transport == "mpi":  # the absent peer agrees (its sums: MPI over COMM_SELF)
                n._transport.agree = lambda tokens, tag, bad=-1, refusal=None: \
                    np.array([[tokens, tag, 0, 0]] * 2)
            q, k, qw, kw = arrays(mem, 11, Q // 2, K)
            n(q, k, qw, kw)
            kinds = ["fused"] if transport == "ipc" else ["partial_sums", "apply"]
            assert [c["kind"] for c in cuda.launches] == kinds * 2  # two chunks
            assert [c["flags"] for c in cuda.launches] == [want] * len(cuda.launches)
        finally:
            n.close()


def test_alone_a_refused_input_launches_nothing_and_leaves_the_object_usable(mem):
    for transport in TRANSPORTS:
        with fake(transport) as (n, cuda):
            q, k, qw, kw = arrays(mem, 3)
            with pytest.raises(ValueError, match="tag must be an int in 0..32766"):
                n(q, k, qw, kw, tag=32767)
            assert cuda.launches == []
            n(q, k, qw, kw, tag=5)
            assert cuda.launches


def test_the_knobs_an_object_builds_with_are_read_once(mem, monkeypatch):
    """A kernel loaded after a knob changed is built as the object's others were: the
    trace build (whose buffer the object allocated, or not, at construction) and the
    layouts' tuning."""
    monkeypatch.setenv("CUPY_QKNORM_TRACE", "0")
    monkeypatch.setenv("CUPY_QKNORM_VECTORS_PER_THREAD", "1")
    n, cuda = fake_norm(MPI.COMM_SELF, "ipc", Q, K, max_tokens=4096)
    try:
        monkeypatch.setenv("CUPY_QKNORM_TRACE", "1")
        monkeypatch.setenv("CUPY_QKNORM_CACHE_BLOCKS", "3")
        monkeypatch.setenv("CUPY_QKNORM_VECTORS_PER_THREAD", "4")
        monkeypatch.setenv("CUPY_QKNORM_WIDE_FROM", "2")
        q, k, qw, kw = arrays(mem, 3)
        n(q, k, qw, kw)
        big = arrays(mem, 600)
        n(*big)
        built = (("CUPY_QKNORM_TRACE", 0), ("CUPY_QKNORM_CACHE_BLOCKS", 1))
        assert cuda.builds == [built] * 2
        vectors = (Q + K) // 4
        assert [s.warps for s in cuda.loads] == [min(32, -(-vectors // 32))] * 2
        assert [s.staged for s in cuda.loads] == [0, 1]  # wide from 512 at G=1, not 2
    finally:
        n.close()


def test_the_nccl_watchdog_bounds_an_all_reduce_queued_behind_an_error(mem):
    """A kernel recorded an error (a T that differs, here) and an all-reduce queued behind
    it never finds its partner: the watchdog still ends it after timeout_s, marks the
    record failed and aborts NCCL, and the report stays the kernels' (the cause)."""
    import time
    n, cuda = fake_norm(MPI.COMM_SELF, "nccl", Q, K, world=2, timeout_s=0.2)
    try:
        t = n._transport
        t.error[1:6] = [1, 0, 0, 5, 3]
        t.error[0] = ERROR_TOKENS
        counts = np.frombuffer(t._counter.owner, np.uint32)
        counts[0] = 1  # partial_sums launched, apply not yet: an all-reduce in flight
        deadline = time.monotonic() + 5
        while not t.aborted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert t.aborted and cuda.nccl_comm.aborted
        assert t.error[0] == ERROR_TOKENS and t.error[ERROR_FAILED] == 1
        record = np.frombuffer(t._record.owner, np.int32)
        assert record[ERROR_FAILED] == 1  # apply stores nothing from here on
        with pytest.raises(CallMismatchError, match="called with 3 tokens where rank 1"):
            n.synchronize(Stream())
    finally:
        n.close()


@pytest.mark.parametrize("tag", [True, 1.0, [1], "1"])
def test_a_tag_that_is_not_an_int_is_refused_even_after_a_cached_call(tag, mem):
    n, cuda = fake_norm(MPI.COMM_SELF, "ipc", Q, K)
    try:
        q, k, qw, kw = arrays(mem, 2)
        n(q, k, qw, kw, tag=1)
        with pytest.raises(ValueError, match="tag must be an int in 0..32766"):
            n(q, k, qw, kw, tag=tag)
        assert len(cuda.launches) == 1
        n(q, k, qw, kw, tag=np.int64(1))  # numpy's ints are ints
        assert [c["tag"] for c in cuda.launches] == [2, 2]
    finally:
        n.close()


@pytest.mark.parametrize("how", ["tag", "out"])
def test_every_refused_call_tells_the_peers_and_closes(how, mem):
    """A tag or an out= the slow path refuses, with peers: they are told (nccl takes part
    in their all-reduce with its refusal) and the object closes, the communicator counted
    unfit on this rank as on its peers."""
    n, cuda = fake_norm(MPI.COMM_SELF, "nccl", Q, K, world=2)
    try:
        q, k, qw, kw = arrays(mem, 3, Q // 2, K // 2)
        n(q, k, qw, kw)
        cuda.launches.clear()
        bad = dict(tag=[1]) if how == "tag" else dict(out=q)
        with pytest.raises((ValueError, TypeError)):
            n(q, k, qw, kw, **bad)
        assert [c["flags"] for c in cuda.launches] == [FLAG_REFUSED] * 2
        assert not n._transport.fit()
        with pytest.raises(ClosedError):
            n(q, k, qw, kw)
    finally:
        n.close()
