"""A MiniMax-M2-shaped attention prologue in ONE jax.jit, over G tensor-parallel ranks:

    mpiexec -n G python examples/jax_prologue.py [--tokens 16] [--layers 4] [--check]
                                                 [--pipelined] [--no-norm]

Per layer (lax.scan over the layers, unrolled; --rolled keeps the loop), on every rank:

    x [T, hidden] @ W_qkv[:, this rank's columns] (jnp.dot, fp32 accumulation, rounded to
    bf16) -> q, k, v -> cupy_qknorm.jax.JaxQKNorm in place: RMSNorm over the FULL q and k
    rows (all ranks), then MiniMax's RoPE at the tokens' positions

A layer's x takes a zero made from the layer before's q, so the norm calls run in layer
order on every rank, as a model's layers do (a real model's next input depends on the last
layer anyway; here a NaN in that q would reach x). One jitted function runs every layer;
it is timed over --steps calls (the positions advancing by one a step) and the time per
layer printed: a step's latency, each step waited for. --pipelined also times steps
dispatched back to back as a serving loop runs them (each step's positions a new array,
the last one's plus one), and says how many norm calls XLA captured again meanwhile;
--no-norm leaves the norm out (q and k as projected), to time the rest alone. On a GPU
the norm launches our kernels on XLA's stream (transport "ipc" by default); on JAX's CPU
backend it runs transport "mpi" on the host.

--check compares the last layer's q and k with the float64 reference (rank 0, from the
gathered shards) and that v is the projection; PASS or FAIL (exit 1). The inputs lie on
a coarse grid (x in steps of 1/4, W in steps of 1/64), so the fp32 projection is exact in
any order and the host reproduces it bit for bit: the check measures the norm and RoPE.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # CuPy shares the GPU

try:
    import cupy_qknorm
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cupy_qknorm  # noqa: F401

from cupy_qknorm import RoPE  # noqa: E402
from cupy_qknorm import reference as ref  # noqa: E402
from cupy_qknorm.placement import select_device  # noqa: E402
from cupy_qknorm.shapes import default_dims  # noqa: E402

EPS, HIDDEN, FIRST_POSITION = 1e-6, 3072, 4096


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16, help="tokens a decode step (T)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="jitted calls timed")
    p.add_argument("--transport", default="auto", choices=("auto", "ipc", "nccl", "mpi"))
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rolled", dest="unroll", action="store_false",
                   help="keep lax.scan's loop (default: unrolled, one straight program XLA "
                        "can capture whole in a command buffer)")
    p.add_argument("--pipelined", action="store_true",
                   help="also time --steps steps dispatched back to back, waited for once "
                        "(on a GPU)")
    p.add_argument("--no-norm", dest="norm", action="store_false",
                   help="leave the norm out (q and k as projected): the rest's time alone")
    p.add_argument("--check", action="store_true",
                   help="compare the last layer with the float64 reference; exit 1 on FAIL")
    args = p.parse_args(argv)
    for name in ("tokens", "layers", "steps", "hidden"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.check and not args.norm:
        p.error("--check needs the norm (not with --no-norm)")
    return args


def inputs(args, world, rank, q_local, k_local):
    """float64 on the host, on a coarse grid: x [T, hidden] (the same on every rank), and
    per layer this rank's columns of W_qkv [hidden, q/G + 2 k/G] and norm weights."""
    x = np.random.default_rng(args.seed).integers(-4, 5, (args.tokens, args.hidden)) / 4.0
    rng = np.random.default_rng([args.seed, world, rank])
    w = rng.integers(-8, 9, (args.layers, args.hidden, q_local + 2 * k_local)) / 64.0
    qw = 1.0 + rng.integers(-32, 33, (args.layers, q_local)) / 128.0
    kw = 1.0 + rng.integers(-32, 33, (args.layers, k_local)) / 128.0
    return x, w, qw, kw


