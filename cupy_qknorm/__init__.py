"""Fused tensor-parallel QK RMSNorm (and RoPE) for CuPy and MPI: one kernel, no PyTorch."""
from .errors import (CallMismatchError, ClosedError, ConfigMismatchError, PeerTimeoutError,
                     PositionError, QKNormError, SlotError, TransportUnavailableError)
from .kvcache import KVCache
from .norm import BoundCall, TPQKNorm
from .rope import RoPE

__version__ = "0.2.0"

__all__ = ["TPQKNorm", "BoundCall", "RoPE", "KVCache", "QKNormError", "ConfigMismatchError",
           "TransportUnavailableError", "PeerTimeoutError", "CallMismatchError",
           "PositionError", "SlotError", "ClosedError", "__version__"]
