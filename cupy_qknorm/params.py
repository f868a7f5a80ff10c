"""The host's view of what the kernels share with it: struct qknorm::Params and the error
record (kernels/params.cuh), the exchange slots (exchange.cuh), the unfused path's sums
header (unfused.cuh) and the trace record (trace.cuh).

FIELDS is struct qknorm::Params, field by field; HEAD, STATIC, PARAMS and CACHE (the KV
cache's fields that end STATIC, packed for each launch of a call with a cache) are built
from it. The header pins the same offsets and sizes (a static_assert a field), and
tests/test_compile.py compiles a probe of FIELDS against the header's struct: a field
moved, resized or swapped on either side fails there. Adding a field: one row here (its
offset as the C struct places it; gaps are padded), and in params.cuh its declaration and
its QKNORM_FIELD line, and kParamsBytes where the size changes (pack_static takes the
static fields' values in order).
"""
from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import NamedTuple

from .errors import QKNormError
from .shapes import MAX_WORLD


def _find_kernel_dir() -> Path:
    here = Path(__file__).resolve().parent
    for d in (here / "kernels", here.parent / "kernels"):  # installed wheel, then checkout
        if (d / "qknorm.cu").is_file():
            return d
    raise QKNormError(f"kernel sources not found next to {here}")


KERNEL_DIR = _find_kernel_dir()


class Field(NamedTuple):
    """One field of struct qknorm::Params: its name there, its struct code here (little
    endian, no padding: a pointer or an unsigned 64-bit word "Q", long long "q", int "i",
    float "f", an array "16Q"), and its offset in bytes."""
    name: str
    code: str
    offset: int

    @property
    def size(self) -> int:
        return struct.calcsize("<" + self.code)


FIELDS = (
    # the head: repacked for each launch
    Field("q", "Q", 0),
    Field("k", "Q", 8),
    Field("q_out", "Q", 16),
    Field("k_out", "Q", 24),
    Field("q_weight", "Q", 32),
    Field("k_weight", "Q", 40),
    Field("q_stride", "q", 48),
    Field("k_stride", "q", 56),
    Field("q_out_stride", "q", 64),
    Field("k_out_stride", "q", 72),
    Field("positions", "Q", 80),
    Field("tokens", "i", 88),
    Field("position_bytes", "i", 92),
    Field("first_token", "i", 96),
    Field("call_tokens", "i", 100),
    Field("tag", "i", 104),
    Field("flags", "i", 108),
    # packed once an object (pack_static)
    Field("slots", f"{MAX_WORLD}Q", 112),
    Field("counters", "Q", 240),
    Field("error", "Q", 248),
    Field("error_host", "Q", 256),
    Field("sums", "Q", 264),
    Field("cos_sin", "Q", 272),
    Field("timeout_ns", "q", 280),
    Field("max_tokens", "i", 288),
    Field("rank", "i", 292),
    Field("eps", "f", 296),
    Field("q_dim", "f", 300),
    Field("k_dim", "f", 304),
    Field("max_position", "i", 308),
    # the KV cache: packed for each launch of a call with a cache (CACHE), else zeros
    Field("v", "Q", 312),
    Field("v_stride", "q", 320),
    Field("k_cache", "Q", 328),
    Field("v_cache", "Q", 336),
    Field("cache_block", "q", 344),
    Field("cache_row", "q", 352),
    Field("cache_head", "q", 360),
    Field("slot_mapping", "Q", 368),
    Field("k_scale_at", "Q", 376),
    Field("v_scale_at", "Q", 384),
    Field("num_slots", "q", 392),
    Field("block_size", "i", 400),
    Field("slot_bytes", "i", 404),
    Field("k_rcp", "d", 408),
    Field("v_rcp", "d", 416),
)
CACHE_FIRST = "v"  # the first of the KV cache's fields, which end the struct
PARAMS_ALIGN = 8  # struct Params's alignment (its pointers'): its size rounds up to it


def _layout(fields, start: int, end: int) -> struct.Struct:
    """The struct of `fields` from byte `start` to byte `end`, padded ("x") wherever the
    C struct leaves a gap: the offsets say where ("<" packs no padding of its own)."""
    fmt, at = "<", start
    for f in fields:
        if f.offset < at:
            raise QKNormError(f"params.FIELDS: {f.name} at offset {f.offset}, inside the "
                              f"field before it (which ends at {at})")
        fmt += (f"{f.offset - at}x" if f.offset > at else "") + f.code
        at = f.offset + f.size
    if end > at:
        fmt += f"{end - at}x"
    return struct.Struct(fmt)


