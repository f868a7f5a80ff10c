"""placement.py: which transport runs on a placement, as a pure function of every rank's
Facts (gpu, bus, host, nccl, device); this machine's own facts without a GPU."""
import pytest

from cupy_qknorm.placement import Facts, choose_transport, local_facts, no_gpu_reason
from tests.conftest import HAS_GPU


def gpu(bus, host="a", nccl=True, device=None):
    return (True, bus, host, nccl, int(bus[-1]) if device is None else device)


CPU = (False, None, "a", False, None)


def test_facts_are_five_fields():
    assert Facts._fields == ("gpu", "bus", "host", "nccl", "device")
    with pytest.raises(TypeError):
        choose_transport("auto", [(True, "bus0", "a", True)])  # the old 4-tuple


@pytest.mark.parametrize("asked,facts,want", [
    ("auto", [gpu("bus0"), gpu("bus1")], "ipc"),
    ("ipc", [gpu("bus0"), gpu("bus1")], "ipc"),
    ("nccl", [gpu("bus0"), gpu("bus1")], "nccl"),
    ("mpi", [gpu("bus0"), gpu("bus1")], "mpi"),
    ("auto", [gpu("bus0", "a"), gpu("bus1", "b")], "nccl"),
    ("nccl", [gpu("bus0", "a"), gpu("bus0", "b")], "nccl"),   # the same bus id on two hosts
    ("auto", [gpu("bus0", "a"), gpu("bus1", "b", nccl=False)], "mpi"),
    ("auto", [gpu("bus0"), CPU], "mpi"),
    ("auto", [CPU, CPU], "mpi"),
    ("mpi", [CPU, CPU], "mpi"),
    ("auto", [gpu("bus0")], "ipc"),                             # one rank
    ("auto", [gpu("bus0"), gpu("bus0", device=0)], "mpi"),      # two ranks on one GPU
])
def test_transport_chosen(asked, facts, want):
    name, reason = choose_transport(asked, facts)
    assert name == want, reason
    assert reason and "\n" not in reason


@pytest.mark.parametrize("asked", ["ipc", "nccl"])
def test_ranks_sharing_a_gpu_are_refused_with_the_ranks_and_the_gpu(asked):
    facts = [gpu("bus0"), gpu("bus1"), gpu("bus3"), Facts(True, "bus1", "a", True, 1)]
    name, reason = choose_transport(asked, facts)
    assert name is None
    assert reason == (f"{asked} needs one GPU per rank; ranks 1 and 3 share GPU 1; "
                      f"transport 'mpi' runs there")
    assert choose_transport("auto", facts) == ("mpi", "ranks share a GPU")


@pytest.mark.parametrize("asked", ["ipc", "nccl"])
def test_gpu_transports_need_a_gpu_on_every_rank(asked):
    name, reason = choose_transport(asked, [gpu("bus0"), gpu("bus1"), CPU])
    assert name is None
    assert reason.startswith(f"{asked} needs a GPU on every rank; rank 2 has none (")
    assert "pip install 'cupy-qknorm[cuda13]'" in reason and "\n" not in reason


def test_ipc_needs_one_node():
    name, reason = choose_transport("ipc", [gpu("bus0", "a"), gpu("bus1", "b")])
    assert name is None and reason == \
        "ipc needs every rank on one node; transport 'nccl' spans nodes"


def test_nccl_unavailable():
    facts = [gpu("bus0", nccl=False), gpu("bus1")]
    name, reason = choose_transport("nccl", facts)
    assert name is None and reason.startswith("nccl is not available in this CuPy")
    assert "pip install" in reason
    assert choose_transport("auto", facts)[0] == "ipc"  # one node: NCCL is not needed


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_this_machine_without_a_gpu():
    f = local_facts()
    assert isinstance(f, Facts) and (f.gpu, f.bus, f.nccl, f.device) == (False, None, False,
                                                                         None)
    assert f.host and no_gpu_reason()
