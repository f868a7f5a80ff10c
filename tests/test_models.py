"""The model presets (cupy_qknorm.models): their numbers, the G each runs at, the docs'
support matrix, and every preset's parity at G=1 through TPQKNorm.for_model (numpy, "mpi";
G = 2, 3 and 4 run in tests/test_mpi.py under mpiexec)."""
import re

import numpy as np
import pytest
from mpi4py import MPI

from cupy_qknorm import RoPE, TPQKNorm
from cupy_qknorm import reference as ref
from cupy_qknorm.models import MODELS, get
from cupy_qknorm.shapes import MAX_WORLD, minimax_local
from tests.conftest import ROOT


def test_minimax_presets_share_m2_but_m2_7_positions():
    m2 = get("MiniMax-M2")
    assert (m2.q_dim, m2.k_dim, m2.kv_heads, m2.head_dim, m2.eps) == (6144, 1024, 8, 128, 1e-6)
    assert m2.rope == RoPE.minimax_m2()
    for name in ("minimax-m2.1", "minimax-m2.5"):
        assert get(name).rope == m2.rope
    assert get("minimax-m2.7").rope.max_position == 204800
    assert get("minimax-m2.7").rope.rows() == 204800


@pytest.mark.parametrize("world,local", [(1, (6144, 1024)), (2, (3072, 512)),
                                         (4, (1536, 256)), (8, (768, 128)), (16, (384, 128))])
def test_minimax_splits_to_eight_and_replicates_at_sixteen(world, local):
    m = get("minimax-m2")
    assert m.local_dims(world) == local == minimax_local(world)
    assert m.layout(world) == ("replicated" if world == 16 else "split")


def test_every_preset_is_whole_heads_and_cites_its_config():
    for m in MODELS.values():
        assert m.config_url == f"https://huggingface.co/{m.hf_id}/blob/main/config.json"
        assert m.worlds()[:3] == [1, 2, 4] and max(m.worlds()) <= MAX_WORLD
        for g in m.worlds():
            q, k = m.local_dims(g)
            assert q % m.head_dim == 0 and k % m.head_dim == 0
        assert (m.rope is None) == ("YaRN" in m.note)
    source = (ROOT / "cupy_qknorm" / "models.py").read_text()
    for m in MODELS.values():
        assert f"https://huggingface.co/{m.hf_id}/" in source, m.name


def test_unknown_model_and_a_g_that_does_not_fit_are_one_line():
    with pytest.raises(ValueError, match=r"unknown model 'llama'; presets: minimax-m2, "):
        get("llama")
    m = get("olmo-2-32b")
    assert m.worlds() == [1, 2, 4, 8]
    with pytest.raises(ValueError) as e:
        m.local_dims(16)
    assert str(e.value) == ("olmo-2-32b (40 q heads, 8 KV heads of 128) does not run at "
                            "G=16: its heads neither split nor replicate evenly there; "
                            "G = 1, 2, 4, 8 do")


def test_the_support_matrix_in_the_docs_is_the_presets():
    """docs/models.md's table: one row a preset, S / R / - for each G column, as
    Model.layout says; and the G it leaves out are refused by every preset."""
    text = (ROOT / "docs" / "models.md").read_text()
    header = next(ln for ln in text.splitlines() if ln.startswith("| model |"))
    worlds = [int(c) for c in re.findall(r"\| (\d+) (?=\|)", header + " ")]
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[5:-1]]
            for ln in text.splitlines() if ln.startswith("| ") and ln.split("|")[1].strip()
            in MODELS}
    assert set(rows) == set(MODELS)
    mark = {"split": "S", "replicated": "R", "": "-"}
    for name, cells in rows.items():
        assert cells == [mark[MODELS[name].layout(g)] for g in worlds], name
    others = [g for g in range(1, MAX_WORLD + 1) if g not in worlds]
    assert not any(m.layout(g) for m in MODELS.values() for g in others)
    listed = re.search(r"Every G not listed \(([^)]*)\)", text).group(1)
    assert listed == "3, 6, 7, 9, 11-15" and others == [3, 6, 7, 9, 11, 12, 13, 14, 15]


