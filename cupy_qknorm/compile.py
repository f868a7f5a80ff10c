"""The one loader: kernels/ sources -> compiled kernels, keyed by everything that matters.

A `Spec` names one specialization (dtype, weight dtype, G, local widths, warps per token).
`load(spec)` returns its CuPy kernels (compiled by NVRTC through cupy.RawModule, cached in
memory per spec and on disk by CuPy); `nvrtc_compile(spec, arch)` builds the same source
with NVRTC through cuda.bindings, which needs no GPU and no driver.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import QKNormError

C_TYPES = {"bfloat16": "qknorm::bf16_t", "float16": "qknorm::f16_t", "float32": "float"}
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
MAX_WORLD = 8            # the width of Params.slots
# 16-byte vectors a thread holds per token: few (more threads per token) for short
# launches, whose time is latency; many (more bytes in flight per thread) for long ones,
# whose time is bandwidth. Measured on H100: BENCHMARKS.md, "vectors per thread".
NARROW_VPT, WIDE_VPT = 2, 8
VPT_ENV = "CUPY_QKNORM_VECTORS_PER_THREAD"  # one value for both (benchmark experiments)
# Tokens a block of the fused kernel keeps in flight, and where it holds their rows.
# In registers, more rows cost blocks: on H100 and H200 depth 3 and 4 were slower than 2
# at every T from 512 (BENCHMARKS.md, kernel 3). In shared memory ("staged": filled by
# asynchronous copies) depth costs no registers: on H200 (G=2) the wide layout with three
# staged rows was 13-21% faster than the layouts with rows in registers from 2048 tokens a
# launch, while staged rows were 0.1-0.45 us slower at 512 and 1024 (BENCHMARKS.md, fifth
# session). Staged rows must fit STAGE_BYTES_MAX of static shared memory (48 KB a block,
# less the block's other arrays); a spec whose rows do not keeps them in registers.
DEPTH, STAGED_DEPTH = 2, 3
DEPTH_ENV = "CUPY_QKNORM_DEPTH"  # overrides both (benchmark experiments)
STAGED_ENV = "CUPY_QKNORM_STAGED"  # 0: rows in registers in every layout (experiments)
STAGE_BYTES_MAX = 44 * 1024
# The fused kernel's layouts, picked by tokens a launch (transports.py):
# name: (vectors a thread, rows staged in shared memory)
LAYOUTS = {"narrow": (NARROW_VPT, False), "wide": (WIDE_VPT, True)}
MIN_ARCH = 80            # cvt.rn.bf16x2.f32 and friends


def _find_kernel_dir() -> Path:
    here = Path(__file__).resolve().parent
    for d in (here / "kernels", here.parent / "kernels"):  # wheel, then checkout
        if (d / "qknorm.cuh").is_file():
            return d
    raise QKNormError(f"kernel sources not found next to {here}")


KERNEL_DIR = _find_kernel_dir()


def _sources_hash() -> str:
    # CuPy's disk cache keys on the code string only and would not notice an edited header
    # pulled in with -I: the hash of every source goes into the code string instead.
    h = hashlib.sha256()
    for f in sorted(KERNEL_DIR.glob("*.cu*")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


SOURCES_HASH = _sources_hash()
SOURCE = f'// cupy_qknorm kernels {SOURCES_HASH}\n#include "qknorm.cu"\n'
MIN_BLOCKS_ENV = "CUPY_QKNORM_MIN_BLOCKS"  # a register cap for the fused kernel (experiments)
IEEE_RSQRT_ENV = "CUPY_QKNORM_IEEE_RSQRT"  # 1: IEEE division and sqrt for the scale (experiments)
TRACE_ENV = "CUPY_QKNORM_TRACE"  # 1: the fused kernel records where its time goes (experiments)
AHEAD_ENV = "CUPY_QKNORM_AHEAD"  # tokens pushed ahead of the one waited for (experiments)
TRACE_WORDS = 10                 # qknorm::kTraceWords: 64-bit words a block records


def env_int(name: str, default: int, minimum: int) -> int:
    """An integer experiment knob from the environment, or `default` where it is unset or
    empty; anything else than an integer >= minimum raises ValueError naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be {minimum} or more, got {value}")
    return value


def _flag(name: str, default: int = 0) -> int:
    """A 0/1 experiment knob from the environment (env_int's rules, at most 1)."""
    value = env_int(name, default, 0)
    if value > 1:
        raise ValueError(f"{name} must be 0 or 1, got {value}")
    return value


def tracing() -> bool:
    """Whether CUPY_QKNORM_TRACE asks the fused kernel for its time records."""
    return _flag(TRACE_ENV) == 1


