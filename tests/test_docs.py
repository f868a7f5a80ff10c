"""The documents describe the product as it is: sizes, the knob table, no work-log words."""
import re
from pathlib import Path

from cupy_qknorm import knobs

ROOT = Path(__file__).resolve().parents[1]


def test_readme_and_benchmarks_fit():
    assert len((ROOT / "README.md").read_text()) <= 8000
    assert len((ROOT / "BENCHMARKS.md").read_text()) <= 15000


def test_knob_table_matches_the_module():
    text = (ROOT / "docs" / "knobs.md").read_text()
    assert knobs.table() in text
    for name in knobs.KNOBS:
        assert f"`{name}`" in text


def test_only_knobs_reads_the_environment():
    for f in sorted((ROOT / "cupy_qknorm").rglob("*.py")):
        if f.name == "knobs.py":
            continue
        assert "os.environ" not in f.read_text(), f"{f} reads the environment"


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
