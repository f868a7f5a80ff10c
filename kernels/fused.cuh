// The fused kernel: per token, local sums -> push to every rank's slot -> wait for all
// World partials -> sum them in rank order (identical on every rank) -> scale, rotate and
// store. And reject, which a rank launches in its place when its host refused the input.
#pragma once

#include "exchange.cuh"
#include "kvcache.cuh"
#include "layout.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "rope.cuh"
#include "row.cuh"
#include "spec.cuh"
#include "trace.cuh"

namespace qknorm {

template <int Value> struct Constant { static constexpr int value = Value; };

// f(Constant<I>{}) for I = From, From + 1, ... < To while it returns true; true if all did.
template <int From, int To, class Fn>
__device__ __forceinline__ bool each_phase(Fn& f) {
  if constexpr (From < To) {
    if (!f(Constant<From>{})) return false;
    return each_phase<From + 1, To>(f);
  }
  return true;
}

// A persistent grid walks the tokens; every rank launches the same grid for the same call.
// Each block keeps Tile::kDepth tokens in flight: while it waits for the partials of token
// t it has already pushed token t + 1, and it has issued the loads of tokens up to
// t + depth - 1, so the peers' latency and the memory latency of the next rows overlap.
// Depth 2: the next row's load is issued only once the current row is done; depth 3: two
// rows' loads are in flight while the third waits for its partials. Tile::kStaged = 0
// holds the rows in registers (depth 3 then costs blocks: slower on H100 and H200,
// BENCHMARKS.md); 1 holds them in shared memory, filled by asynchronous copies.
// A block pushes one token ahead of the one it waits for: two ahead was 5-7% slower at
// 4096-8192 tokens on H200.
// Elem: the data type (bf16_t, f16_t, float); Weight: the weights' (Elem or float); World:
// the ranks (G); Slice: a Widths; Tile: a Tiling; Rope: a Rotary (NoRope, NeoX, GptJ);
// Cache: a KVCache (kvcache.cuh): with one, finish() also writes k's row and v's row to the
// token's slot of the caches, from the same threads' stores.
template <class Elem, class Weight, int World, class Slice, class Tile, class Rope,
          class Cache = NoCache>
struct Fused {
  static constexpr int kWarps = Tile::kWarps;
  static constexpr int kDepth = Tile::kDepth;
  static_assert(kDepth >= 2, "at least two tokens in flight");
  static constexpr int kThreads = Tile::kThreads;
  using RowLayout = typename LayoutFor<Elem, Slice, kThreads, Rope>::type;
  using TokenRow =
      typename Pick<Tile::kStaged != 0, StagedRow<RowLayout>, Row<RowLayout>>::type;
  using TokenAngles = Angles<RowLayout, Rope>;
  using Slot = TokenCache<Elem, Cache>;
  using Values = ValueRow<Elem, Cache, Slice::kK, kThreads>;
  using Scales = CacheScales<Cache>;
  static constexpr int kStageVectors = Tile::kStaged ? RowLayout::kSlots * kThreads : 0;

  // One set per row: a set is rewritten only by the next push() and finish() of the same
  // row, kDepth tokens later, after the barrier of another row's finish() that every thread
  // reaches after its last read of the set.
  struct Shared {
    float2 scratch[kDepth][kWarps];
    float2 scale[kDepth];
    int ok[kDepth];
    // the token's row in the caches, or -1 (nothing without a cache)
    typename Pick<Cache::kOn, long long[kDepth], Constant<0>>::type at;
  };

  // A token between load() and finish(): the slot's use and the sums as warp 0 knows
  // them, the position as every thread does.
  struct Pending {
    unsigned int uses;  // use number of the token's slot: which half of the buffer it takes
    float2 part;        // this rank's sums of squares
    typename TokenAngles::Token pos;
    // KV cache: the token's slot and scales, and its v row, loaded with the row (a load
    // issued at finish() was a memory latency on every token's path)
    typename Pick<Cache::kOn, Slot, Constant<0>>::type cache;
    typename Pick<Cache::kOn, Values, Constant<0>>::type values;
  };

