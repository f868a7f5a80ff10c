"""Transport "mpi" with numpy arrays over several ranks: run under
`mpiexec -n G python -m pytest --with-mpi tests/test_mpi.py` (tests/test_launch.py does).

Parity against the float64 reference (norm, and norm then RoPE), and the faults a caller
can make: each must raise a typed error on every rank, within its bound, with nothing
written, and leave the communicator fit for a new object. Rank 0 prints each fault's
time to the error on every rank (lines starting with FAULT-TIME).

Every rank makes every collective step of a test before anything is asserted, and the
assertions are collective (all ranks pass or fail together): a rank that failed alone
would leave the others in a collective it never joins."""
import time

import numpy as np
import pytest
from mpi4py import MPI

from cupy_qknorm import (CallMismatchError, ClosedError, ConfigMismatchError,
                         PeerTimeoutError, PositionError, RoPE, TPQKNorm)
from cupy_qknorm import reference as ref
from cupy_qknorm.models import MODELS
from cupy_qknorm.shapes import default_dims

pytestmark = pytest.mark.mpi(min_size=2)


def mine(arrays, comm):
    return [np.ascontiguousarray(ref.shard(a, comm.size, comm.rank)) for a in arrays]


def poisoned(like, dtype):
    return np.full_like(like, ref.poison(dtype))


def untouched(out, dtype):
    p = ref.poison(dtype)
    return bool(np.all(out.view(np.uint16) == p)) if dtype == "bfloat16" else \
        bool(np.all(np.isnan(out)))


def fast_and_untouched(seconds, outs):
    """The problems of a fault that must raise before the timeout, writing nothing."""
    problems = []
    if seconds >= TIMEOUT_S / 5:
        problems.append(f"{seconds:.3f} s: the error waited for the timeout")
    return problems + untouched_problems(outs)


def untouched_problems(outs):
    if not (untouched(outs[0], "bfloat16") and untouched(outs[1], "bfloat16")):
        return ["an output was written"]
    return []


def report(comm, capsys, case, seconds, outcome):
    """Gather every rank's time to its error and print it from rank 0."""
    rows = comm.gather((seconds, outcome), root=0)
    if comm.rank == 0:
        text = ", ".join(f"rank {r}: {o} after {s * 1e3:.1f} ms" if s is not None else
                         f"rank {r}: {o}" for r, (s, o) in enumerate(rows))
        with capsys.disabled():
            print(f"\nFAULT-TIME G={comm.size} {case}: {text}", flush=True)


def timed(fn):
    """(exception or None, seconds) of fn()."""
    t = time.monotonic()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - returned to the test, which checks its type
        return e, time.monotonic() - t
    return None, time.monotonic() - t


def agree(comm, problems):
    """Collective assertion: fails on every rank if any rank found a problem."""
    found = [f"rank {r}: {p}" for r, ps in enumerate(comm.allgather(list(problems)))
             for p in ps]
    assert not found, "; ".join(found)


def fresh_object_problems(comm, dtype="float32"):
    """A new object on the same communicator, after a fault: [] where its results are
    exact on this rank."""
    q_dim, k_dim = default_dims(comm.size)
    q, k, qw, kw, qr, kr = ref.make_case(99, 3, q_dim, k_dim, dtype)
    try:
        with TPQKNorm(comm, q_dim, k_dim, dtype, transport="mpi", timeout_s=5) as norm:
            sh = mine((q, k, qw, kw), comm)
            norm(*sh)
    except Exception as e:  # noqa: BLE001 - reported collectively
        return [f"a new object after the fault raised {type(e).__name__}: {e}"]
    bad = sum(ref.compare(o, ref.shard(r, comm.size, comm.rank), dtype)[1]
              for o, r in zip(sh[:2], (qr, kr)))
    return [f"a new object after the fault: {bad} elements wrong"] if bad else []


# -- parity ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,wdtype", [("bfloat16", None), ("bfloat16", "float32"),
                                          ("float16", None), ("float16", "float32"),
                                          ("float32", None)])
