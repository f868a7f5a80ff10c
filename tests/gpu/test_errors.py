"""What every error leaves behind, the same on every transport (README's table): which rows
are written, whether the object is closed, what each rank raises and when. Run by
scripts/gpu_suite.sh at every G, with ranks sharing a GPU where there are fewer GPUs than
ranks; "nccl" skips there (NCCL refuses two ranks on one GPU: tests/gpu/conftest.py)."""
import time

import numpy as np
import pytest

from cupy_qknorm import (CallMismatchError, ClosedError, PositionError, RoPE, TPQKNorm,
                         TransportUnavailableError)
from cupy_qknorm import reference as ref
from tests.conftest import requires_gpu
from tests.gpu.test_gpu import dims_for, shards
from tests.gpu.test_rope import assert_rope_close, poisoned, rope_case
from tests.test_mpi import agree, timed

pytestmark = [requires_gpu, pytest.mark.mpi(min_size=1)]

TRANSPORTS = ["ipc", "nccl", "mpi"]
TIMEOUT_S = 2.0
ROPE = RoPE(128, 64, theta=5e6, max_position=4096)
DTYPE = "bfloat16"


def make(comm, transport, **kw):
    return TPQKNorm(comm, *dims_for(comm.size), DTYPE, transport=transport,
                    timeout_s=TIMEOUT_S, **kw)


def unwritten_rows(out):
    p = np.uint16(ref.poison(DTYPE))
    return [int(r) for r in np.flatnonzero((out.get() == p).all(axis=1))]


def refused_call_problems(took, outs, rows, closed):
    """What a call that failed as a whole leaves on a rank: the error without waiting for
    the timeout, none of its `rows` written, the object closed."""
    problems = [] if took <= TIMEOUT_S / 2 else [f"{took:.2f} s to the error"]
    problems += [f"{name}: a row was written" for name, o in zip("qk", outs)
                 if len(unwritten_rows(o)) != rows]
    if type(closed) is not ClosedError:
        problems.append(f"the next call raised {closed!r}")
    return problems


def raise_point(norm, transport, call):
    """The error of a call: raised by the call itself ("mpi") or by synchronize()."""
    err, _ = timed(call)
    if err is None:
        err, _ = timed(norm.synchronize)
    return err


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bad_position_in_a_middle_chunk(comm, transport):
    """T = 300 in chunks of 64 with token 70 (chunk 1) outside the table on every rank:
    every row of a valid position is written in every chunk, row 70 is not; every rank
    raises PositionError naming token 70 of the call; the object is then closed."""
    (qs, ks, qws, kws), pos, mine = rope_case(comm, 21, 300, DTYPE, ROPE)
    pos[70] = ROPE.rows()
    outs = [poisoned(qs, DTYPE), poisoned(ks, DTYPE)]
    norm = make(comm, transport, max_tokens=64, rope=ROPE)
    try:
        err = raise_point(norm, transport,
                          lambda: norm(qs, ks, qws, kws, out=outs, positions=pos))
        closed, _ = timed(lambda: norm(qs, ks, qws, kws, out=outs, positions=pos))
    finally:
        comm.Barrier()
        norm.close()
    problems = []
    if type(err) is not PositionError or (err.token, err.position) != (70, ROPE.rows()):
        problems.append(f"expected PositionError for token 70, got {err!r}")
    for name, o in zip("qk", outs):
        if unwritten_rows(o) != [70]:
            problems.append(f"{name}: unwritten rows {unwritten_rows(o)}, expected [70]")
    if type(closed) is not ClosedError:
        problems.append(f"the next call raised {closed!r}")
    agree(comm, problems)
    good = np.array([i for i in range(300) if i != 70])
    assert_rope_close(comm, [outs[0][good], outs[1][good]], [m[good] for m in mine], DTYPE,
                      "rows of valid positions")


