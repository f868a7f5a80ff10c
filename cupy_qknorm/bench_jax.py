"""bench --jax: the norm inside jax.jit, and XLA's own jitted norm (+ RoPE), per call.

A call's cost inside jax.jit is the slope between two chain lengths: a chain of n
dependent calls (each reads what the one before wrote, as layers do) in one jitted
function, timed as the median wall time of a call + block_until_ready, at n = N1 and
n = N2; per call = (wall(N2) - wall(N1)) / (N2 - N1), so JAX's dispatch and the final
sync cancel instead of being spread over n. XLA's own norm (fp32 math, one rounding;
+ RoPE) is chained the same way, with an optimization barrier between calls so that XLA
cannot fuse consecutive norms into one pass (each call reads and writes its rows).
At G >= 2 XLA's norm is what a JAX user writes at TP >= 2: the processes of
jax.distributed (one device each) as a mesh, each process's slices as its shards of global
arrays, and a shard_map whose body psums the rows' sums of squares over the processes.

Imported by cupy_qknorm.bench only for --jax; JAX is imported by require_jax(), never at
import time. The timing helpers take their clock and sync as arguments (tested on CPU).
"""
from __future__ import annotations

import statistics
import time

import numpy as np

N1, N2 = 16, 64   # chain lengths: per call = (wall(N2) - wall(N1)) / (N2 - N1)
REPS = 15         # timed calls of each chain (median)
WARMUP = 3