  static __device__ __forceinline__ uint4* slot(const Params& p, unsigned int uses,
                                                long long t, int from) {
    uint4* mine = nullptr;
#pragma unroll
    for (int r = 0; r < World; ++r) if (p.rank == r) mine = p.slots[r];
    return mine + ((long long)(uses & 1u) * p.max_tokens + t) * World + from;
  }

  // Issues the loads of token t's row, its position and its slot's use count; nothing
  // waits for them.
  static __device__ __forceinline__ void load(const Params& p, TokenRow& row, long long t,
                                              Pending& pending) {
    if (World > 1 && threadIdx.x == 0) pending.uses = p.counters[t];
    if constexpr (TokenAngles::kOn) pending.pos.words = load_position(p, t);
    if constexpr (Cache::kOn) {
      pending.cache.load(p, t);
      pending.values.load(p, t);
    }
    row.load(p, t);
  }

  // Sums token t's row (waiting for its loads, while the InFlight rows loaded after it may
  // still be in flight) and pushes the partials to every rank.
  template <int InFlight>
  static __device__ __forceinline__ void push(const Params& p, const TokenRow& row,
                                              long long t, Pending& pending, float2* scratch,
                                              Trace& tr) {
    tr.begin();
    row.template ready<InFlight>();
    float2 part = block_sum<kWarps>(row.sums(), scratch);
    // a replica of a lower rank's k head adds 0 (a select, not a product: none of its
    // values, NaN or Inf included, reaches the sum; the first replica's carry the head)
    if (World > 1 && (p.flags & kFlagKReplica) != 0) part.y = 0.f;
    tr.summed();
    pending.part = part;
    // the position was loaded with the row, so here by now: its validity travels with the
    // partials; the angles are read a phase later, in finish()
    if constexpr (TokenAngles::kOn) pending.pos.row = angle_row(p, pending.pos.words);
    if (World > 1 && threadIdx.x < 32) {
      const int lane = threadIdx.x;
      const unsigned int uses = __shfl_sync(0xffffffffu, pending.uses, 0);
      pending.uses = uses;
      if (lane < World) {
        uint4* peer = nullptr;
#pragma unroll
        for (int r = 0; r < World; ++r) if (lane == r) peer = p.slots[r];
        const long long base = ((long long)(uses & 1u) * p.max_tokens + t) * World;
        unsigned int call = (unsigned int)p.call_tokens;
        if constexpr (TokenAngles::kOn) {
          if (pending.pos.row < 0) call |= kBadPosition;
        }
        store_volatile(peer + base + p.rank, make_slot(part.x, part.y, call, uses, p.tag));
      }
    }
    if constexpr (TokenAngles::kOn) TokenAngles::prefetch(p, pending.pos.row);
  }

  // Whether a peer's slot belongs to this call: the same T, use number and tag (else the
  // error is recorded and the token is not stored). A peer's position out of range is
  // recorded too, but its sums are whole and the row is stored.
  static __device__ __forceinline__ bool check_slot(const Params& p, const uint4 got,
                                                    int lane, int token, unsigned int uses) {
    const unsigned int call = got.z & kCallTokens, use = got.w & kUseNumber;
    const int tag = (int)(got.w >> kTagShift);
    if (got.z == kRejectTokens) {
      record_error(p, kErrorRejected, lane, token, 0, p.call_tokens);
    } else if (call != (unsigned int)p.call_tokens) {
      record_error(p, kErrorTokens, lane, token, (int)call, p.call_tokens);
    } else if (use != (uses & kUseNumber)) {
      record_error(p, kErrorSequence, lane, token, (int)use, (int)(uses & kUseNumber));
    } else if (tag != p.tag) {
      record_error(p, kErrorTag, lane, token, tag, p.tag);
    } else {
      if ((got.z & kBadPosition) && lane != p.rank)
        record_error(p, kErrorPeerPosition, lane, token, 0, 0);
      return true;
    }
    return false;
  }

