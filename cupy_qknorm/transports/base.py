"""The contract between TPQKNorm and a transport: how the per-token partial sums of a call
travel between the ranks. TPQKNorm validates a call, then asks its transport, without
knowing which one it is:

    go = transport.bind(call)   a launch function go(stream) for these validated arrays;
                                 it may be called any number of times (the call cache, bind())
    transport.error[0]          non-zero once an error is pending (host memory, no sync)
    transport.raise_error()     raises the pending error
    transport.refuse(...)       this rank refused its input of a call its peers make: tell
                                 them, so that they raise at once instead of at the timeout
    transport.close()           collective; frees everything; says whether the object's
                                 communicator may still be freed

Errors, the same on every transport (README's table): an error a call raises or leaves
pending closes the object for use on every rank, except a refused input at G=1.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

from ..arrays import Plan
from ..errors import CallMismatchError, PositionError, SlotError

MAX_TAG = 32766  # tags travel as tag + 1 in 15 bits of the exchange (0: no tag)


class CacheCall(NamedTuple):
    """A validated call's KV cache: what its launches' cache fields hold (params.CACHE;
    v and slot_mapping are the call's first row's, a chunk moves them on), and the arrays
    themselves for the host path."""
    v: int                # address of v's first row
    v_stride: int         # elements between rows of v
    k_cache: int
    v_cache: int
    strides: tuple        # (block, row, head) strides of both caches, in their elements
    slot_mapping: int
    k_scale_at: int       # device scalars (0: the value)
    v_scale_at: int
    num_slots: int
    block_size: int
    slot_bytes: int       # 4 or 8
    k_scale: float
    v_scale: float
    store_k: bool
    arrays: tuple         # (v, k_cache, v_cache, slot_mapping, k_scale, v_scale) as passed
    heads: int
    head_dim: int
    cache_dtype: str

    def fields(self, start: int, itemsize: int) -> tuple:
        """params.CACHE's values for a launch from the call's token `start` (the scales
        as their reciprocals rounded to fp64: Python's division is IEEE's, the value the
        kernel's __drcp_rn gives a device scale)."""
        return (self.v + start * self.v_stride * itemsize, self.v_stride, self.k_cache,
                self.v_cache, *self.strides, self.slot_mapping + start * self.slot_bytes,
                self.k_scale_at, self.v_scale_at, self.num_slots, self.block_size,
                self.slot_bytes, 1.0 / self.k_scale, 1.0 / self.v_scale)


class Call(NamedTuple):
    """A validated call: its operands (arrays.Operand of q, k, q_weight, k_weight, q_out,
    k_out, then positions or None), what a launch needs besides the pointers, the
    pointers, its tag code (0: no tag; else tag + 1), and its KV cache (or None)."""
    ops: tuple
    plan: Plan
    ptrs: tuple
    tag: int
    cache: CacheCall | None = None

    @property
    def tokens(self) -> int:
        return self.plan.tokens

    @property
    def on_host(self) -> bool:
        return self.ops[0].device is None


def tag_code(tag) -> int:
    """The code a tag travels as (0: no tag). Raises ValueError for a tag that is not an
    int (numpy's included, bool not) in 0..MAX_TAG."""
    if tag is None:
        return 0
    if isinstance(tag, bool) or not isinstance(tag, numbers.Integral) or \
            not 0 <= tag <= MAX_TAG:
        raise ValueError(f"tag must be an int in 0..{MAX_TAG} (e.g. the layer index) or None, "
                         f"got {tag!r}")
    return int(tag) + 1


def describe_tag(code: int) -> str:
    return f"tag={code - 1}" if code else "no tag"


CLOSED = "the object is closed for use"


def position_error(rank: int, token: int, position: int, rows: int) -> PositionError:
    """This rank's token `token` has a position outside the RoPE table."""
    return PositionError(
        f"rank {rank}: token {token} has position {position}, outside the RoPE table's "
        f"{rows} rows; its row was not written, the rows of valid positions were; {CLOSED}",
        token=token, position=position)


def slot_error(rank: int, token: int, slot: int, slots: int, written: bool) -> SlotError:
    """This rank's token `token` has a KV-cache slot outside its cache."""
    what = ("its cache rows were not written, its outputs and every other row were"
            if written else "nothing of the call was written")
    return SlotError(
        f"rank {rank}: token {token} has slot_mapping {slot}, outside the KV cache's "
        f"{slots} slots (-1: no write); {what}; {CLOSED}", token=token, slot=slot)


def peer_position_error(rank: int, peer: int, token: int) -> CallMismatchError:
    """A peer's token `token` has a position outside its RoPE table."""
    return CallMismatchError(
        f"rank {peer}: token {token} has a position outside the RoPE table (rank {peer} "
        f"raises PositionError); rank {rank} wrote its rows of valid positions; {CLOSED}",
        peer=peer, token=token)


class Transport:
    """The interface TPQKNorm calls (module docstring). `capturable`: whether its calls may
    be captured in a CUDA graph; `host_arrays`: whether it takes numpy arrays."""
    name = "?"
    capturable = True
    host_arrays = False
    error = (0,)

    def bind(self, call: Call):
        raise NotImplementedError

    def refuse(self, tokens: int, tag: int, why: str, stream) -> str | None:
        """This rank refused its input (`why`: the error it raises) of a call with about
        `tokens` rows. Returns None, or a line saying why the peers could not be told."""
        self.refused = True
        return None

    def raise_error(self) -> None:
        pass

    def fit(self) -> bool:
        """Whether the object's communicator may still be freed collectively: no request of
        its left pending, no peer known to be gone, no call failed (on every rank alike:
        a rank that refused its input counts as failed, as its peers do)."""
        return not self.error[0] and not self.refused

    refused = False

    def close(self) -> bool:
        return self.fit()
