"""Which kernel specialization runs where: the layouts of the fused kernel, the token
count between them, and the specializations the package ships. Pure: no GPU.

The measured reasons (H200, G=2, bf16, MiniMax widths; BENCHMARKS.md):
- Few 16-byte vectors a thread (more threads a token) for short launches, whose time is
  latency; many for long ones, whose time is bandwidth.
- In registers, a third row in flight costs blocks and was slower from 512 tokens up; in
  shared memory (filled by cp.async) it costs no registers: the wide layout with three
  staged rows is 13-21% faster than rows in registers from 2048 tokens a launch, and
  0.1-0.45 us slower at 512-1024, hence the narrow layout below 2048 tokens (below
  1024 with RoPE, 512 on one GPU: wide_from).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import knobs
from .rope import RoPE, check as check_rope
from .shapes import DTYPES, MAX_WORLD, default_dims, minimax_local, vector_elems

C_TYPES = {"bfloat16": "qknorm::bf16_t", "float16": "qknorm::f16_t", "float32": "float"}
ROTARY_STYLES = {1: "NeoX", 2: "GptJ"}   # Spec.style -> kernels/spec.cuh's Rotary alias
CACHE_KINDS = {1: "SameCache", 2: "Fp8Cache"}  # Spec.cache -> kernels/kvcache.cuh's alias
FP8_MIN_ARCH = 89             # cvt.rn.satfinite.e4m3x2.f32
# name: (16-byte vectors a thread, rows staged in shared memory, tokens in flight)
LAYOUTS = {"narrow": (2, False, 2), "wide": (8, True, 3)}
STAGE_BYTES_MAX = 44 * 1024   # static shared memory a block may use for staged rows
MIN_ARCH = 80                 # cvt.rn.bf16x2.f32, cp.async


def read_knobs() -> dict:
    """The tuning knobs' values now: an object reads them once, at its construction, so
    that every kernel it loads later agrees with the others and with its buffers."""
    return {"CUPY_QKNORM_WIDE_FROM": knobs.get("CUPY_QKNORM_WIDE_FROM"),
            "CUPY_QKNORM_VECTORS_PER_THREAD": knobs.get("CUPY_QKNORM_VECTORS_PER_THREAD"),
            "CUPY_QKNORM_STAGED": knobs.get("CUPY_QKNORM_STAGED"),
            "CUPY_QKNORM_DEPTH": knobs.get("CUPY_QKNORM_DEPTH")}


def wide_from(world: int, rope: bool = False, tuning: dict | None = None) -> int:
    """Tokens a launch from which the fused kernel takes the wide layout: the knob
    CUPY_QKNORM_WIDE_FROM where set, else what H200 measured (BENCHMARKS.md). One GPU has
    no exchange to hide the narrow layout's second token a block behind (its grid holds
    one token a block up to ~260 tokens): wide from 512. With RoPE the narrow kernel holds
    2 blocks an SM instead of 4: wide from 1024. Otherwise from 2048. `tuning`: the knobs
    as read_knobs() read them (default: now)."""
    forced = (tuning or read_knobs())["CUPY_QKNORM_WIDE_FROM"]
    if forced is not None:
        return forced
    return 512 if world == 1 else 1024 if rope else 2048


def layout_for(tokens: int, start: int) -> str:
    """The fused kernel's layout for a launch of `tokens` tokens, wide from `start`."""
    return "wide" if tokens >= start else "narrow"


