"""The documents describe the product as it is: sizes, the knob table, no work-log words;
and CI runs the README's commands, printing the test command's time."""
import os
import re
import subprocess
from pathlib import Path

import pytest

from cupy_qknorm import knobs

ROOT = Path(__file__).resolve().parents[1]


def test_readme_and_benchmarks_fit():
    assert len((ROOT / "README.md").read_text()) <= 8000
    assert len((ROOT / "BENCHMARKS.md").read_text()) <= 15000


def test_knob_table_matches_the_module():
    text = (ROOT / "docs" / "knobs.md").read_text()
    assert knobs.table() in text  # test_knobs: the table names every knob


@pytest.mark.parametrize("doc", ["docs/kvcache.md", "docs/design.md", "BENCHMARKS.md"])
def test_docs_state_the_cache_split_defaults(doc):
    """The prose that states from how many tokens a launch "ipc" writes the KV cache apart
    says knobs.CACHE_SPLIT_FROM's numbers (FP8's, then the data dtype's)."""
    text = " ".join((ROOT / doc).read_text().split())
    fp8, data = knobs.CACHE_SPLIT_FROM["fp8"], knobs.CACHE_SPLIT_FROM["data"]
    assert re.search(rf"\b{fp8}\b[^.;]{{0,40}}FP8[^.;]{{0,20}}\b{data}\b[^.;]{{0,20}}data's",
                     text), f"{doc} does not state the split defaults {fp8} (FP8), {data}"


TRACKED = [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts
           and ".venv" not in p.parts and "__pycache__" not in p.parts
           and p.suffix in (".md", ".py", ".cu", ".cuh", ".sh", ".toml")
           and p.name != "test_docs.py"]
# what a work log says and the tree must not: the unit of work it was done in, a machine
# named by a letter, a ticket number, a path beside the repository
_WORK_UNIT = "s" + "ession"
LOG_WORDS = re.compile(rf"\b({_WORK_UNIT}s?|machine [A-Z]\b|issue \d+|#\d{{2}}\b)|\.\./shared",
                       re.IGNORECASE)


def test_no_work_log_language():
    found = []
    for f in TRACKED:
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if LOG_WORDS.search(line):
                found.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not found, "\n".join(found)


def readme_commands():
    """The README's two commands (install, test), without their comments."""
    text = (ROOT / "README.md").read_text().split("## Install and test", 1)[1]
    lines = [ln.split("#")[0].strip() for ln in text.splitlines() if ln.startswith("    ")]
    return [ln for ln in lines if ln][:2]


def test_ci_runs_the_readme_commands_exactly():
    install, test = readme_commands()
    assert install.startswith("pip install -e ") and test.startswith("python -m pytest ")
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install in ci
    assert f"{test} || rc=$?" in ci  # the exit code is kept, not lost to set -e


@pytest.mark.parametrize("code", [0, 1, 5])
def test_ci_prints_the_test_commands_time_and_keeps_its_exit_code(tmp_path, code):
    """The test part of .ci/run, with `python` a stub that sleeps a second and exits
    `code`: CI's log gets the wall time, and the job pytest's exit code (5: no tests)."""
    script = (ROOT / ".ci" / "run").read_text()
    test_part = script[script.index("# --- test"):]
    stub = tmp_path / "python"
    stub.write_text(f"#!/bin/sh\nsleep 1\nexit {code}\n")
    stub.chmod(0o755)
    r = subprocess.run(["bash", "-c", "set -euo pipefail\n" + test_part], cwd=tmp_path,
                       env=dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == code, r.stdout + r.stderr
    took = re.search(rf"^CI: the test command took (\d+) s \(exit {code}\)$", r.stdout, re.M)
    assert took and 1 <= int(took.group(1)) <= 5, r.stdout
    assert ("collected no tests" in r.stderr) == (code == 5)


def _error_table(text):
    """The rows of the table 'What an error leaves behind' in a document."""
    at = text.index("## What an error leaves behind")
    return [ln for ln in text[at:].split("\n## ")[0].splitlines() if ln.startswith("|")]


def test_readme_and_reliability_state_the_same_error_table():
    readme = _error_table((ROOT / "README.md").read_text())
    assert len(readme) >= 8 and readme == _error_table((ROOT / "RELIABILITY.md").read_text())
