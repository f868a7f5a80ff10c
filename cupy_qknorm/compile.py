"""The one loader: kernels/ sources -> compiled kernels, keyed by everything that matters.

Two modules: the op's (kernels/qknorm.cu: the kernels of Spec.names) and the tools'
(kernels/tools.cu: the P2P probe, the benchmark's floors and its separate RoPE kernel),
built only where used. `load(spec)` returns a spec's CuPy kernels, `load_plain(name)` an
extern "C" kernel of the tools, `load_rope(spec)` a spec's separate RoPE kernel; each is
compiled by NVRTC through cupy.RawModule and cached per (what it holds, build knobs,
device) in memory and by CuPy on disk. `nvrtc_compile(spec, arch)` builds the same
sources with NVRTC through cuda.bindings, which needs no GPU and no driver. The code
strings carry a hash of every file in kernels/: CuPy's disk cache keys on the code string
and would not notice an edited header pulled in with -I.
"""
from __future__ import annotations

import functools
import hashlib
import re

from . import knobs
from .errors import QKNormError
from .params import KERNEL_DIR
from .tuning import Spec


def _sources_hash() -> str:
    h = hashlib.sha256()
    for f in sorted(KERNEL_DIR.glob("*.cu*")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


OP_MODULE = "qknorm.cu"      # the entry file of the op's kernels (Spec.names)
TOOLS_MODULE = "tools.cu"    # the entry file of the others (load_plain, load_rope)
PLAIN_KERNELS = ("qknorm_probe", "qknorm_empty", "qknorm_pingpong", "qknorm_copy",
                 "qknorm_exchange")  # the tools module's extern "C" kernels (load_plain)
SOURCES_HASH = _sources_hash()


def _code(module: str) -> str:
    return f'// cupy_qknorm kernels {SOURCES_HASH}\n#include "{module}"\n'


SOURCE = _code(OP_MODULE)
TOOLS_SOURCE = _code(TOOLS_MODULE)


def options(build=None) -> tuple:
    """NVRTC options of a compile with these build knobs (default: the environment's)."""
    build = dict(knobs.build_values() if build is None else build)
    blocks = build.get("CUPY_QKNORM_CACHE_BLOCKS") or 1
    return ("-std=c++17", f"-I{KERNEL_DIR}") + \
        (("-DQKNORM_TRACE=1",) if build.get("CUPY_QKNORM_TRACE") else ()) + \
        ((f"-DQKNORM_CACHE_BLOCKS={blocks}",) if blocks != 1 else ())


def tracing(build: tuple | None = None) -> bool:
    """Whether kernels built with these build knobs (default: the environment's now)
    record where the fused kernel's time goes."""
    return dict(knobs.build_values() if build is None else build).get("CUPY_QKNORM_TRACE") == 1


def require_cupy(what: str):
    """CuPy, or one clear error saying how to install it."""
    try:
        import cupy
    except ImportError:
        raise QKNormError(
            f"{what} needs CuPy: pip install 'cupy-qknorm[cuda13]' (CUDA 13 driver) or "
            f"'cupy-qknorm[cuda12]' (CUDA 12 driver)") from None
    return cupy


@functools.lru_cache(maxsize=None)
def _module(spec: Spec, build: tuple, device: int):
    cupy = require_cupy("compiling kernels")
    return cupy.RawModule(code=SOURCE, options=options(build),
                          name_expressions=tuple(spec.names.values()))


def load(spec: Spec, build: tuple | None = None) -> dict:
    """{kind: cupy RawKernel} of every kernel of `spec` (Spec.names) on the current device,
    built with these build knobs (knobs.build_values(); default: the environment's now)."""
    cupy = require_cupy("compiling kernels")
    build = knobs.build_values() if build is None else build
    mod = _module(spec, build, cupy.cuda.Device().id)
    return {kind: mod.get_function(name) for kind, name in spec.names.items()}


@functools.lru_cache(maxsize=None)
def _plain_module(build: tuple, device: int):
    return require_cupy("compiling kernels").RawModule(code=TOOLS_SOURCE,
                                                       options=options(build))


def load_plain(name: str):
    """An extern "C" kernel of the tools module (PLAIN_KERNELS) on the current device."""
    cupy = require_cupy("compiling kernels")
    return _plain_module(knobs.build_values(), cupy.cuda.Device().id).get_function(name)


@functools.lru_cache(maxsize=None)
def _rope_module(name: str, build: tuple, device: int):
    cupy = require_cupy("compiling kernels")
    return cupy.RawModule(code=TOOLS_SOURCE, options=options(build), name_expressions=(name,))


def load_rope(spec: Spec, build: tuple | None = None):
    """The separate RoPE kernel of `spec` (Spec.rope_name: RoPE alone, in place, on the rows
    a norm left; same threads a block as the spec's kernels) on the current device."""
    if spec.rope_name is None:
        raise ValueError(f"{spec} has no RoPE: no separate RoPE kernel")
    cupy = require_cupy("compiling kernels")
    build = knobs.build_values() if build is None else build
    mod = _rope_module(spec.rope_name, build, cupy.cuda.Device().id)
    return mod.get_function(spec.rope_name)


def load_cache_write(spec: Spec, build: tuple | None = None):
    """The separate KV-cache write kernel of `spec` (Spec.cache_name: k_out's and v's rows
    to the caches, after the op) on the current device."""
    if spec.cache_name is None:
        raise ValueError(f"{spec} has no KV cache: no cache write kernel")
    cupy = require_cupy("compiling kernels")
    build = knobs.build_values() if build is None else build
    return _rope_module(spec.cache_name, build, cupy.cuda.Device().id).get_function(
        spec.cache_name)


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


def nvrtc_available() -> str | None:
    """None where NVRTC can be reached through cuda.bindings, else why not."""
    try:
        from cuda.bindings import nvrtc
        err, major, minor = nvrtc.nvrtcVersion()
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            return f"nvrtcVersion failed: {err.name}"
    except Exception as e:  # noqa: BLE001 - ImportError, a missing libnvrtc: say which
        return (f"{type(e).__name__}: {e} (pip install 'cupy-qknorm[cuda13]' or "
                f"'[cuda12]', which bring cuda-bindings and NVRTC)")
    return None


def supported_archs() -> list:
    """The sm_XY targets this NVRTC can build for, from MIN_ARCH up."""
    from cuda.bindings import nvrtc
    from .tuning import MIN_ARCH
    err, n = nvrtc.nvrtcGetNumSupportedArchs()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return []
    err, archs = nvrtc.nvrtcGetSupportedArchs()
    return [f"sm_{a}" for a in archs if a >= MIN_ARCH]


def nvrtc_build(names, arch: str = "sm_90", build=None, source: str | None = None,
                module: str = OP_MODULE, opts: tuple | None = None):
    """Compile the name expressions `names` of `source` (default: the entry file `module`
    of kernels/, the op's or TOOLS_MODULE) with NVRTC for `arch` and these build knobs
    (None: the environment's), ptxas reporting; `opts` replaces options(build) (another
    tree's, scripts/sass_diff.py). Returns (log, {name: lowered name}, cubin); raises
    QKNormError with the log."""
    from cuda.bindings import nvrtc
    src = (KERNEL_DIR / module).read_text() if source is None else source
    program = module if source is None else "source.cu"  # may include any entry file
    prog, = _check(nvrtc.nvrtcCreateProgram(src.encode(), program.encode(), 0, [], []))
    try:
        for name in names:
            _check(nvrtc.nvrtcAddNameExpression(prog, name.encode()))
        # CuPy's RawModule adds --device-as-default-execution-space (NVRTC 13.0 refuses the
        # fused kernel's generic lambda without it) and -ftz=true (fp32 subnormals flushed
        # to zero): the same build here
        argv = [o.encode() for o in (options(build) if opts is None else opts)] + [
            f"--gpu-architecture={arch}".encode(), b"--ptxas-options=-v",
            b"--device-as-default-execution-space", b"-ftz=true"]
        _check(nvrtc.nvrtcCompileProgram(prog, len(argv), argv), prog)
        lowered = {}
        for name in names:
            mangled, = _check(nvrtc.nvrtcGetLoweredName(prog, name.encode()))
            lowered[name] = mangled.decode() if isinstance(mangled, bytes) else mangled
        size, = _check(nvrtc.nvrtcGetCUBINSize(prog))
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin))
        _, n = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * n
        nvrtc.nvrtcGetProgramLog(prog, log)
        return log.decode(errors="replace").strip(" \0\n"), lowered, cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def modules(spec: Spec) -> list:
    """[(entry file, {kind: name})]: what builds every kernel of `spec`, the op's module
    and, with RoPE or a KV cache, the tools' for its separate RoPE kernel (kind "rope")
    and cache write (kind "cache_write")."""
    out = [(OP_MODULE, dict(spec.names))]
    tools = {}
    if spec.rope_name is not None:
        tools["rope"] = spec.rope_name
    if spec.cache_name is not None:
        tools["cache_write"] = spec.cache_name
    if tools:
        out.append((TOOLS_MODULE, tools))
    return out


def nvrtc_compile(spec: Spec, arch: str = "sm_90") -> dict:
    """Compile every kernel of `spec` (modules(spec)) for `arch` with NVRTC (no GPU
    needed). Returns sizes, the log and the compiler's resource report of each kernel
    (registers, spills, smem), by kind."""
    size, logs, lowered, resources = 0, [], {}, {}
    for module, kinds in modules(spec):
        log, mangled, cubin = nvrtc_build(list(kinds.values()), arch, module=module)
        found = ptxas_resources(log)
        size += len(cubin)
        logs.append(log)
        for kind, name in kinds.items():
            lowered[kind] = mangled[name]
            resources[kind] = found.get(mangled[name])
    return {"cubin_bytes": size, "lowered": lowered, "log": "\n".join(logs),
            "resources": resources}
