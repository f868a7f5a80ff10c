"""Whether two source trees build the same machine code: every kernel of every shipped
specialization, compiled by NVRTC and disassembled by nvdisasm, instruction by instruction.

    python scripts/sass_diff.py [--base REV] [--arch sm_90] [--spec dtype=float16,...]
                                [--nvdisasm PATH] [--keep DIR] [-j N]

The trees: this checkout's working tree, and revision REV (default HEAD~) extracted with
git archive. Each tree's own cupy_qknorm says what to build (its Spec names, its modules,
its compile options), so a refactor that renames kernels or their template arguments, or
moves a kernel to another module, is compared by what it ships: the specs of this tree's
tuning.shipped_specs() (or, with --no-shipped, only those given with --spec), each
compiled as the runtime loads it (one program a module a spec), plus the extern "C"
kernels. Before the comparison the disassembly is normalized where it may differ without
any code changing: function names (mangled with their template arguments) and the
numbering of labels. The encodings (-hex) and ptxas's resource report are compared too.
One line per kernel that differs, a count of those that are identical; exit 1 on any
difference, 2 on a build failure.

Needs cuda-bindings with NVRTC (the package's [cuda13] extra) and nvdisasm, which comes
in the nvidia-cuda-nvdisasm wheel (pip install nvidia-cuda-nvdisasm). No GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import glob
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package builds both trees' kernels

# Runs in a tree's own interpreter state: its Spec, its modules, its options. The package
# is entered without its __init__ (which imports the transports), so that a tree whose
# other modules are being edited still says what its kernels are.
DESCRIBE = r"""
import json, sys, types
root = sys.argv[1]
pkg = types.ModuleType("cupy_qknorm")
pkg.__path__ = [root + "/cupy_qknorm"]
sys.modules["cupy_qknorm"] = pkg
from cupy_qknorm import compile as kc, tuning
request = json.load(sys.stdin)
if request["shipped"]:
    request["specs"] = [{f: getattr(s, f) for f in tuning.Spec.__dataclass_fields__}
                        for s in tuning.shipped_specs()] + request["specs"]
out = {"options": list(kc.options(())), "kernel_dir": str(kc.KERNEL_DIR),
       "plain": getattr(kc, "TOOLS_MODULE", "qknorm.cu"), "specs": []}
for fields in request["specs"]:
    spec = tuning.Spec(**{k: v for k, v in fields.items()
                          if k in tuning.Spec.__dataclass_fields__})
    # before the tools module, every kernel of a spec was one module's (its names)
    groups = kc.modules(spec) if hasattr(kc, "modules") else [("qknorm.cu", spec.names)]
    out["specs"].append({"fields": fields, "label": str(spec),
                         "modules": [[m, dict(k)] for m, k in groups]})
print(json.dumps(out))
"""


def nvdisasm_path(given: str | None) -> str | None:
    """nvdisasm: the one given, else on PATH, else in an installed nvidia-cuda-nvdisasm
    wheel (nvidia/cu13/bin, or nvidia/cuda_nvdisasm/bin for CUDA 12)."""
    if given:
        return given if os.access(given, os.X_OK) else None
    found = shutil.which("nvdisasm")
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        return None
    for base in getattr(nvidia, "__path__", []):
        for hit in sorted(glob.glob(os.path.join(base, "*", "bin", "nvdisasm"))):
            if os.access(hit, os.X_OK):
                return hit
    return None


def extract(rev: str, into: Path) -> Path:
    """The files of `rev` that build kernels (kernels/, cupy_qknorm/), under `into`."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev,
                          "kernels", "cupy_qknorm"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        try:
            t.extractall(into, filter="data")
        except TypeError:  # Python before 3.11.4: no filter argument
            t.extractall(into)
    return into


