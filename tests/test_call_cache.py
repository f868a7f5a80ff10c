"""The eager fast path is taken for every way of passing the same arrays: in place
without out=, with out= naming the inputs themselves, and out of place."""
import numpy as np
import pytest
from mpi4py import MPI

from tests.fake_cuda import fake_norm

cupy = pytest.importorskip("cupy")


HOST = np.zeros(1 << 20, np.uint8)


def arr(shape, offset):
    mem = cupy.cuda.UnownedMemory(HOST.ctypes.data + offset, HOST.nbytes - offset, HOST,
                                  device_id=0)
    return cupy.ndarray(shape, np.uint16, memptr=cupy.cuda.MemoryPointer(mem, 0))


class Counts:
    """What a fake "ipc" object did: validations and launches."""

    def __init__(self, norm, cuda):
        self.norm, self.cuda = norm, cuda

    @property
    def launches(self):
        return len(self.cuda.launches)


@pytest.fixture
def fake_ipc():
    """(TPQKNorm, Counts): an object whose calls take the "ipc" path over a fake CUDA."""
    n, cuda = fake_norm(MPI.COMM_SELF, "ipc", 256, 64, "bfloat16")
    yield n, Counts(n, cuda)
    n.close()


@pytest.mark.parametrize("how", ["in place", "out= the inputs", "out of place"])
def test_each_way_of_calling_is_cached(fake_ipc, how):
    n, fake = fake_ipc
    q, k, qw, kw = arr((2, 256), 0), arr((2, 64), 4096), arr((256,), 8192), arr((64,), 12288)
    out = {"in place": None, "out= the inputs": (q, k),
           "out of place": (arr((2, 256), 16384), arr((2, 64), 20480))}[how]
    for _ in range(100):
        got = n(q, k, qw, kw, out=out)
    assert got == ((q, k) if out is None else out)
    assert (n._validations, fake.launches) == (1, 100)


@pytest.mark.parametrize("which", ["q_weight", "k_weight", "q", "out[0]"])
def test_in_place_reshape_of_any_cached_array_is_caught(fake_ipc, which):
    """A 1-D array (a weight) reshaped in place to 2-D, or a 2-D one to another 2-D
    shape, no longer matches its cached call: validation runs again and refuses it."""
    n, fake = fake_ipc
    q, k, qw, kw = arr((2, 256), 0), arr((2, 64), 4096), arr((256,), 8192), arr((64,), 12288)
    qo, ko = arr((2, 256), 16384), arr((2, 64), 20480)
    n(q, k, qw, kw, out=(qo, ko))
    target = {"q_weight": qw, "k_weight": kw, "q": q, "out[0]": qo}[which]
    target.shape = (1, target.size) if target.ndim == 1 else (4, target.shape[1] // 2)
    with pytest.raises(ValueError, match="shape must be"):
        n(q, k, qw, kw, out=(qo, ko))
    assert n._validations == 2 and fake.launches == 1


def test_in_place_with_and_without_out_share_one_entry(fake_ipc):
    """out=(q, k) is the in-place call: it takes the entry of the call without out=."""
    n, fake = fake_ipc
    q, k, qw, kw = arr((2, 256), 0), arr((2, 64), 4096), arr((256,), 8192), arr((64,), 12288)
    for i in range(10):
        assert n(q, k, qw, kw, out=(q, k) if i % 2 else None) == (q, k)
    assert (n._validations, fake.launches) == (1, 10)
    q.shape = (4, 128)
    with pytest.raises(ValueError, match="shape must be"):
        n(q, k, qw, kw, out=[q, k])
    assert fake.launches == 10


@pytest.mark.parametrize("out", [None, "q"], ids=["a single array", "a string"])
def test_an_out_that_is_not_a_pair_is_refused_after_cached_calls(fake_ipc, out):
    n, fake = fake_ipc
    q, k, qw, kw = arr((2, 256), 0), arr((2, 64), 4096), arr((256,), 8192), arr((64,), 12288)
    n(q, k, qw, kw)
    with pytest.raises(TypeError, match="out must be a pair"):
        n(q, k, qw, kw, out=q if out is None else out)
    assert fake.launches == 1


def test_a_generator_out_is_refused_even_when_its_arrays_are_cached(fake_ipc):
    n, fake = fake_ipc
    q, k, qw, kw = arr((2, 256), 0), arr((2, 64), 4096), arr((256,), 8192), arr((64,), 12288)
    qo, ko = arr((2, 256), 16384), arr((2, 64), 20480)
    n(q, k, qw, kw, out=(qo, ko))
    with pytest.raises(TypeError, match="out must be a pair"):
        n(q, k, qw, kw, out=(a for a in (qo, ko)))
    assert fake.launches == 1