def test_parity(comm, dtype, wdtype):
    q_dim, k_dim = default_dims(comm.size)
    problems = []
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=64, transport="mpi") as norm:
        assert norm.transport == "mpi"
        for i, tokens in enumerate((0, 1, 7, 130)):
            q, k, qw, kw, qr, kr = ref.make_case(50 + i, tokens, q_dim, k_dim, dtype, wdtype)
            sh = mine((q, k, qw, kw), comm)
            outs = [poisoned(sh[0], dtype), poisoned(sh[1], dtype)]
            norm(*sh, out=outs)
            for o, r in zip(outs, (qr, kr)):
                err, bad = ref.compare(o, ref.shard(r, comm.size, comm.rank), dtype)
                if bad:
                    problems.append(f"T={tokens}: {bad} past tolerance, max error {err}")
    agree(comm, problems)


def test_small_rms_rows_keep_full_eps(comm):
    """Rows far below sqrt(eps): the full eps must be used, not eps / G or eps / D."""
    q_dim, k_dim = default_dims(comm.size)
    q, k, qw, kw, qr, kr = ref.make_case(77, 5, q_dim, k_dim, "float32",
                                         log10_rms=(-6.0, -5.0))
    with TPQKNorm(comm, q_dim, k_dim, "float32", transport="mpi") as norm:
        sh = mine((q, k, qw, kw), comm)
        norm(*sh)
    agree(comm, [f"{name}: {bad} past tolerance" for name, o, r in
                 (("q", sh[0], qr), ("k", sh[1], kr))
                 if (bad := ref.compare(o, ref.shard(r, comm.size, comm.rank),
                                        "float32")[1])])


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_rope_parity(comm, style, dtype):
    """Norm then RoPE (64 of each head of 128 rotated), positions up to the table's end."""
    g = comm.size
    q_dim, k_dim = g * 256, g * 128   # whole heads on every rank
    rope = RoPE(128, 64, theta=5e6, style=style, max_position=4096)
    table = ref.rope_table(4096, 64, 5e6)
    problems = []
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=16, transport="mpi",
                  rope=rope) as norm:
        for i, tokens in enumerate((1, 5, 40)):
            q, k, qw, kw, _, _ = ref.make_case(60 + i, tokens, q_dim, k_dim, dtype)
            pos = np.random.default_rng(i).integers(0, 4096, tokens)
            pos[0] = 4095
            qy, ky, qm, km = ref.qk_norm_rope(
                ref.to_f64(q, dtype), ref.to_f64(k, dtype), ref.to_f64(qw, dtype),
                ref.to_f64(kw, dtype), 1e-6, pos, table, 128, 64, style)
            sh = mine((q, k, qw, kw), comm)
            outs = [poisoned(sh[0], dtype), poisoned(sh[1], dtype)]
            norm(*sh, out=outs, positions=pos.astype(np.int32 if i % 2 else np.int64))
            for o, y, m in zip(outs, (qy, ky), (qm, km)):
                err, bad = ref.compare_rope(o, ref.shard(y, g, comm.rank),
                                            ref.shard(m, g, comm.rank), dtype)
                if bad:
                    problems.append(f"T={tokens}: {bad} past tolerance, max error {err}")
    agree(comm, problems)


