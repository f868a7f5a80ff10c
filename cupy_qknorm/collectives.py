"""Collective helpers over an mpi4py communicator: every rank raises the same error
together, so that no rank is left blocked in a collective that another rank skipped."""
from __future__ import annotations

import time
import traceback

from . import knobs
from .errors import PeerTimeoutError, QKNormError


def agree(comm, error, exc_type=QKNormError):
    """Collective: raise `exc_type` on every rank if `error` (a message or None) is set on
    any. The message names each failing rank, so every rank reports the same cause."""
    errors = comm.allgather(error)
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        raise exc_type("; ".join(f"rank {r}: {e}" for r, e in bad))


def run_collectively(comm, fn, exc_type=QKNormError):
    """Run fn() on every rank; if it raises anywhere, raise `exc_type` everywhere."""
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        error = f"{type(e).__name__}: {e}"
        if knobs.get("CUPY_QKNORM_DEBUG"):
            traceback.print_exc()
    agree(comm, error, exc_type)
    return result


def wait(request, deadline, what, rank):
    """Test an MPI `request` until it completes or `deadline` (time.monotonic(); None:
    never) passes, then PeerTimeoutError. Sleeps a little between tests after the first
    few, so a wait for a slow peer does not take a core."""
    spins = 0
    while not request.Test():
        if deadline is not None and time.monotonic() > deadline:
            raise PeerTimeoutError(
                f"rank {rank} waited longer than the timeout for the other ranks in {what} "
                f"(a rank did not make this call, or is gone); the object is closed for use")
        spins += 1
        if spins > 64:
            time.sleep(2e-5 if spins < 4096 else 1e-3)
