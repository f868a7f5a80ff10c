"""cupy-qknorm {compile, check, info, bench}: build the kernels, check parity, describe
this machine, time the op. Also `python -m cupy_qknorm`.

Every command validates its arguments and this machine before any work. A usage error (a
bad value, an unknown architecture, a transport this machine cannot run) or a missing
piece (CuPy, a CUDA driver or device, NVRTC, an MPI library) prints one line,
`cupy-qknorm <command>: <why>`, naming the extra to install where one brings it (on rank
0 under mpiexec), and exits with 2; CUPY_QKNORM_DEBUG=1 adds the traceback. `info` says
what is missing line by line and exits 0; `check` without CuPy runs on transport "mpi".
"""
from __future__ import annotations

import argparse
import os
import sys
import time

PROG = "cupy-qknorm"
USAGE_ERROR = 2


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where the help text already says it or there
    is none to show (a flag, or a default the help describes)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _ints(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 0, e.g. 0,1,64; "
                                         f"got {text!r}")
    return values


def _positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            v = None
        if v is None or not v > 0 or v != v or v == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
        return v
    parse.__name__ = kind.__name__
    return parse


# -- compile ----------------------------------------------------------------------------
def _compile_one(job):
    """One specialization for one architecture, in a worker process: (status, spill)."""
    from . import compile as kc
    spec, arch = job
    t = time.perf_counter()
    try:
        r = kc.nvrtc_compile(spec, arch)
    except Exception as e:  # noqa: BLE001 - reported, counted, and the run fails
        first = str(e).strip().splitlines()
        return f"FAIL {first[0] if first else type(e).__name__}", None, \
            time.perf_counter() - t, str(e)
    fused = r["resources"].get("fused") or {}
    spill = fused.get("spill_stores", 0) + fused.get("spill_loads", 0)
    regs, smem = fused.get("registers"), fused.get("smem", 0)
    status = (f"ok   {r['cubin_bytes']:>7} B; fused kernel: {regs or '?'} registers, "
              f"{spill} B spilled, {smem} B shared, "
              f"{_blocks_per_sm(regs, spec.threads, smem)} blocks/SM")
    return status, spill, time.perf_counter() - t, None


def cmd_compile(args):
    """Build every shipped specialization with NVRTC (no GPU needed), in parallel."""
    from . import compile as kc
    from . import knobs
    from .placement import no_gpu_reason
    from .tuning import shipped_specs
    why = kc.nvrtc_available()
    if why is not None:
        raise _UsageError(f"NVRTC is not available: {why}")
    supported = kc.supported_archs()
    for arch in args.arch:
        if arch not in supported:
            raise _UsageError(f"unknown architecture {arch!r}; this NVRTC supports "
                              f"{', '.join(supported)}")
    if args.cupy_cache:
        why = no_gpu_reason()
        if why is not None:
            raise _UsageError(f"--cupy-cache needs a GPU (CuPy compiles for the GPU it "
                              f"sees): {why}")
    knobs.check_all()
    specs = shipped_specs()
    jobs = [(spec, arch) for arch in args.arch for spec in specs]
    failed, spilled, errors = 0, [], []
    t0 = time.perf_counter()
    workers = max(1, min(args.jobs, len(jobs)))
    results = _map(_compile_one, jobs, workers)
    for i, ((spec, arch), (status, spill, seconds, error)) in enumerate(zip(jobs, results), 1):
        if error is not None:
            failed += 1
            errors.append(f"{arch} {spec}:\n{error}")
        elif spill:
            spilled.append(f"{arch} {spec}")
        print(f"[{i:>3}/{len(jobs)}] {arch} {spec}: {status} ({seconds:.2f} s)", flush=True)
    for e in errors[:3]:  # the compiler's log of the first failures, after the list
        print(e, file=sys.stderr)
    print(f"compiled {len(jobs) - failed}/{len(jobs)} specializations for "
          f"{', '.join(args.arch)} in {time.perf_counter() - t0:.1f} s with {workers} "
          f"process{'es' if workers > 1 else ''}; sources {kc.SOURCES_HASH}; register "
          f"spills: {', '.join(spilled) if spilled else 'none'}", flush=True)
    if args.cupy_cache and not failed:
        failed = _warm_cupy_cache(kc, specs)
    return 1 if failed else 0


