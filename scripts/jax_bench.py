"""The norm + RoPE inside jax.jit against the same call in a CuPy graph and XLA's own
jitted norm (+ RoPE), at G=1 (one process, one GPU), bf16, MiniMax widths, in place.

Each timing is a chain of N dependent calls (each reads what the one before wrote, as
layers do): in one CuPy graph (median replay / N, CUDA events), in one jitted function
(median wall time of call + block_until_ready / N: JAX's dispatch is spread over N), and
XLA's jnp norm (+ NeoX partial RoPE) chained the same way. Prints a table and how many of
our calls XLA captured into command buffers (CUDA graphs).

    XLA_PYTHON_CLIENT_PREALLOCATE=false python3 scripts/jax_bench.py [--tokens 64,1024,16384]
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def xla_norm(x, w, eps, rope, table, pos):
    """XLA's RMSNorm (fp32 math, one rounding) and, with `rope`, NeoX partial RoPE."""
    import jax
    import jax.numpy as jnp
    f = x.astype(jnp.float32)
    y = f * jax.lax.rsqrt(jnp.mean(f * f, axis=-1, keepdims=True) + eps) * \
        w.astype(jnp.float32)
    if rope is not None:
        t, half = y.shape[0], rope.rotary_dim // 2
        h = y.reshape(t, -1, rope.head_dim)
        cs = table[pos]
        cos, sin = cs[:, None, :half], cs[:, None, half:]
        a, b = h[..., :half], h[..., half:rope.rotary_dim]
        y = jnp.concatenate([a * cos - b * sin, b * cos + a * sin,
                             h[..., rope.rotary_dim:]], axis=-1).reshape(t, -1)
    return y.astype(x.dtype)


def wall_us(fn, args, reps, n):
    import jax
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6 / n


def donated_us(fn, jargs, reps, n):
    """As wall_us, with q and k donated and fed back: XLA's buffers keep their addresses
    from one call to the next."""
    import jax
    import jax.numpy as jnp
    q, k, rest = jnp.copy(jargs[0]), jnp.copy(jargs[1]), jargs[2:]
    for _ in range(3):
        q, k = fn(q, k, *rest)
    jax.block_until_ready((q, k))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        q, k = fn(q, k, *rest)
        jax.block_until_ready((q, k))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6 / n


