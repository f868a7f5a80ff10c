"""Fused tensor-parallel QK RMSNorm for CuPy and MPI: one kernel, no PyTorch."""
from .errors import (CallMismatchError, ClosedError, ConfigMismatchError, PeerTimeoutError,
                     QKNormError, TransportUnavailableError)
from .norm import TPQKNorm

__version__ = "0.1.0"

__all__ = ["TPQKNorm", "QKNormError", "ConfigMismatchError", "TransportUnavailableError",
           "PeerTimeoutError", "CallMismatchError", "ClosedError", "__version__"]
