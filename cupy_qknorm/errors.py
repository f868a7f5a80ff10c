"""Typed errors. Every rank of a communicator raises the same one for the same cause."""


class QKNormError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigMismatchError(QKNormError, ValueError):
    """The ranks of a communicator were given different configurations."""


class TransportUnavailableError(QKNormError, RuntimeError):
    """The transport asked for cannot run here (no GPU, ranks on several nodes, P2P broken)."""


class PeerTimeoutError(QKNormError, RuntimeError):
    """A peer's partial sums did not arrive within the timeout; the object is closed for use."""

    def __init__(self, message, peer=None, token=None):
        super().__init__(message)
        self.peer = peer
        self.token = token


class CallMismatchError(QKNormError, RuntimeError):
    """The ranks' calls did not match (T differs between ranks, or calls out of step);
    detected on the GPU from the peers' slots. The object is closed for use."""

    def __init__(self, message, peer=None, token=None):
        super().__init__(message)
        self.peer = peer
        self.token = token


class ClosedError(QKNormError, RuntimeError):
    """The object was used after close() or after a failed call."""


class PositionError(QKNormError, ValueError):
    """A RoPE position outside the cos/sin table: that token's row was not written. Raised
    by the next call or synchronize() after the launch (the device checks it); the object
    is closed for use."""

    def __init__(self, message, token=None, position=None):
        super().__init__(message)
        self.token = token
        self.position = position


class SlotError(QKNormError, ValueError):
    """A KV-cache slot outside the cache (slot_mapping[t] < -1 or >= the cache's slots):
    on a GPU, that token's cache rows were not written (its outputs were), raised by the
    next call or synchronize() after the launch (the device checks it); with "mpi" on numpy
    arrays, raised in the call, before anything is written. The object is closed for use."""

    def __init__(self, message, token=None, slot=None):
        super().__init__(message)
        self.token = token
        self.slot = slot
