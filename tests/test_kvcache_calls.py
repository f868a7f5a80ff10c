"""Calls with a KV cache on the CPU, over tests/fake_cuda.py: the kernels' names, the cache
fields packed into each chunk's Params (v and slot_mapping moved on per chunk, strides,
slots, scales as values or device pointers, the store_k flag), the call cache keyed by the
cache's arguments, what a bad argument raises (one line, nothing launched), FP8 refused
below sm_89, and the error record of a slot outside the cache."""
import contextlib

import numpy as np
import pytest
from mpi4py import MPI

from cupy_qknorm import ClosedError, KVCache, RoPE, SlotError, TransportUnavailableError
from cupy_qknorm.knobs import CACHE_SPLIT_FROM
from cupy_qknorm.params import (CACHE, CACHE_OFFSET, ERROR_SLOT, FIELDS, FLAG_NO_K_STORE,
                                PARAMS)
from cupy_qknorm.tuning import Spec, representative_specs
from tests.fake_cuda import FakeCuda, HostMemory, fake_norm

cupy = pytest.importorskip("cupy")

Q, K, HEAD = 256, 256, 128
ROPE = RoPE(128, 64, max_position=64)
TRANSPORTS = ["ipc", "nccl", "mpi"]
IDS = ["ipc", "nccl", "mpi-gpu"]


@pytest.fixture
def mem():
    return HostMemory(cupy, 1 << 23)


@contextlib.contextmanager
def fake(transport, kv, cuda=None, **kwargs):
    n, cuda = fake_norm(MPI.COMM_SELF, transport, Q, K, "bfloat16", cuda=cuda, rope=ROPE,
                        kv_cache=kv, **kwargs)
    try:
        yield n, cuda
    finally:
        n.close()


def call_arrays(mem, tokens, blocks=4, block=16, cache=np.uint16, hnd=False):
    """q, k, weights, positions, v (a strided view), caches, slot_mapping on the fake."""
    qkv = mem.array((tokens, Q + 2 * K + 64), np.uint16)
    q, k, v = qkv[:, :Q], qkv[:, Q:Q + K], qkv[:, Q + K:Q + 2 * K]
    qw, kw = mem.array((Q,), np.uint16), mem.array((K,), np.uint16)
    pos = mem.array((tokens,), np.int32)
    shape = (blocks, 2, block, HEAD) if hnd else (blocks, block, 2, HEAD)
    kc, vc = mem.array(shape, cache), mem.array(shape, cache)
    if hnd:
        kc, vc = kc.transpose(0, 2, 1, 3), vc.transpose(0, 2, 1, 3)
    slots = mem.array((tokens,), np.int64)
    return dict(q=q, k=k, qw=qw, kw=kw, pos=pos, v=v, kc=kc, vc=vc, slots=slots)


def go(n, a, **kw):
    args = dict(positions=a["pos"], v=a["v"], k_cache=a["kc"], v_cache=a["vc"],
                slot_mapping=a["slots"])
    args.update(kw)
    return n(a["q"], a["k"], a["qw"], a["kw"], **args)


def test_the_cache_fields_end_params():
    """After max_position, to the struct's end: the fields before them keep their offsets
    (specs without a cache build the same code)."""
    names = [f.name for f in FIELDS]
    last = FIELDS[names.index("max_position")]
    assert names.index("v") == len(names) - 15 and CACHE_OFFSET == last.offset + last.size
    assert CACHE.size == 112 and CACHE_OFFSET + CACHE.size == PARAMS.size


