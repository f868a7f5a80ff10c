"""How the per-token partial sums travel between ranks.

    ipc   one fused kernel: sums -> peers' IPC buffers over NVLink -> wait -> scale, store
    nccl  partial_sums kernel -> NCCL all-reduce of the sums -> apply kernel
    mpi   partial sums -> MPI all-reduce on the host -> apply; numpy arrays run on the CPU

Each GPU transport walks the tokens in chunks of at most max_tokens, one launch (or one
kernel-collective-kernel sequence) per chunk, on the caller's stream, with no host
synchronization (except "mpi", which must bring the sums to the host).
"""
from .ipc import IpcTransport
from .mpi import MpiTransport
from .nccl import NcclTransport

CLASSES = {"ipc": IpcTransport, "nccl": NcclTransport, "mpi": MpiTransport}
