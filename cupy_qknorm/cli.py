"""python -m cupy_qknorm {compile, check, info, bench}."""
from __future__ import annotations

import argparse
import sys
import time


def _ints(s):
    return [int(v) for v in s.split(",") if v]


def cmd_compile(args):
    """Build every shipped specialization with NVRTC: no GPU needed."""
    from . import compile as kc
    from .tuning import shipped_specs
    specs = shipped_specs()
    failed, spilled = 0, []
    t0 = time.perf_counter()
    for arch in args.arch:
        for i, spec in enumerate(specs, 1):
            t = time.perf_counter()
            try:
                r = kc.nvrtc_compile(spec, arch)
                fused = r["resources"]["fused"] or {}
                spill = fused.get("spill_stores", 0) + fused.get("spill_loads", 0)
                if spill:
                    spilled.append(f"{arch} {spec}")
                regs, smem = fused.get("registers"), fused.get("smem", 0)
                status = (f"ok   {r['cubin_bytes']:>7} B; fused kernel: "
                          f"{regs or '?'} registers, {spill} B spilled, {smem} B shared, "
                          f"{_blocks_per_sm(regs, spec.threads, smem)} blocks/SM")
            except Exception as e:  # noqa: BLE001 - reported, counted, and the run fails
                failed += 1
                status = f"FAIL {e}"
            print(f"[{i:>3}/{len(specs)}] {arch} {spec}: {status} "
                  f"({time.perf_counter() - t:.2f} s)", flush=True)
    n = len(specs) * len(args.arch)
    print(f"compiled {n - failed}/{n} specializations for {', '.join(args.arch)} in "
          f"{time.perf_counter() - t0:.1f} s; sources {kc.SOURCES_HASH}; register spills: "
          f"{', '.join(spilled) if spilled else 'none'}")
    if args.cupy_cache and not failed:
        failed = _warm_cupy_cache(kc, specs)
    return 1 if failed else 0