def require_jax():
    """The jax module, or ValueError in one line where it cannot be imported. Sets
    XLA_PYTHON_CLIENT_PREALLOCATE=false unless set: by default XLA takes 75% of the GPU's
    memory at its first use, and the bench's CuPy buffers need theirs."""
    from .knobs import default_for_library
    default_for_library("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import jax
    except ImportError as e:
        raise ValueError(f"--jax needs JAX (pip install 'cupy-qknorm[jax]', and on a GPU "
                         f"JAX's CUDA plugin: 'jax[cuda13]'): {e}") from e
    return jax


def per_call_us(wall_us, n1: int = N1, n2: int = N2) -> float:
    """(wall_us(n2) - wall_us(n1)) / (n2 - n1): the cost of one more call in the chain,
    what a chain of n calls costs per call once its fixed part (dispatch, sync) is out."""
    if not 0 < n1 < n2:
        raise ValueError(f"chain lengths must be 0 < n1 < n2, got {n1}, {n2}")
    short = wall_us(n1)
    return (wall_us(n2) - short) / (n2 - n1)


def median_wall_us(fn, args, sync, reps: int = REPS, warmup: int = WARMUP,
                   clock=time.perf_counter) -> float:
    """Median of `reps` wall times (us) of sync(fn(*args)), after `warmup` untimed calls."""
    for _ in range(warmup):
        sync(fn(*args))
    times = []
    for _ in range(reps):
        t = clock()
        sync(fn(*args))
        times.append(clock() - t)
    return statistics.median(times) * 1e6


def chain_us(chain, args, sync, barrier=None, calls=(N1, N2), reps: int = REPS,
             clock=time.perf_counter) -> float:
    """Per call of the chains chain(n) (a function of `args` making n dependent calls,
    compiled already): per_call_us over median_wall_us. `barrier` (comm.Barrier) runs
    after chain(n) is built and before its first call: ranks compile at their own pace,
    and calls that exchange across ranks must start together (a peer waits timeout_s)."""
    def wall(n):
        fn = chain(n)
        if barrier is not None:
            barrier()
        return median_wall_us(fn, args, sync, reps, clock=clock)
    return per_call_us(wall, *calls)


def device(jax):
    """JAX's GPU that is CuPy's current device (the bench's GPU on this rank)."""
    import cupy
    index = cupy.cuda.Device().id
    # JAX opens every GPU it sees; a process of one GPU needs only its own (as
    # jax.distributed sets it); no effect once JAX's backend has started
    try:
        jax.config.update("jax_cuda_visible_devices", str(index))
    except AttributeError:  # a JAX without the option: it opens them all
        pass
    try:  # this process's: with jax.distributed, jax.devices() lists every process's
        gpus = jax.local_devices(backend="gpu")
    except RuntimeError as e:
        raise ValueError(f"--jax: JAX has no GPU backend (JAX's CUDA plugin: pip install "
                         f"'jax[cuda13]'): {e}") from e
    dev = next((d for d in gpus if d.local_hardware_id == index), None)
    if dev is None and len(gpus) == 1:
        dev = gpus[0]
    if dev is None:
        raise ValueError(f"--jax: JAX has no GPU that is CuPy's device {index} (JAX sees "
                         f"{[d.local_hardware_id for d in gpus]})")
    return dev


def to_jax(jax, dev, q, k, q_weight, k_weight, positions):
    """Host copies of CuPy arrays (bf16 as uint16 bits) as jax.Arrays on `dev`; positions
    as int32 (JAX's default integer)."""
    import ml_dtypes

    def one(x):
        a = x.get() if hasattr(x, "get") else np.asarray(x)
        if a.dtype == np.uint16:
            a = a.view(ml_dtypes.bfloat16)
        elif a.dtype.kind == "i":
            a = a.astype(np.int32)
        return jax.device_put(a, dev)
    return [one(x) for x in (q, k, q_weight, k_weight, positions)]


def compiled(jax, fn, args):
    """jax.jit(fn), compiled for `args` now (not at its first call)."""
    return jax.jit(fn).lower(*args).compile()


def ours(qk, n, in_place):
    """n dependent calls of `qk` (a JaxQKNorm; with RoPE where it was built with one):
    (q, k, qw, kw, positions) -> (q, k)."""
    rope = qk.config.rope is not None

    def chain(q, k, qw, kw, pos):
        for _ in range(n):
            q, k = qk(q, k, qw, kw, pos if rope else None, in_place=in_place)
        return q, k
    return chain


def xla_norm(x, w, eps, rope=None, table=None, positions=None):
    """XLA's RMSNorm over the row (fp32 math, one rounding) and, with `rope`, its
    rotary embedding (cupy_qknorm.rope: NeoX or GPT-J, the first rotary_dim elements of
    each head; `table` [rows, rotary_dim] fp32, cos then sin)."""
    import jax.numpy as jnp
    f = x.astype(jnp.float32)
    mean_sq = jnp.mean(f * f, axis=-1, keepdims=True)
    return _scaled(f, w, mean_sq, eps, rope, table, positions).astype(x.dtype)


def xla_norm_across(q, k, qw, kw, eps, axis, rope=None, table=None, positions=None):
    """out = x / rms(x's row over every process) * w for x = q and k, inside shard_map
    over mesh axis `axis` (each process's block: its slices of the rows and of the
    weights, whole heads): mean square = psum(the slice's sum of squares) / (G x the
    slice's width), one psum for q's and k's sums together (our call, too, makes one
    exchange for both); then RoPE on the local heads. KV heads replicated over the
    processes stay right: each is counted as often in the sum as in the width. Every
    process makes the same calls (psum is a collective)."""
    import jax
    import jax.numpy as jnp
    fq, fk = q.astype(jnp.float32), k.astype(jnp.float32)
    sums = jax.lax.psum(jnp.stack([jnp.sum(fq * fq, axis=-1), jnp.sum(fk * fk, axis=-1)],
                                  axis=-1), axis)
    g = jax.lax.axis_size(axis)
    return (_scaled(fq, qw, sums[:, 0:1] / (g * q.shape[-1]), eps, rope, table,
                    positions).astype(q.dtype),
            _scaled(fk, kw, sums[:, 1:2] / (g * k.shape[-1]), eps, rope, table,
                    positions).astype(k.dtype))


def _scaled(f, w, mean_sq, eps, rope, table, positions):
    """f * rsqrt(mean_sq + eps) * w in fp32, then rope's rotation of each head."""
    import jax
    import jax.numpy as jnp
    y = f * jax.lax.rsqrt(mean_sq + eps) * w.astype(jnp.float32)
    if rope is not None:
        t, half, rd = y.shape[0], rope.rotary_dim // 2, rope.rotary_dim
        h = y.reshape(t, -1, rope.head_dim)
        cs = table[positions]
        cos, sin = cs[:, None, :half], cs[:, None, half:]
        if rope.style == "gptj":
            a, b = h[..., 0:rd:2], h[..., 1:rd:2]
            turned = jnp.stack([a * cos - b * sin, b * cos + a * sin], -1).reshape(
                t, h.shape[1], rd)
        else:
            a, b = h[..., :half], h[..., half:rd]
            turned = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
        y = jnp.concatenate([turned, h[..., rd:]], axis=-1).reshape(t, -1)
    return y


def theirs(n, eps, rope=None):
    """n dependent calls of xla_norm on q and k: (q, k, qw, kw, positions, table) ->
    (q, k); the table an argument (not a constant folded into the program)."""
    import jax

    def chain(q, k, qw, kw, pos, table=None):
        for _ in range(n):
            q, k = (xla_norm(q, qw, eps, rope, table, pos),
                    xla_norm(k, kw, eps, rope, table, pos))
            q, k = jax.lax.optimization_barrier((q, k))  # no fusion across calls
        return q, k
    return chain


def jit_us(jax, qk, jargs, in_place, barrier, calls=(N1, N2), reps=REPS):
    """Per call of `qk` inside jax.jit (chain_us of ours), and how many of the handler's
    runs XLA captured into a command buffer (a CUDA graph): (us, (captured, runs))."""
    runs, captured = qk.executions, qk.captured_calls
    us = chain_us(lambda n: compiled(jax, ours(qk, n, in_place), jargs), jargs,
                  jax.block_until_ready, barrier, calls, reps)
    qk.synchronize()
    return us, (qk.captured_calls - captured, qk.executions - runs)


def theirs_across(n, eps, rope, mesh):
    """theirs at G >= 2: n dependent calls of xla_norm_across, one shard_map over `mesh`
    (process_mesh): (q, k, qw, kw, positions, table) global arrays (across) -> (q, k)."""
    import jax
    from jax.sharding import PartitionSpec as P
    (axis,) = mesh.axis_names
    row, col = P(None, axis), P(axis)

    def chain(q, k, qw, kw, pos, table=None):
        for _ in range(n):
            q, k = xla_norm_across(q, k, qw, kw, eps, axis, rope, table, pos)
            q, k = jax.lax.optimization_barrier((q, k))  # no fusion across calls
        return q, k
    specs = (row, row, col, col, P()) + (() if rope is None else (P(),))
    return _shard_map(jax)(chain, mesh=mesh, in_specs=specs, out_specs=(row, row))


def _shard_map(jax):
    """jax.shard_map, or jax.experimental's where this JAX has only that one."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map
    from jax.experimental.shard_map import shard_map as experimental
    return experimental


def start_distributed(jax, timeout_s: int = 60):
    """jax.distributed over MPI's processes (cluster_detection_method="mpi4py": JAX's
    process index is the MPI rank), unless it is initialized already. Before JAX's backend
    starts (device()). None, or why not in one line; collective (every process calls)."""
    try:
        if not jax.distributed.is_initialized():
            jax.distributed.initialize(cluster_detection_method="mpi4py",
                                       initialization_timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - said in the table's header, not raised
        first = (str(e).strip().splitlines() or [""])[0]
        return f"jax.distributed could not be initialized: {type(e).__name__}: {first}"
    return None


def process_mesh(jax, dev, axis: str = "tp"):
    """A 1-D mesh along `axis` of each process's device, in process order (one device a
    process, `dev` this one's). ValueError in one line where a process has other than one."""
    devices = sorted(jax.devices(dev.platform), key=lambda d: d.process_index)
    if len(devices) != jax.process_count() or dev not in devices:
        raise ValueError(f"the psum baseline needs one {dev.platform} device a process: "
                         f"JAX has {len(devices)} over {jax.process_count()} processes")
    return jax.sharding.Mesh(np.array(devices), (axis,))