def layouts(fields=FIELDS):
    """(HEAD, STATIC, PARAMS) of a table of fields: the head is the fields before slots,
    repacked for each launch; STATIC the rest, packed once; PARAMS both, its size the C
    struct's (its end rounded up to PARAMS_ALIGN)."""
    split = [f.name for f in fields].index("slots")
    last = max(fields, key=lambda f: f.offset)
    size = -(-(last.offset + last.size) // PARAMS_ALIGN) * PARAMS_ALIGN
    head = _layout(fields[:split], 0, fields[split].offset)
    static = _layout(fields[split:], fields[split].offset, size)
    return head, static, struct.Struct(head.format + static.format[1:])


HEAD, STATIC, PARAMS = layouts(FIELDS)
_CACHE_AT = [f.name for f in FIELDS].index(CACHE_FIRST)
# the KV cache's fields, from their offset to the end of the struct (packed per launch)
CACHE = _layout(FIELDS[_CACHE_AT:], FIELDS[_CACHE_AT].offset, PARAMS.size)
CACHE_OFFSET = FIELDS[_CACHE_AT].offset

ERROR_WORDS = 8             # {code, peer, token, rank, theirs, ours, failed, lock}
ERROR_FAILED = 6            # the record's word that ends every wait once the exchange failed
ERROR_TIMEOUT, ERROR_TOKENS, ERROR_SEQUENCE, ERROR_POSITION, ERROR_REJECTED = 1, 2, 3, 4, 5
ERROR_TAG, ERROR_PEER_POSITION, ERROR_SLOT = 6, 7, 8
FLAG_REFUSED = 1            # qknorm::kFlagRefused: take part in the exchange, read no row
FLAG_K_REPLICA = 2          # qknorm::kFlagKReplica: k's slice repeats a lower rank's head
FLAG_NO_K_STORE = 4         # qknorm::kFlagNoKStore: with a KV cache, k's row to the cache only
SLOT_BYTES = 16             # one exchange slot: {sum_q, sum_k, tokens, use and tag}
EMPTY_WORD = 0x80000000     # qknorm::kEmptyWord (the float -0.0): every slot word, empty
SUMS_HEADER = 4 * MAX_WORLD  # qknorm::kSumsHeader: floats before the unfused path's sums
MAX_CALL_TOKENS = (1 << 24) - 1  # T travels as an fp32 in the unfused path's header
TRACE_WORDS = 10            # qknorm::kTraceWords: 64-bit words a traced block records

# The constants above, by their names in the kernels (tests/test_compile.py's probe).
DEVICE_CONSTANTS = {
    "kParamsBytes": PARAMS.size, "kErrorWords": ERROR_WORDS, "kErrorTimeout": ERROR_TIMEOUT,
    "kErrorTokens": ERROR_TOKENS, "kErrorSequence": ERROR_SEQUENCE,
    "kErrorPosition": ERROR_POSITION, "kErrorRejected": ERROR_REJECTED,
    "kErrorTag": ERROR_TAG, "kErrorPeerPosition": ERROR_PEER_POSITION,
    "kErrorSlot": ERROR_SLOT, "kErrorFailed": ERROR_FAILED,
    "kFlagRefused": FLAG_REFUSED, "kFlagKReplica": FLAG_K_REPLICA,
    "kFlagNoKStore": FLAG_NO_K_STORE, "kMaxWorld": MAX_WORLD,
    "kEmptyWord": EMPTY_WORD, "kSumsHeader": SUMS_HEADER, "kTraceWords": TRACE_WORDS,
}


def _header_constant(name: str) -> int:
    path = KERNEL_DIR / "params.cuh"
    m = re.search(rf"{name}\s*=\s*(\d+)", path.read_text())
    if m is None:
        raise QKNormError(f"{name} not found in {path}")
    return int(m.group(1))


# the whole size at import (no compiler needed): a stale install of either side fails here
if PARAMS.size != _header_constant("kParamsBytes"):
    raise QKNormError(f"the host's Params ({PARAMS.size} bytes) does not match struct "
                      f"qknorm::Params in params.cuh ({_header_constant('kParamsBytes')})")


def pack_static(buf, slots, counters, error, error_host, sums, cos_sin, timeout_ns,
                max_tokens, rank, eps, q_dim, k_dim, max_position):
    """Write the fields that stay the same for every launch of an object."""
    slots = tuple(slots) + (0,) * (MAX_WORLD - len(slots))
    STATIC.pack_into(buf, HEAD.size, *slots, counters, error, error_host, sums, cos_sin,
                     timeout_ns, max_tokens, rank, eps, q_dim, k_dim, max_position,
                     *(0,) * len(CACHE.unpack(bytes(CACHE.size))))  # no cache: zeros
