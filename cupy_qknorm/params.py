"""The host's view of what the kernels share with it: struct qknorm::Params, the error
record, the exchange slots and the unfused path's sums header (kernels/qknorm.cuh).

The layout is checked against the header's kParamsBytes at import, so an edit of one
side without the other fails at once rather than launching garbage.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

from .errors import QKNormError
from .shapes import MAX_WORLD


def _find_kernel_dir() -> Path:
    here = Path(__file__).resolve().parent
    for d in (here / "kernels", here.parent / "kernels"):  # installed wheel, then checkout
        if (d / "qknorm.cuh").is_file():
            return d
    raise QKNormError(f"kernel sources not found next to {here}")


KERNEL_DIR = _find_kernel_dir()

# struct qknorm::Params, field by field. The head (pointers, strides, positions, tokens,
# position width) changes per launch and is repacked then; the rest is packed once.
HEAD = struct.Struct("<6Q4qQii")
STATIC = struct.Struct(f"<{MAX_WORLD}Q5Qq2i3fi")
PARAMS = struct.Struct(HEAD.format + STATIC.format[1:])

ERROR_WORDS = 8             # {code, peer, token, rank, theirs, ours, 0, 0}
ERROR_TIMEOUT, ERROR_TOKENS, ERROR_SEQUENCE, ERROR_POSITION, ERROR_REJECTED = 1, 2, 3, 4, 5
SLOT_BYTES = 16             # one exchange slot: {sum_q, sum_k, tokens, use number}
EMPTY_WORD = 0x80000000     # qknorm::kEmptyWord (the float -0.0): every slot word, empty
SUMS_HEADER = 8             # qknorm::kSumsHeader: floats before the unfused path's sums
TRACE_WORDS = 10            # qknorm::kTraceWords: 64-bit words a traced block records


def _header_constant(name: str) -> int:
    text = (KERNEL_DIR / "qknorm.cuh").read_text()
    m = re.search(rf"{name}\s*=\s*(\d+)", text)
    if m is None:
        raise QKNormError(f"{name} not found in {KERNEL_DIR / 'qknorm.cuh'}")
    return int(m.group(1))


if PARAMS.size != _header_constant("kParamsBytes"):
    raise QKNormError(f"the host's Params ({PARAMS.size} bytes) does not match struct "
                      f"qknorm::Params in qknorm.cuh ({_header_constant('kParamsBytes')})")


def pack_static(buf, slots, counters, error, error_host, sums, cos_sin, timeout_ns,
                max_tokens, rank, eps, q_dim, k_dim, max_position):
    """Write the fields that stay the same for every launch of an object."""
    slots = tuple(slots) + (0,) * (MAX_WORLD - len(slots))
    STATIC.pack_into(buf, HEAD.size, *slots, counters, error, error_host, sums, cos_sin,
                     timeout_ns, max_tokens, rank, eps, q_dim, k_dim, max_position)
