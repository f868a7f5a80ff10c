// Rotary position embedding after the norm: a row's position, its row of the cos/sin
// table, and the rotation of this thread's vectors by those angles.
//
// Head h of a full row is its elements [h HeadDim, (h + 1) HeadDim); the first RotaryDim
// elements of every head of q and of k rotate by the angles of the token's position, the
// rest pass through. With H = RotaryDim / 2:
//   NeoX (rotate-half): y[i] = x[i] c_i - x[i+H] s_i,   y[i+H] = x[i+H] c_i + x[i] s_i
//   GPT-J (pairs):      y[2i] = x[2i] c_i - x[2i+1] s_i, y[2i+1] = x[2i+1] c_i + x[2i] s_i
// for i < H, with c_i = cos_sin[pos][i] and s_i = cos_sin[pos][H + i]. x is the
// normalized value in fp32, and y is rounded once. Each rank's slices hold whole heads, so a
// vector's place in its head is its index in the slice mod HeadDim / kElems. A GPT-J pair
// sits in one vector. A NeoX pair sits RotaryDim / 2 kElems vectors apart: in the paired
// layout (Layout with PairDistance > 0, see LayoutFor) in two slots of one thread;
// otherwise in two lanes of one warp (kQVectors and kThreads are multiples of the head's
// vectors, so a vector's place is a lane's, and the rotated vectors of a head are 32 or
// fewer, within one aligned run of 32).
#pragma once

#include "exchange.cuh"
#include "layout.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "spec.cuh"

namespace qknorm {

// A row's position as the two 32-bit words of an int64 (hi = 0 for int32 positions), read
// with the row: no instruction waits for the load until the angles' addresses need it.
struct PositionWords {
  int lo, hi;
};

__device__ __forceinline__ PositionWords load_position(const Params& p, long long t) {
  const int* w = static_cast<const int*>(p.positions);
  PositionWords r;
  if (p.position_bytes == 8) {
    r.lo = w[2 * t];
    r.hi = w[2 * t + 1];
  } else {
    r.lo = w[t];
    r.hi = 0;
  }
  return r;
}

// The row of cos_sin for a position, or -1 outside [0, max_position).
__device__ __forceinline__ int angle_row(const Params& p, PositionWords w) {
  return w.hi == 0 && w.lo >= 0 && w.lo < p.max_position ? w.lo : -1;
}

// Row t of the launch has a position out of range: nothing of the row is stored. The record
// names the call's token.
__device__ void record_position_error(const Params& p, long long t) {
  const PositionWords w = load_position(p, t);
  int pos = w.lo;  // the position clamped to int range
  if (p.position_bytes == 8 && w.hi != (w.lo >> 31))
    pos = w.hi < 0 ? -2147483647 - 1 : 2147483647;
  record_error(p, kErrorPosition, -1, p.first_token + (int)t, pos, p.max_position);
}

// Count floats from 8-byte (Count = 2) or 16-byte (Count % 4 == 0) aligned memory
template <int Count>
__device__ __forceinline__ void load_floats(const float* src, float* dst) {
  if constexpr (Count % 4 == 0) {
#pragma unroll
    for (int i = 0; i < Count / 4; ++i) {
      const float4 v = reinterpret_cast<const float4*>(src)[i];
      dst[4 * i] = v.x; dst[4 * i + 1] = v.y; dst[4 * i + 2] = v.z; dst[4 * i + 3] = v.w;
    }
  } else {
    static_assert(Count == 2, "two floats, or a multiple of four");
    const float2 v = *reinterpret_cast<const float2*>(src);
    dst[0] = v.x; dst[1] = v.y;
  }
}

// The angles of one token for this thread's rotated vectors, and the rotation itself.
// Rope: a Rotary (spec.cuh).
template <class RowLayout, class Rope>
struct Angles {
  static constexpr int kStyle = Rope::kStyle;
  static constexpr int kThreads = RowLayout::kThreads;
  static constexpr int kElems = RowLayout::kElems;
  static constexpr int kHead = Rope::kHead, kRotary = Rope::kRotary;
  static constexpr bool kOn = true;
  // NeoX in the paired layout: both halves of a pair in this thread's slots 2b and 2b + 1
  static constexpr bool kPaired = RowLayout::kPaired;
  // pairs span two lanes
  static constexpr bool kExchange = kStyle == kRopeNeox && !kPaired;
  static constexpr int kHeadVectors = kHead / kElems;       // vectors a head
  static constexpr int kRotatedVectors = kRotary / kElems;  // rotated vectors a head
  // NeoX: vectors between the two elements of a pair
  static constexpr int kPairDistance = kRotatedVectors / 2;
  // cos (and sin) values a vector
  static constexpr int kAngles = kStyle == kRopeNeox ? kElems : kElems / 2;
  static_assert(kStyle == kRopeNeox || kStyle == kRopeGptj, "a Rotary style: NeoX or GptJ");
  static_assert(kHead > 0 && kHead % kElems == 0, "a head is whole 16-byte vectors");
  static_assert(RowLayout::kQVectors * kElems % kHead == 0 &&
                    (RowLayout::kVectors - RowLayout::kQVectors) * kElems % kHead == 0,
                "each rank's slices hold whole heads");
  static_assert(kRotary > 0 && kRotary % 2 == 0 && kRotary <= kHead,
                "0 < RotaryDim <= HeadDim, RotaryDim even");
  static_assert(kRotary % (kStyle == kRopeNeox ? 2 * kElems : kElems) == 0,
                "rotated elements are whole vectors (NeoX: both halves)");
  static_assert(kPaired || 32 % kHeadVectors == 0 || kHeadVectors % 32 == 0,
                "a head's vectors divide 32 or are a multiple");
  static_assert(!kExchange || kRotatedVectors <= 32,
                "NeoX: a head's rotated vectors fit one warp's 32");
  // Every vector of a thread has the same place in its head when kThreads is a multiple of
  // a head's vectors (always, for heads of 32 vectors or fewer). Otherwise (a head of 64 or
  // more vectors) vector j's place is 32 k + lane for some k that depends on j, and it is
  // rotated only for k = 0 when the rotated vectors are 32 or fewer. Either way one set
  // of angles serves all of a thread's rotated vectors.
  static constexpr bool kUniform = kThreads % kHeadVectors == 0;
  static_assert(kPaired || kUniform || kRotatedVectors <= 32,
                "at most 32 rotated vectors a head, or kThreads a multiple of a head's "
                "vectors");