def _blocks_per_sm(registers, threads, smem=0):
    """Blocks of `threads` that an sm_90 multiprocessor holds at once by its 64K registers
    (allocated per warp in units of 256), its 64 warps, its 32 blocks and its 228 KB of
    shared memory (each block also takes 1 KB the system reserves). Staged rows make shared
    memory the limit for some specs (43 KB a block: 5 at most)."""
    if not registers:
        return "?"
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // 256) * 256
    return min(65536 // (per_warp * warps), 64 // warps, 32, 228 * 1024 // (smem + 1024))


def _warm_cupy_cache(kc, specs):
    """Load every specialization through CuPy on this GPU: CuPy keeps the binaries in its
    disk cache, so no later process compiles on its first call. Returns the failures."""
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
        arch = cupy.cuda.Device().compute_capability
    except Exception as e:  # noqa: BLE001 - no driver or no GPU
        print(f"--cupy-cache needs a GPU: {e}")
        return 1
    t0 = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        t = time.perf_counter()
        kc.load(spec)
        print(f"[{i:>3}/{len(specs)}] CuPy cache, sm_{arch} {spec}: "
              f"{time.perf_counter() - t:.2f} s", flush=True)
    print(f"CuPy's kernel cache holds all {len(specs)} specializations for sm_{arch} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_check(args):
    """Parity of this machine against the float64 reference; PASS/FAIL on rank 0."""
    import numpy as np
    from mpi4py import MPI

    from . import TPQKNorm
    from . import reference as ref
    from .placement import select_device
    comm = MPI.COMM_WORLD
    rank, world = comm.rank, comm.size
    select_device(comm)
    _default_dims(args, world)
    worst = 0.0
    bad_total = 0
    with TPQKNorm(comm, args.q_dim, args.k_dim, args.dtype, args.eps, args.max_tokens,
                  transport=args.transport, timeout_s=args.timeout) as norm:
        xp = _array_module(norm)
        if rank == 0:
            print(f"check: G={world} dtype={args.dtype} q_dim={args.q_dim} k_dim={args.k_dim} "
                  f"transport={norm.transport} max_tokens={args.max_tokens}", flush=True)
        for i, tokens in enumerate(args.tokens):
            q, k, qw, kw, qr, kr = ref.make_case(args.seed + i, tokens, args.q_dim, args.k_dim,
                                                 args.dtype, eps=args.eps)
            sh = [xp.asarray(np.ascontiguousarray(ref.shard(a, world, rank)))
                  for a in (q, k, qw, kw)]
            outs = [xp.full_like(sh[0], ref.poison(args.dtype)),
                    xp.full_like(sh[1], ref.poison(args.dtype))]
            norm(*sh, out=outs)
            norm.synchronize()
            errs = [ref.compare(_host(o), ref.shard(r, world, rank), args.dtype)
                    for o, r in zip(outs, (qr, kr))]
            err = comm.allreduce(max(e[0] for e in errs), op=MPI.MAX)
            bad = comm.allreduce(sum(e[1] for e in errs), op=MPI.SUM)
            worst, bad_total = max(worst, err), bad_total + bad
            if rank == 0:
                unit = ref.TOLERANCE[args.dtype][0]
                print(f"  T={tokens:>6}: max error {err:.3g} {unit}, {bad} past tolerance",
                      flush=True)
    if rank == 0:
        verdict = "PASS" if bad_total == 0 else "FAIL"
        print(f"{verdict}: max error {worst:.3g} {ref.TOLERANCE[args.dtype][0]} "
              f"(tolerance {ref.TOLERANCE[args.dtype][1]:g}), {bad_total} elements past it")
    return 0 if bad_total == 0 else 1


def cmd_info(args):
    from . import __version__
    from . import compile as kc
    print(f"cupy_qknorm {__version__}; kernels {kc.KERNEL_DIR} ({kc.SOURCES_HASH})")
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
        for d in range(n):
            p = cupy.cuda.runtime.getDeviceProperties(d)
            print(f"GPU {d}: {p['name'].decode()} sm_{p['major']}{p['minor']}")
    except Exception as e:  # noqa: BLE001 - informational
        print(f"no GPU: {type(e).__name__}: {e}")
    return 0


def _array_module(norm):
    if norm._device is None:
        import numpy
        return numpy
    import cupy
    return cupy


def _host(a):
    return a.get() if hasattr(a, "get") else a


def _default_dims(args, world):
    """Fill --q-dim/--k-dim left out with widths that split over `world` ranks."""
    from .shapes import default_dims
    q, k = default_dims(world)
    if args.q_dim is None:
        args.q_dim = q
    if args.k_dim is None:
        args.k_dim = k


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m cupy_qknorm", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="build every shipped specialization with NVRTC")
    c.add_argument("--arch", action="append", help="e.g. sm_90 (repeatable; default sm_90)")
    c.add_argument("--cupy-cache", action="store_true",
                   help="then load each through CuPy on this GPU, filling CuPy's disk cache "
                        "so that no first call compiles (needs a GPU)")
    k = sub.add_parser("check", help="parity against the float64 reference (under mpiexec)")
    k.add_argument("--transport", default="auto", choices=("auto", "ipc", "nccl", "mpi"))
    k.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    k.add_argument("--q-dim", type=int, help="full q width (default: 6144, or what splits "
                   "over G ranks: cupy_qknorm.compile.default_dims)")
    k.add_argument("--k-dim", type=int, help="full k width (default: 1024, or as --q-dim)")
    k.add_argument("--eps", type=float, default=1e-6)
    k.add_argument("--tokens", type=_ints, default=[0, 1, 7, 64, 1000, 3000])
    k.add_argument("--max-tokens", type=int, default=2048)
    k.add_argument("--seed", type=int, default=1234)
    k.add_argument("--timeout", type=float, default=5.0, help="peer wait bound, seconds")
    sub.add_parser("info", help="version, kernel sources and GPUs")
    from .bench import add_parser as add_bench
    add_bench(sub)
    args = p.parse_args(argv)
    if args.cmd == "compile":
        args.arch = args.arch or ["sm_90"]
    from .bench import run as cmd_bench
    return {"compile": cmd_compile, "check": cmd_check, "info": cmd_info,
            "bench": cmd_bench}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