@pytest.mark.parametrize("name", list(MODELS))
def test_preset_parity_at_one_rank(name):
    """for_model on one rank (numpy, "mpi") against the float64 truth, with the model's
    RoPE where it has one: positions up to the table's last row."""
    m, dtype, tokens = get(name), "bfloat16", 6
    q, k, qw, kw, qr, kr = ref.make_case(11, tokens, m.q_dim, m.k_dim, dtype, eps=m.eps)
    kwargs, mags = {}, (None, None)
    if m.rope is not None:
        r = m.rope
        pos = np.random.default_rng(5).integers(0, r.max_position, tokens)
        pos[0] = r.max_position - 1
        qr, kr, *mags = ref.qk_norm_rope(
            ref.to_f64(q, dtype), ref.to_f64(k, dtype), ref.to_f64(qw, dtype),
            ref.to_f64(kw, dtype), m.eps, pos,
            ref.shared_table(r.max_position, r.rotary_dim, r.theta), r.head_dim,
            r.rotary_dim, r.style)
        kwargs["positions"] = pos
    outs = [np.full_like(q, ref.poison(dtype)), np.full_like(k, ref.poison(dtype))]
    with TPQKNorm.for_model(name, MPI.COMM_SELF, max_tokens=4, transport="mpi") as norm:
        assert (norm.config.eps, norm.config.kv_heads) == (m.eps, m.kv_heads)
        norm(q, k, qw, kw, out=outs, **kwargs)
    for o, y, mag in zip(outs, (qr, kr), mags):
        err, bad = ref.compare(o, y, dtype) if mag is None else \
            ref.compare_rope(o, y, mag, dtype)
        assert bad == 0, f"{name}: {bad} past tolerance, max error {err}"


def test_for_model_without_rope_is_the_norm_alone():
    with TPQKNorm.for_model("minimax-m2", MPI.COMM_SELF, transport="mpi", rope=False) as n:
        assert n.config.rope is None and n.config.k_dim == 1024


def test_for_model_writes_the_kv_cache():
    """for_model(kv_cache=...): the preset's norm + RoPE, then k's stored rows and v at
    their slots (numpy, "mpi"), as reference.expected_cache writes them; a slot -1 hole."""
    from cupy_qknorm import KVCache
    m, dtype, tokens = get("minimax-m2"), "bfloat16", 3
    kv = KVCache(4, m.head_dim, "float8_e4m3fn")
    q, k, qw, kw, _, _ = ref.make_case(3, tokens, m.q_dim, m.k_dim, dtype, eps=m.eps)
    v = k[::-1].copy()
    rng = np.random.default_rng(2)
    caches = [rng.integers(0, 256, (2, 4, m.kv_heads, m.head_dim), dtype=np.uint8)
              for _ in range(2)]
    before = [c.copy() for c in caches]
    slots = np.array([5, -1, 2], np.int64)
    outs = [np.empty_like(q), np.empty_like(k)]
    with TPQKNorm.for_model("minimax-m2", MPI.COMM_SELF, max_tokens=4, transport="mpi",
                            kv_cache=kv) as norm:
        norm(q, k, qw, kw, out=outs, positions=np.arange(tokens), v=v, k_cache=caches[0],
             v_cache=caches[1], slot_mapping=slots, k_scale=0.5, v_scale=2.0)
    for got, was, rows, scale in zip(caches, before, (outs[1], v), (0.5, 2.0)):
        want = ref.expected_cache(was, rows, slots, kv, m.kv_heads, dtype, scale)
        assert np.array_equal(got, want)
    assert not np.array_equal(caches[0], before[0])  # something was written