def describe(tree: Path, specs: list, shipped: bool) -> dict:
    r = subprocess.run([sys.executable, "-c", DESCRIBE, str(tree)], cwd=tree,
                       input=json.dumps({"specs": specs, "shipped": shipped}),
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{tree}: cannot read its specs:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


# -- one program: compile, disassemble, normalize (in a worker process) --------------------
_SECTION = re.compile(r"^//-+ \.text\.(\S+)\s+-+$")
_SYMBOL = re.compile(r"_Z[A-Za-z0-9_]+")
_LABEL = re.compile(r"\.L_x_\d+")
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                    r"loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def _nvrtc(entry: Path, options: list, names: list, arch: str):
    """(cubin, {name: lowered}, log) of `names` in the entry file of a tree, with that
    tree's options, through this checkout's one NVRTC build path."""
    from cupy_qknorm import compile as kc
    log, lowered, cubin = kc.nvrtc_build(names, arch, source=entry.read_text(),
                                         module=entry.name, opts=tuple(options))
    return cubin, lowered, log


def _resources(log: str) -> dict:
    out, entry = {}, None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry = out.setdefault(m.group(1), [])
        elif entry is not None and (m := _FRAME.search(line) or _USED.search(line)):
            entry.append(" ".join(g or "0" for g in m.groups()))
    return out


def sections(sass: str) -> dict:
    """{function: its lines} of nvdisasm's output."""
    out, name = {}, None
    for line in sass.splitlines():
        if m := _SECTION.match(line):
            name = m.group(1)
            out[name] = []
        elif line.startswith("//----"):
            name = None
        elif name is not None:
            out[name].append(line)
    return out


def normalize(kernel: str, funcs: dict, resources: list) -> str:
    """The kernel's lines and those of every function it calls (in the order of their
    first call), with function names and labels numbered by first appearance."""
    order, todo, labels, out = [], [kernel], {}, []
    while todo:
        f = todo.pop(0)
        if f in order:
            continue
        order.append(f)
        for line in funcs.get(f, ()):
            todo += [s for s in _SYMBOL.findall(line) if s in funcs and s not in order]
    names = {f: f"<fn{i}>" for i, f in enumerate(order)}
    for f in order:
        out.append(f"== {names[f]}")
        for line in funcs[f]:
            line = _SYMBOL.sub(lambda m: names.setdefault(m.group(), f"<sym{len(names)}>"),
                               line)
            line = _LABEL.sub(lambda m: labels.setdefault(m.group(), f".L{len(labels)}"), line)
            out.append(" ".join(line.split()))
    out.append("== ptxas " + "; ".join(resources))
    return "\n".join(out) + "\n"


def build(job):
    """Compile one program, disassemble it, write each requested kernel's normalized text
    under `where` and return {kind: (digest, file)}, or {"error": log}."""
    entry, options, kinds, exprs, arch, nvdisasm, where = job
    try:
        cubin, lowered, log = _nvrtc(Path(entry), options, exprs, arch)
    except Exception as e:  # noqa: BLE001 - QKNormError with NVRTC's log: reported per kernel
        return {"error": str(e)}
    where = Path(where)
    where.mkdir(parents=True, exist_ok=True)
    (where / "kernels.cubin").write_bytes(cubin)
    sass = subprocess.run([nvdisasm, "-c", "-hex", str(where / "kernels.cubin")],
                          capture_output=True, text=True)
    if sass.returncode:
        return {"error": f"nvdisasm: {sass.stderr.strip()}"}
    (where / "kernels.cubin").unlink()
    funcs, found = sections(sass.stdout), _resources(log)
    out = {}
    for kind, name in kinds.items():
        symbol = lowered.get(name, name)  # extern "C" kernels are their own symbols
        if symbol not in funcs:
            return {"error": f"{kind} ({symbol}) is not in the cubin"}
        text = normalize(symbol, funcs, found.get(symbol, []))
        path = where / f"{kind}.sass"
        path.write_text(text)
        out[kind] = (hashlib.sha256(text.encode()).hexdigest(), str(path))
    return out


# -- the comparison ---------------------------------------------------------------------
def _spec_arg(text: str) -> dict:
    fields = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if not value:
            raise argparse.ArgumentTypeError(f"expected field=value,..., got {text!r}")
        fields[key.strip()] = value.strip() if key.strip() in ("dtype", "weight_dtype") \
            else int(value)
    return fields


def jobs_of(tree: dict, name: str, arch: str, nvdisasm: str, out: Path) -> dict:
    """{(spec index or "plain", module): job} of a described tree."""
    kdir = Path(tree["kernel_dir"])
    jobs = {}
    for i, spec in enumerate(tree["specs"]):
        for module, kinds in spec["modules"]:
            jobs[(i, module)] = (str(kdir / module), tree["options"], kinds,
                                 list(kinds.values()), arch, nvdisasm,
                                 str(out / name / f"{i:03d}-{module}"))
    plain = ("qknorm_probe", "qknorm_empty", "qknorm_pingpong", "qknorm_copy",
             "qknorm_exchange")
    jobs[("plain", tree["plain"])] = (str(kdir / tree["plain"]), tree["options"],
                                      {k: k for k in plain}, [], arch, nvdisasm,
                                      str(out / name / "plain"))
    return jobs


def kernels_of(jobs: dict, results: dict) -> dict:
    """{(spec index or "plain", kind): result} across a tree's modules."""
    out = {}
    for key, job in jobs.items():
        r = results[key]
        for kind in job[2]:
            out[(key[0], kind)] = r.get("error") or r[kind]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD~", help="the revision to compare against "
                    "(default HEAD~)")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--spec", type=_spec_arg, action="append", default=[],
                    help="another spec, as tuning.Spec's fields: dtype=float16,"
                    "weight_dtype=float32,world=4,q_local=1536,k_local=256,warps=4 "
                    "(depth, staged, head, rot, style default as Spec's)")
    ap.add_argument("--no-shipped", action="store_true",
                    help="only the --spec specs, not tuning.shipped_specs()")
    ap.add_argument("--nvdisasm", help="path of nvdisasm (default: on PATH, or from the "
                    "nvidia-cuda-nvdisasm wheel)")
    ap.add_argument("--keep", type=Path, help="keep the normalized disassembly here")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    nvdisasm = nvdisasm_path(args.nvdisasm)
    if nvdisasm is None:
        print("nvdisasm not found: pip install nvidia-cuda-nvdisasm, or pass --nvdisasm PATH",
              file=sys.stderr)
        return 2
    try:
        from cuda.bindings import nvrtc  # noqa: F401
    except ImportError as e:
        print(f"NVRTC: {e} (pip install 'cupy-qknorm[cuda13]')", file=sys.stderr)
        return 2
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.base],
                         capture_output=True, text=True)
    if rev.returncode:
        print(f"--base {args.base}: {rev.stderr.strip()}", file=sys.stderr)
        return 2
    rev = rev.stdout.strip()
    with tempfile.TemporaryDirectory(prefix="sass_diff.") as tmp:
        tmp = Path(tmp)
        out = args.keep or tmp / "sass"
        # the working tree says which specs; the base builds the same fields its own way
        work = describe(ROOT, args.spec, not args.no_shipped)
        fields = [s["fields"] for s in work["specs"]]
        base = describe(extract(rev, tmp / "base"), fields, False)
        jobs = {"work": jobs_of(work, "work", args.arch, nvdisasm, out),
                "base": jobs_of(base, "base", args.arch, nvdisasm, out)}
        flat = [(tree, key) for tree in jobs for key in jobs[tree]]
        print(f"{len(fields)} specs, {len(flat)} programs for {args.arch}: the working "
              f"tree against {rev} ({args.base}), {args.jobs} processes", flush=True)
        with ProcessPoolExecutor(args.jobs,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            done = dict(zip(flat, pool.map(build, [jobs[t][k] for t, k in flat])))
        results = {tree: {k: done[(tree, k)] for k in jobs[tree]} for tree in jobs}
        mine = kernels_of(jobs["work"], results["work"])
        theirs = kernels_of(jobs["base"], results["base"])
        return report(work, mine, theirs, rev)


def report(work: dict, mine: dict, theirs: dict, rev: str) -> int:
    same, differ, failed = 0, [], []
    for key in sorted(set(mine) | set(theirs), key=str):
        index, kind = key
        label = "extern \"C\"" if index == "plain" else work["specs"][index]["label"]
        a, b = mine.get(key), theirs.get(key)
        if a is None or b is None:
            differ.append(f"{label} {kind}: only in {'the base' if a is None else 'the tree'}")
        elif isinstance(a, str) or isinstance(b, str):
            failed.append(f"{label} {kind}: {a if isinstance(a, str) else b}")
        elif a[0] == b[0]:
            same += 1
        else:
            old, new = Path(b[1]).read_text().splitlines(), Path(a[1]).read_text().splitlines()
            diff = list(difflib.unified_diff(old, new, rev, "working tree", n=1, lineterm=""))
            differ.append(f"{label} {kind}: DIFFERENT ({len(diff)} diff lines)\n  " +
                          "\n  ".join(diff[:12]))
    for line in failed + differ:
        print(line)
    print(f"{same} kernels identical, {len(differ)} different, {len(failed)} not built "
          f"(working tree against {rev})")
    return 2 if failed else 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
