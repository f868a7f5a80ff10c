"""How the per-token partial sums travel between ranks; each transport keeps the contract
of base.py.

    ipc   one fused kernel: sums -> peers' IPC buffers over NVLink -> wait -> scale, store
    nccl  partial_sums kernel -> NCCL all-reduce of the sums -> apply kernel
    mpi   the sums all-reduced by MPI on the host; numpy arrays run on the CPU

Each GPU transport walks the tokens in chunks of at most max_tokens, one launch (or one
kernel-collective-kernel sequence) per chunk, on the caller's stream, with no host
synchronization (except "mpi", which must bring the sums to the host).
"""
from __future__ import annotations

import warnings

from ..collectives import run_collectively
from ..errors import TransportUnavailableError
from .base import Call, Transport, tag_code  # noqa: F401 - the contract
from .ipc import IpcTransport
from .mpi import MpiTransport
from .nccl import NcclTransport


def open_transport(name: str, asked: str, cfg, comm, gpu: bool) -> Transport:
    """Collective: the transport `name` (chosen for `asked`) on every rank, or the same
    TransportUnavailableError on every rank. "auto" falls back from "ipc" to "nccl" where
    the IPC path cannot run (its P2P write test failed), with a warning."""
    if name == "mpi":
        return run_collectively(comm, lambda: MpiTransport(cfg, comm, gpu),
                                TransportUnavailableError)
    cls = IpcTransport if name == "ipc" else NcclTransport
    try:
        return run_collectively(comm, lambda: cls(cfg, comm), TransportUnavailableError)
    except TransportUnavailableError as e:
        if not (name == "ipc" and asked == "auto"):
            raise
        warnings.warn(f"cupy_qknorm: the fused IPC path is unavailable ({e}); falling back "
                      f"to transport 'nccl'", RuntimeWarning, stacklevel=3)
        return run_collectively(comm, lambda: NcclTransport(cfg, comm),
                                TransportUnavailableError)