@pytest.mark.parametrize("transport", ["ipc", "nccl"])
def test_calls_queued_after_a_bad_position_still_store(comm, transport):
    """A graph of two calls, the first with a bad position in its second chunk: the
    second call stores every row (a position error leaves the exchange in step), and the
    first every row but the bad one."""
    import cupy
    (qs, ks, qws, kws), pos, mine = rope_case(comm, 22, 200, DTYPE, ROPE)
    bad_pos = pos.copy()
    bad_pos[100] = ROPE.rows() + 5
    first = [poisoned(qs, DTYPE), poisoned(ks, DTYPE)]
    second = [poisoned(qs, DTYPE), poisoned(ks, DTYPE)]
    norm = make(comm, transport, max_tokens=64, rope=ROPE)
    graph = None
    try:
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            norm(qs[:4], ks[:4], qws, kws, out=(first[0][:4], first[1][:4]),
                 positions=pos[:4])  # warm up outside the capture
            stream.synchronize()
            for o in first:
                o.fill(ref.poison(DTYPE))
            stream.begin_capture()
            norm(qs, ks, qws, kws, out=first, positions=bad_pos)
            norm(qs, ks, qws, kws, out=second, positions=pos)
            graph = stream.end_capture()
            graph.launch(stream)
            err, _ = timed(lambda: norm.synchronize(stream))
    finally:
        del graph
        comm.Barrier()
        norm.close()
    problems = []
    if type(err) is not PositionError or err.token != 100:
        problems.append(f"expected PositionError for token 100, got {err!r}")
    for name, o in zip("qk", first):
        if unwritten_rows(o) != [100]:
            problems.append(f"first call, {name}: unwritten rows {unwritten_rows(o)}")
    for name, o in zip("qk", second):
        if unwritten_rows(o):
            problems.append(f"second call, {name}: unwritten rows {unwritten_rows(o)}")
    agree(comm, problems)
    assert_rope_close(comm, second, mine, DTYPE, "the call after the bad one")


def one_bad_rank_problems(rank, bad, err, outs, token, position):
    """What a call whose `token` has `position` outside the table on rank `bad` only
    leaves on `rank`: there PositionError naming both and that row unwritten; on the
    others CallMismatchError naming rank `bad` and the token, every row written."""
    problems = []
    if rank == bad:
        if type(err) is not PositionError or (err.token, err.position) != (token, position):
            problems.append(f"expected PositionError for token {token}, got {err!r}")
        want = [token]
    else:
        if type(err) is not CallMismatchError or (err.peer, err.token) != (bad, token) or \
                f"rank {bad}: token {token} has a position outside" not in str(err):
            problems.append(f"expected CallMismatchError naming rank {bad}, token {token}, "
                            f"got {err!r}")
        want = []
    for name, o in zip("qk", outs):
        if unwritten_rows(o) != want:
            problems.append(f"{name}: unwritten rows {unwritten_rows(o)}, expected {want}")
    return problems


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bad_position_on_one_rank(comm, transport):
    """Only the last rank's token 70 is outside the table: it raises PositionError, every
    other rank CallMismatchError naming it and token 70, without waiting for a timeout;
    every rank wrote its rows of valid positions."""
    bad = comm.size - 1
    (qs, ks, qws, kws), pos, mine = rope_case(comm, 23, 200, DTYPE, ROPE)
    if comm.rank == bad:
        pos[70] = -1
    outs = [poisoned(qs, DTYPE), poisoned(ks, DTYPE)]
    norm = make(comm, transport, max_tokens=64, rope=ROPE)
    try:
        t0 = time.perf_counter()
        err = raise_point(norm, transport,
                          lambda: norm(qs, ks, qws, kws, out=outs, positions=pos))
        took = time.perf_counter() - t0
    finally:
        comm.Barrier()
        norm.close()
    problems = one_bad_rank_problems(comm.rank, bad, err, outs, 70, -1)
    if took > TIMEOUT_S / 2:
        problems.append(f"{took:.2f} s to the error: it waited for a timeout")
    agree(comm, problems)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("tokens", [1, 65])
