"""IPC buffers: allocate, exchange handles over MPI, open, prove a peer write, close.

Every function here is collective over `comm`: all ranks call it, and where any rank fails,
all ranks raise the same error (collectives.py), so no rank is left blocked in a collective.
"""
from __future__ import annotations

import secrets

from .collectives import run_collectively
from .errors import TransportUnavailableError
from .params import EMPTY_WORD

_OPEN_MAPPINGS = set()  # peer buffers this process has mapped and not yet unmapped


def open_mappings() -> int:
    """How many peer buffers this process holds mapped (scripts/cycles.py checks it)."""
    return len(_OPEN_MAPPINGS)


class PeerBuffers:
    """One exchange buffer per rank, each mapped into every rank's process.

    ptrs[r] is rank r's buffer as seen from this process (ptrs[rank] is our own). The last
    `8 * world` bytes of each buffer are the probe area: word r is written by rank r."""

    corrupt_probe = False  # tests set it: the probe then writes a wrong value (a broken P2P)

    def __init__(self, comm, nbytes: int):
        from cupy.cuda import runtime
        self._comm = comm
        self.rank, self.world = comm.rank, comm.size
        self.nbytes = nbytes
        self.total = nbytes + 8 * self.world
        self.local = 0
        self._opened = []
        self.closed = False

        def allocate():
            # cudaMalloc directly: an IPC handle of a CuPy pool block would map the whole block
            self.local = runtime.malloc(self.total)
            self._fill_empty()
            return runtime.ipcGetMemHandle(self.local)

        try:
            handle = run_collectively(comm, allocate, TransportUnavailableError)
            handles = comm.allgather(handle)

            def open_peers():
                ptrs = []
                for r, h in enumerate(handles):
                    if r == self.rank:
                        ptrs.append(self.local)
                    else:
                        ptrs.append(runtime.ipcOpenMemHandle(
                            h, runtime.cudaIpcMemLazyEnablePeerAccess))
                        self._opened.append(ptrs[-1])
                        _OPEN_MAPPINGS.add(ptrs[-1])
                return ptrs

            self.ptrs = run_collectively(comm, open_peers, TransportUnavailableError)
            self._probe()
            comm.Barrier()  # nobody writes into a peer's buffer before all are mapped
        except BaseException:
            self.close()
            raise

    def _fill_empty(self):
        import cupy
        from cupy.cuda import runtime
        words = cupy.ndarray((self.total // 4,), cupy.uint32, cupy.cuda.MemoryPointer(
            cupy.cuda.UnownedMemory(self.local, self.total, self), 0))
        words.fill(EMPTY_WORD)
        runtime.deviceSynchronize()

    def _probe(self):
        """Prove that a kernel's store reaches every peer (some drivers report P2P support
        while peer writes never arrive: a spin loop would then hang)."""
        import cupy
        import numpy as np
        from cupy.cuda import runtime
        from .compile import load_plain
        nonce = self._comm.bcast(secrets.randbits(62) if self.rank == 0 else None, root=0)
        broken = self.corrupt_probe

        def expected(writer):
            return (nonce ^ (0x9E3779B97F4A7C15 * (writer + 1))) & 0x7FFFFFFFFFFFFFFF

        def write():
            probe = load_plain("qknorm_probe")
            mine = expected(self.rank) ^ (1 if broken else 0)
            for r in range(self.world):
                dst = self.ptrs[r] + self.nbytes + 8 * self.rank
                probe((1,), (1,), (np.uint64(dst), np.uint64(mine)))
            runtime.deviceSynchronize()

        run_collectively(self._comm, write, TransportUnavailableError)
        self._comm.Barrier()

        def check():
            got = cupy.ndarray((self.world,), cupy.uint64, cupy.cuda.MemoryPointer(
                cupy.cuda.UnownedMemory(self.local + self.nbytes, 8 * self.world, self), 0)).get()
            wrong = [r for r in range(self.world) if int(got[r]) != expected(r)]
            if wrong:
                raise TransportUnavailableError(
                    f"P2P write test failed: writes from ranks {wrong} did not arrive")

        run_collectively(self._comm, check, TransportUnavailableError)

    def close(self):
        """Collective and idempotent: wait for the device, unmap the peers' buffers, and
        free ours only once every rank has unmapped it."""
        if self.closed:
            return
        self.closed = True
        from cupy.cuda import runtime
        runtime.deviceSynchronize()
        self._comm.Barrier()
        for p in self._opened:
            runtime.ipcCloseMemHandle(p)
            _OPEN_MAPPINGS.discard(p)
        self._opened = []
        self._comm.Barrier()
        if self.local:
            runtime.free(self.local)
            self.local = 0