@pytest.mark.parametrize("transport", TRANSPORTS, ids=IDS)
@pytest.mark.parametrize("hnd", [False, True], ids=["nhd", "hnd"])
def test_chunks_pack_the_cache_fields(transport, hnd, mem):
    kv = KVCache(16, HEAD, None)
    with fake(transport, kv, max_tokens=16) as (n, cuda):
        a = call_arrays(mem, 40, hnd=hnd)
        go(n, a, k_scale=0.5, store_k=False)
        op = {"ipc": "fused", "nccl": "apply", "mpi": "apply"}[transport]
        launches = [c for c in cuda.launches if c["kind"] == op]
        assert [c["tokens"] for c in launches] == [16, 16, 8]
        assert "qknorm::SameCache<128>>" in launches[0]["name"]
        row = a["v"].strides[0]
        item = 2
        strides = tuple(s // item for s in a["kc"].strides[:3])
        for c, start in zip(launches, (0, 16, 32)):
            assert c["v"] - a["v"].data.ptr == start * row
            assert c["v_stride"] == row // item
            assert (c["k_cache"], c["v_cache"]) == (a["kc"].data.ptr, a["vc"].data.ptr)
            assert (c["cache_block"], c["cache_row"], c["cache_head"]) == strides
            assert c["slot_mapping"] - a["slots"].data.ptr == 8 * start
            assert (c["slot_bytes"], c["num_slots"], c["block_size"]) == (8, 64, 16)
            assert (c["k_rcp"], c["k_scale_at"], c["v_rcp"], c["v_scale_at"]) == \
                (2.0, 0, 1.0, 0)
            assert c["flags"] & FLAG_NO_K_STORE
        assert strides == ((2 * 16 * HEAD, HEAD, 16 * HEAD) if hnd else
                           (16 * 2 * HEAD, 2 * HEAD, HEAD))


@pytest.mark.parametrize("transport", TRANSPORTS, ids=IDS)
def test_device_scales_travel_as_pointers_and_fp8_names_its_kernels(transport, mem):
    kv = KVCache(16, HEAD, "float8_e4m3fn")
    with fake(transport, kv) as (n, cuda):
        a = call_arrays(mem, 5, cache=np.uint8)
        ks, vs = mem.array((), np.float32), mem.array((1,), np.float32)
        go(n, a, k_scale=ks, v_scale=vs)
        c = cuda.launches[-1]
        assert "qknorm::Fp8Cache<128>>" in c["name"]
        assert (c["k_scale_at"], c["v_scale_at"]) == (ks.data.ptr, vs.data.ptr)
        assert not c["flags"] & FLAG_NO_K_STORE and c["slot_bytes"] == 8


def test_a_call_without_a_cache_packs_zeros(mem):
    with fake("ipc", None) as (n, cuda):
        a = call_arrays(mem, 3)
        n(a["q"], a["k"], a["qw"], a["kw"], positions=a["pos"])
        raw = cuda.launches[-1]["raw"]
        assert raw[CACHE_OFFSET:] == bytes(CACHE.size)
        assert "Cache" not in cuda.launches[-1]["name"]


def test_the_call_cache_keys_by_the_cache_arguments(mem):
    kv = KVCache(16, HEAD, "float8_e4m3fn")
    with fake("ipc", kv) as (n, cuda):
        a = call_arrays(mem, 3, cache=np.uint8)
        go(n, a, k_scale=0.5)
        go(n, a, k_scale=0.5)
        assert n._validations == 1
        go(n, a, k_scale=0.25)  # another value: validated and packed anew
        assert n._validations == 2 and cuda.launches[-1]["k_rcp"] == 4.0
        other = mem.array((3,), np.int32)
        go(n, a, k_scale=0.25, slot_mapping=other)
        assert n._validations == 3 and cuda.launches[-1]["slot_bytes"] == 4
        go(n, a, k_scale=0.25, store_k=False)
        assert n._validations == 4 and cuda.launches[-1]["flags"] & FLAG_NO_K_STORE
        n.bind(a["q"], a["k"], a["qw"], a["kw"], positions=a["pos"], v=a["v"],
               k_cache=a["kc"], v_cache=a["vc"], slot_mapping=a["slots"])()
        assert cuda.launches[-1]["v"] == a["v"].data.ptr


def bad_calls(mem):
    a = call_arrays(mem, 4)
    return a, [
        (dict(v=None), TypeError, "pass v="),
        (dict(slot_mapping=None, v_cache=None), TypeError, "pass v_cache=, slot_mapping="),
        (dict(v=a["v"][:, :128]), ValueError, "v: shape must be [T, 256]"),
        (dict(v=a["v"][:3]), ValueError, "v has 3 rows but q has 4"),
        (dict(v=a["k"]), ValueError, "overlaps v"),
        (dict(k_cache=a["kc"][:, :, :1]), ValueError, "k_cache: "),
        (dict(v_cache=a["vc"][:2]), ValueError, "v_cache must have k_cache's blocks"),
        (dict(slot_mapping=a["slots"][:3]), ValueError, "slot_mapping: "),
        (dict(slot_mapping=mem.array((4,), np.float32)), ValueError, "slot_mapping: "),
        (dict(k_cache=cupy.ndarray((1, 16, 2, HEAD), np.uint16, memptr=a["q"].data),
              v_cache=a["vc"][:1]), ValueError, "k_cache overlaps"),
        (dict(store_k=1), TypeError, "store_k must be True or False"),
        (dict(v_cache=a["kc"]), ValueError, "k_cache and v_cache overlap"),
        (dict(slot_mapping=cupy.ndarray((4,), np.int64, memptr=a["kc"].data)), ValueError,
         "k_cache overlaps slot_mapping"),
        (dict(positions=cupy.ndarray((4,), np.int32, memptr=a["vc"].data)), ValueError,
         "v_cache overlaps positions"),
    ]


@pytest.mark.parametrize("case", range(14))
def test_bad_cache_arguments_are_refused_before_launch(case, mem):
    kv = KVCache(16, HEAD, None)
    with fake("ipc", kv) as (n, cuda):
        a, cases = bad_calls(mem)
        kwargs, error, text = cases[case]
        with pytest.raises(error, match=None) as e:
            go(n, a, **kwargs)
        assert text in str(e.value) and "\n" not in str(e.value)
        assert cuda.launches == []
        go(n, a)  # alone (G=1), a refused call leaves the object usable
        assert len(cuda.launches) == 1


def test_cache_arguments_need_an_object_with_a_cache(mem):
    with fake("ipc", None) as (n, cuda):
        a = call_arrays(mem, 4)
        with pytest.raises(TypeError, match="built without kv_cache="):
            go(n, a)
        with pytest.raises(TypeError, match="built without kv_cache="):
            n(a["q"], a["k"], a["qw"], a["kw"], positions=a["pos"], store_k=False)
        assert cuda.launches == []


def test_kv_cache_config_is_checked():
    from cupy_qknorm.norm import check_config
    with pytest.raises(ValueError, match="head_dim=64 but rope.head_dim=128"):
        check_config(256, 256, "bfloat16", 1e-6, 16, 1.0, 1, RoPE(128, 64, max_position=4),
                     kv_cache=KVCache(16, 64))
    with pytest.raises(ValueError, match="head_dim=64 but head_dim=128"):
        check_config(2048, 256, "bfloat16", 1e-6, 16, 1.0, 4, None, kv_heads=2,
                     head_dim=128, kv_cache=KVCache(16, 64))
    with pytest.raises(ValueError):  # k's slice is not whole heads of 96
        check_config(256, 256, "bfloat16", 1e-6, 16, 1.0, 1, None, kv_cache=KVCache(16, 96))
    with pytest.raises(TypeError, match="KVCache"):
        check_config(256, 256, "bfloat16", 1e-6, 16, 1.0, 1, None, kv_cache=(16, 128))


def test_fp8_is_refused_below_sm89():
    with pytest.raises(TransportUnavailableError, match="sm_89"):
        with fake("ipc", KVCache(16, HEAD, "float8_e4m3fn"), cuda=FakeCuda(major=8)):
            pass


@pytest.mark.parametrize("transport", TRANSPORTS, ids=IDS)
def test_a_slot_outside_the_cache_raises_slot_error(transport, mem):
    with fake(transport, KVCache(16, HEAD, None)) as (n, cuda):
        a = call_arrays(mem, 4)
        go(n, a)
        n._transport.error[:6] = [ERROR_SLOT, -1, 3, 0, 64, 64]
        with pytest.raises(SlotError, match="token 3 has slot_mapping 64, outside the KV "
                           "cache's 64 slots") as e:
            n.synchronize()
        assert (e.value.token, e.value.slot) == (3, 64)
        with pytest.raises(ClosedError):
            go(n, a)


def test_specs_name_their_cache():
    s = Spec.plan("bfloat16", "bfloat16", 2, 3072, 512, "narrow", ROPE, cache=(2, 128))
    assert s.names["fused"].endswith("qknorm::NeoX<128, 64>, qknorm::Fp8Cache<128>>")
    assert s.names["apply"].endswith(", qknorm::Fp8Cache<128>>")
    assert s.cache_name == ("qknorm::cache_write<qknorm::bf16_t, 512, 2, "
                            "qknorm::Fp8Cache<128>>") and s.cache_threads == 64
    plain = Spec.plan("bfloat16", "bfloat16", 2, 3072, 512, "narrow", ROPE)
    assert "Cache" not in str(plain.names) and plain.cache_name is None
    assert {x.cache for x in representative_specs()} == {0, 1, 2}
    with pytest.raises(ValueError, match="cache must be"):
        Spec.plan("bfloat16", "bfloat16", 2, 3072, 512, cache=(2, 96))


@pytest.mark.parametrize("store_k", [True, False])
def test_long_ipc_chunks_write_the_cache_in_a_second_launch(store_k, mem, monkeypatch):
    """From CUPY_QKNORM_CACHE_SPLIT_FROM tokens a launch, "ipc" launches, a chunk at a time,
    the fused kernel without the cache, then the cache write with a block a token on the
    same Params (PDL). k's rows go to the k output, or with store_k=False to the
    transport's scratch rows (made at construction), the k output left alone; a shorter
    chunk keeps the write in the fused kernel."""
    monkeypatch.setenv("CUPY_QKNORM_CACHE_SPLIT_FROM", "9")
    kv = KVCache(16, HEAD, "float8_e4m3fn")
    with fake("ipc", kv, max_tokens=16) as (n, cuda):
        t = n._transport
        scratch = t._k_scratch
        assert scratch is not None and scratch.nbytes == 16 * K * 2
        a = call_arrays(mem, 40, blocks=8, cache=np.uint8)
        go(n, a, store_k=store_k)
        assert cuda.kinds() == ["fused", "cache_write"] * 2 + ["fused"]
        fused, writes = cuda.launches[0::2], cuda.launches[1::2]
        assert all("Cache" not in c["name"] for c in fused[:2])
        assert "Fp8Cache<128>" in fused[2]["name"]  # 8 tokens: written by the fused kernel
        for f, w, start in zip(fused, writes, (0, 16)):
            assert w["name"] == ("qknorm::cache_write<qknorm::bf16_t, 256, 1, "
                                 "qknorm::Fp8Cache<128>>")
            assert (w["grid"], w["block"], w["pdl"]) == (16, 32, True)
            assert w["raw"] == f["raw"] and f["tokens"] == 16
            assert f["slot_mapping"] - a["slots"].data.ptr == 8 * start
            assert not f["flags"] & FLAG_NO_K_STORE
            if store_k:
                assert f["k_out"] - a["k"].data.ptr == start * a["k"].strides[0]
                assert f["k_out_stride"] == a["k"].strides[0] // 2
            else:
                assert (f["k_out"], f["k_out_stride"]) == (scratch.ptr, K)
        assert bool(fused[2]["flags"] & FLAG_NO_K_STORE) is not store_k


def test_the_cache_split_is_ipc_only_and_a_knob(mem, monkeypatch):
    kv = KVCache(16, HEAD, None)
    for transport, split in (("nccl", "1"), ("mpi", "1"), ("ipc", "17")):
        monkeypatch.setenv("CUPY_QKNORM_CACHE_SPLIT_FROM", split)
        with fake(transport, kv, max_tokens=16) as (n, cuda):
            go(n, call_arrays(mem, 16))
            assert "cache_write" not in cuda.kinds()
            assert getattr(n._transport, "_k_scratch", None) is None
            assert all("SameCache<128>" in c["name"] for c in cuda.launches
                       if c["kind"] in ("fused", "apply"))
    monkeypatch.delenv("CUPY_QKNORM_CACHE_SPLIT_FROM")
    # the defaults (knobs.CACHE_SPLIT_FROM): one for an FP8 cache, one for the data's dtype
    fp8, data = CACHE_SPLIT_FROM["fp8"], CACHE_SPLIT_FROM["data"]
    with fake("ipc", KVCache(16, HEAD, "float8_e4m3fn"), max_tokens=fp8 + 64) as (n, cuda):
        assert n._transport.split_from == fp8 and n._transport._k_scratch is not None
        go(n, call_arrays(mem, fp8 - 1, blocks=fp8 // 16, cache=np.uint8))
        go(n, call_arrays(mem, fp8, blocks=fp8 // 16, cache=np.uint8))
        assert cuda.kinds() == ["fused", "fused", "cache_write"]
    with fake("ipc", kv, max_tokens=data - 1) as (n, cuda):
        assert n._transport.split_from == data and n._transport._k_scratch is None
    monkeypatch.setenv("CUPY_QKNORM_CACHE_SPLIT_FROM", "1")
    with fake("ipc", None, max_tokens=16) as (n, cuda):  # no cache: nothing to split
        a = call_arrays(mem, 16)
        n(a["q"], a["k"], a["qw"], a["kw"], positions=a["pos"])
        assert cuda.kinds() == ["fused"] and n._transport._k_scratch is None


def test_load_for_loads_what_a_split_launch_takes(monkeypatch):
    """JaxQKNorm loads a call's kernels at trace time (a capture may not load modules):
    where the cache is written apart, the kernels without the cache and the cache write
    too."""
    monkeypatch.setenv("CUPY_QKNORM_CACHE_SPLIT_FROM", "9")
    with fake("ipc", KVCache(16, HEAD, None), max_tokens=16) as (n, cuda):
        t = n._transport
        t.load_for("bfloat16", 8)
        assert [s.cache for s in cuda.loads] == [1] and t._writer is None
        t.load_for("bfloat16", 9)
        assert sorted(t._kernels) == [("bfloat16", "narrow", False), ("bfloat16", "narrow", True)]
        assert t._writer is not None and "cache_write" in [k for k, _ in
                                                           cuda._kernels.values()]
