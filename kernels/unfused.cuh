// The unfused path (transports "nccl" and "mpi"): partial sums -> (NCCL or MPI all-reduce
// of sums[kSumsHeader + 2 tokens]) -> apply. The all-reduce also carries what the fused
// kernel's slots carry, with no collective of its own: each rank writes its own words of a
// header, and zeros in every other rank's, so that the all-reduced header holds every
// rank's words exactly (integers below 2^24 are exact in fp32, in any order of addition):
//   header[f * kMaxWorld + r] = rank r's field f: its call's T, tag + 1, 1 where it refused
//   its input, and 1 + the call's first token whose position is outside its table (or 0)
// then {sum_q, sum_k} per token. apply reads the header before anything else: a rank whose
// T or tag differs, or that refused, fails the call on every rank with nothing stored; a
// rank's bad position is reported by its peers, which store their rows.
#pragma once

#include "exchange.cuh"
#include "kvcache.cuh"
#include "layout.cuh"
#include "params.cuh"
#include "rope.cuh"
#include "row.cuh"
#include "spec.cuh"

namespace qknorm {

constexpr int kSumsHeader = 4 * kMaxWorld;
constexpr int kHeaderTokens = 0, kHeaderTag = 1, kHeaderRefused = 2, kHeaderBadPosition = 3;

// The unfused path counts its launches in p.counters: partial_sums writes how many it has
// made (word 0), apply how many it follows (word 1). A count that stays ahead of the other
// means the all-reduce between them is still in flight: the host's watchdog
// (transports/nccl.py) copies both words on a stream of its own, and past timeout_s writes
// a timeout into the device's error record, which apply reads before it stores anything.
// Words 2 and 3 are partial_sums' own where a launch has several blocks: its blocks' first
// bad position, and the blocks done (the last block writes the position into the header,
// and zeros both for the next launch); a launch of one block writes it directly.
// Kernels never read host memory here: on some hosts a read of mapped memory costs
// microseconds, once per block.
// Elem: the data type; Slice: a Widths; Warps: a block's warps, one token at a time. With
// p.flags & kFlagRefused it reads no row: it writes the header (and the sums stay stale).
template <class Elem, class Slice, int Warps>
__global__ void __launch_bounds__(Warps * 32) partial_sums(const Params p) {
  using TokenRow = Row<Layout<Elem, Slice, Warps * 32>>;
  __shared__ float2 scratch[Warps];
  const bool refused = (p.flags & kFlagRefused) != 0;
  const bool positions = p.positions != nullptr && !refused;
  if (blockIdx.x == 0 && threadIdx.x == 0 && p.counters != nullptr)
    p.counters[0] += 1;  // launches made; only this thread writes it
  if (blockIdx.x == 0) {
    for (int i = threadIdx.x; i < kSumsHeader; i += blockDim.x) {
      const int field = i / kMaxWorld;
      if (i % kMaxWorld != p.rank) {
        p.sums[i] = 0.f;
      } else if (field == kHeaderTokens) {
        p.sums[i] = (float)p.call_tokens;
      } else if (field == kHeaderTag) {
        p.sums[i] = (float)p.tag;
      } else if (field == kHeaderRefused) {
        p.sums[i] = refused ? 1.f : 0.f;
      } else if (!positions) {  // with positions, the last block writes it
        p.sums[i] = 0.f;
      }
    }
  }
  float2* const sums = reinterpret_cast<float2*>(p.sums + kSumsHeader);
  TokenRow row;
  int bad = -1;  // this block's first row whose position is out of range
  for (long long t = blockIdx.x; !refused && t < p.tokens; t += gridDim.x) {
    // the position's load goes out with the row's and is looked at once the row is
    // summed: no load waits for another
    PositionWords words = {0, 0};
    if (positions && threadIdx.x == 0) words = load_position(p, t);
    row.load(p, t);
    const float2 s = block_sum<Warps>(row.sums(), scratch);
    if (threadIdx.x == 0) {
      // a replica of a lower rank's k head adds 0 (a select, as in the fused kernel)
      sums[t] = make_float2(s.x, (p.flags & kFlagKReplica) != 0 ? 0.f : s.y);
      if (positions && bad < 0 && angle_row(p, words) < 0) bad = (int)t;
    }
    if constexpr (Warps > 1) __syncthreads();  // scratch is reused by the next token
  }
  float* const bad_word = p.sums + kHeaderBadPosition * kMaxWorld + p.rank;
  if (positions && threadIdx.x == 0 && gridDim.x == 1) {  // one block: no other to wait for
    *bad_word = bad >= 0 ? (float)(p.first_token + bad + 1) : 0.f;
  } else if (positions && threadIdx.x == 0) {
    unsigned int* const first = p.counters + 2;  // 0x7fffffff - the first bad row, or 0
    unsigned int* const done = p.counters + 3;
    if (bad >= 0) atomicMax(first, 0x7fffffffu - (unsigned int)bad);
    __threadfence();
    if (atomicAdd(done, 1u) == gridDim.x - 1) {  // the last block: every other is done
      const unsigned int got = atomicExch(first, 0u);
      *done = 0u;
      *bad_word = got ? (float)(p.first_token + (int)(0x7fffffffu - got) + 1) : 0.f;
    }
  }
}

// What the all-reduced header says of this launch (on a rank that did not refuse it): an
// error to record (code, 0 for none; a failure of the exchange: nothing of the launch is
// stored), or a peer's position out of range (peer_bad >= 0: the rows are stored). The
// same in every thread of every block.
struct HeaderVerdict {
  int code, peer, theirs, ours;
  int peer_bad, bad_token;
};

__device__ __forceinline__ HeaderVerdict read_header(const Params& p) {
  // Lane r of every warp reads rank r's words (four loads a thread, whatever kMaxWorld);
  // the warp's ballots then keep the lowest rank's finding, as every thread needs it.
  static_assert(kMaxWorld <= 32, "a lane a rank");
  const int lane = threadIdx.x & 31;
  int tokens = 0, tag = 0, bad = 0;
  bool refused = false;
  if (lane < kMaxWorld) {
    tokens = (int)p.sums[kHeaderTokens * kMaxWorld + lane];
    tag = (int)p.sums[kHeaderTag * kMaxWorld + lane];
    refused = p.sums[kHeaderRefused * kMaxWorld + lane] != 0.f;
    bad = (int)p.sums[kHeaderBadPosition * kMaxWorld + lane];
  }
  // tokens 0: no such rank (every rank present has a call of T >= 1)
  int code = 0, theirs = 0, ours = 0;
  if (tokens != 0) {
    if (refused) {
      code = kErrorRejected;
      ours = p.call_tokens;
    } else if (tokens != p.call_tokens) {
      code = kErrorTokens;
      theirs = tokens;
      ours = p.call_tokens;
    } else if (tag != p.tag) {
      code = kErrorTag;
      theirs = tag;
      ours = p.tag;
    }
  }
  HeaderVerdict v = {0, -1, 0, 0, -1, 0};
  const unsigned int failed = __ballot_sync(0xffffffffu, code != 0);
  if (failed != 0) {
    const int r = __ffs(failed) - 1;
    v.code = __shfl_sync(0xffffffffu, code, r);
    v.peer = r;
    v.theirs = __shfl_sync(0xffffffffu, theirs, r);
    v.ours = __shfl_sync(0xffffffffu, ours, r);
    return v;
  }
  const unsigned int peers_bad =
      __ballot_sync(0xffffffffu, tokens != 0 && bad != 0 && lane != p.rank);
  if (peers_bad != 0) {
    const int r = __ffs(peers_bad) - 1;
    v.peer_bad = r;
    v.bad_token = __shfl_sync(0xffffffffu, bad, r) - 1;
  }
  return v;
}

// With RoPE, the minimum of one block an SM lets ptxas keep the weights in registers
// (without it, it spilled an unpacked weight in some layouts); without RoPE, none is set.
// Weight: the weights' type (Elem or float); Rope: a Rotary (NoRope, NeoX, GptJ).
// Stores every row whose own position is valid, whatever an earlier launch recorded,
// unless the exchange failed (the header's verdict, or a timeout the watchdog recorded).
// Cache: a KVCache (kvcache.cuh): with one, k's stored row and v's row go to the token's
// slot of the caches too.
template <class Elem, class Weight, class Slice, int Warps, class Rope, class Cache = NoCache>
__global__ void __launch_bounds__(Warps * 32, Rope::kStyle == kRopeNone ? 0 : 1)
    apply(const Params p) {
  constexpr int kThreads = Warps * 32;
  using RowLayout = typename LayoutFor<Elem, Slice, kThreads, Rope>::type;
  using TokenAngles = Angles<RowLayout, Rope>;
  using Slot = TokenCache<Elem, Cache>;
  using Values = ValueRow<Elem, Cache, Slice::kK, kThreads>;
  if (blockIdx.x == 0 && threadIdx.x == 0 && p.counters != nullptr)
    p.counters[1] = p.counters[0];  // launches followed
  if ((p.flags & kFlagRefused) != 0) return;  // this rank refused (its host raises that)
  // an exchange failed already (the watchdog ended the all-reduce: the sums are not whole);
  // loaded at entry, beside the weights and the header. The watchdog may write it while
  // the block runs: a warp leaves as a whole (its lanes shuffle with each other later)
  const bool failed = exchange_failed(p);
  Weights<Weight, RowLayout> wt;
  wt.load(p);
  CacheScales<Cache> scales;
  scales.load(p);
  const HeaderVerdict v = read_header(p);
  if (__any_sync(0xffffffffu, failed)) return;
  const bool first = blockIdx.x == 0 && threadIdx.x == 0;
  if (v.code != 0) {
    if (first) record_error(p, v.code, v.peer, p.first_token, v.theirs, v.ours);
    return;
  }
  const float2* const sums = reinterpret_cast<const float2*>(p.sums + kSumsHeader);
  // Failures are recorded once, after the loop: a record_error inside it made ptxas spill.
  int bad = -1;  // a row whose position is out of range
  long long bad_slot = 0, bad_slot_token = -1;  // a row whose slot is outside the cache
  scales.prepare(p);
  Row<RowLayout> row;
  for (long long t = blockIdx.x; t < p.tokens; t += gridDim.x) {
    PositionWords words;
    if constexpr (TokenAngles::kOn) words = load_position(p, t);
    Slot slot;
    slot.scales = scales;
    Values values;
    if constexpr (Cache::kOn) {
      slot.load(p, t);
      values.load(p, t);
    }
    const float2 s = sums[t];
    row.load(p, t);
    TokenAngles angles;
    if constexpr (TokenAngles::kOn) {
      const int r = angle_row(p, words);  // the same for every thread
      if (r < 0) {
        bad = (int)t;
        continue;
      }
      angles.load(p, r);
    }
    if constexpr (Cache::kOn) {
      const long long at = slot.row(p);
      row.scale_store(p, t, inv_rms(p, s.x, s.y), wt, angles, slot, at);
      if (at >= 0) {
        values.store(p, at, slot);
      } else if (slot.bad(p)) {
        bad_slot = slot.slot;
        bad_slot_token = t;
      }
    } else {
      row.scale_store(p, t, inv_rms(p, s.x, s.y), wt, angles);
    }
  }
  if constexpr (Cache::kOn) {
    if (threadIdx.x == 0 && bad_slot_token >= 0) record_slot_error(p, bad_slot, bad_slot_token);
  }
  if (threadIdx.x == 0 && bad >= 0) record_position_error(p, bad);
  if (first && v.peer_bad >= 0)
    record_error(p, kErrorPeerPosition, v.peer_bad, v.bad_token, 0, 0);
}

}  // namespace qknorm
