"""GPU-suite switches for hosts with fewer GPUs than ranks.

QKNORM_TEST_SHARED_GPU=1 lets the GPU transports run with several ranks on one GPU, for
correctness only: the library refuses that placement (NCCL rejects it, and the fused
kernel's spin-waits then progress only as the GPU time-slices between the processes, so
every exchange costs a time slice). Here each rank's GPU is made to look distinct to
the transport choice. Timings and fault times from such a run mean nothing; "nccl" still
refuses (NCCL itself does)."""
import os


def pytest_configure(config):
    if os.environ.get("QKNORM_TEST_SHARED_GPU") != "1":
        return
    from cupy_qknorm import norm
    from cupy_qknorm.placement import choose_transport

    def distinct(asked, facts):
        facts = [f._replace(bus=f"{f.bus}#{r}") for r, f in enumerate(facts)]
        return choose_transport(asked, facts)
    norm.choose_transport = distinct