def across(jax, mesh, arrays):
    """Each process's local arrays (q, k [T, width/G], their weights [width/G], positions
    and a table, on its device of `mesh`) as global arrays over `mesh`: q, k and the weights
    split along the last axis in process order (the rows' slices; each process's array is
    its shard, not a copy), positions and the table replicated."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    (axis,) = mesh.axis_names

    def sliced(a):
        return jax.make_array_from_single_device_arrays(
            a.shape[:-1] + (a.shape[-1] * mesh.size,),
            NamedSharding(mesh, P(*[None] * (a.ndim - 1), axis)), [a])

    def replicated(a):
        return jax.make_array_from_single_device_arrays(a.shape, NamedSharding(mesh, P()),
                                                        [a])
    return [sliced(a) for a in arrays[:4]] + [replicated(a) for a in arrays[4:]]


def xla_us(jax, jargs, eps, rope, dev, calls=(N1, N2), reps=REPS, mesh=None, barrier=None):
    """Per call of XLA's own norm (+ `rope`) inside jax.jit (chain_us of theirs); with
    `mesh` (process_mesh, G >= 2), of theirs_across on this process's slices (jargs) as
    shards of global arrays, every process timing the same calls after `barrier`."""
    from .rope import host_table
    args = list(jargs) + ([] if rope is None else [jax.device_put(host_table(rope), dev)])
    if mesh is not None:
        args = across(jax, mesh, args)

    def chain(n):
        return theirs(n, eps, rope) if mesh is None else theirs_across(n, eps, rope, mesh)
    return chain_us(lambda n: compiled(jax, chain(n), args), args, jax.block_until_ready,
                    barrier, calls, reps)