  // Per token, between load() and push() the position's words, from push() to finish()
  // the row of cos_sin (-1: out of range).
  struct Token {
    PositionWords words;
    int row;
  };

  // lines a row of cos_sin touches (+ 1: a row need not start a line)
  static constexpr int kPrefetchLines = (kRotary * 4 + 127) / 128 + 1;

  float c[kAngles], s[kAngles];

  static __device__ __forceinline__ int place(int j) {  // vector j's index in its head
    return (int)(threadIdx.x + (kUniform ? 0 : j * kThreads)) % kHeadVectors;
  }
  static __device__ __forceinline__ bool rotated(int j) {
    if constexpr (kPaired) return RowLayout::paired(j);
    return place(j) < kRotatedVectors;
  }

  // Brings cos_sin row `row` (RotaryDim floats) into L2 (ToL1: this SM's L1 too), one
  // line a thread of the first few, so that load() a phase later finds it there: positions
  // are arbitrary, and with a table larger than L2 (MiniMax's is 48 MiB) a row read from
  // memory at finish() was a DRAM latency on every token's path.
  template <bool ToL1 = false>
  static __device__ __forceinline__ void prefetch(const Params& p, int row) {
    if (row >= 0 && threadIdx.x < kPrefetchLines) {
      const float* line = p.cos_sin + (long long)row * kRotary +
                          min((int)threadIdx.x * 32, kRotary - 1);
      if constexpr (ToL1) prefetch_l1(line);
      else prefetch_l2(line);
    }
  }

  // Before grid_dependency_wait (PDL): token t's position, read only to steer a prefetch
  // of its cos_sin row into this SM's L1 (prefetch_early) while the first rows load. With
  // one token a block (decode) the angles' load in finish() was otherwise an L2 latency
  // after the row's sums, hidden at G >= 2 by the wait for the peers but not at G = 1.
  // The word may be the previous kernel's, still being written: it is read through L2
  // (load_cg: nothing of it stays in L1 for the read after the wait to find stale), and
  // whatever it holds only picks the lines prefetched; the angles used are those of the
  // position read after the wait, from a table that never changes. Threads of the first
  // few, one line each, as prefetch() does.
  static __device__ __forceinline__ PositionWords early_position(const Params& p,
                                                                 long long t) {
    PositionWords w{-1, 0};
    if (threadIdx.x < kPrefetchLines) {
      const int* at = static_cast<const int*>(p.positions);
      if (p.position_bytes == 8) {
        w.lo = load_cg(at + 2 * t);
        w.hi = load_cg(at + 2 * t + 1);
      } else {
        w.lo = load_cg(at + t);
      }
    }
    return w;
  }
  static __device__ __forceinline__ void prefetch_early(const Params& p, PositionWords w) {
    prefetch<true>(p, angle_row(p, w));
  }

