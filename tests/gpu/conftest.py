"""GPU-suite switches for hosts with fewer GPUs than ranks.

QKNORM_TEST_SHARED_GPU=1 (scripts/gpu_suite.sh sets it for a G beyond the GPUs) lets the
GPU transports run with several ranks on one GPU, for correctness only: the library
refuses that placement (NCCL rejects it, and the fused kernel's spin-waits then progress
only as the GPU time-slices between the processes, so every exchange costs a time slice).
Here each rank's GPU is made to look distinct to the transport choice. Timings and fault
times from such a run mean nothing.

NCCL itself still refuses two ranks on one GPU, so in that mode every test that needs
"nccl" skips, saying so: those run with `transport="nccl"`, and those NEEDS_NCCL lists
(which reach nccl another way)."""
import os
from pathlib import Path

import pytest

SHARED = os.environ.get("QKNORM_TEST_SHARED_GPU") == "1"
NCCL_REFUSES = "NCCL refuses two ranks on one GPU (ranks share GPUs here)"
# tests without a `transport` parameter that need nccl: name -> how they reach it
NEEDS_NCCL = {
    "test_broken_p2p_auto_falls_back_ipc_raises": "its 'auto' falls back to nccl",
}
HERE = Path(__file__).resolve().parent


def nccl_skip_reason(name: str, params: dict) -> str | None:
    """Why a test of tests/gpu named `name` (without its parameters), run with `params`,
    cannot run where ranks share a GPU; None where it can."""
    if params.get("transport") == "nccl":
        return NCCL_REFUSES
    if name in NEEDS_NCCL:
        return f"{NCCL_REFUSES}: {NEEDS_NCCL[name]}"
    return None


def pytest_configure(config):
    if not SHARED:
        return
    from cupy_qknorm import norm, placement

    choose = placement.choose_transport

    def distinct(asked, facts):
        facts = [f._replace(bus=f"{f.bus}#{r}") for r, f in enumerate(facts)]
        return choose(asked, facts)
    # wherever the choice is looked up from
    for module in (norm, placement):
        if getattr(module, "choose_transport", None) is choose:
            module.choose_transport = distinct


def pytest_collection_modifyitems(config, items):
    """Marked at collection, so that the skip comes before any fixture's collective."""
    if not SHARED:
        return
    for item in items:
        if HERE not in Path(item.path).resolve().parents:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        why = nccl_skip_reason(getattr(item, "originalname", item.name), params)
        if why is not None:
            item.add_marker(pytest.mark.skip(reason=why))