def _map(fn, jobs, workers):
    """fn over jobs in `workers` processes (in this one for 1), results in order. Spawned,
    not forked: a fork of a process that has touched CUDA may not use it."""
    if workers == 1:
        return map(fn, jobs)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    return _drain(pool, pool.map(fn, jobs))


def _drain(pool, results):
    with pool:
        yield from results


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
    import cupy
    arch = cupy.cuda.Device().compute_capability
    t0 = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        t = time.perf_counter()
        kc.load(spec)
        print(f"[{i:>3}/{len(specs)}] CuPy cache, sm_{arch} {spec}: "
              f"{time.perf_counter() - t:.2f} s", flush=True)
    print(f"CuPy's kernel cache holds all {len(specs)} specializations for sm_{arch} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


# -- check ------------------------------------------------------------------------------
def cmd_check(args):
    """Parity of this machine against the float64 reference; PASS/FAIL on rank 0."""
    import numpy as np

    from . import TPQKNorm, knobs
    from . import reference as ref
    from .placement import select_device
    from .rope import host_table
    gpu = args.transport in ("ipc", "nccl")
    comm = _world(f"transport {args.transport!r}" if gpu else None)
    from mpi4py import MPI
    rank, world = comm.rank, comm.size
    knobs.check_all()
    # the same on every rank: every rank raises, rank 0 says why
    model, rope, heads = _check_shape(args, world)
    from .bench import kv_cache_option
    kv = kv_cache_option(args.kv_cache, args.dtype, rope)
    select_device(comm)
    worst, bad_total, cache_bad = 0.0, 0, 0
    built = _jax_check(comm, gpu) if args.jax else TPQKNorm
    extra = {} if kv is None else {"kv_cache": kv}
    with built(comm, args.q_dim, args.k_dim, args.dtype, args.eps, args.max_tokens,
               transport=args.transport, timeout_s=args.timeout, rope=rope,
               kv_heads=args.kv_heads, head_dim=args.head_dim, **extra) as norm:
        xp = _array_module(norm.norm if args.jax else norm)
        dk = norm.config.k_local
        if rank == 0:
            heads_say = "" if args.kv_heads is None else (
                f" kv_heads={args.kv_heads}x{args.head_dim}"
                f"{' replicated' if norm.config.k_replicas > 1 else ''}")
            name = f"model={model.name} " if model is not None else ""
            what = ("MiniMax M2" if model is None else model.name)
            print(f"check: {name}G={world} dtype={args.dtype} q_dim={args.q_dim} "
                  f"k_dim={args.k_dim}{heads_say}{f' eps={args.eps:g}' if model else ''} "
                  f"transport={norm.transport} "
                  f"max_tokens={args.max_tokens}"
                  + (f" jax.jit ({norm.backend})" if args.jax else "")
                  + (f" rope={what} ({rope.head_dim}/{rope.rotary_dim} {rope.style}, "
                     f"{rope.max_position} positions)" if rope else "")
                  + (f" kv_cache={kv.cache_dtype(args.dtype)} (blocks of {kv.block_size}, "
                     f"random slots, -1 holes)" if kv else ""), flush=True)

        def mine(x, is_k):  # this rank's slice: k's heads may be replicated
            return ref.shard_heads(x, world, rank, heads) if is_k else ref.shard(x, world, rank)

        for i, tokens in enumerate(args.tokens):
            q, k, qw, kw, qr, kr = ref.make_case(args.seed + i, tokens, args.q_dim, args.k_dim,
                                                 args.dtype, eps=args.eps)
            kwargs, mags = {}, None
            if rope is not None:  # the same positions on every rank, the table's last row too
                pos = np.random.default_rng(args.seed + i).integers(0, rope.max_position,
                                                                     tokens)
                if tokens:
                    pos[0] = rope.max_position - 1
                qr, kr, qm, km = ref.qk_norm_rope(
                    ref.to_f64(q, args.dtype), ref.to_f64(k, args.dtype),
                    ref.to_f64(qw, args.dtype), ref.to_f64(kw, args.dtype), args.eps, pos,
                    host_table(rope), rope.head_dim, rope.rotary_dim, rope.style)
                kwargs["positions"] = xp.asarray(pos)
                mags = [mine(m, i) for i, m in enumerate((qm, km))]
            sh = [xp.asarray(np.ascontiguousarray(mine(a, i % 2)))
                  for i, a in enumerate((q, k, qw, kw))]
            if kv is not None:
                caches = _check_caches(xp, kv, args, dk, rank, i, tokens)
            if args.jax:  # XLA allocates the outputs: nothing to poison
                outs = norm.checked(*sh, kwargs.get("positions"),
                                    caches[0] if kv is not None else None)
                if kv is not None:  # the caches the call returned
                    caches[0].update(k_cache=outs[2], v_cache=outs[3])
                    outs = outs[:2]
            else:
                outs = [xp.full_like(sh[0], ref.poison(args.dtype)),
                        xp.full_like(sh[1], ref.poison(args.dtype))]
                if kv is not None:
                    kwargs.update(caches[0])
                norm(*sh, out=outs, **kwargs)
                norm.synchronize()
            if kv is not None:
                cb = comm.allreduce(_cache_mismatches(kv, args, caches, _host(outs[1]), dk),
                                    op=MPI.SUM)
                cache_bad += cb
            want = [mine(r, i) for i, r in enumerate((qr, kr))]
            errs = [ref.compare(_host(o), y, args.dtype) if mags is None else
                    ref.compare_rope(_host(o), y, m, args.dtype)
                    for o, y, m in zip(outs, want, mags or (None, None))]
            err = comm.allreduce(max(e[0] for e in errs), op=MPI.MAX)
            bad = comm.allreduce(sum(e[1] for e in errs), op=MPI.SUM)
            worst, bad_total = max(worst, err), bad_total + bad
            if rank == 0:
                unit = ref.TOLERANCE[args.dtype][0]
                print(f"  T={tokens:>6}: max error {err:.3g} {unit}, {bad} past tolerance"
                      + (f"; caches: {cb} bytes differ from the reference's" if kv else ""),
                      flush=True)
    if rank == 0:
        verdict = "PASS" if bad_total == 0 and cache_bad == 0 else "FAIL"
        print(f"{verdict}: max error {worst:.3g} {ref.TOLERANCE[args.dtype][0]} "
              f"(tolerance {ref.TOLERANCE[args.dtype][1]:g}), {bad_total} elements past it"
              + (f"; {cache_bad} cache bytes differ" if kv else ""))
    return 0 if bad_total == 0 and cache_bad == 0 else 1


KV_CHECK_SCALES = (0.75, 2.5)  # check --kv-cache fp8: k_scale, v_scale


def _check_caches(xp, kv, args, dk, rank, i, tokens):
    """(the call's cache arguments, their host copies before the call, the slots) of one
    check call: v rows, caches of random bytes with room for 2 T tokens, distinct random
    slots with -1 holes, the FP8 scales."""
    import numpy as np

    from .host import from_f64
    rng = np.random.default_rng(args.seed + 1000 * i + rank)
    heads, block = kv.kv_heads(dk), kv.block_size
    blocks = max(1, -(-2 * tokens // block))
    storage = kv.storage_dtype(args.dtype)
    shape = (blocks, block, heads, kv.head_dim)

    def poisoned():
        return rng.integers(0, 256, int(np.prod(shape)) * storage.itemsize,
                            dtype=np.uint8).view(storage).reshape(shape)
    before = (poisoned(), poisoned())
    slots = rng.permutation(blocks * block)[:tokens]
    slots[rng.random(tokens) < 0.1] = -1
    v = from_f64(rng.standard_normal((tokens, dk)) * 10.0 ** rng.uniform(-2, 3, (tokens, 1)),
                 args.dtype)
    call = {"v": xp.asarray(v), "k_cache": xp.asarray(before[0]),
            "v_cache": xp.asarray(before[1]), "slot_mapping": xp.asarray(slots)}
    if kv.dtype is not None:
        call.update(k_scale=KV_CHECK_SCALES[0], v_scale=KV_CHECK_SCALES[1])
    return call, before, slots, v


def _cache_mismatches(kv, args, caches, k_rows, dk) -> int:
    """Bytes of this rank's caches that differ from the reference's write of the k rows
    the op stored and of v (reference.expected_cache)."""
    import numpy as np

    from . import reference as ref
    call, before, slots, v = caches
    heads = kv.kv_heads(dk)
    scales = KV_CHECK_SCALES if kv.dtype is not None else (1.0, 1.0)
    bad = 0
    for got, was, rows, scale in ((call["k_cache"], before[0], k_rows, scales[0]),
                                  (call["v_cache"], before[1], v, scales[1])):
        want = ref.expected_cache(was, rows, slots, kv, heads, args.dtype, scale)
        bad += int(np.count_nonzero(_host(got).view(np.uint8) != want.view(np.uint8)))
    return bad


def _check_shape(args, world):
    """Fill in check's widths, eps and KV heads (from --model or the defaults); returns
    (the model or None, its RoPE or MiniMax's with --rope or None, k's heads for the
    shards). Raises ValueError, the same on every rank, where they cannot run."""
    from . import RoPE
    from .models import get
    from .rope import check as check_rope
    from .shapes import default_dims
    model = None
    if args.model is not None:
        given = [f"--{n.replace('_', '-')}" for n in ("q_dim", "k_dim", "kv_heads", "head_dim")
                 if getattr(args, n) is not None] + (["--rope"] if args.rope else [])
        if given:
            raise ValueError(f"{', '.join(given)} and --model do not go together: the model "
                             f"sets them")
        model = get(args.model)
        if not model.layout(world):
            raise ValueError(model.refusal(world))
        args.q_dim, args.k_dim = model.q_dim, model.k_dim
        args.kv_heads, args.head_dim = model.kv_heads, model.head_dim
        args.eps = model.eps if args.eps is None else args.eps
        rope = model.rope
    else:
        q_dim, k_dim = default_dims(world)
        args.q_dim = q_dim if args.q_dim is None else args.q_dim
        args.k_dim = k_dim if args.k_dim is None else args.k_dim
        if args.kv_heads is not None and args.head_dim is None:
            args.head_dim = args.k_dim // args.kv_heads
        args.eps = 1e-6 if args.eps is None else args.eps
        rope = RoPE.minimax_m2() if args.rope else None
        if rope is not None and args.kv_heads is None:
            check_rope(rope, args.dtype, world, args.q_dim, args.k_dim)
    heads = args.kv_heads if args.kv_heads is not None else world
    return model, rope, heads


# -- info -------------------------------------------------------------------------------
def cmd_info(args):
    """What this machine offers: version, kernel sources, CuPy, NVRTC, NCCL, MPI, GPUs."""
    from . import __version__
    from . import compile as kc
    from .placement import no_gpu_reason
    print(f"cupy_qknorm {__version__}; kernels {kc.KERNEL_DIR} ({kc.SOURCES_HASH})")
    for name, line in (("CuPy", _cupy_line), ("NVRTC", _nvrtc_line), ("NCCL", _nccl_line),
                       ("MPI", _mpi_line)):
        try:
            text = line()
        except Exception as e:  # noqa: BLE001 - informational: say what failed
            text = f"unavailable ({type(e).__name__}: {_first_line(e)})"
        print(f"{name}: {text}")
    why = no_gpu_reason()
    if why is not None:
        print(f"GPUs: none; {why}")
        return 0
    import cupy
    for d in range(cupy.cuda.runtime.getDeviceCount()):
        p = cupy.cuda.runtime.getDeviceProperties(d)
        print(f"GPU {d}: {p['name'].decode()} sm_{p['major']}{p['minor']}, "
              f"{p['totalGlobalMem'] / 2 ** 30:.0f} GiB")
    return 0


def _cupy_line():
    try:
        import cupy
    except ImportError:
        from .placement import no_gpu_reason
        return f"unavailable: {no_gpu_reason()}"
    v = cupy.cuda.runtime.runtimeGetVersion()
    return f"{cupy.__version__} (CUDA runtime {v // 1000}.{v % 1000 // 10})"


def _nvrtc_line():
    from . import compile as kc
    why = kc.nvrtc_available()
    if why is not None:
        return f"unavailable ({why})"
    from cuda.bindings import nvrtc
    _, major, minor = nvrtc.nvrtcVersion()
    return f"{major}.{minor}, targets {', '.join(kc.supported_archs())}"


def _nccl_line():
    import warnings
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "unavailable (it comes with CuPy)"
    with warnings.catch_warnings():  # CuPy warns where libnccl is missing: said below
        warnings.simplefilter("ignore")
        from cupy.cuda import nccl
    if not getattr(nccl, "available", True) or not hasattr(nccl, "NcclCommunicator"):
        return "unavailable in this CuPy (pip install nvidia-nccl-cu13 or -cu12)"
    return f"{nccl.get_version()}"


def _mpi_line():
    why = _mpi_missing()
    if why is not None:
        return f"unavailable: {why}"
    import mpi4py
    from mpi4py import MPI
    lib = " ".join(MPI.Get_library_version().strip().splitlines()[0].split())
    return f"mpi4py {mpi4py.__version__}; {lib}; {MPI.COMM_WORLD.size} rank(s) here"


# -- what a command needs from this machine ----------------------------------------------
def _mpi_missing() -> str | None:
    """None where mpi4py loads an MPI library, else what is missing, in one line."""
    try:
        from mpi4py import MPI  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name == "mpi4py":
            return ("mpi4py is not installed (pip install mpi4py, and where this host has "
                    "no MPI: pip install 'cupy-qknorm[mpich]')")
        detail = _first_line(e)
    except Exception as e:  # noqa: BLE001 - mpi4py's loader raises RuntimeError
        # its first line is "cannot load MPI library"; the next names the file it tried
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else _first_line(e)
    else:
        return None
    return (f"mpi4py finds no MPI library ({detail}): pip install 'cupy-qknorm[mpich]', or "
            f"load this host's own MPI")


def _world(gpu_for: str | None = None):
    """MPI.COMM_WORLD; with `gpu_for` (what needs it), also a GPU that CuPy can use on
    every rank, agreed by an allgather, so every rank raises the same _UsageError."""
    from .placement import no_gpu_reason
    why = _mpi_missing()
    if why is not None:
        gpu = no_gpu_reason() if gpu_for is not None else None
        raise _UsageError(why if gpu is None else f"{why}; {gpu_for} also needs a GPU: "
                                                  f"{gpu}")
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if gpu_for is None:
        return comm
    reasons = comm.allgather(no_gpu_reason())
    bad = [r for r, why in enumerate(reasons) if why is not None]
    if bad:
        where = ("" if comm.size == 1 else "every rank: " if len(set(reasons)) == 1
                 else f"rank {bad[0]}: ")
        raise _UsageError(f"{gpu_for} needs a CUDA GPU on every rank; {where}"
                          f"{reasons[bad[0]]}")
    return comm


def _first_line(e) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# -- main -------------------------------------------------------------------------------
class _UsageError(Exception):
    """What this machine cannot act on (an argument, a missing piece): one line, exit 2."""


def _jax_check(comm, gpu):
    """JaxQKNorm for `check --jax`, with checked(q, k, qw, kw, positions, cache): the call
    through one jitted function, its outputs as host arrays (bf16 as uint16 bits); with
    `cache` (the KV cache's arguments by name) the caches it returns follow them."""
    try:
        import jax
    except ImportError as e:
        raise _UsageError("check --jax needs JAX: pip install 'cupy-qknorm[jax]'") from e
    from .jax import JaxQKNorm
    backend = "gpu" if jax.default_backend() == "gpu" else "cpu"
    if gpu and backend == "cpu":
        raise _UsageError("check --jax with a GPU transport needs JAX's CUDA backend "
                          "(pip install 'jax[cuda13]')")

    class Checked(JaxQKNorm):
        def checked(self, q, k, qw, kw, positions, cache=None):
            import numpy as np
            dev = jax.devices(backend)[0]
            if backend == "gpu":
                import cupy
                dev = next(d for d in jax.devices("gpu")
                           if d.local_hardware_id == cupy.cuda.Device().id)
            arrays = [_host(a) for a in (q, k, qw, kw) +
                      (() if positions is None else (positions,))]
            names = ("v", "k_cache", "v_cache", "slot_mapping") if cache else ()
            static = {n: cache[n] for n in ("k_scale", "v_scale") if n in cache} \
                if cache else {}
            ours = len(arrays)
            arrays += [_host(cache[n]) for n in names]
            import ml_dtypes
            put = [jax.device_put(a.view(ml_dtypes.bfloat16) if a.dtype == np.uint16 else a,
                                  dev) for a in arrays]
            if self._jit is None:
                self._jit = jax.jit(lambda *a: self(*a[:ours], **dict(zip(names, a[ours:])),
                                                    **static))
            with self.errors():
                out = self._jit(*put)
                self.synchronize(*out)
            return [np.asarray(o).view(np.uint16) if o.dtype == ml_dtypes.bfloat16 else
                    np.asarray(o) for o in out]
        _jit = None

    return lambda *a, **kw: Checked(*a, backend=backend, **kw)


def _array_module(norm):
    if norm._device is None:
        import numpy
        return numpy
    import cupy
    return cupy


def _host(a):
    return a.get() if hasattr(a, "get") else a


def _model_names():
    from .models import MODELS
    return list(MODELS)


def parser():
    from . import __version__
    from .norm import TRANSPORTS
    from .shapes import DTYPES
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{compile,check,info,bench}")
    c = sub.add_parser("compile", formatter_class=_Formatter,
                       help="build every shipped specialization with NVRTC (no GPU needed)",
                       description="Build every shipped specialization with NVRTC (no GPU "
                                   "needed): one line per specialization and a summary.")
    c.add_argument("--arch", action="append", metavar="sm_XY",
                   help="target architecture, repeatable (default: sm_90)")
    c.add_argument("--jobs", "-j", type=_positive(int), default=os.cpu_count() or 1,
                   help="compiler processes")
    c.add_argument("--cupy-cache", action="store_true",
                   help="then load each through CuPy on this GPU, filling CuPy's disk cache "
                        "so that no first call compiles (needs a GPU; default: off)")
    k = sub.add_parser("check", formatter_class=_Formatter,
                       help="parity against the float64 reference (under mpiexec)",
                       description="Parity of every rank's output against the float64 "
                                   "reference: mpiexec -n G cupy-qknorm check.")
    k.add_argument("--transport", default="auto", choices=TRANSPORTS,
                   help="how partial sums travel (auto: the fastest this placement runs)")
    k.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="data type of q and k")
    k.add_argument("--q-dim", type=_positive(int),
                   help="full q width (default: 6144, or what splits over G ranks: "
                        "cupy_qknorm.shapes.default_dims)")
    k.add_argument("--k-dim", type=_positive(int),
                   help="full k width (default: 1024, or what splits over G ranks)")
    k.add_argument("--eps", type=float, help="RMSNorm epsilon (default: 1e-6, or the model's)")
    k.add_argument("--tokens", type=_ints, default="0,1,7,64,1000,3000",
                   help="token counts T to check, comma-separated")
    k.add_argument("--max-tokens", type=_positive(int), default=2048,
                   help="tokens a launch (longer calls run in chunks)")
    k.add_argument("--seed", type=int, default=1234, help="seed of the random inputs")
    k.add_argument("--timeout", type=_positive(float), default=5.0,
                   help="bound on any wait for a peer, seconds")
    k.add_argument("--rope", action="store_true",
                   help="then MiniMax M2's RoPE (heads of 128, 64 rotated, NeoX, theta 5e6, "
                        "positions up to 196607); needs whole heads on every rank "
                        "(default: off)")
    k.add_argument("--kv-heads", type=_positive(int),
                   help="k's heads (of --head-dim): split evenly over G, or replicated "
                        "where G is a multiple of them (default: not given)")
    k.add_argument("--head-dim", type=_positive(int),
                   help="with --kv-heads: one head's width (default: k_dim / kv_heads)")
    k.add_argument("--model", metavar="NAME",
                   help="a model preset (cupy_qknorm.models: " + ", ".join(_model_names()) +
                        "): its widths, KV heads, eps and RoPE (default: none)")
    k.add_argument("--jax", action="store_true",
                   help="call the norm inside jax.jit (cupy_qknorm.jax; JAX's backend: GPU "
                        "where it has one, else CPU with transport mpi) (default: off)")
    k.add_argument("--kv-cache", choices=("bf16", "fp8"),
                   help="with --rope: then the paged KV-cache write of k and v (a cache of "
                        "the data's dtype, or FP8 E4M3 with scales), checked byte for byte "
                        "against the reference's (default: off)")
    sub.add_parser("info", formatter_class=_Formatter,
                   help="version, kernel sources, CuPy, NVRTC, NCCL, MPI and GPUs",
                   description="What this machine offers cupy_qknorm.")
    from .bench import add_parser as add_bench
    add_bench(sub, _Formatter)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.cmd == "compile":
        args.arch = args.arch or ["sm_90"]
    command = {"compile": cmd_compile, "check": cmd_check, "info": cmd_info,
               "bench": _bench}[args.cmd]
    from .errors import QKNormError
    try:
        return command(args)
    except (_UsageError, QKNormError, ValueError, TypeError) as e:
        from . import knobs
        if _rank(args.cmd) == 0:
            text = " ".join(str(e).split()) or type(e).__name__
            print(f"{PROG} {args.cmd}: {text}", file=sys.stderr, flush=True)
            try:
                debug = knobs.get("CUPY_QKNORM_DEBUG")
            except ValueError:
                debug = 0
            if debug:
                import traceback
                traceback.print_exc()
        return USAGE_ERROR


def _bench(args):
    """bench times the GPU transports: its options, MPI and a GPU on every rank, then
    bench.run."""
    from .bench import jax_refusal, run
    refusal = jax_refusal(args)
    if refusal is not None:
        raise _UsageError(refusal)
    _world("timing the GPU transports")
    return run(args)


def _rank(cmd) -> int:
    """This process's rank where the command runs under MPI (and MPI loads), else 0."""
    if cmd not in ("check", "bench") or _mpi_missing() is not None:
        return 0
    from mpi4py import MPI
    return MPI.COMM_WORLD.rank


if __name__ == "__main__":
    sys.exit(main())