  // Issues the loads of this thread's angles at cos_sin row `row`; nothing waits for them.
  // Every thread loads, with no branch (a branch around the loads cost the narrow layout
  // 12 registers): a lane with no rotated vector reads its warp's first angles, and a row
  // out of range (-1: nothing of it is stored) reads row 0, so no read leaves the table.
  // NeoX: a lane of the lower half keeps -sin (its partner's term is subtracted), so that
  // rotate() is two multiply-adds an element with no select.
  // Paired: every pair of a thread sits at place tid % kPairDistance of its head
  // (kThreads % kPairDistance == 0).
  __device__ __forceinline__ void load(const Params& p, int row) {
    const int m = kPaired    ? (int)threadIdx.x % kPairDistance
                  : kUniform ? place(0)
                             : (int)(threadIdx.x & 31);
    const int first = kPaired                ? m * kElems
                      : m >= kRotatedVectors ? 0
                      : kExchange ? (m < kPairDistance ? m : m - kPairDistance) * kElems
                                  : m * (kElems / 2);
    const float* at = p.cos_sin + (long long)(row < 0 ? 0 : row) * kRotary + first;
    load_floats<kAngles>(at, c);
    load_floats<kAngles>(at + kRotary / 2, s);
    if constexpr (kExchange) {
      if (lower()) {
#pragma unroll
        for (int e = 0; e < kAngles; ++e) s[e] = -s[e];
      }
    }
  }

  // NeoX: whether this lane's rotated vectors are in the first half of the rotation (a
  // lane's place in its head, from the lane alone: heads of fewer than 32 vectors tile
  // the warp; a longer head's rotated vectors are its first 32).
  static __device__ __forceinline__ bool lower() {
    const int lane = threadIdx.x & 31;
    return (kHeadVectors < 32 ? lane % kHeadVectors : lane) < kPairDistance;
  }

  // Paired: rotates a pair held by this thread, its lower half lo and upper half hi (the
  // normalized values of slots 2b and 2b + 1) in place.
  __device__ __forceinline__ void rotate_pair(float* lo, float* hi) const {
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const float x = lo[e], y = hi[e];
      lo[e] = fmaf(-y, s[e], x * c[e]);
      hi[e] = fmaf(x, s[e], y * c[e]);
    }
  }

  // Rotates this lane's normalized values f of vector j in place (nothing in the paired
  // layout: its pairs go through rotate_pair). NeoX with pairs across lanes: every lane of
  // the warp calls it for the same j, since each reads its partner's values.
  __device__ __forceinline__ void rotate(int j, float* f) const {
    if constexpr (kPaired) return;
    const bool on = rotated(j);
    if constexpr (kExchange) {
      const int lane = threadIdx.x & 31;
      // in the warp for every lane
      const int from = lower() ? lane + kPairDistance : lane - kPairDistance;
      float g[kElems];
#pragma unroll
      for (int e = 0; e < kElems; ++e) g[e] = __shfl_sync(0xffffffffu, f[e], from);
      if (on) {
#pragma unroll
        for (int e = 0; e < kElems; ++e) f[e] = fmaf(g[e], s[e], f[e] * c[e]);  // s signed
      }
    } else {
      if (on) {
#pragma unroll
        for (int i = 0; i < kElems / 2; ++i) {
          const float x0 = f[2 * i], x1 = f[2 * i + 1];
          f[2 * i] = fmaf(-x1, s[i], x0 * c[i]);
          f[2 * i + 1] = fmaf(x0, s[i], x1 * c[i]);
        }
      }
    }
  }
};

template <class RowLayout, int HeadDim, int RotaryDim>
struct Angles<RowLayout, Rotary<HeadDim, RotaryDim, kRopeNone>> {  // the norm alone
  static_assert(HeadDim == 0 && RotaryDim == 0, "no rotary embedding: HeadDim = RotaryDim = 0");
  static constexpr bool kOn = false;
  static constexpr bool kExchange = false;
  static constexpr bool kPaired = false;
  struct Token {};
};

}  // namespace qknorm
