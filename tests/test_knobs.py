"""knobs.py: every CUPY_QKNORM_* variable parsed and validated in one place, the build
knobs in the compiled-kernel cache key, and no other module reading the environment."""
import ast
from pathlib import Path

import pytest

from cupy_qknorm import compile as kc
from cupy_qknorm import knobs

PACKAGE = Path(kc.__file__).resolve().parent
EXPECTED = {  # name: (default, minimum, maximum)
    "CUPY_QKNORM_PDL": (1, 0, 1),
    "CUPY_QKNORM_WIDE_FROM": (None, 1, None),
    "CUPY_QKNORM_STAGED": (1, 0, 1),
    "CUPY_QKNORM_DEPTH": (None, 2, 8),
    "CUPY_QKNORM_VECTORS_PER_THREAD": (None, 1, 32),
    "CUPY_QKNORM_CACHE_BLOCKS": (1, 1, 4),
    "CUPY_QKNORM_CACHE_SPLIT_FROM": (None, 1, None),
    "CUPY_QKNORM_TRACE": (0, 0, 1),
    "CUPY_QKNORM_DEBUG": (0, 0, 1),
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in knobs.KNOBS:
        monkeypatch.delenv(name, raising=False)


def test_every_knob_is_listed_with_its_range():
    assert {n: (k.default, k.minimum, k.maximum) for n, k in knobs.KNOBS.items()} == EXPECTED
    for k in knobs.KNOBS.values():
        assert k.kind in ("production", "tuning", "diagnostic") and k.doc.strip()
    assert set(knobs.BUILD_KNOBS) <= set(knobs.KNOBS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_unset_or_blank_is_the_default(monkeypatch, name):
    assert knobs.get(name) == EXPECTED[name][0]
    for blank in ("", "  "):
        monkeypatch.setenv(name, blank)
        assert knobs.get(name) == EXPECTED[name][0]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_values_in_range_are_read(monkeypatch, name):
    _, low, high = EXPECTED[name]
    for value in {low, high if high is not None else low + 1000}:
        monkeypatch.setenv(name, f" {value} ")
        assert knobs.get(name) == value


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_values_name_the_variable(monkeypatch, name):
    _, low, high = EXPECTED[name]
    span = (f"{low} or {high}" if high == low + 1 else f"in {low}..{high}" if high
            else f"{low} or more")
    bad = [(str(low - 1), f"{name} must be {span}, got {low - 1}")]
    if high is not None:
        bad.append((str(high + 1), f"{name} must be {span}, got {high + 1}"))
    for raw in ("yes", "1.5", "0x2"):
        bad.append((raw, f"{name} must be an integer, got '{raw}'"))
    for raw, message in bad:
        monkeypatch.setenv(name, raw)
        with pytest.raises(ValueError) as e:
            knobs.get(name)
        assert str(e.value) == message
        with pytest.raises(ValueError, match=name):
            knobs.check_all()


def test_table_lists_every_knob():
    table = knobs.table().splitlines()
    assert len(table) == 2 + len(knobs.KNOBS)
    for name, k in knobs.KNOBS.items():
        row = next(r for r in table if f"`{name}`" in r)
        assert k.doc in row and k.kind in row


def test_build_values_follow_the_environment(monkeypatch):
    assert knobs.build_values() == (("CUPY_QKNORM_TRACE", 0), ("CUPY_QKNORM_CACHE_BLOCKS", 1))
    assert not any("CACHE_BLOCKS" in o for o in kc.options())
    monkeypatch.setenv("CUPY_QKNORM_CACHE_BLOCKS", "3")
    assert "-DQKNORM_CACHE_BLOCKS=3" in kc.options()
    monkeypatch.setenv("CUPY_QKNORM_CACHE_BLOCKS", "1")
    monkeypatch.setenv("CUPY_QKNORM_TRACE", "1")
    assert knobs.build_values() == (("CUPY_QKNORM_TRACE", 1), ("CUPY_QKNORM_CACHE_BLOCKS", 1))
    assert "-DQKNORM_TRACE=1" in kc.options() and kc.tracing()
    monkeypatch.setenv("CUPY_QKNORM_TRACE", "0")
    assert not any("TRACE" in o for o in kc.options()) and not kc.tracing()
    assert "-DQKNORM_TRACE=1" in kc.options((("CUPY_QKNORM_TRACE", 1),))


class StubModule:
    """Stands in for cupy.RawModule: records what each build was asked for."""
    built = []

    def __init__(self, code, options, name_expressions=()):
        self.code, self.options, self.names = code, options, name_expressions
        StubModule.built.append(self)

    def get_function(self, name):
        assert name in self.names or not self.names  # extern "C" kernels: no names
        return (self, name)


@pytest.fixture
def stub_cupy(monkeypatch):
    cupy = pytest.importorskip("cupy")

    class Device:
        id = 0

    monkeypatch.setattr(cupy, "RawModule", StubModule)
    monkeypatch.setattr(cupy.cuda, "Device", Device)
    StubModule.built = []
    kc._module.cache_clear()
    kc._plain_module.cache_clear()
    yield StubModule, Device
    kc._module.cache_clear()
    kc._plain_module.cache_clear()


def test_build_knobs_are_in_the_kernel_cache_key(monkeypatch, stub_cupy):
    stub, device = stub_cupy
    spec = kc.Spec.plan("bfloat16", "bfloat16", 2, 3072, 512)
    plain = kc.load(spec)
    monkeypatch.setenv("CUPY_QKNORM_TRACE", "1")
    traced = kc.load(spec)
    assert len(stub.built) == 2, "a changed build knob reused the kernel built without it"
    a, b = stub.built
    assert "-DQKNORM_TRACE=1" in b.options and "-DQKNORM_TRACE=1" not in a.options
    assert a.names == b.names == tuple(spec.names.values())
    assert kc.SOURCES_HASH in a.code and a.code == b.code
    assert plain["fused"][0] is a and traced["fused"][0] is b
    assert set(plain) == set(spec.names)
    kc.load(spec)                                  # the same knob value: the same module
    monkeypatch.delenv("CUPY_QKNORM_TRACE")
    assert kc.load(spec)["fused"][0] is a
    monkeypatch.setenv("CUPY_QKNORM_TRACE", "0")  # "0" is the default's value
    assert kc.load(spec)["fused"][0] is a
    assert len(stub.built) == 2
    device.id = 1                                  # another GPU: its own build
    kc.load(spec)
    assert len(stub.built) == 3
    kc.load_plain("qknorm_empty")
    monkeypatch.setenv("CUPY_QKNORM_TRACE", "1")
    kc.load_plain("qknorm_empty")
    assert len(stub.built) == 5 and "-DQKNORM_TRACE=1" in stub.built[-1].options


def test_a_bad_build_knob_fails_before_building(monkeypatch, stub_cupy):
    stub, _ = stub_cupy
    monkeypatch.setenv("CUPY_QKNORM_TRACE", "2")
    with pytest.raises(ValueError, match="CUPY_QKNORM_TRACE must be 0 or 1, got 2"):
        kc.load(kc.Spec.plan("bfloat16", "bfloat16", 2, 3072, 512))
    assert stub.built == []


def _environment_reads(tree):
    """Lines of `tree` that touch the process environment: os.environ, os.getenv,
    os.putenv, os.unsetenv, or those names imported from os."""
    names = {"environ", "getenv", "putenv", "unsetenv", "environb", "getenvb"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in names:
            found.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and \
                any(a.name in names for a in node.names):
            found.append(node.lineno)
    return found


def test_only_knobs_reads_the_environment():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "knobs.py" in sources and len(sources) > 10
    offenders = []
    for f in sources:
        lines = _environment_reads(ast.parse(f.read_text(), str(f)))
        if f.name == "knobs.py":
            assert lines, "knobs.py no longer reads the environment: update this test"
        else:
            offenders += [f"{f.relative_to(PACKAGE)}:{n}" for n in lines]
    assert not offenders, f"only knobs.py may read the environment: {offenders}"


def test_the_environment_check_catches_each_form():
    for code in ("import os\nos.environ.get('CUPY_QKNORM_X')", "import os\nos.getenv('X')",
                 "from os import environ", "from os import getenv as g"):
        assert _environment_reads(ast.parse(code)), code
    assert not _environment_reads(ast.parse("knobs.get('CUPY_QKNORM_TRACE')"))


def test_every_knobs_get_names_a_knob():
    """A misspelt knobs.get() on a GPU-only path would raise KeyError only there."""
    used = set()
    for f in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "get" and isinstance(node.func.value, ast.Name) and \
                    node.func.value.id == "knobs" and node.args:
                assert isinstance(node.args[0], ast.Constant), f"{f}:{node.lineno}"
                used.add(node.args[0].value)
    assert used and used <= set(knobs.KNOBS), used - set(knobs.KNOBS)