def test_bad_position_on_one_rank_in_a_one_token_launch(comm, transport, tokens):
    """A launch of one token (T=1, or T=65's last chunk of max_tokens 64) whose token is
    outside the table on the last rank only: the sums kernel runs one block there and
    reports the token to the peers by itself. A call of T=1 with valid positions first
    (a one-block launch that finds nothing must leave the next launches clean). The last
    rank raises PositionError, the others CallMismatchError naming it and the token."""
    import cupy
    bad, token = comm.size - 1, tokens - 1
    (qs, ks, qws, kws), pos, _ = rope_case(comm, 29, tokens, DTYPE, ROPE)
    if comm.rank == bad:
        pos[token] = ROPE.rows() + 5
    outs = [poisoned(qs, DTYPE), poisoned(ks, DTYPE)]
    first = [poisoned(qs[:1], DTYPE), poisoned(ks[:1], DTYPE)]
    norm = make(comm, transport, max_tokens=64, rope=ROPE)
    try:
        norm(qs[:1], ks[:1], qws, kws, out=first, positions=cupy.zeros(1, pos.dtype))
        ok, _ = timed(norm.synchronize)
        err = raise_point(norm, transport,
                          lambda: norm(qs, ks, qws, kws, out=outs, positions=pos))
    finally:
        comm.Barrier()
        norm.close()
    problems = [] if ok is None else [f"the valid call of T=1 raised {ok!r}"]
    agree(comm, problems + one_bad_rank_problems(comm.rank, bad, err, outs, token,
                                                 ROPE.rows() + 5))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_tags_differ(comm, transport):
    """Rank 0 passes tag=99, the others tag=8: every rank raises CallMismatchError naming
    its tag and a differing peer's, at once, with nothing written; then closed."""
    dims = dims_for(comm.size)
    q, k, qw, kw, _, _ = ref.make_case(24, 50, *dims, DTYPE)
    qs, ks, qws, kws = shards((q, k, qw, kw), comm)
    outs = [poisoned(qs, DTYPE), poisoned(ks, DTYPE)]
    tag = 99 if comm.rank == 0 else 8
    norm = make(comm, transport, max_tokens=64)
    try:
        norm(qs[:1], ks[:1], qws, kws, out=(outs[0][:1], outs[1][:1]), tag=8)
        norm.synchronize()  # the same call on every rank
        for o in outs:
            o.fill(ref.poison(DTYPE))
        comm.Barrier()
        t0 = time.perf_counter()
        err = raise_point(norm, transport, lambda: norm(qs, ks, qws, kws, out=outs, tag=tag))
        took = time.perf_counter() - t0
        closed, _ = timed(lambda: norm(qs, ks, qws, kws, out=outs, tag=tag))
    finally:
        comm.Barrier()
        norm.close()
    # rank 0 may name any of the others (the first peer whose slot it read)
    want = ["made a call with tag=99 where rank ", "made it with tag=8"] if comm.rank == 0 \
        else ["made a call with tag=8 where rank 0 made it with tag=99"]
    problems = []
    if type(err) is not CallMismatchError or not all(w in str(err) for w in want):
        problems.append(f"expected CallMismatchError ({want}), got {err!r}")
    problems += refused_call_problems(took, outs, 50, closed)
    agree(comm, problems)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_refused_input_on_one_rank(comm, transport):
    """The last rank's q has the wrong width: it raises its own ValueError, every other
    rank CallMismatchError naming it, at once; nothing is written; every object closes."""
    dims = dims_for(comm.size)
    q, k, qw, kw, _, _ = ref.make_case(25, 40, *dims, DTYPE)
    qs, ks, qws, kws = shards((q, k, qw, kw), comm)
    outs = [poisoned(qs, DTYPE), poisoned(ks, DTYPE)]
    bad = comm.size - 1
    norm = make(comm, transport, max_tokens=16)  # 40 rows: three chunks
    try:
        norm(qs[:1], ks[:1], qws, kws, out=(outs[0][:1], outs[1][:1]))
        norm.synchronize()
        for o in outs:
            o.fill(ref.poison(DTYPE))
        comm.Barrier()
        t0 = time.perf_counter()
        err = raise_point(norm, transport, lambda: norm(
            qs[:, :-8] if comm.rank == bad else qs, ks, qws, kws, out=outs))
        took = time.perf_counter() - t0
        closed, _ = timed(lambda: norm(qs, ks, qws, kws, out=outs))
    finally:
        comm.Barrier()
        norm.close()
    problems = []
    if comm.rank == bad:
        if type(err) is not ValueError or "q: shape must be" not in str(err):
            problems.append(f"expected its own ValueError, got {err!r}")
    elif type(err) is not CallMismatchError or err.peer != bad:
        problems.append(f"expected CallMismatchError naming rank {bad}, got {err!r}")
    problems += refused_call_problems(took, outs, 40, closed)
    agree(comm, problems)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_skipped_tagged_call_is_caught_at_once(comm, transport):
    """Layer-tagged calls; the last rank skips layer 0 and calls layer 1, which meets the
    others' layer 0: every rank raises CallMismatchError at once, instead of pairing the
    calls off one apart."""
    dims = dims_for(comm.size)
    q, k, qw, kw, _, _ = ref.make_case(26, 8, *dims, DTYPE)
    qs, ks, qws, kws = shards((q, k, qw, kw), comm)
    outs = [poisoned(qs, DTYPE), poisoned(ks, DTYPE)]
    skipper = comm.size - 1
    norm = make(comm, transport, max_tokens=16)
    try:
        norm(qs, ks, qws, kws, out=outs, tag=5)
        norm.synchronize()
        comm.Barrier()
        t0 = time.perf_counter()
        err = raise_point(norm, transport, lambda: norm(
            qs, ks, qws, kws, out=outs, tag=1 if comm.rank == skipper else 0))
        took = time.perf_counter() - t0
    finally:
        comm.Barrier()
        norm.close()
    problems = []
    if type(err) is not CallMismatchError or "tag=" not in str(err):
        problems.append(f"expected CallMismatchError naming the tags, got {err!r}")
    if took > TIMEOUT_S / 2:
        problems.append(f"{took:.2f} s to the error")
    agree(comm, problems)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_alone_a_refused_input_leaves_the_object_usable(comm, transport):
    """Each rank alone on a communicator of its own (G=1): a refused input raises its
    error and nothing else; the next call is exact."""
    sub = comm.Split(comm.rank, 0)
    try:
        dims = dims_for(1)
        q, k, qw, kw, qr, kr = ref.make_case(27 + comm.rank, 9, *dims, DTYPE)
        qs, ks, qws, kws = shards((q, k, qw, kw), sub)
        outs = [poisoned(qs, DTYPE), poisoned(ks, DTYPE)]
        with TPQKNorm(sub, *dims, DTYPE, max_tokens=16, transport=transport) as norm:
            with pytest.raises(TypeError, match="dtype must be bfloat16"):
                norm(qs.view("float16"), ks, qws, kws, out=outs)
            assert len(unwritten_rows(outs[0])) == 9
            norm(qs, ks, qws, kws, out=outs)
            norm.synchronize()
        for o, r in zip(outs, (qr, kr)):
            assert ref.compare(o.get(), r, DTYPE)[1] == 0
    finally:
        sub.Free()


def test_mpi_says_at_a_capture_that_it_cannot_be_captured(comm):
    import cupy
    dims = dims_for(comm.size)
    q, k, qw, kw, _, _ = ref.make_case(28, 4, *dims, DTYPE)
    qs, ks, qws, kws = shards((q, k, qw, kw), comm)
    norm = make(comm, "mpi", max_tokens=16)
    try:
        assert not norm.capturable
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            norm(qs, ks, qws, kws)
            stream.synchronize()
            stream.begin_capture()
            err, _ = timed(lambda: norm(qs, ks, qws, kws))
            graph = stream.end_capture()
            del graph
    finally:
        comm.Barrier()
        norm.close()
    assert type(err) is TransportUnavailableError, err
    assert str(err) == ("transport 'mpi' cannot be captured in a CUDA graph (it brings the "
                        "sums to the host); capture calls of an object with transport 'ipc' "
                        "or 'nccl'")
