"""Where the ranks are (GPU, host) and which transport can run there.

`choose_transport` is a pure function of every rank's `local_facts()`, tested without a
GPU; `select_device` picks this rank's GPU from its node-local rank."""
from __future__ import annotations

import socket
from typing import NamedTuple


class Facts(NamedTuple):
    gpu: bool            # CuPy sees a usable current device
    bus: str | None      # its PCI bus id: the same GPU seen by two ranks has the same one
    host: str
    nccl: bool           # cupy.cuda.nccl can be used
    device: int | None   # the device index in this process


def local_facts() -> Facts:
    """This rank's placement; never raises (no CuPy, no driver or no GPU: CPU only)."""
    host = socket.gethostname()
    try:
        import cupy
        dev = cupy.cuda.Device()
        bus = dev.pci_bus_id
        index = dev.id
    except Exception:  # noqa: BLE001 - ImportError, CUDARuntimeError: no GPU here
        return Facts(False, None, host, False, None)
    try:
        from cupy.cuda import nccl
        has_nccl = bool(getattr(nccl, "available", True)) and \
            hasattr(nccl, "NcclCommunicator")
    except Exception:  # noqa: BLE001
        has_nccl = False
    return Facts(True, bus, host, has_nccl, index)


def _shared_gpu(facts):
    """(rank a, rank b, device index) of two ranks on one GPU of one host, or None."""
    seen = {}
    for r, f in enumerate(facts):
        key = (f.host, f.bus)
        if key in seen:
            return seen[key], r, f.device
        seen[key] = r
    return None


def choose_transport(asked: str, facts) -> tuple:
    """(transport, reason) for a request of `asked` given every rank's Facts; transport
    None with a one-line reason where `asked` cannot run on this placement. Pure."""
    facts = [Facts(*f) for f in facts]
    if asked == "mpi":
        return "mpi", "asked for"
    if not all(f.gpu for f in facts):
        if asked == "auto":
            return "mpi", "no GPU on some rank"
        cpu = [r for r, f in enumerate(facts) if not f.gpu]
        # the facts do not say which piece that rank lacks: name each, the install last
        return None, (f"{asked} needs a GPU on every rank; rank {cpu[0]} has none (no CUDA "
                      f"device or driver there, or no CuPy: pip install "
                      f"'cupy-qknorm[cuda13]' or 'cupy-qknorm[cuda12]')")
    shared = _shared_gpu(facts)
    if shared is not None:
        # NCCL refuses two ranks on one device, and the fused kernel's spin-waits would need
        # both ranks' kernels resident on the GPU at once.
        if asked == "auto":
            return "mpi", "ranks share a GPU"
        a, b, dev = shared
        return None, (f"{asked} needs one GPU per rank; ranks {a} and {b} share GPU {dev}; "
                      f"transport 'mpi' runs there")
    one_node = len({f.host for f in facts}) == 1
    if asked in ("auto", "ipc") and one_node:
        return "ipc", "one node, one GPU per rank"
    if asked == "ipc":
        return None, "ipc needs every rank on one node; transport 'nccl' spans nodes"
    if all(f.nccl for f in facts):
        return "nccl", "asked for" if asked == "nccl" else "ranks span nodes"
    if asked == "auto":
        return "mpi", "NCCL is not available"
    return None, "nccl is not available in this CuPy (pip install nvidia-nccl-cu13 or -cu12)"


def select_device(comm) -> bool:
    """Make this rank's GPU current: node-local rank modulo the GPUs visible (never by
    masking CUDA_VISIBLE_DEVICES, which breaks peer access). False where there is none."""
    from mpi4py import MPI
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
        if n:
            cupy.cuda.Device(local.rank % n).use()
            return True
    except Exception:  # noqa: BLE001 - no CuPy, no driver or no GPU: numpy and "mpi"
        pass
    finally:
        local.Free()
    return False


# CUDA runtime errors that say what is missing
_INSUFFICIENT_DRIVER = 35    # cudaErrorInsufficientDriver: no driver, or one too old
_NO_DEVICE = 100             # cudaErrorNoDevice

CUPY_MISSING = "CuPy is not installed (pip install 'cupy-qknorm[cuda13]' or '[cuda12]')"


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def no_gpu_reason() -> str | None:
    """None where CuPy sees a GPU, else what is missing, in one line: CuPy (with the extra
    that brings it), a CUDA driver (none, or one older than CuPy's runtime), or a device.
    An install is named only where it is the remedy: no CuPy, or a CuPy newer than the
    driver."""
    try:
        import cupy
    except ImportError as e:  # not installed, or a CuPy whose own libraries are missing
        if isinstance(e, ModuleNotFoundError) and \
                (e.name or "").split(".")[0] in ("cupy", "cupy_backends"):
            return CUPY_MISSING
        return f"CuPy is installed but does not import ({type(e).__name__}: {_first(e)})"
    runtime = cupy.cuda.runtime
    try:
        count = runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - CUDARuntimeError: say which piece is missing
        return _runtime_reason(runtime, e)
    return None if count > 0 else "CuPy is installed but sees no CUDA device"


def _runtime_reason(runtime, error) -> str:
    status = getattr(error, "status", None)
    if status == _NO_DEVICE:
        return "CuPy is installed but sees no CUDA device"
    if status != _INSUFFICIENT_DRIVER:
        return (f"CuPy is installed but cannot reach a GPU ({type(error).__name__}: "
                f"{_first(error)})")
    try:
        driver, ours = runtime.driverGetVersion(), runtime.runtimeGetVersion()
    except Exception:  # noqa: BLE001 - the versions only sharpen the message
        driver, ours = None, None
    if driver == 0:  # what cudaDriverGetVersion reports where no driver is installed
        return "CuPy is installed but this host has no CUDA driver (no libcuda)"
    if driver and ours:
        return (f"the CUDA driver ({_cuda_version(driver)}) is older than CuPy's CUDA runtime "
                f"({_cuda_version(ours)}): update the driver, or use the CuPy of its CUDA "
                f"version (cupy-qknorm[cuda12] in place of [cuda13])")
    return "CuPy is installed but finds no usable CUDA driver"


def _first(e) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
