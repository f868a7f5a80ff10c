// The unfused path (transports "nccl" and "mpi"): partial sums -> (NCCL or MPI all-reduce
// of sums[kSumsHeader + 2 tokens]) -> apply. The all-reduce also checks that every rank
// launched the same token count T, with no collective of its own: partial_sums writes a
// header of T's base-1024 digits d_i, their squares and a 1, which the all-reduce sums
// over the n ranks with the rest. Sums of n digits equal n d_i and sums of their squares
// n d_i^2 only if all n are d_i (the squared deviations from d_i sum to zero), so every
// rank of a call whose ranks disagree on T sees it. All are integers below 2^24: exact in
// fp32 in any order.
//   header = {d0, d1, d2, d0^2, d1^2, d2^2, 1, 0}, then {sum_q, sum_k} per token
#pragma once

#include "exchange.cuh"
#include "layout.cuh"
#include "params.cuh"
#include "rope.cuh"
#include "row.cuh"
#include "spec.cuh"

namespace qknorm {

constexpr int kSumsHeader = 8;

__device__ __forceinline__ void token_digits(int tokens, int* d) {
  d[0] = tokens & 1023;
  d[1] = (tokens >> 10) & 1023;
  d[2] = tokens >> 20;
}

// The unfused path counts its launches in p.counters: partial_sums writes how many it has
// made (word 0), apply how many it follows (word 1). A count that stays ahead of the other
// means the all-reduce between them is still in flight: the host's watchdog
// (transports/nccl.py) copies both words on a stream of its own, and past timeout_s writes
// a timeout into the device's error record, which apply reads before it stores anything.
// Kernels never read host memory here: on some hosts a read of mapped memory costs
// microseconds, once per block.
// Elem: the data type; Slice: a Widths; Warps: a block's warps, one token at a time.
template <class Elem, class Slice, int Warps>
__global__ void __launch_bounds__(Warps * 32) partial_sums(const Params p) {
  using TokenRow = Row<Layout<Elem, Slice, Warps * 32>>;
  __shared__ float2 scratch[Warps];
  if (blockIdx.x == 0 && threadIdx.x == 0 && p.counters != nullptr)
    p.counters[0] += 1;  // launches made; only this thread writes it
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    int d[3];
    token_digits(p.tokens, d);
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      p.sums[i] = (float)d[i];
      p.sums[3 + i] = (float)(d[i] * d[i]);
    }
    p.sums[6] = 1.0f;
    p.sums[7] = 0.0f;
  }
  float2* const sums = reinterpret_cast<float2*>(p.sums + kSumsHeader);
  TokenRow row;
  for (long long t = blockIdx.x; t < p.tokens; t += gridDim.x) {
    row.load(p, t);
    const float2 s = block_sum<Warps>(row.sums(), scratch);
    if (threadIdx.x == 0) sums[t] = s;
    if constexpr (Warps > 1) __syncthreads();  // scratch is reused by the next token
  }
}

// Whether the all-reduced header says that every rank launched p.tokens (see above).
__device__ __forceinline__ bool same_tokens(const Params& p) {
  int d[3];
  token_digits(p.tokens, d);
  const float n = p.sums[6];
  bool same = true;
#pragma unroll
  for (int i = 0; i < 3; ++i)
    same = same && p.sums[i] == n * (float)d[i] && p.sums[3 + i] == n * (float)(d[i] * d[i]);
  return same;
}

// With RoPE, the minimum of one block an SM lets ptxas keep the weights in registers
// (without it, it spilled an unpacked weight in some layouts); without RoPE, none is set.
// Weight: the weights' type (Elem or float); Rope: a Rotary (NoRope, NeoX, GptJ).
template <class Elem, class Weight, class Slice, int Warps, class Rope>
__global__ void __launch_bounds__(Warps * 32, Rope::kStyle == kRopeNone ? 0 : 1)
    apply(const Params p) {
  constexpr int kThreads = Warps * 32;
  using RowLayout = typename LayoutFor<Elem, Slice, kThreads, Rope>::type;
  using TokenAngles = Angles<RowLayout, Rope>;
  // a failure already recorded (the watchdog ended the all-reduce: the sums are not whole)
  const bool failed = *reinterpret_cast<volatile int*>(p.error) != 0;
  if (blockIdx.x == 0 && threadIdx.x == 0 && p.counters != nullptr)
    p.counters[1] = p.counters[0];  // launches followed
  Weights<Weight, RowLayout> wt;
  wt.load(p);
  const float2* const sums = reinterpret_cast<const float2*>(p.sums + kSumsHeader);
  // Failures are recorded once, after the loop: a record_error inside it made ptxas spill.
  const bool same = same_tokens(p);  // checked by every block before any store
  if (failed) return;
  int bad = -1;                      // a row whose position is out of range
  Row<RowLayout> row;
  for (long long t = blockIdx.x; same && t < p.tokens; t += gridDim.x) {
    PositionWords words;
    if constexpr (TokenAngles::kOn) words = load_position(p, t);
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
    row.scale_store(p, t, inv_rms(p, s.x, s.y), wt, angles);
  }
  if (threadIdx.x == 0) {
    if (!same) record_error(p, kErrorTokens, -1, 0, 0, p.tokens);
    else if (bad >= 0) record_position_error(p, bad);
  }
}

}  // namespace qknorm