def main(argv=None):
    args = parse(argv)
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    gpu = select_device(comm)
    import jax
    import jax.numpy as jnp
    from cupy_qknorm.jax import JaxQKNorm

    g, r = comm.size, comm.rank
    q_dim, k_dim = default_dims(g)
    ql, kl = q_dim // g, k_dim // g
    backend = "gpu" if gpu and jax.default_backend() == "gpu" else "cpu"
    if backend == "gpu":
        import cupy
        dev = next(d for d in jax.devices("gpu")
                   if d.local_hardware_id == cupy.cuda.Device().id)
    else:
        dev = jax.devices("cpu")[0]
    bf16 = jnp.bfloat16
    x, w, qw, kw = inputs(args, g, r, ql, kl)
    put = lambda a, dt=bf16: jax.device_put(jnp.asarray(a, dt), dev)  # noqa: E731
    jx, jw, jqw, jkw = put(x), put(w), put(qw), put(kw)
    rope = RoPE.minimax_m2()
    with JaxQKNorm(comm, q_dim, k_dim, "bfloat16", EPS, rope=rope, backend=backend,
                   transport="mpi" if backend == "cpu" else args.transport) as qk:
        @jax.jit
        def prologue(x, w, qw, kw, pos):
            def layer(before, weights):
                w, qw, kw = weights
                # x plus a zero made from the layer before's q (the value stays x): this
                # layer's calls depend on the last's, as a model's next input does, so
                # they run in layer order whatever XLA schedules (an optimization barrier
                # does not do it: XLA removes it before scheduling)
                xl = x + before * 0
                qkv = jnp.dot(xl, w, preferred_element_type=jnp.float32).astype(bf16)
                q, k = qkv[:, :ql], qkv[:, ql:ql + kl]
                if args.norm:
                    q, k = qk(q, k, qw, kw, pos, in_place=True)
                return q[0, 0], (q, k, qkv[:, ql + kl:])
            return jax.lax.scan(layer, jnp.zeros((), bf16), (w, qw, kw),
                                unroll=args.unroll)[1]

        pos0 = np.random.default_rng(args.seed).integers(0, FIRST_POSITION, args.tokens)
        times = []
        for step in range(args.steps + 2):  # two warm-ups
            pos = jax.device_put(jnp.asarray(pos0 + step, jnp.int32), dev)
            t = time.perf_counter()
            with qk.errors():
                out = jax.block_until_ready(prologue(jx, jw, jqw, jkw, pos))
            if step >= 2:
                times.append(time.perf_counter() - t)
        qk.synchronize(*out)
        per_layer = statistics.median(times) * 1e6 / args.layers
        who = f"{jax.devices(backend)[0].device_kind}" if backend == "gpu" else "CPU"
        if r == 0:
            print(f"G={g} T={args.tokens} layers={args.layers} "
                  f"({'unrolled' if args.unroll else 'rolled'}) on {who} ({backend}, "
                  f"transport {qk.transport!r}){'' if args.norm else ', no norm'}: "
                  f"{per_layer:.1f} us a layer in one jit (median of {args.steps}); XLA "
                  f"captured {qk.captured_calls} norm calls into command buffers")
        if args.pipelined and backend != "gpu":
            if r == 0:  # a step does not wait for the last: the CPU may run both at once
                print("pipelined: GPU only (JAX's CPU backend may run two steps at once)")
        elif args.pipelined:
            advance = jax.jit(lambda p: p + 1)
            captured, runs = qk.captured_calls, []
            for _ in range(5):
                pos = jax.device_put(jnp.asarray(pos0, jnp.int32), dev)
                t = time.perf_counter()
                with qk.errors():
                    for _ in range(args.steps):  # nothing waited for until the last
                        out = prologue(jx, jw, jqw, jkw, pos)
                        pos = advance(pos)
                    jax.block_until_ready(out)
                runs.append((time.perf_counter() - t) / args.steps)
            qk.synchronize(*out)
            if r == 0:
                print(f"pipelined: {statistics.median(runs) * 1e6 / args.layers:.1f} us a "
                      f"layer ({args.steps} steps back to back, median of 5); XLA captured "
                      f"{qk.captured_calls - captured} of {5 * args.steps * args.layers} "
                      f"norm calls again")
        if not args.check:
            return 0
        q, k, v = (np.asarray(a[-1].astype(jnp.float32)) for a in out)
        last = args.layers - 1
        proj = ref.from_f64(x @ w[last], "bfloat16")   # exact: the coarse grid
        parts = comm.gather((q, k, v, proj, qw[last], kw[last]), root=0)
    if r != 0:
        return int(comm.bcast(None, root=0))
    qf, kf, vf, qwf, kwf = (np.concatenate([p[i] for p in parts], axis=-1)
                            for i in (0, 1, 2, 4, 5))
    qin = np.concatenate([p[3][:, :ql] for p in parts], axis=-1)
    kin = np.concatenate([p[3][:, ql:ql + kl] for p in parts], axis=-1)
    vin = np.concatenate([p[3][:, ql + kl:] for p in parts], axis=-1)
    pos = pos0 + args.steps + 1
    table = ref.rope_table(rope.rows(), rope.rotary_dim, rope.theta)
    qy, ky, qm, km = ref.qk_norm_rope(ref.to_f64(qin, "bfloat16"), ref.to_f64(kin, "bfloat16"),
                                      qwf, kwf, EPS, pos, table, rope.head_dim,
                                      rope.rotary_dim, rope.style)
    bits = lambda a: ref.from_f64(a, "bfloat16")  # noqa: E731 - exact: a and its values
    bad = [n for o, y, m in ((qf, qy, qm), (kf, ky, km))
           for n in [ref.compare_rope(bits(o), y, m, "bfloat16")[1]]]
    v_ok = np.array_equal(bits(vf), vin)
    ok = not any(bad) and v_ok
    print(f"{'PASS' if ok else 'FAIL'}: last layer q/k past tolerance {bad}, v exact {v_ok}")
    comm.bcast(0 if ok else 1, root=0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