def cupy_graph_us(norm, q, k, qw, kw, pos, reps, n):
    import cupy
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for _ in range(2):
            norm(q, k, qw, kw, positions=pos)
        stream.begin_capture()
        for _ in range(n):
            norm(q, k, qw, kw, positions=pos)
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        norm.synchronize(stream)
        times = []
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        for _ in range(reps):
            a.record(stream)
            graph.launch(stream)
            b.record(stream)
            b.synchronize()
            times.append(cupy.cuda.get_elapsed_time(a, b))
    norm.synchronize(stream)
    return statistics.median(times) * 1e3 / n


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="64,1024,16384")
    p.add_argument("--calls", default="16,64",
                   help="N1,N2: chain lengths; per call = (time(N2) - time(N1)) / (N2 - N1)")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--transport", default="ipc")
    args = p.parse_args()

    import cupy
    import jax
    import ml_dtypes
    from mpi4py import MPI

    from cupy_qknorm import RoPE, TPQKNorm
    from cupy_qknorm.host import f32_to_bf16
    from cupy_qknorm.jax import JaxQKNorm
    from cupy_qknorm.rope import host_table

    comm, eps = MPI.COMM_SELF, 1e-6
    n1, n2 = (int(x) for x in args.calls.split(","))
    rope = RoPE.minimax_m2()
    q_dim, k_dim = 6144, 1024
    dev = next(d for d in jax.devices("gpu") if d.local_hardware_id == cupy.cuda.Device().id)
    print(f"jax {jax.__version__} on {dev.device_kind}; cupy {cupy.__version__}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; G=1 bf16 MiniMax widths, "
          f"in place, chains of N={n1} and N={n2} calls, us per call", flush=True)
    table = jax.device_put(host_table(rope), dev)
    rng = np.random.default_rng(0)
    rows = []
    with JaxQKNorm(comm, q_dim, k_dim, "bfloat16", rope=rope, transport=args.transport,
                   backend="gpu") as qk, \
            TPQKNorm(comm, q_dim, k_dim, "bfloat16", rope=rope, transport=args.transport) \
            as norm:
        def ours(n):
            def chain(q, k, qw, kw, pos):
                for _ in range(n):
                    q, k = qk(q, k, qw, kw, pos, in_place=True)
                return q, k
            return chain

        def theirs(rotate, n):
            def chain(q, k, qw, kw, pos):
                r = rope if rotate else None
                for _ in range(n):
                    q, k = xla_norm(q, qw, eps, r, table, pos), xla_norm(k, kw, eps, r, table,
                                                                           pos)
                return q, k
            return jax.jit(chain)

        fns = {n: (jax.jit(ours(n)), jax.jit(ours(n), donate_argnums=(0, 1)),
                   theirs(False, n), theirs(True, n)) for n in (n1, n2)}
        for t in (int(x) for x in args.tokens.split(",")):
            q = f32_to_bf16(rng.standard_normal((t, q_dim)))
            k = f32_to_bf16(rng.standard_normal((t, k_dim)))
            qw = f32_to_bf16(1 + 0.25 * rng.standard_normal(q_dim))
            kw = f32_to_bf16(1 + 0.25 * rng.standard_normal(k_dim))
            pos = rng.integers(0, rope.rows(), t).astype(np.int32)
            graph = cupy_graph_us(norm, *(cupy.asarray(a) for a in (q, k, qw, kw, pos)),
                                  args.reps, n2)
            jargs = [jax.device_put(a.view(ml_dtypes.bfloat16) if a.dtype == np.uint16
                                    else a, dev) for a in (q, k, qw, kw, pos)]
            chains = {}
            for n, (mine, kept, plain, rotated) in fns.items():
                before, ran = qk.captured_calls, qk.executions
                walls = [wall_us(mine, jargs, args.reps, 1)]
                qk.synchronize()
                captured, ran = qk.captured_calls - before, qk.executions - ran
                walls += [donated_us(kept, jargs, args.reps, 1), wall_us(plain, jargs, args.reps, 1),
                          wall_us(rotated, jargs, args.reps, 1)]
                chains[n] = walls
                print(f"T={t} N={n}: chain wall us: jit {walls[0]:.1f}, jit donated "
                      f"{walls[1]:.1f}, XLA norm {walls[2]:.1f}, XLA norm+RoPE {walls[3]:.1f} "
                      f"(our handler ran {ran} times for {(args.reps + 3) * n} calls, "
                      f"{captured} of them captured by XLA)", flush=True)
            per = [(b - a) / (n2 - n1) for a, b in zip(chains[n1], chains[n2])]
            rows.append((t, graph, *per))
            print(f"T={t}: per call: CuPy graph {graph:.2f}, jit {per[0]:.2f}, jit donated "
                  f"{per[1]:.2f}, XLA norm {per[2]:.2f}, XLA norm+RoPE {per[3]:.2f}", flush=True)
    print(f"\nus per call: CuPy graph = median replay of {n2} calls / {n2}; jit = (wall({n2}) "
          f"- wall({n1})) / {n2 - n1} (JAX's dispatch cancels)")
    print("\n| T | ours + RoPE, CuPy graph | ours + RoPE, jit | jit / graph | jit, q and k "
          "donated | XLA norm, jit | XLA norm + RoPE, jit | XLA / ours (jit) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for t, graph, mine, kept, plain, rotated in rows:
        print(f"| {t} | {graph:.2f} | {mine:.2f} | {mine / graph:.2f}x | {kept:.2f} | "
              f"{plain:.2f} | {rotated:.2f} | {rotated / mine:.1f}x |")


if __name__ == "__main__":
    main()