# -- replicated KV heads and model presets ---------------------------------------------
def kv_cases(g):
    """(kv_heads, head_dim) of k at G ranks, replicated: every KV head on G / kv_heads
    ranks (one head on all of them, and at G=4 two heads on two ranks each)."""
    return [(1, 64)] + ([(g // 2, 64)] if g % 2 == 0 and g > 2 else [])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_parity_replicated_kv_heads(comm, dtype):
    """KV heads fewer than the ranks: rank r holds head r * kv_heads // G of k and of its
    weight; the k norm counts every distinct head once (float64 truth over the distinct
    heads), on every rank of each replica group alike; q unaffected."""
    g, problems = comm.size, []
    for kv, head in kv_cases(g):
        q_dim, k_dim = 2 * g * head, kv * head
        with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=16, transport="mpi",
                      kv_heads=kv, head_dim=head) as norm:
            assert norm.config.k_local == head and norm.config.k_replicas == g // kv
            for i, tokens in enumerate((1, 7, 40)):  # 40: three chunks of the sums
                q, k, qw, kw, qr, kr = ref.make_case(80 + i, tokens, q_dim, k_dim, dtype)
                qs, qws = mine((q, qw), comm)
                ks, kws = (np.ascontiguousarray(ref.shard_heads(a, g, comm.rank, kv))
                           for a in (k, kw))
                outs = [poisoned(qs, dtype), poisoned(ks, dtype)]
                norm(qs, ks, qws, kws, out=outs)
                for name, o, want in (("q", outs[0], ref.shard(qr, g, comm.rank)),
                                      ("k", outs[1], ref.shard_heads(kr, g, comm.rank, kv))):
                    err, bad = ref.compare(o, want, dtype)
                    if bad:
                        problems.append(f"kv_heads={kv} T={tokens} {name}: {bad} past "
                                        f"tolerance, max error {err}")
    agree(comm, problems)


def test_a_kv_head_layout_that_does_not_fit_is_refused_on_every_rank(comm):
    """k's heads neither split nor replicate evenly: the same one-line ValueError on
    every rank, from the constructor (before any buffer)."""
    g = comm.size
    kv = g + 1  # neither a multiple nor a divisor of G (G >= 2)
    error = construct(comm, g * 64, kv * 64, "float32", transport="mpi", kv_heads=kv,
                      head_dim=64)
    want = f"{kv} KV heads neither split evenly over {g} ranks nor replicate evenly"
    text = str(error)
    ok = type(error) is ValueError and want in text and "\n" not in text and \
        text.startswith("rank 0: ")
    agree(comm, [] if ok else [f"expected ValueError ({want}), got {error!r}"])
    texts = comm.allgather(text)
    agree(comm, [] if len(set(texts)) == 1 else [f"the ranks' errors differ: {texts}"])


@pytest.mark.parametrize("name", list(MODELS))
def test_model_preset_parity(comm, name):
    """TPQKNorm.for_model at this G (whole heads, or MiniMax's KV heads replicated),
    against the float64 truth with the model's RoPE where it has one; a G the model's
    heads do not fit raises its one-line ValueError on every rank."""
    from cupy_qknorm.models import get
    model, g = get(name), comm.size
    if not model.layout(g):
        try:
            TPQKNorm.for_model(name, comm, max_tokens=16, transport="mpi").close()
            error = None
        except ValueError as e:
            error = e
        ok = error is not None and f"does not run at G={g}" in str(error)
        agree(comm, [] if ok else [f"expected the model's refusal, got {error!r}"])
        return
    dtype, tokens, problems = "bfloat16", 5, []
    q, k, qw, kw, qr, kr = ref.make_case(90, tokens, model.q_dim, model.k_dim, dtype,
                                         eps=model.eps)
    kwargs, mags = {}, None
    if model.rope is not None:
        rope = model.rope
        pos = np.random.default_rng(3).integers(0, rope.max_position, tokens)
        pos[0] = rope.max_position - 1
        qr, kr, qm, km = ref.qk_norm_rope(
            ref.to_f64(q, dtype), ref.to_f64(k, dtype), ref.to_f64(qw, dtype),
            ref.to_f64(kw, dtype), model.eps, pos, ref.shared_table(
                rope.max_position, rope.rotary_dim, rope.theta), rope.head_dim,
            rope.rotary_dim, rope.style)
        kwargs["positions"] = pos
        mags = (ref.shard(qm, g, comm.rank), ref.shard_heads(km, g, comm.rank, model.kv_heads))
    with TPQKNorm.for_model(name, comm, max_tokens=16, transport="mpi") as norm:
        assert (norm.config.q_local, norm.config.k_local) == model.local_dims(g)
        qs, qws = mine((q, qw), comm)
        ks, kws = (np.ascontiguousarray(ref.shard_heads(a, g, comm.rank, model.kv_heads))
                   for a in (k, kw))
        outs = [poisoned(qs, dtype), poisoned(ks, dtype)]
        norm(qs, ks, qws, kws, out=outs, **kwargs)
    want = (ref.shard(qr, g, comm.rank), ref.shard_heads(kr, g, comm.rank, model.kv_heads))
    for i, (o, y) in enumerate(zip(outs, want)):
        err, bad = ref.compare(o, y, dtype) if mags is None else \
            ref.compare_rope(o, y, mags[i], dtype)
        if bad:
            problems.append(f"{'qk'[i]}: {bad} past tolerance, max error {err}")
    agree(comm, problems)


# -- configuration ---------------------------------------------------------------------
def construct(*args, **kwargs):
    """The error of TPQKNorm(*args, **kwargs), or None (the object is then closed)."""
    try:
        TPQKNorm(*args, **kwargs).close()
    except Exception as e:  # noqa: BLE001 - checked by the caller
        return e
    return None


def test_config_mismatch_raises_on_every_rank(comm):
    eps = 1e-6 if comm.rank == 0 else 1e-5
    error = construct(comm, *default_dims(comm.size), "float32", eps=eps, transport="mpi")
    ok = type(error) is ConfigMismatchError and "disagree" in str(error)
    agree(comm, [] if ok else [f"expected ConfigMismatchError, got {error!r}"])


def test_one_rank_bad_config_raises_everywhere(comm):
    good = default_dims(comm.size)[0]
    q_dim = good if comm.rank else good + 1  # only rank 0 is wrong
    error = construct(comm, q_dim, default_dims(comm.size)[1], "float32", transport="mpi")
    ok = type(error) is ValueError and str(error).startswith("rank 0: q_dim=")
    agree(comm, [] if ok else [f"expected ValueError naming rank 0, got {error!r}"])


def test_sub_communicators_side_by_side(comm):
    """Each rank alone in its own group: every group normalizes its rows by itself."""
    sub = comm.Split(comm.rank, 0)
    try:
        with TPQKNorm(sub, 64, 32, "float32", transport="mpi") as norm:
            q, k, qw, kw, qr, kr = ref.make_case(comm.rank, 3, 64, 32, "float32")
            norm(q, k, qw, kw)
    finally:
        sub.Free()
    bad = ref.compare(q, qr, "float32")[1] + ref.compare(k, kr, "float32")[1]
    agree(comm, [f"{bad} elements past tolerance"] if bad else [])


def test_auto_without_gpu_is_mpi(comm):
    from tests.conftest import HAS_GPU
    if HAS_GPU:
        pytest.skip("a GPU is present: auto picks a GPU transport")
    with TPQKNorm(comm, *default_dims(comm.size), "bfloat16") as norm:
        assert norm.transport == "mpi"


# -- faults ----------------------------------------------------------------------------
TIMEOUT_S = 5.0


def setup(comm, dtype="bfloat16", tokens=4, timeout_s=TIMEOUT_S, rope=None):
    q_dim, k_dim = (comm.size * 256, comm.size * 128) if rope else default_dims(comm.size)
    norm = TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=16, transport="mpi",
                    timeout_s=timeout_s, rope=rope)
    q, k, qw, kw, _, _ = ref.make_case(7, tokens, q_dim, k_dim, dtype)
    sh = mine((q, k, qw, kw), comm)
    return norm, sh, [poisoned(sh[0], dtype), poisoned(sh[1], dtype)]


def test_fault_one_rank_bad_shape(comm, capsys):
    """That rank raises its own ValueError; the others CallMismatchError naming it and
    quoting its cause, at once (no waiting for the timeout)."""
    bad = comm.size - 1
    norm, (q, k, qw, kw), outs = setup(comm)
    if comm.rank == bad:
        q = q[:, :-8]
    error, seconds = timed(lambda: norm(q, k, qw, kw, out=outs))
    norm.close()
    report(comm, capsys, "one rank passes a bad shape", seconds, type(error).__name__)
    problems = fresh_object_problems(comm)
    if comm.rank == bad:
        if type(error) is not ValueError or "q: shape must be" not in str(error):
            problems.append(f"expected its own ValueError, got {error!r}")
    elif type(error) is not CallMismatchError or error.peer != bad or \
            f"the call was refused by rank {bad}: ValueError: q: shape must be" not in \
            str(error):
        problems.append(f"expected CallMismatchError naming rank {bad}, got {error!r}")
    problems += fast_and_untouched(seconds, outs)
    agree(comm, problems)


def test_fault_token_counts_differ(comm, capsys):
    """Rank 0 calls with T=5, the others with T=4: CallMismatchError on every rank."""
    norm, (q, k, qw, kw), outs = setup(comm, tokens=5)
    if comm.rank:
        q, k, outs = q[:4], k[:4], [o[:4] for o in outs]
    error, seconds = timed(lambda: norm(q, k, qw, kw, out=outs))
    norm.close()
    report(comm, capsys, "T=5 on rank 0, T=4 elsewhere", seconds, type(error).__name__)
    problems = fresh_object_problems(comm)
    want = (f"rank {comm.rank} called with {5 if comm.rank == 0 else 4} tokens while the "
            f"ranks' token counts range from 4 to 5")
    if type(error) is not CallMismatchError or want not in str(error):
        problems.append(f"expected CallMismatchError ({want}), got {error!r}")
    problems += fast_and_untouched(seconds, outs)
    agree(comm, problems)


def test_fault_a_rank_skips_a_call(comm, capsys):
    """The last rank makes no call: the others raise PeerTimeoutError after about
    timeout_s, and every rank can then build a new object on the communicator."""
    skipper, timeout = comm.size - 1, 1.0
    norm, (q, k, qw, kw), outs = setup(comm, timeout_s=timeout)
    if comm.rank == skipper:
        error, seconds = None, None
    else:
        error, seconds = timed(lambda: norm(q, k, qw, kw, out=outs))
    norm.close()
    report(comm, capsys, f"a rank skips a call (timeout_s={timeout:g})", seconds,
           type(error).__name__ if error else "no call")
    problems = fresh_object_problems(comm)
    if comm.rank != skipper:
        if type(error) is not PeerTimeoutError:
            problems.append(f"expected PeerTimeoutError, got {error!r}")
        if not timeout <= seconds < timeout + 1.0:
            problems.append(f"{seconds:.3f} s to the error for a {timeout:g} s bound")
        problems += untouched_problems(outs)
    agree(comm, problems)


def rows_of_valid_positions_problems(outs, bad_row):
    """The rows of valid positions were written, the bad one was not."""
    problems = []
    for name, o in zip(("q", "k"), outs):
        rows = untouched_rows(o)
        if rows != [bad_row]:
            problems.append(f"{name}: rows {rows} unwritten, expected only row {bad_row}")
    return problems


def untouched_rows(out):
    p = ref.poison("bfloat16")
    return [int(r) for r in np.flatnonzero((out.view(np.uint16) == p).all(axis=1))]


@pytest.mark.parametrize("where", ["every rank", "one rank"])
def test_fault_position_outside_the_table(comm, capsys, where):
    """A position outside the table: part of the call's agreement, so every rank raises in
    the same call, the rank whose position it is PositionError and the others
    CallMismatchError naming it and the token; every rank wrote its rows of valid
    positions; then every object is closed."""
    rope = RoPE(128, 64, max_position=32)
    norm, (q, k, qw, kw), outs = setup(comm, rope=rope)
    bad = 0 if where == "every rank" else comm.size - 1
    pos = np.array([0, 31, 32 if where == "every rank" or comm.rank == bad else 7, 5])
    error, seconds = timed(lambda: norm(q, k, qw, kw, out=outs, positions=pos))
    closed, _ = timed(lambda: norm(q, k, qw, kw, out=outs, positions=pos))
    norm.close()
    report(comm, capsys, f"a position outside the table on {where}", seconds,
           type(error).__name__)
    problems = fresh_object_problems(comm)
    if where == "every rank" or comm.rank == bad:
        want = f"rank {comm.rank}: token 2 has position 32, outside the RoPE table's 32 rows"
        if type(error) is not PositionError or want not in str(error) or \
                (error.token, error.position) != (2, 32):
            problems.append(f"expected PositionError ({want}), got {error!r}")
        problems += rows_of_valid_positions_problems(outs, 2)
    else:
        want = f"rank {bad}: token 2 has a position outside the RoPE table"
        if type(error) is not CallMismatchError or want not in str(error) or \
                (error.peer, error.token) != (bad, 2):
            problems.append(f"expected CallMismatchError ({want}), got {error!r}")
        problems += [] if not untouched_rows(outs[0]) and not untouched_rows(outs[1]) else \
            ["a row of a valid position was not written"]
    if seconds >= TIMEOUT_S / 5:
        problems.append(f"{seconds:.3f} s: the error waited for the timeout")
    if type(closed) is not ClosedError:
        problems.append(f"the next call raised {closed!r}, not ClosedError")
    agree(comm, problems)


def test_fault_tags_differ(comm, capsys):
    """Rank 0 calls with tag=3, the others with tag=4: every rank raises
    CallMismatchError naming its tag and a differing peer's, with nothing written."""
    norm, (q, k, qw, kw), outs = setup(comm)
    tag = 3 if comm.rank == 0 else 4
    error, seconds = timed(lambda: norm(q, k, qw, kw, out=outs, tag=tag))
    norm.close()
    report(comm, capsys, "tag=3 on rank 0, tag=4 elsewhere", seconds, type(error).__name__)
    problems = fresh_object_problems(comm)
    other, theirs = (1, 4) if comm.rank == 0 else (0, 3)
    want = f"rank {comm.rank} made a call with tag={tag} where rank {other} made it with " \
           f"tag={theirs}"
    if type(error) is not CallMismatchError or want not in str(error):
        problems.append(f"expected CallMismatchError ({want}), got {error!r}")
    problems += fast_and_untouched(seconds, outs)
    agree(comm, problems)


def test_a_rank_that_skips_a_tagged_call_is_caught_at_once(comm):
    """Tagged calls: the last rank skips layer 0's call and makes layer 1's, which meets
    the others' layer 0: every rank raises CallMismatchError at once, where untagged
    calls would have paired off one apart."""
    norm, (q, k, qw, kw), outs = setup(comm)
    skipper = comm.size - 1
    error, seconds = timed(lambda: norm(q, k, qw, kw, out=outs,
                                        tag=1 if comm.rank == skipper else 0))
    norm.close()
    problems = fresh_object_problems(comm)
    if type(error) is not CallMismatchError or "tag=" not in str(error):
        problems.append(f"expected CallMismatchError naming the tags, got {error!r}")
    problems += fast_and_untouched(seconds, outs)
    agree(comm, problems)


def test_a_refused_input_closes_the_object_on_every_rank(comm):
    norm, (q, k, qw, kw), outs = setup(comm)
    bad = comm.size - 1
    first, _ = timed(lambda: norm(q[:, :-8] if comm.rank == bad else q, k, qw, kw, out=outs))
    then, _ = timed(lambda: norm(q, k, qw, kw, out=outs))
    norm.close()
    problems = fresh_object_problems(comm)
    if type(first) is not (ValueError if comm.rank == bad else CallMismatchError):
        problems.append(f"the refused call raised {first!r}")
    if type(then) is not ClosedError:
        problems.append(f"the next call raised {then!r}, not ClosedError")
    agree(comm, problems)
