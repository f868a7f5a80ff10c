"""The MPI paths with numpy arrays: run under `mpiexec -n G python -m pytest --with-mpi`
(tests/test_launch.py does that). Every rank must raise the same error together."""
import numpy as np
import pytest
from mpi4py import MPI

from cupy_qknorm import ConfigMismatchError, TPQKNorm
from cupy_qknorm import reference as ref

pytestmark = pytest.mark.mpi(min_size=2)


def dims(world):
    from cupy_qknorm.compile import default_dims
    return default_dims(world)


@pytest.mark.parametrize("dtype,wdtype", [("bfloat16", None), ("bfloat16", "float32"),
                                          ("float16", None), ("float32", None)])
def test_mpi_transport_parity(comm, dtype, wdtype):
    q_dim, k_dim = dims(comm.size)
    with TPQKNorm(comm, q_dim, k_dim, dtype, max_tokens=64, transport="mpi") as norm:
        assert norm.transport == "mpi"
        for i, tokens in enumerate((0, 1, 7, 130)):
            q, k, qw, kw, qr, kr = ref.make_case(50 + i, tokens, q_dim, k_dim, dtype, wdtype)
            mine = [np.ascontiguousarray(ref.shard(a, comm.size, comm.rank))
                    for a in (q, k, qw, kw)]
            outs = [np.full_like(mine[0], ref.poison(dtype)),
                    np.full_like(mine[1], ref.poison(dtype))]
            norm(*mine, out=outs)
            for o, r in zip(outs, (qr, kr)):
                err, bad = ref.compare(o, ref.shard(r, comm.size, comm.rank), dtype)
                assert bad == 0, f"T={tokens}: max error {err}"


def test_small_rms_rows_keep_full_eps(comm):
    """Rows far below sqrt(eps): the full eps must be used, not eps / G or eps / D."""
    q_dim, k_dim = dims(comm.size)
    q, k, qw, kw, qr, kr = ref.make_case(77, 5, q_dim, k_dim, "float32",
                                         log10_rms=(-6.0, -5.0))
    with TPQKNorm(comm, q_dim, k_dim, "float32", transport="mpi") as norm:
        mine = [np.ascontiguousarray(ref.shard(a, comm.size, comm.rank))
                for a in (q, k, qw, kw)]
        norm(*mine)
    assert ref.compare(mine[0], ref.shard(qr, comm.size, comm.rank), "float32")[1] == 0


def test_config_mismatch_raises_on_every_rank(comm):
    eps = 1e-6 if comm.rank == 0 else 1e-5
    with pytest.raises(ConfigMismatchError, match="disagree"):
        TPQKNorm(comm, *dims(comm.size), "float32", eps=eps, transport="mpi")


def test_one_rank_bad_config_raises_everywhere(comm):
    good = dims(comm.size)[0]
    q_dim = good if comm.rank else good + 1  # only rank 0 is wrong
    with pytest.raises(ValueError, match=r"^rank 0: q_dim="):
        TPQKNorm(comm, q_dim, dims(comm.size)[1], "float32", transport="mpi")


def test_sub_communicators_side_by_side(comm):
    """Each rank alone in its own group: every group normalizes its rows by itself."""
    sub = comm.Split(comm.rank, 0)
    try:
        with TPQKNorm(sub, 64, 32, "float32", transport="mpi") as norm:
            q, k, qw, kw, qr, kr = ref.make_case(comm.rank, 3, 64, 32, "float32")
            norm(q, k, qw, kw)
            assert ref.compare(q, qr, "float32")[1] == 0
    finally:
        sub.Free()


def test_auto_without_gpu_is_mpi(comm):
    from tests.conftest import HAS_GPU
    if HAS_GPU:
        pytest.skip("a GPU is present: auto picks a GPU transport")
    with TPQKNorm(comm, *dims(comm.size), "bfloat16") as norm:
        assert norm.transport == "mpi"
