// The norm's arithmetic on one token's row: the block's sums of squares, the scale, and
// the row held in registers or staged in shared memory, scaled, weighted, rotated and
// stored.
#pragma once

#include "kvcache.cuh"
#include "layout.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "vec.cuh"

namespace qknorm {

__device__ __forceinline__ float2 warp_sum(float2 v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
  }
  return v;
}

// Sum over the block, in a fixed order. Every thread calls it; every lane of warp 0 gets it.
// It is a barrier for the block (for one warp, __syncwarp).
template <int Warps>
__device__ __forceinline__ float2 block_sum(float2 v, float2* scratch) {
  v = warp_sum(v);
  if constexpr (Warps == 1) {
    __syncwarp();  // the barrier callers rely on: earlier shared reads are done
    return v;
  }
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) scratch[warp] = v;
  __syncthreads();
  float2 s = make_float2(0.f, 0.f);
  if (threadIdx.x < 32) {
#pragma unroll
    for (int i = 0; i < Warps; ++i) { s.x += scratch[i].x; s.y += scratch[i].y; }
  }
  return s;
}

// The scale 1 / sqrt(S / D + eps) with the hardware's approximate division and reciprocal
// square root (2 fp32 units in the last place each, denormals handled, no branches): three
// orders of magnitude below a 16-bit output's unit, inside fp32's tolerance. IEEE division
// and square root put special-case branches on the serial path between the peers' partials
// arriving and the block barrier, once per token: 6-7% slower from T=4096 on H200 at G=2.
__device__ __forceinline__ float2 inv_rms(const Params& p, float sq, float sk) {
  return make_float2(rsqrtf(__fdividef(sq, p.q_dim) + p.eps),
                     rsqrtf(__fdividef(sk, p.k_dim) + p.eps));
}

// The arithmetic on this thread's part of one token's row, wherever the row is held:
// `get(j)` returns its vector j (a register, or a read of shared memory).
template <class RowLayout>
struct RowMath {
  using Elem = typename RowLayout::Elem;
  static constexpr int kElems = RowLayout::kElems;

  static __device__ __forceinline__ const void* source(const Params& p, long long t, int j) {
    return RowLayout::is_q(j)
               ? static_cast<const void*>(static_cast<const Elem*>(p.q) + t * p.q_stride +
                                          RowLayout::offset(j))
               : static_cast<const void*>(static_cast<const Elem*>(p.k) + t * p.k_stride +
                                          RowLayout::offset(j));
  }

  // this thread's share of sum(q^2) and sum(k^2)
  template <class Get>
  static __device__ __forceinline__ float2 sums(const Get& get) {
    float2 s = make_float2(0.f, 0.f);
#pragma unroll
    for (int j = 0; j < RowLayout::kSlots; ++j) {
      if (!RowLayout::valid(j)) continue;
      float f[kElems];
      Vec<Elem>::unpack(get(j), f);
      float a = 0.f;
#pragma unroll
      for (int e = 0; e < kElems; ++e) a = fmaf(f[e], f[e], a);
      if (RowLayout::is_q(j)) s.x += a; else s.y += a;
    }
    return s;
  }

  // Scales, weights, rotates (TokenAngles: an Angles, or the empty one of NoRope) and
  // stores the row; with a KV cache (Cache: a TokenCache with its row `at` in the caches,
  // -1 for none), k's vectors go to the cache too.
  template <class Weight, class TokenAngles, class Get, class Cache = NoTokenCache>
  static __device__ __forceinline__ void scale_store(const Params& p, long long t,
                                                     float2 scale,
                                                     const Weights<Weight, RowLayout>& wt,
                                                     const TokenAngles& rope,
                                                     const Get& get,
                                                     const Cache& cache = Cache(),
                                                     long long at = -1) {
    constexpr int kWeightVectors = Weights<Weight, RowLayout>::kVectors;
    auto scaled = [&](int j, float* f) {  // slot j's normalized values
      float wf[kElems];
      Vec<Elem>::unpack(get(j), f);
#pragma unroll
      for (int u = 0; u < kWeightVectors; ++u)
        Vec<Weight>::unpack(wt.w[j][u], wf + u * Vec<Weight>::kElems);
      const float s = RowLayout::is_q(j) ? scale.x : scale.y;
#pragma unroll
      for (int e = 0; e < kElems; ++e) f[e] = f[e] * s * wf[e];
    };
#pragma unroll
    for (int j = 0; j < RowLayout::kSlots; ++j) {
      if constexpr (TokenAngles::kPaired) {  // slots 2b and 2b + 1 together: a pair is both
        if (j % 2 == 1) continue;
        if (j + 1 < RowLayout::kSlots) {
          float lo[kElems], hi[kElems];
          const bool v0 = RowLayout::valid(j), v1 = RowLayout::valid(j + 1);
          if (v0) scaled(j, lo);
          if (v1) scaled(j + 1, hi);
          if (RowLayout::paired(j)) rope.rotate_pair(lo, hi);  // a pair's two slots are valid
          if (v0) store(p, t, j, lo, cache, at);
          if (v1) store(p, t, j + 1, hi, cache, at);
          continue;
        }
      }
      // a NeoX rotation across lanes needs every lane of the warp, even one past the row
      if (TokenAngles::kExchange ? !RowLayout::warp_valid(j) : !RowLayout::valid(j)) continue;
      float f[kElems];
      scaled(j, f);
      if constexpr (TokenAngles::kOn) {
        rope.rotate(j, f);
        if (TokenAngles::kExchange && !RowLayout::valid(j)) continue;
      }
      store(p, t, j, f, cache, at);
    }
  }

