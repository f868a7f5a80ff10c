"""Compile many kernel names with NVRTC in a few programs, in background processes:
how tests/test_compile.py builds its specializations within the CI's time.

- A kernel is (module, name): the entry file of kernels/ that holds it (the op's or the
  tools') and its name expression, or its name for an extern "C" kernel.
- One program per batch of names of one module: the headers are parsed once a batch, and
  a kernel that several specs share is built once. A batch that fails is compiled again
  name by name, so that each failure is attributed to its kernel.
- Batches run in spawned worker processes at a lower priority, started when the tests
  are collected (conftest.py), so they use the CPU the other tests leave idle; the
  compile tests run last and wait for what is left.
- For a developer's repeated runs, QKNORM_TEST_NVRTC_CACHE=1 (or a directory) remembers
  each kernel compiled cleanly (no error, no warning) on disk under a key of everything
  its result depends on: the kernel sources, the NVRTC library, the options and the
  architecture; a run with none of those changed compiles nothing again. Off by default,
  so that every run (CI's included) compiles every kernel.
Each program is compiled by compile.nvrtc_build, as compile.nvrtc_compile is.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def compile_names(names, arch, build=None, module=None):
    """{name: {"resources", "error"}} and the log of one NVRTC program holding `names` of
    `module` (default: the op's), built with these build knobs (None: the environment's).
    Returns (results, log, seconds)."""
    from cupy_qknorm import compile as kc
    module = module or kc.OP_MODULE
    t0 = time.perf_counter()
    try:
        log, lowered, _ = kc.nvrtc_build(names, arch, build, module=module)
    except kc.QKNormError as e:
        return {n: {"resources": None, "error": str(e)} for n in names}, str(e), \
            time.perf_counter() - t0
    found = kc.ptxas_resources(log)
    out = {name: {"resources": found.get(lowered[name]), "error": None} for name in names}
    return out, log, time.perf_counter() - t0


def _batch(job):
    module, names, target = job
    arch, build = target
    out, log, seconds = compile_names(names, arch, build, module)
    if len(names) > 1 and any(r["error"] for r in out.values()):
        out, logs = {}, []
        for name in names:  # attribute the failure to its kernel(s)
            one, one_log, _ = compile_names([name], arch, build, module)
            out.update(one)
            logs.append(one_log)
        log = "\n".join(logs)
    return target, out, log, seconds


_STAGED = re.compile(r"Tiling<\d+, \d+, 1>")


def weight(name):
    """Relative compile time of a kernel (the fused kernel dominates; staged rows and
    RoPE make it longer): to balance the batches."""
    if name.startswith("qknorm::rope<"):
        return 0.4
    if not name.startswith("qknorm::fused<"):
        return 0.2
    return 1.0 + 0.6 * bool(_STAGED.search(name)) + 0.5 * ("qknorm::NoRope" not in name)


def plan(names, batches):
    """`names` (each once) split into `batches` lists of about equal compile time (the
    longest kernels placed first, each on the lightest list)."""
    out = [[] for _ in range(batches)]
    load = [0.0] * batches
    for name in sorted(dict.fromkeys(names), key=weight, reverse=True):
        i = load.index(min(load))
        out[i].append(name)
        load[i] += weight(name)
    return [b for b in out if b]


# -- the cache of clean compiles ----------------------------------------------------------
def cache_dir():
    """The cache's directory, or None (the default: QKNORM_TEST_NVRTC_CACHE unset or 0)."""
    where = os.environ.get("QKNORM_TEST_NVRTC_CACHE", "").strip()
    if where in ("", "0"):
        return None
    if where and where != "1":
        return Path(where)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                            ".cache")
    return Path(base) / "cupy-qknorm" / "test-nvrtc"


def toolchain() -> str:
    """What identifies the NVRTC in use: its version, its wheel's version, and the
    library file (path, size, modification time)."""
    import importlib.metadata

    from cuda.bindings import nvrtc
    _, major, minor = nvrtc.nvrtcVersion()
    parts = [f"nvrtc {major}.{minor}"]
    for dist in ("nvidia-cuda-nvrtc", "nvidia-cuda-nvrtc-cu12", "cuda-bindings"):
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib
        lib = Path(load_nvidia_dynamic_lib("nvrtc").abs_path)
        st = lib.stat()
        parts.append(f"{lib} {st.st_size} {st.st_mtime_ns}")
    except Exception:  # noqa: BLE001 - no pathfinder: the versions above identify it
        pass
    return "; ".join(parts)


