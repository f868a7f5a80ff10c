"""bench --jax: the norm inside jax.jit, and XLA's own jitted norm (+ RoPE), per call.

A call's cost inside jax.jit is the slope between two chain lengths: a chain of n
dependent calls (each reads what the one before wrote, as layers do) in one jitted
function, timed as the median wall time of a call + block_until_ready, at n = N1 and
n = N2; per call = (wall(N2) - wall(N1)) / (N2 - N1), so JAX's dispatch and the final
sync cancel instead of being spread over n. XLA's own norm (fp32 math, one rounding;
+ RoPE) is chained the same way, with an optimization barrier between calls so that XLA
cannot fuse consecutive norms into one pass (each call reads and writes its rows).

Imported by cupy_qknorm.bench only for --jax; JAX is imported by require_jax(), never at
import time. The timing helpers take their clock and sync as arguments (tested on CPU).
"""
from __future__ import annotations

import os
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
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
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
    try:
        gpus = jax.devices("gpu")
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
    import jax
    import jax.numpy as jnp
    f = x.astype(jnp.float32)
    y = f * jax.lax.rsqrt(jnp.mean(f * f, axis=-1, keepdims=True) + eps) * \
        w.astype(jnp.float32)
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
    return y.astype(x.dtype)


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


def xla_us(jax, jargs, eps, rope, dev, calls=(N1, N2), reps=REPS):
    """Per call of XLA's own norm (+ `rope`) inside jax.jit (chain_us of theirs)."""
    from .rope import host_table
    args = list(jargs) + ([] if rope is None else [jax.device_put(host_table(rope), dev)])
    return chain_us(lambda n: compiled(jax, theirs(n, eps, rope), args), args,
                    jax.block_until_ready, None, calls, reps)