  // Waits for token t's partials from every rank, then scales, rotates and stores the row.
  // A row whose position is out of range still takes its part in the exchange, so the
  // peers' calls and the slots stay in step; only its store is left out.
  template <class TokenWeights>
  static __device__ __forceinline__ void finish(const Params& p, const TokenRow& row,
                                                long long t, const Pending& pending,
                                                const TokenWeights& wt, const Scales& scales,
                                                Shared& sh, int set, Trace& tr) {
    TokenAngles angles;  // loaded while warp 0 waits for the partials
    if constexpr (TokenAngles::kOn) angles.load(p, pending.pos.row);
    if (threadIdx.x < 32) {
      tr.begin();
      const unsigned int uses = pending.uses;
      const int lane = threadIdx.x;
      float sq, sk;
      bool ok = true;
      if constexpr (World > 1) {
        const uint4 empty = make_uint4(kEmptyWord, kEmptyWord, kEmptyWord, kEmptyWord);
        uint4 got = empty;
        if (lane < World) {
          uint4* const from = slot(p, uses, t, lane);
          const int token = p.first_token + (int)t;  // the call's, for the record
          ok = wait_slot(from, p, lane, token, got);
          if (ok) ok = check_slot(p, got, lane, token, uses);
          store_volatile(from, empty);
        }
        ok = __all_sync(0xffffffffu, ok);
        tr.waited();
        sq = 0.f;
        sk = 0.f;
#pragma unroll
        for (int r = 0; r < World; ++r) {
          sq += __uint_as_float(__shfl_sync(0xffffffffu, got.x, r));
          sk += __uint_as_float(__shfl_sync(0xffffffffu, got.y, r));
        }
      } else {
        sq = pending.part.x;
        sk = pending.part.y;
      }
      if (lane == 0) {
        sh.scale[set] = inv_rms(p, sq, sk);
        sh.ok[set] = ok;
        if constexpr (Cache::kOn) sh.at[set] = pending.cache.row(p);
        if (World > 1) p.counters[t] = uses + 1;
      }
    }
    __syncthreads();
    if constexpr (TokenAngles::kOn) {
      if (pending.pos.row < 0) {  // the same for every thread: all read one position
        if (threadIdx.x == 0) record_position_error(p, t);
        return;
      }
    }
    if constexpr (Cache::kOn) {
      if (!sh.ok[set]) return;
      Slot cache = pending.cache;
      cache.scales = scales;
      const long long at = sh.at[set];  // -1: no cache row (padding, or a bad slot)
      row.scale_store(p, t, sh.scale[set], wt, angles, cache, at);
      if (at >= 0) pending.values.store(p, at, cache);
      else if (threadIdx.x == 0 && cache.bad(p)) record_slot_error(p, cache.slot, t);
    } else {
      if (sh.ok[set]) row.scale_store(p, t, sh.scale[set], wt, angles);
    }
  }
};

// The wide layout's blocks an SM where it writes a KV cache (build knob
// CUPY_QKNORM_CACHE_BLOCKS): 1 leaves its registers to ptxas.
#ifndef QKNORM_CACHE_BLOCKS
#define QKNORM_CACHE_BLOCKS 1
#endif

// The blocks an SM the wide layout (staged rows) is built for without a cache: its
// registers capped at 128 (168 with RoPE). Uncapped, ptxas keeps every slot's addresses
// live across the token loop (150 and 185 registers at G=1) and the SM holds a block less.
template <class Tile, class Rope>
constexpr int staged_blocks() {
  return 65536 / (Tile::kThreads * (Rope::kStyle == kRopeNone ? 128 : 168));
}

template <class Elem, class Weight, int World, class Slice, class Tile, class Rope,
          class Cache = NoCache>
__global__ void __launch_bounds__(Tile::kThreads,
                                  !Tile::kStaged ? 1
                                  : Cache::kOn   ? QKNORM_CACHE_BLOCKS
                                                 : staged_blocks<Tile, Rope>())
    fused(const Params p) {
  using Impl = Fused<Elem, Weight, World, Slice, Tile, Rope, Cache>;
  constexpr int kDepth = Tile::kDepth;
  __shared__ typename Impl::Shared sh;
  // staged: the rows
  __shared__ uint4 stages[Tile::kStaged ? kDepth * Impl::kStageVectors : 1];
  __shared__ Trace::Data trace_data;
  Trace tr;
  tr.start(&trace_data);
  const long long step = gridDim.x;
  long long t = blockIdx.x;
  using TokenAngles = typename Impl::TokenAngles;
  PositionWords early{-1, 0};  // RoPE: the first token's position, as read before the wait
  if constexpr (TokenAngles::kOn) {
    if (t < p.tokens) early = TokenAngles::early_position(p, t);
  }
  grid_dependency_wait();  // the previous kernel of the stream is complete from here on
  allow_dependents();      // the next launch may start its own wait now
  tr.passed();
  if (t >= p.tokens) return;
  Weights<Weight, typename Impl::RowLayout> wt;
  wt.load(p);
  typename Impl::Scales scales;
  scales.load(p);
  // Row i of the ring holds token t + ((i - phase) mod depth) * step. Each phase is its
  // own copy of the code (a compiler loop kept depth 2 in local memory), so every index
  // into the ring is a constant and the rows stay in registers. Every phase loads one row
  // or skips (an empty commit group, for staged rows), so a push finds its row's group a
  // constant number of groups back.
  typename Impl::TokenRow rows[kDepth];
  if constexpr (Tile::kStaged != 0) {
#pragma unroll
    for (int i = 0; i < kDepth; ++i)
      rows[i].at = stages + i * Impl::kStageVectors + threadIdx.x;
  }
  typename Impl::Pending pend[kDepth] = {};
#pragma unroll
  for (int i = 0; i + 1 < kDepth; ++i) {
    if (t + i * step < p.tokens) Impl::load(p, rows[i], t + i * step, pend[i]);
    else Impl::TokenRow::skip();
    if constexpr (TokenAngles::kOn) {
      if (i == 0) TokenAngles::prefetch_early(p, early);  // behind the first row's loads
    }
  }
  scales.prepare(p);  // its reads were issued before the rows'
  Impl::template push<kDepth - 2>(p, rows[0], t, pend[0], sh.scratch[0], tr);
  tr.pushed();
  // Phase `cur` finishes token t (row cur), after loading token t + (depth - 1) step into
  // the row the last phase finished and pushing token t + step, loaded depth - 2 phases
  // ago (one group a phase: that many may still be in flight).
  auto phase = [&](auto cur_) {  // false once the block's last token is done
    constexpr int cur = decltype(cur_)::value;
    constexpr int last = (cur + kDepth - 1) % kDepth, pushed = (cur + 1) % kDepth;
    const long long ahead = t + (kDepth - 1) * step;
    if (ahead < p.tokens) Impl::load(p, rows[last], ahead, pend[last]);
    else Impl::TokenRow::skip();
    const long long next = t + step;
    if (next < p.tokens)
      Impl::template push<kDepth - 2>(p, rows[pushed], next, pend[pushed], sh.scratch[pushed],
                                      tr);
    Impl::finish(p, rows[cur], t, pend[cur], wt, scales, sh, cur, tr);
    t += step;
    return t < p.tokens;
  };
  while (each_phase<0, kDepth>(phase)) {}
  tr.write(p);
}

// A rank whose host refused its input launches this (one block of 32 threads, on the
// stream where the fused kernel would have run) in place of the fused kernel. It pushes
// token 0's slot of this call, in the half the fused kernel would have used, with the call
// word kRejectTokens, into every rank's buffer: the peers' fused kernels wait for token 0
// first and fail at once (kErrorRejected) instead of at their timeout. It leaves the
// counters alone; the call fails on every rank, and the object is out of step from there.
template <int World>
__global__ void __launch_bounds__(32) reject(const Params p) {
  grid_dependency_wait();  // counters[0] as the previous call left it
  const int lane = threadIdx.x;
  if (lane >= World) return;
  const unsigned int uses = p.counters[0];
  uint4* peer = nullptr;
#pragma unroll
  for (int r = 0; r < World; ++r) if (lane == r) peer = p.slots[r];
  store_volatile(peer + (long long)(uses & 1u) * p.max_tokens * World + p.rank,
                 make_slot(0.f, 0.f, kRejectTokens, uses, p.tag));
}

}  // namespace qknorm