def cache_key(target) -> str:
    """Everything a kernel's compile result depends on, but its name: sources (every
    file of kernels/), NVRTC, options (build knobs included) and architecture."""
    from cupy_qknorm import compile as kc
    arch, build = target
    h = hashlib.sha256()
    for f in sorted(kc.KERNEL_DIR.glob("*")):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(f"{toolchain()}\0{kc.options(build)}\0{arch}".encode())
    return h.hexdigest()[:32]


def _cache_file(target):
    d = cache_dir()
    return None if d is None else d / f"{cache_key(target)}.json"


def cache_read(target) -> dict:
    f = _cache_file(target)
    try:
        return json.loads(f.read_text()) if f is not None else {}
    except (OSError, ValueError):
        return {}


def cache_write(target, results: dict) -> None:
    """Add these {name: resources} (clean compiles only) to the target's file."""
    f = _cache_file(target)
    if f is None or not results:
        return
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        merged = {**cache_read(target), **results}
        tmp = f.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged, sort_keys=True))
        tmp.replace(f)  # atomic: a concurrent run reads the old file or the new one
    except OSError:
        pass  # a read-only home: the next run compiles again


# -- the build --------------------------------------------------------------------------
def _lower_priority():
    os.nice(10)


class Build:
    """The compile of {target: [(module, name)]} (target: (arch, build knobs or None)),
    started at construction in `workers` processes; result() waits for it. Results are
    keyed by name: a name expression or an extern "C" name belongs to one module."""

    def __init__(self, kernels_by_target, workers=2, batches_per_worker=4):
        self.t0 = time.perf_counter()
        self.results = {target: {} for target in kernels_by_target}
        self.logs = []
        self.cached = self.compiled = 0
        jobs = []
        for target, kernels in kernels_by_target.items():
            kernels = list(dict.fromkeys(kernels))
            known = cache_read(target)
            for _, name in kernels:
                if name in known:
                    self.results[target][name] = {"resources": known[name], "error": None}
            todo = [(m, n) for m, n in kernels if n not in known]
            self.cached += len(kernels) - len(todo)
            self.compiled += len(todo)
            total = sum(weight(n) for _, n in todo)
            for module in dict.fromkeys(m for m, _ in todo):
                names = [n for m, n in todo if m == module]
                share = sum(map(weight, names)) / total  # batches in proportion to the work
                n = max(1, min(len(names), round(workers * batches_per_worker * share)))
                jobs += [(module, b, target) for b in plan(names, n)]
        jobs.sort(key=lambda j: -sum(map(weight, j[1])))
        self._pool = None
        self._futures = []
        if jobs:
            self._pool = ProcessPoolExecutor(
                min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                initializer=_lower_priority)
            self._futures = [self._pool.submit(_batch, job) for job in jobs]
            for f in self._futures:
                f.add_done_callback(self._finished)
        self.last = None   # when the last batch finished (time.perf_counter())
        self._done = False

    def _finished(self, _):
        self.last = time.perf_counter()

    def result(self):
        """({target: {name: {"resources", "error"}}}, [logs]) once every batch is done."""
        if not self._done:
            try:
                for f in self._futures:
                    target, out, log, _ = f.result()
                    self.results[target].update(out)
                    self.logs.append(log)
                    if "warning" not in log.lower():
                        cache_write(target, {n: r["resources"] for n, r in out.items()
                                             if r["error"] is None and r["resources"]})
            finally:
                self.close()
            self._done = True
        return self.results, self.logs

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def summary(self) -> str:
        self.result()
        where = cache_dir()
        took = f" in {self.last - self.t0:.1f} s from collection" if self.last else ""
        return (f"NVRTC: {self.compiled} kernels compiled{took}, {self.cached} from the "
                f"cache ({where if where else 'off; QKNORM_TEST_NVRTC_CACHE=1 keeps one'})")