def options() -> tuple:
    """NVRTC options of every compile (read when compiling, so a bad knob raises there)."""
    min_blocks = env_int(MIN_BLOCKS_ENV, 0, 1)
    ahead = env_int(AHEAD_ENV, 0, 1)
    return ("-std=c++17", f"-I{KERNEL_DIR}") + \
        ((f"-DQKNORM_MIN_BLOCKS={min_blocks}",) if min_blocks else ()) + \
        ((f"-DQKNORM_AHEAD={ahead}",) if ahead else ()) + \
        (("-DQKNORM_IEEE_RSQRT=1",) if _flag(IEEE_RSQRT_ENV) else ()) + \
        (("-DQKNORM_TRACE=1",) if tracing() else ())

# Launch parameters: the same layout as struct qknorm::Params.
PARAMS_DTYPE = np.dtype(
    [("q", np.uint64), ("k", np.uint64), ("q_out", np.uint64), ("k_out", np.uint64),
     ("q_weight", np.uint64), ("k_weight", np.uint64),
     ("q_stride", np.int64), ("k_stride", np.int64),
     ("q_out_stride", np.int64), ("k_out_stride", np.int64),
     ("slots", np.uint64, (MAX_WORLD,)), ("counters", np.uint64), ("error", np.uint64),
     ("error_host", np.uint64), ("sums", np.uint64), ("timeout_ns", np.int64),
     ("tokens", np.int32), ("max_tokens", np.int32), ("rank", np.int32),
     ("eps", np.float32), ("q_dim", np.float32), ("k_dim", np.float32)],
    align=True)


def _header_params_bytes() -> int:
    text = (KERNEL_DIR / "qknorm.cuh").read_text()
    return int(re.search(r"kParamsBytes\s*=\s*(\d+)", text).group(1))


if PARAMS_DTYPE.itemsize != _header_params_bytes():
    raise QKNormError("PARAMS_DTYPE does not match struct qknorm::Params in qknorm.cuh")


def vector_elems(dtype: str) -> int:
    """Elements of `dtype` in one 16-byte vector: local widths must be multiples of it."""
    return 16 // ITEMSIZE[dtype]


def _staging_allowed() -> bool:
    return _flag(STAGED_ENV, 1) == 1