  template <class Cache = NoTokenCache>
  static __device__ __forceinline__ void store(const Params& p, long long t, int j,
                                               const float* f, const Cache& cache = Cache(),
                                               long long at = -1) {
    if constexpr (!Cache::kOn) {
      Elem* dst = RowLayout::is_q(j)
                      ? static_cast<Elem*>(p.q_out) + t * p.q_out_stride + RowLayout::offset(j)
                      : static_cast<Elem*>(p.k_out) + t * p.k_out_stride + RowLayout::offset(j);
      *reinterpret_cast<uint4*>(dst) = Vec<Elem>::pack(f);
    } else {
      const uint4 v = Vec<Elem>::pack(f);
      if (RowLayout::is_q(j)) {
        *reinterpret_cast<uint4*>(static_cast<Elem*>(p.q_out) + t * p.q_out_stride +
                                  RowLayout::offset(j)) = v;
        return;
      }
      if ((p.flags & kFlagNoKStore) == 0)
        *reinterpret_cast<uint4*>(static_cast<Elem*>(p.k_out) + t * p.k_out_stride +
                                  RowLayout::offset(j)) = v;
      if (at >= 0) cache.store_k(p, at, RowLayout::offset(j), v);
    }
  }
};

// This thread's part of one token's row, held in registers.
template <class RowLayout>
struct Row {
  using Math = RowMath<RowLayout>;
  uint4 x[RowLayout::kSlots];

  __device__ __forceinline__ void load(const Params& p, long long t) {
#pragma unroll
    for (int j = 0; j < RowLayout::kSlots; ++j)
      if (RowLayout::valid(j)) x[j] = *static_cast<const uint4*>(Math::source(p, t, j));
  }
  static __device__ __forceinline__ void skip() {}  // no row to load in this phase
  template <int Pending>
  __device__ __forceinline__ void ready() const {}  // a register load is waited for on use
  __device__ __forceinline__ float2 sums() const {
    return Math::sums([&](int j) { return x[j]; });
  }
  template <class Weight, class TokenAngles, class Cache = NoTokenCache>
  __device__ __forceinline__ void scale_store(const Params& p, long long t, float2 scale,
                                              const Weights<Weight, RowLayout>& wt,
                                              const TokenAngles& rope,
                                              const Cache& cache = Cache(),
                                              long long at = -1) const {
    Math::scale_store(p, t, scale, wt, rope, [&](int j) { return x[j]; }, cache, at);
  }
};

// This thread's part of one token's row, held in shared memory: vector j at
// at[j * kThreads], copied there asynchronously, so a block keeps several rows' loads in
// flight for the price of shared memory, not registers. Each load is one commit group;
// ready<Pending>() waits for this row's group while the Pending groups committed after it
// may still be in flight. A stage is refilled only after the same thread's last reads of
// it have returned: their values went into the stores of finish(), issued before the next
// load of the stage.
template <class RowLayout>
struct StagedRow {
  static constexpr int kThreads = RowLayout::kThreads;
  using Math = RowMath<RowLayout>;
  uint4* at;  // this thread's first vector in the row's stage

  __device__ __forceinline__ void load(const Params& p, long long t) {
#pragma unroll
    for (int j = 0; j < RowLayout::kSlots; ++j)
      if (RowLayout::valid(j)) copy_async16(at + j * kThreads, Math::source(p, t, j));
    copy_async_commit();
  }
  static __device__ __forceinline__ void skip() { copy_async_commit(); }
  template <int Pending>
  __device__ __forceinline__ void ready() const { copy_async_wait<Pending>(); }
  __device__ __forceinline__ float2 sums() const {
    return Math::sums([&](int j) { return at[j * kThreads]; });
  }
  template <class Weight, class TokenAngles, class Cache = NoTokenCache>
  __device__ __forceinline__ void scale_store(const Params& p, long long t, float2 scale,
                                              const Weights<Weight, RowLayout>& wt,
                                              const TokenAngles& rope,
                                              const Cache& cache = Cache(),
                                              long long row = -1) const {
    Math::scale_store(p, t, scale, wt, rope, [&](int j) { return at[j * kThreads]; }, cache,
                      row);
  }
};

}  // namespace qknorm
