"""Fused tensor-parallel QK RMSNorm for CuPy and MPI: one kernel, no PyTorch."""
from .errors import (CallMismatchError, ClosedError, ConfigMismatchError, PeerTimeoutError,
                     QKNormError, TransportUnavailableError)
from .norm import BoundCall, TPQKNorm

__version__ = "0.1.0"

__all__ = ["TPQKNorm", "BoundCall", "QKNormError", "ConfigMismatchError",
           "TransportUnavailableError", "PeerTimeoutError", "CallMismatchError", "ClosedError",
           "__version__"]
