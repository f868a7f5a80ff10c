"""TPQKNorm: validates, picks a transport, launches."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from . import arrays
from .compile import ITEMSIZE, MAX_WORLD, vector_elems
from .errors import ClosedError, ConfigMismatchError, QKNormError, TransportUnavailableError
from .peers import agree, run_collectively

TRANSPORTS = ("auto", "ipc", "nccl", "mpi")
_MAX_PLANS = 1024  # validated array signatures kept per object (one per T seen, typically)


@dataclass(frozen=True)
class Config:
    q_dim: int
    k_dim: int
    dtype: str
    eps: float
    max_tokens: int
    timeout_ns: int
    world: int
    rank: int

    @property
    def q_local(self):
        return self.q_dim // self.world

    @property
    def k_local(self):
        return self.k_dim // self.world

    def shared(self):
        """What every rank must agree on."""
        return (self.q_dim, self.k_dim, self.dtype, self.eps, self.max_tokens,
                self.timeout_ns, self.world)


def check_config(q_dim, k_dim, dtype, eps, max_tokens, timeout_s, world):
    """Raise TypeError/ValueError for a bad configuration. Pure: no GPU, no MPI."""
    if dtype not in ITEMSIZE:
        raise ValueError(f"dtype must be one of {sorted(ITEMSIZE)}, got {dtype!r}")
    if not 1 <= world <= MAX_WORLD:
        raise ValueError(f"the communicator has {world} ranks; 1..{MAX_WORLD} are supported")
    n = vector_elems(dtype)
    for name, d in (("q_dim", q_dim), ("k_dim", k_dim)):
        if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
            raise ValueError(f"{name} must be a positive int, got {d!r}")
        if d % world or (d // world) % n:
            raise ValueError(
                f"{name}={d} must split over {world} ranks into slices that are multiples of "
                f"{n} elements ({dtype}: 16-byte vectors); {d}/{world} = {d / world:g}")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or \
            not 1 <= max_tokens <= 1 << 24:
        raise ValueError(f"max_tokens must be an int in 1..{1 << 24}, got {max_tokens!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and eps == eps and eps != float("inf")):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not (isinstance(timeout_s, (int, float)) and timeout_s == timeout_s):
        raise ValueError(f"timeout_s must be a number of seconds, got {timeout_s!r}")


def _local_facts():
    """(GPU usable, device PCI bus id, host name, NCCL usable) of this rank; never raises."""
    import socket
    host = socket.gethostname()
    try:
        import cupy
        dev = cupy.cuda.Device()
        bus = dev.pci_bus_id
    except Exception:  # noqa: BLE001 - no cupy, no driver or no GPU: CPU only
        return False, None, host, False
    try:
        from cupy.cuda import nccl
        has_nccl = bool(getattr(nccl, "available", True))
    except Exception:  # noqa: BLE001
        has_nccl = False
    return True, bus, host, has_nccl


def choose_transport(asked, facts):
    """Which transport a call of `asked` gets, from every rank's _local_facts(). Pure.

    Returns (name, reason); name None with a reason when `asked` cannot run here."""
    gpus = all(f[0] for f in facts)
    nccl_available = all(f[3] for f in facts)
    one_node = len({f[2] for f in facts}) == 1
    distinct = len({f[1] for f in facts}) == len(facts)
    if asked == "mpi":
        return "mpi", "asked for"
    if not gpus:
        if asked == "auto":
            return "mpi", "no GPU on some rank"
        return None, "needs a GPU on every rank"
    if asked in ("auto", "ipc"):
        if one_node and distinct:
            return "ipc", "one node, one GPU per rank"
        if asked == "ipc":
            return None, ("needs every rank on one node" if not one_node
                          else "needs a distinct GPU per rank")
    if nccl_available:
        return "nccl", "asked for" if asked == "nccl" else "ranks span nodes or share a GPU"
    if asked == "auto":
        return "mpi", "NCCL is not available"
    return None, "NCCL is not available in this CuPy"


class TPQKNorm:
    """Tensor-parallel RMSNorm of q and k over the full rows:

        q_out = q * q_weight / sqrt(sum over ranks of sum(q^2) / q_dim + eps)   (same for k)

    One MPI rank per GPU; rank r of `comm` holds columns [r*q_dim/G, (r+1)*q_dim/G) of every
    row of q (and likewise of k and of both weights). Accumulation is fp32 and the result is
    rounded once to `dtype`.

    Collective contract: every rank of `comm` constructs the object with the same
    arguments, makes the same calls in the same order with the same T, and closes it.
    Calls are asynchronous on the current CuPy stream (or `stream`) and can be captured
    in a CUDA graph; they make no MPI call (except transport "mpi").
    """

    def __init__(self, comm, q_dim: int, k_dim: int, dtype: str = "bfloat16",
                 eps: float = 1e-6, max_tokens: int = 8192, *, transport: str = "auto",
                 timeout_s: float = 5.0):
        self._transport = None
        self._closed = True
        self._plans = {}
        self._current_stream = _no_stream
        self.comm = comm
        world, rank = comm.Get_size(), comm.Get_rank()
        error = None
        try:
            if transport not in TRANSPORTS:
                raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
            check_config(q_dim, k_dim, dtype, eps, max_tokens, timeout_s, world)
        except (TypeError, ValueError) as e:
            error = str(e)
        agree(comm, error, ValueError)
        self.config = Config(q_dim, k_dim, dtype, float(eps), max_tokens,
                             int(timeout_s * 1e9), world, rank)
        configs = comm.allgather((self.config.shared(), transport))
        if len(set(configs)) > 1:
            lines = "; ".join(f"rank {r}: (q_dim, k_dim, dtype, eps, max_tokens, timeout_ns, "
                              f"world) = {c[0]}, transport={c[1]!r}"
                              for r, c in enumerate(configs))
            raise ConfigMismatchError(f"ranks disagree on the configuration: {lines}")

        facts = comm.allgather(_local_facts())
        self._gpu = facts[rank][0]
        name, reason = choose_transport(transport, facts)
        if name is None:
            raise TransportUnavailableError(f"transport {transport!r} {reason}")
        self.transport = self._open(name, transport)
        self._closed = False

    def _open(self, name, asked):
        from . import transports
        self._device = None
        if self._gpu:
            import cupy
            self._device = cupy.cuda.Device().id
            self._current_stream = cupy.cuda.get_current_stream
        if name == "mpi":
            self._transport = _HostCapable(self.config, self.comm)
            return "mpi"
        cls = {"ipc": transports.IpcTransport, "nccl": transports.NcclTransport}[name]
        try:
            self._transport = run_collectively(
                self.comm, lambda: cls(self.config, self.comm), TransportUnavailableError)
        except TransportUnavailableError as e:
            if not (name == "ipc" and asked == "auto"):
                raise
            warnings.warn(f"cupy_qknorm: the fused IPC path is unavailable ({e}); "
                          f"falling back to transport 'nccl'", RuntimeWarning, stacklevel=3)
            self._transport = run_collectively(
                self.comm, lambda: transports.NcclTransport(self.config, self.comm),
                TransportUnavailableError)
            return "nccl"
        return name

    # ------------------------------------------------------------------------------------
    def __call__(self, q, k, q_weight, k_weight, *, out=None, stream=None):
        """Normalize q [T, q_dim/G] and k [T, k_dim/G] (in place, or into out=(q2, k2)).

        Returns the output pair. Raises TypeError/ValueError before anything is launched
        for bad input, and PeerTimeoutError/CallMismatchError if an earlier call failed."""
        self._check_usable()
        qo, ko = (q, k) if out is None else _pair(out)
        arrs = (q, k, q_weight, k_weight, qo, ko)
        # Fast path: CuPy arrays whose shapes, strides, dtypes, device and alignment were
        # validated before are not validated again (validation depends on nothing else).
        key, ptrs = arrays.cupy_signature(arrs)
        run = self._plans.get(key) if key is not None else None
        if run is None:
            ops = self._validate(*arrs)
            if ops[0].device is None:
                if ops[0].shape[0]:
                    from .transports import run_host
                    run_host(self.config, self.comm, ops, ops[0].shape[0])
                return qo, ko
            plan = arrays.Plan.of(ops)
            ptrs = [op.ptr for op in ops]
            run = self._transport.prepare(plan) if plan.tokens else _no_tokens
            if key is not None:
                if len(self._plans) >= _MAX_PLANS:
                    self._plans.clear()
                self._plans[key] = run
        run(ptrs, stream if stream is not None else self._current_stream())
        return qo, ko

    def bind(self, q, k, q_weight, k_weight, *, out=None):
        """Validate these arrays once; return a BoundCall that normalizes them on each
        call with no validation at all: `call(stream=None)` -> (q_out, k_out). The least
        host time per eager call, for pipelines that reuse their buffers. The call holds
        the arrays; they must keep their shapes and strides (no in-place reshape) and the
        same contract holds as for __call__ (every rank calls, same T)."""
        self._check_usable()
        qo, ko = (q, k) if out is None else _pair(out)
        arrs = (q, k, q_weight, k_weight, qo, ko)
        ops = self._validate(*arrs)
        tokens = ops[0].shape[0]
        if not tokens:
            go = _no_tokens_bound
        elif ops[0].device is None:
            from .transports import run_host
            cfg, comm = self.config, self.comm

            def go(stream):
                run_host(cfg, comm, ops, tokens)
        else:
            go = self._transport.bound(arrays.Plan.of(ops), [op.ptr for op in ops])
        return BoundCall(self, go, arrs)

    def _validate(self, q, k, q_weight, k_weight, qo, ko):
        cfg = self.config
        dq, dk = cfg.q_local, cfg.k_local
        ops = [arrays.describe(x, role) for x, role in (
            (q, "q"), (k, "k"), (q_weight, "q_weight"), (k_weight, "k_weight"),
            (qo, "out[0]"), (ko, "out[1]"))]
        for op, role, width in ((ops[0], "q", dq), (ops[1], "k", dk),
                                (ops[4], "out[0]", dq), (ops[5], "out[1]", dk)):
            arrays.check_rows(op, role, width, cfg.dtype)
        for op, role in ((ops[4], "out[0]" if qo is not q else "q (in place)"),
                         (ops[5], "out[1]" if ko is not k else "k (in place)")):
            if not op.writable:
                raise ValueError(f"{role}: the array is read-only")
        arrays.check_weight(ops[2], "q_weight", dq, cfg.dtype)
        arrays.check_weight(ops[3], "k_weight", dk, cfg.dtype)
        if ops[2].dtype != ops[3].dtype:
            raise TypeError(f"q_weight and k_weight must have one dtype, got {ops[2].dtype} "
                            f"and {ops[3].dtype}")
        tokens = ops[0].shape[0]
        for op, role in ((ops[1], "k"), (ops[4], "out[0]"), (ops[5], "out[1]")):
            if op.shape[0] != tokens:
                raise ValueError(f"{role} has {op.shape[0]} rows but q has {tokens}")
        where = {op.device for op in ops}
        if len(where) > 1:
            raise TypeError(f"all arrays must be on one device; got devices "
                            f"{sorted(where, key=str)} (None = host memory)")
        dev = where.pop()
        if dev is None and self.transport != "mpi":
            raise TypeError(f"transport {self.transport!r} needs GPU arrays; numpy arrays "
                            f"run with transport='mpi'")
        if dev is not None and self._device is not None and dev != self._device:
            raise TypeError(f"arrays are on device {dev}, this object on device {self._device}")
        if dev is not None and self._device is None:
            raise TypeError("this object was built without a GPU; pass numpy arrays")
        return ops

    def _check_usable(self):
        if self._closed:
            raise ClosedError("this TPQKNorm is closed")
        try:
            self._transport.check()
        except QKNormError:
            self._closed = True  # a timed-out exchange leaves the buffers in an unknown state
            raise

    def synchronize(self, stream=None):
        """Wait for this object's work on `stream` (default: current) and raise any error."""
        if self._device is not None:
            import cupy
            (stream if stream is not None else cupy.cuda.get_current_stream()).synchronize()
        self._check_usable()

    def close(self):
        """Collective and idempotent: waits for the device and frees every buffer.

        Destroy CUDA graphs that captured calls of this object before closing it: their
        kernels point into its buffers, and with transport "nccl" NCCL's teardown waits
        for such graphs to be destroyed."""
        t, self._transport = self._transport, None
        self._closed = True
        self._plans.clear()  # its launch functions hold the transport
        if t is not None:
            t.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_transport", None) is not None:
            warnings.warn("TPQKNorm was not closed; call close() on every rank (its buffers "
                          "stay allocated until the process exits)", ResourceWarning)

    def __repr__(self):
        c = self.config
        return (f"TPQKNorm(q_dim={c.q_dim}, k_dim={c.k_dim}, dtype={c.dtype!r}, eps={c.eps}, "
                f"max_tokens={c.max_tokens}, transport={getattr(self, 'transport', None)!r}, "
                f"rank={c.rank}/{c.world})")


