"""Every CUPY_QKNORM_* environment variable: its type, default and meaning, in one place.

This module is the only reader of the environment in the package. A TPQKNorm reads the
knobs once, at its construction (its transport keeps the values), so every kernel it
loads later agrees with its other kernels and its buffers; a change inside a process
reaches the next object. The values that shape a kernel are part of the compiled-kernel
cache key (compile.py), so a changed knob never reuses a stale kernel. A bad value raises
ValueError naming the variable.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Knob:
    name: str
    default: int | None   # None: the layout's own value (tuning.py)
    minimum: int
    maximum: int | None
    kind: str             # "production", "tuning" or "diagnostic"
    doc: str


# CUPY_QKNORM_CACHE_SPLIT_FROM's defaults, by the KV cache's dtype: where the second
# launch was faster on H200 at G=1 (BENCHMARKS.md). FP8: from 2048 (the fused kernel's
# conversion costs it registers, and blocks an SM; at 1536 the epilogue was still 1.05x
# faster, at 2048 within 1.5%, at 3072 the split 1.07x faster); the data's dtype: from
# 4096 (there within 2% either way, the split 1.03-1.05x faster at 16384).
CACHE_SPLIT_FROM = {"fp8": 2048, "data": 4096}

KNOBS = {k.name: k for k in (
    Knob("CUPY_QKNORM_PDL", 1, 0, 1, "production",
         "0 launches the fused kernel without programmatic dependent launch (sm_90+), "
         "so it starts only once the previous kernel of the stream has finished"),
    Knob("CUPY_QKNORM_WIDE_FROM", None, 1, None, "tuning",
         "tokens a launch from which the fused kernel takes the wide layout (default 512 "
         "on one GPU; else 1024 with RoPE, 2048 without)"),
    Knob("CUPY_QKNORM_STAGED", 1, 0, 1, "tuning",
         "0 keeps the wide layout's rows in registers instead of shared memory"),
    Knob("CUPY_QKNORM_DEPTH", None, 2, 8, "tuning",
         "tokens a block of the fused kernel keeps in flight (default 2 narrow, 3 wide)"),
    Knob("CUPY_QKNORM_VECTORS_PER_THREAD", None, 1, 32, "tuning",
         "16-byte vectors a thread holds per token, both layouts (default 2 narrow, 8 wide)"),
    Knob("CUPY_QKNORM_CACHE_BLOCKS", 1, 1, 4, "tuning",
         "blocks an SM the fused kernel's wide layout is built for where it writes a KV "
         "cache (below CUPY_QKNORM_CACHE_SPLIT_FROM; 1: its registers uncapped; 3 caps "
         "them at 168 on 4 warps: 8 bytes spilled at G=1)"),
    Knob("CUPY_QKNORM_CACHE_SPLIT_FROM", None, 1, None, "tuning",
         "tokens a launch from which \"ipc\" writes the KV cache in a second launch (a "
         "block a token) after the fused kernel without the cache, instead of in the fused "
         f"kernel's epilogue (default {CACHE_SPLIT_FROM['fp8']} for an FP8 cache, "
         f"{CACHE_SPLIT_FROM['data']} for the data's dtype; more than max_tokens: never)"),
    Knob("CUPY_QKNORM_TRACE", 0, 0, 1, "diagnostic",
         "1 builds the fused kernel with per-block cycle counts (scripts/trace_fused.py)"),
    Knob("CUPY_QKNORM_DEBUG", 0, 0, 1, "diagnostic",
         "1 prints the traceback of a failure on the rank where it happened, before every "
         "rank raises the collective error"),
)}

# The knobs a kernel build depends on (the rest pick among builds or act on the host).
BUILD_KNOBS = ("CUPY_QKNORM_TRACE", "CUPY_QKNORM_CACHE_BLOCKS")


def get(name: str) -> int | None:
    """The knob's value from the environment, or its default where unset or empty."""
    knob = KNOBS[name]
    raw = os.environ.get(name, "").strip()
    if not raw:
        return knob.default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < knob.minimum or (knob.maximum is not None and value > knob.maximum):
        span = (f"{knob.minimum} or {knob.maximum}" if knob.maximum == knob.minimum + 1
                else f"in {knob.minimum}..{knob.maximum}" if knob.maximum is not None
                else f"{knob.minimum} or more")
        raise ValueError(f"{name} must be {span}, got {value}")
    return value


def build_values() -> tuple:
    """(name, value) of every knob a kernel build depends on: part of the cache key."""
    return tuple((name, get(name)) for name in BUILD_KNOBS)


def default_for_library(name: str, value: str) -> None:
    """Set another library's environment variable (read when that library starts) where
    the user has not set it: bench --jax turns XLA's preallocation off this way."""
    os.environ.setdefault(name, value)


def check_all() -> None:
    """Read every knob once: raises ValueError for the first bad one."""
    for name in KNOBS:
        get(name)


def table() -> str:
    """The knobs as a markdown table (README's table is checked against it)."""
    lines = ["| variable | default | kind | meaning |", "| --- | --- | --- | --- |"]
    for k in KNOBS.values():
        default = "see meaning" if k.default is None else str(k.default)
        lines.append(f"| `{k.name}` | {default} | {k.kind} | {k.doc} |")
    return "\n".join(lines)
