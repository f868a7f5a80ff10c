"""Collective helpers over an mpi4py communicator: every rank raises the same error
together, so that no rank is left blocked in a collective that another rank skipped."""
from __future__ import annotations

import traceback

from . import knobs
from .errors import QKNormError


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