class _HostCapable:
    """Transport "mpi": numpy arrays on the host, or GPU arrays through the device path."""

    def __init__(self, cfg, comm):
        self.cfg, self.comm = cfg, comm
        self._device = None

    def _on_device(self):
        if self._device is None:
            from .transports import MpiTransport
            self._device = MpiTransport(self.cfg, self.comm)
        return self._device

    def prepare(self, plan):
        return self._on_device().prepare(plan)

    def bound(self, plan, ptrs):
        return self._on_device().bound(plan, ptrs)

    def check(self):
        pass

    def close(self):
        self._device = None


class BoundCall:
    """TPQKNorm.bind(...)'s result: the same normalization of the same arrays, again."""
    __slots__ = ("_norm", "_go", "arrays")

    def __init__(self, norm, go, arrs):
        self._norm, self._go, self.arrays = norm, go, arrs

    def __call__(self, stream=None):
        norm = self._norm
        norm._check_usable()
        self._go(stream if stream is not None else norm._current_stream())
        return self.arrays[4], self.arrays[5]


def _no_tokens(ptrs, stream):
    """T = 0: nothing is read, written or launched."""


def _no_tokens_bound(stream):
    """T = 0, bound: nothing is read, written or launched."""


def _no_stream():
    """The current stream of an object built without a GPU: there is none."""


def _pair(out):
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("out must be a pair (q_out, k_out)")
    return out