@dataclass(frozen=True)
class Spec:
    """One specialization of the kernels: everything a template argument depends on."""
    dtype: str
    weight_dtype: str
    world: int
    q_local: int
    k_local: int
    warps: int
    depth: int = 2
    staged: int = 0
    head: int = 0      # RoPE: head_dim (0: no RoPE)
    rot: int = 0       # RoPE: rotary_dim
    style: int = 0     # RoPE: 0 none, 1 NeoX, 2 GPT-J
    cache: int = 0     # KV cache: 0 none, 1 the data type, 2 FP8 E4M3 (CACHE_KINDS)
    cache_head: int = 0  # KV cache: head_dim

    @classmethod
    def plan(cls, dtype: str, weight_dtype: str, world: int, q_local: int, k_local: int,
             layout: str = "narrow", rope: RoPE | None = None, tuning: dict | None = None,
             cache: tuple = (0, 0)):
        """The spec of one layout: warps per token, the fewest that keep about its
        vectors a thread; depth and staging as the layout says (the tuning knobs, as
        read_knobs() read them, included; default: now), rows in registers where staged
        rows would not fit shared memory. `cache`: (kind, head_dim) of the KV cache the
        kernels write (Spec.cache; (0, 0): none)."""
        kind, cache_head = cache
        if kind not in (0, *CACHE_KINDS) or (kind and (cache_head <= 0 or
                                                       k_local % cache_head)):
            raise ValueError(f"cache must be (0, 0) or (1 or 2, a head_dim that divides "
                             f"{k_local}), got {cache!r}")
        if dtype not in C_TYPES:
            raise ValueError(f"dtype must be one of {sorted(C_TYPES)}, got {dtype!r}")
        if weight_dtype not in (dtype, "float32"):
            allowed = repr(dtype) if dtype == "float32" else f"{dtype!r} or 'float32'"
            raise ValueError(f"weight dtype must be {allowed}, got {weight_dtype!r}")
        if not 1 <= world <= MAX_WORLD:
            raise ValueError(f"world size must be 1..{MAX_WORLD}, got {world}")
        n = vector_elems(dtype)
        for name, d in (("q", q_local), ("k", k_local)):
            if d <= 0 or d % n:
                raise ValueError(f"local {name} width {d} must be a positive multiple of {n} "
                                 f"({dtype}: 16-byte vectors)")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        head = rot = style = 0
        if rope is not None:
            check_rope(rope, dtype, world, q_local * world, k_local * world)
            head, rot, style = rope.head_dim, rope.rotary_dim, rope.style_code
        tuning = tuning or read_knobs()
        vectors = (q_local + k_local) // n
        vpt, staged, depth = LAYOUTS[layout]
        vpt = tuning["CUPY_QKNORM_VECTORS_PER_THREAD"] or vpt
        warps = min(32, -(-vectors // (32 * vpt)))
        staged = staged and tuning["CUPY_QKNORM_STAGED"] == 1
        forced = tuning["CUPY_QKNORM_DEPTH"]
        spec = cls(dtype, weight_dtype, world, q_local, k_local, warps, forced or depth,
                   int(staged), head, rot, style, kind, cache_head if kind else 0)
        if spec.stage_bytes > STAGE_BYTES_MAX:  # rows in registers, at the register depth
            spec = cls(dtype, weight_dtype, world, q_local, k_local, warps,
                       forced or LAYOUTS["narrow"][2], 0, head, rot, style, kind,
                       cache_head if kind else 0)
        return spec

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def stage_bytes(self) -> int:
        """Shared memory the fused kernel's staged rows take (0 in registers): `depth`
        rows of whole 16-byte vectors for every thread."""
        if not self.staged:
            return 0
        vectors = (self.q_local + self.k_local) // vector_elems(self.dtype)
        return self.depth * -(-vectors // self.threads) * self.threads * 16

    @property
    def names(self) -> dict:
        """{kind: the template instance NVRTC compiles} of every kernel of this spec in the
        op's module (kernels/qknorm.cu): fused, partial_sums, apply, and reject where there
        are peers to tell. The template arguments are grouped as kernels/spec.cuh says:
        qknorm::fused<qknorm::bf16_t, float, 2, qknorm::Widths<3072, 512>,
        qknorm::Tiling<7, 2, 0>, qknorm::NoRope>."""
        t, w = C_TYPES[self.dtype], C_TYPES[self.weight_dtype]
        widths = f"qknorm::Widths<{self.q_local}, {self.k_local}>"
        tiling = f"qknorm::Tiling<{self.warps}, {self.depth}, {self.staged}>"
        kv = f", {self.kv}" if self.cache else ""
        out = {
            "fused": f"qknorm::fused<{t}, {w}, {self.world}, {widths}, {tiling}, "
                     f"{self.rotary}{kv}>",
            "partial_sums": f"qknorm::partial_sums<{t}, {widths}, {self.warps}>",
            "apply": f"qknorm::apply<{t}, {w}, {widths}, {self.warps}, {self.rotary}{kv}>",
        }
        if self.world > 1:
            out["reject"] = f"qknorm::reject<{self.world}>"
        return out

    @property
    def rotary(self) -> str:
        """The kernels' Rope argument: qknorm::NoRope, qknorm::NeoX<head, rot> or
        qknorm::GptJ<head, rot>."""
        if not self.style:
            return "qknorm::NoRope"
        return f"qknorm::{ROTARY_STYLES[self.style]}<{self.head}, {self.rot}>"

    @property
    def kv(self) -> str:
        """The kernels' Cache argument: qknorm::NoCache, qknorm::SameCache<head_dim> or
        qknorm::Fp8Cache<head_dim>."""
        if not self.cache:
            return "qknorm::NoCache"
        return f"qknorm::{CACHE_KINDS[self.cache]}<{self.cache_head}>"

    @property
    def cache_name(self) -> str | None:
        """The separate KV-cache write kernel of this spec, in the tools module
        (kernels/tools.cu): the benchmark's unfused baseline. None without a cache. A
        thread a 16-byte vector of k's slice (up to 1024)."""
        if not self.cache:
            return None
        return (f"qknorm::cache_write<{C_TYPES[self.dtype]}, {self.k_local}, "
                f"{self.cache_threads // 32}, {self.kv}>")

    @property
    def cache_threads(self) -> int:
        """Threads a block of the separate cache write: one a 16-byte vector of k's slice,
        whole warps, at most 1024."""
        return 32 * min(32, -(-(self.k_local // vector_elems(self.dtype)) // 32))

    @property
    def rope_name(self) -> str | None:
        """The separate RoPE kernel of this spec, in the tools module (kernels/tools.cu):
        the benchmark's unfused baseline. None without RoPE."""
        if not self.style:
            return None
        return (f"qknorm::rope<{C_TYPES[self.dtype]}, qknorm::Widths<{self.q_local}, "
                f"{self.k_local}>, {self.warps}, {self.rotary}>")

    def __str__(self):
        rope = f" rope={self.head}/{self.rot}/{'neox' if self.style == 1 else 'gptj'}" \
            if self.style else ""
        kv = f" cache={'fp8' if self.cache == 2 else 'same'}/{self.cache_head}" \
            if self.cache else ""
        return (f"{self.dtype}/w:{self.weight_dtype} G={self.world} q={self.q_local} "
                f"k={self.k_local} warps={self.warps} depth={self.depth}" +
                (" staged" if self.staged else "") + rope + kv)


SHIPPED_WORLDS = (1, 2, 3, 4, 5, 6, 7, 8, 16)  # G the package ships kernels for


def shipped_specs() -> list:
    """Every specialization the package ships (the compile command and its test build
    each): for G = 1, 2, 4, 8 and 16 with MiniMax's heads (at 16, one replicated KV head a
    rank), every layout, dtype and weight dtype, without and with MiniMax's RoPE; for
    G = 3, 5, 6, 7, the widths shapes.default_dims gives them, bf16, both layouts; GPT-J
    style and full rotation at G=2 in bf16; the KV cache (bf16 and FP8) after MiniMax's
    RoPE in bf16 at G = 1, 2, 4, 8 and 16, and an FP8 cache of fp32 data at G=2. Any other
    specialization compiles at its first use."""
    minimax = RoPE.minimax_m2()
    specs = []
    for world in SHIPPED_WORLDS:
        local = minimax_local(world)
        if local is None:
            q, k = default_dims(world)
            local = (q // world, k // world)
        combos = [(d, w) for d in DTYPES for w in sorted({d, "float32"})] \
            if minimax_local(world) else [("bfloat16", "bfloat16")]
        for dtype, wdt in combos:
            for rope in ((None, minimax) if minimax_local(world) else (None,)):
                for layout in LAYOUTS:
                    specs.append(Spec.plan(dtype, wdt, world, *local, layout, rope))
    for rope in (RoPE(128, 64, style="gptj", max_position=1), RoPE(128, 128, max_position=1)):
        for layout in LAYOUTS:
            specs.append(Spec.plan("bfloat16", "bfloat16", 2, 3072, 512, layout, rope))
    for world in (1, 2, 4, 8, 16):  # the attention prologue: MiniMax's, bf16 and FP8 caches
        for wdt in ("bfloat16", "float32"):
            for cache in ((1, 128), (2, 128)):
                for layout in LAYOUTS:
                    specs.append(Spec.plan("bfloat16", wdt, world, *minimax_local(world),
                                           layout, minimax, cache=cache))
    specs.append(Spec.plan("float32", "float32", 2, 3072, 512, "narrow", cache=(2, 128)))
    return list(dict.fromkeys(specs))  # layouts coincide for some widths


def representative_specs() -> list:
    """Shipped specializations that build every kernel template at least once: every dtype,
    both weight dtypes, both layouts, the norm alone and each RoPE layout (NeoX paired,
    NeoX across lanes at G=8, GPT-J, full rotation), G = 1, 2, 3, 8 and 16, and the KV
    cache (same dtype, FP8 from 16-bit and from fp32 data); what CI compiles
    (tests/test_compile.py asserts these claims). The full matrix is shipped_specs()."""
    minimax = RoPE.minimax_m2()
    plan = Spec.plan
    return [
        plan("bfloat16", "bfloat16", 2, 3072, 512, "narrow"),
        plan("bfloat16", "bfloat16", 2, 3072, 512, "wide", minimax),       # paired, staged
        plan("float16", "float32", 2, 3072, 512, "narrow", minimax),       # paired
        plan("bfloat16", "float32", 1, 6144, 1024, "narrow"),
        plan("float16", "float16", 8, 768, 128, "narrow", minimax),        # across lanes
        plan("float32", "float32", 2, 3072, 512, "wide"),
        plan("bfloat16", "bfloat16", 3, 2048, 512, "narrow"),
        plan("bfloat16", "bfloat16", 2, 3072, 512, "narrow",
             RoPE(128, 64, style="gptj", max_position=1)),
        plan("bfloat16", "bfloat16", 2, 3072, 512, "narrow", RoPE(128, 128, max_position=1)),
        plan("bfloat16", "bfloat16", 16, 384, 128, "narrow", minimax),    # replicated k
        # the KV cache's write in the epilogue: bf16 (paired), FP8 (staged), FP8 from fp32
        plan("bfloat16", "bfloat16", 2, 3072, 512, "narrow", minimax, cache=(1, 128)),
        plan("bfloat16", "float32", 1, 6144, 1024, "wide", minimax, cache=(2, 128)),
        plan("float32", "float32", 2, 3072, 512, "narrow", cache=(2, 128)),
    ]