@dataclass(frozen=True)
class Spec:
    """One specialization of the kernels."""
    dtype: str
    weight_dtype: str
    world: int
    q_local: int
    k_local: int
    warps: int
    depth: int = DEPTH
    staged: int = 0

    @classmethod
    def plan(cls, dtype: str, weight_dtype: str, world: int, q_local: int, k_local: int,
             layout: str = "narrow"):
        """The spec of one layout (LAYOUTS): warps per token, the fewest that keep about
        its vectors a thread; depth and staging as it says, rows in registers at DEPTH
        where staged rows would not fit shared memory."""
        if dtype not in C_TYPES:
            raise ValueError(f"dtype must be one of {sorted(C_TYPES)}, got {dtype!r}")
        if weight_dtype not in (dtype, "float32"):
            raise ValueError(f"weight dtype must be {dtype!r} or 'float32', got {weight_dtype!r}")
        if not 1 <= world <= MAX_WORLD:
            raise ValueError(f"world size must be 1..{MAX_WORLD}, got {world}")
        n = vector_elems(dtype)
        for name, d in (("q", q_local), ("k", k_local)):
            if d <= 0 or d % n:
                raise ValueError(f"local {name} width {d} must be a positive multiple of {n} "
                                 f"({dtype}: 16-byte vectors)")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        vectors = (q_local + k_local) // n
        vpt, staged = LAYOUTS[layout]
        warps = min(32, -(-vectors // (32 * env_int(VPT_ENV, vpt, 1))))
        spec = cls(dtype, weight_dtype, world, q_local, k_local, warps,
                   env_int(DEPTH_ENV, STAGED_DEPTH if staged else DEPTH, 2), int(staged))
        if staged and (not _staging_allowed() or spec.stage_bytes > STAGE_BYTES_MAX):
            spec = cls(dtype, weight_dtype, world, q_local, k_local, warps,
                       env_int(DEPTH_ENV, DEPTH, 2), 0)
        return spec

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def stage_bytes(self) -> int:
        """Shared memory the fused kernel's staged rows take (0 in registers): DEPTH rows
        of whole 16-byte vectors for every thread."""
        if not self.staged:
            return 0
        vectors = (self.q_local + self.k_local) // vector_elems(self.dtype)
        return self.depth * -(-vectors // self.threads) * self.threads * 16

    @property
    def names(self) -> dict:
        t, w = C_TYPES[self.dtype], C_TYPES[self.weight_dtype]
        dims = f"{self.q_local}, {self.k_local}, {self.warps}"
        fused = f"{self.depth}, {self.staged}"
        return {
            "fused": f"qknorm::fused<{t}, {w}, {self.world}, {dims}, {fused}>",
            "partial_sums": f"qknorm::partial_sums<{t}, {dims}>",
            "apply": f"qknorm::apply<{t}, {w}, {dims}>",
        }

    def __str__(self):
        return (f"{self.dtype}/w:{self.weight_dtype} G={self.world} q={self.q_local} "
                f"k={self.k_local} warps={self.warps} depth={self.depth}" +
                (" staged" if self.staged else ""))


@functools.lru_cache(maxsize=None)
def _module(spec: Spec):
    import cupy
    names = tuple(spec.names.values())
    return cupy.RawModule(code=SOURCE, options=options(), name_expressions=names)


def load(spec: Spec) -> dict:
    """{"fused" | "partial_sums" | "apply": cupy RawKernel} for the current device."""
    mod = _module(spec)
    return {kind: mod.get_function(name) for kind, name in spec.names.items()}


@functools.lru_cache(maxsize=None)
def load_plain(name: str):
    """An extern "C" kernel of qknorm.cu: qknorm_probe, qknorm_empty, qknorm_pingpong."""
    import cupy
    return cupy.RawModule(code=SOURCE, options=options()).get_function(name)


def _check(result, prog=None):
    from cuda.bindings import nvrtc
    err = result[0]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = ""
        if prog is not None:
            _, n = nvrtc.nvrtcGetProgramLogSize(prog)
            buf = b" " * n
            nvrtc.nvrtcGetProgramLog(prog, buf)
            log = buf.decode(errors="replace")
        raise QKNormError(f"NVRTC: {err.name}\n{log}")
    return result[1:]


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def ptxas_resources(log: str) -> dict:
    """{entry name: {registers, stack, spill_stores, spill_loads, smem}} from ptxas -v."""
    out, entry = {}, None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry = out.setdefault(m.group(1), {})
        elif entry is not None and (m := _FRAME.search(line)):
            entry.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                         spill_loads=int(m.group(3)))
        elif entry is not None and (m := _USED.search(line)):
            entry.update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return out


def nvrtc_compile(spec: Spec, arch: str = "sm_90") -> dict:
    """Compile `spec` for `arch` with NVRTC (no GPU needed). Returns sizes, the log and the
    compiler's resource report of each kernel of the spec (registers, spills, smem)."""
    from cuda.bindings import nvrtc
    src = (KERNEL_DIR / "qknorm.cu").read_text()
    prog, = _check(nvrtc.nvrtcCreateProgram(src.encode(), b"qknorm.cu", 0, [], []))
    try:
        for name in spec.names.values():
            _check(nvrtc.nvrtcAddNameExpression(prog, name.encode()))
        opts = [o.encode() for o in options()] + [f"--gpu-architecture={arch}".encode(),
                                                 b"--ptxas-options=-v"]
        _check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts), prog)
        lowered = {}
        for kind, name in spec.names.items():
            mangled, = _check(nvrtc.nvrtcGetLoweredName(prog, name.encode()))
            lowered[kind] = mangled.decode() if isinstance(mangled, bytes) else mangled
        size, = _check(nvrtc.nvrtcGetCUBINSize(prog))
        _, n = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * n
        nvrtc.nvrtcGetProgramLog(prog, log)
        log = log.decode(errors="replace").strip(" \0\n")
        found = ptxas_resources(log)
        return {"cubin_bytes": size, "lowered": lowered, "log": log,
                "resources": {kind: found.get(name) for kind, name in lowered.items()}}
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


MINIMAX_DIMS = (6144, 1024)
OTHER_LOCAL_DIMS = (1024, 128)  # per rank, for every G: covers G that MiniMax's widths miss


def default_dims(world: int) -> tuple:
    """Full (q_dim, k_dim) for tests, checks and scripts at `world` ranks: MiniMax's widths
    where they split into whole 16-byte vectors of bf16 (G = 1, 2, 4, 8), else 6144 / 1536
    (G = 3, 6), else 1024 / 128 per rank (G = 5, 7)."""
    for q, k in (MINIMAX_DIMS, (6144, 1536)):
        if q % world == 0 and k % world == 0 and (q // world) % 8 == 0 and \
                (k // world) % 8 == 0:
            return q, k
    return OTHER_LOCAL_DIMS[0] * world, OTHER_LOCAL_DIMS[1] * world


def shipped_specs() -> list:
    """Every specialization the package ships and the compile test builds: every layout
    for MiniMax's widths and for the other shape."""
    specs = []
    for dtype in C_TYPES:
        for wdt in sorted({dtype, "float32"}):
            for world in range(1, MAX_WORLD + 1):
                q, k = MINIMAX_DIMS
                n = vector_elems(dtype)
                shapes = [OTHER_LOCAL_DIMS]
                if q % world == 0 and k % world == 0 and (q // world) % n == 0 \
                        and (k // world) % n == 0:
                    shapes.insert(0, (q // world, k // world))
                for shape in shapes:
                    for layout in LAYOUTS:
                        specs.append(Spec.plan(dtype, wdt, world, *shape, layout))
    return list(dict.fromkeys(specs))  # layouts coincide for some widths
