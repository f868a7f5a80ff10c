// The paged KV-cache write that rides the op's epilogue: where a kernel stores k's final
// row it also stores that row (the same rounded values) at the token's slot of k_cache, and
// the same block copies v's row to v_cache. No extra pass over k, no extra launch.
//
// Token t goes to slot s = slot_mapping[t]: block s / block_size, row s % block_size; the
// element d of head h of that row is at
//   cache + block * cache_block + row * cache_row + h * cache_head + d
// (strides in elements of the cache, any order: an HND cache is a transposed view, a token
// pool has block_size 1). s = -1 writes nothing (padding). A slot below -1 or at or past
// num_slots writes nothing and records kErrorSlot, naming the token: the host raises
// SlotError. FP8 caches hold fp8_e4m3(value / scale): the quotient as IEEE fp32 division
// rounds it (Fp8Divisor), then round to nearest even, saturating at +-448, every NaN as
// 0x7F (cvt.rn.satfinite, sm_89+).
#pragma once

#include "exchange.cuh"
#include "params.cuh"
#include "vec.cuh"

namespace qknorm {

constexpr int kCacheNone = 0, kCacheSame = 1, kCacheFp8 = 2;

// The cache a specialization writes: none, the data type, or FP8 E4M3; heads of HeadDim
// elements (the k slice is whole heads).
template <int Kind, int HeadDim>
struct KVCache {
  static constexpr int kKind = Kind;
  static constexpr int kHead = HeadDim;
  static constexpr bool kOn = Kind != kCacheNone;
};

using NoCache = KVCache<kCacheNone, 0>;
template <int HeadDim> using SameCache = KVCache<kCacheSame, HeadDim>;
template <int HeadDim> using Fp8Cache = KVCache<kCacheFp8, HeadDim>;

// Two floats -> two E4M3 bytes, lo in the low byte.
__device__ __forceinline__ unsigned int fp8x2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
#else
  __trap();  // the host refuses FP8 caches below sm_89
  return 0u;
#endif
}

// One FP8 cache's scale, ready to divide by: r = 1 / scale rounded to fp64, worked out
// once a call (by the host for a scale it was given, once a block for a device scale: a
// call's scales hold still while it runs), not for every vector stored.
struct Fp8Divisor {
  double r;

  // x / scale rounded to fp32 as IEEE division rounds it (to nearest even):
  // fp32(fp64(x * r)), three instructions and no branch where __fdiv_rn takes a dozen and a
  // slow path. Exact: x * r in fp64 is x / scale within 2^-52 relative (two roundings, and
  // no fp64 underflow or overflow for fp32 x and scale), and an exact quotient of two fp32
  // numbers never lies within 2^-49 relative of a midpoint between fp32 neighbours (a
  // midpoint times scale needs 25 or more bits; x has 24), so the fp64 value rounds to
  // fp32 on the same side. Quotients in fp32's subnormal range may round differently, but
  // every one is an FP8 zero of the same sign either way; zeros, infinities and NaNs follow
  // IEEE division (0 * inf = NaN as 0 / 0), and subnormal x and scales count as themselves.
  __device__ __forceinline__ float divide(float x) const {
    return __double2float_rn(widen(x) * r);
  }
};

// The divisors of both caches (FP8): load() issues the reads of device scales, prepare()
// waits for them and takes their reciprocals (the host's where the scales were values).
// Nothing for a cache of the data's dtype.
template <class Cache>
struct CacheScales {
  Fp8Divisor k, v;
  // the device scales as read; 1 otherwise, so that a reciprocal the compiler works out
  // before its select (it may) takes __drcp_rn's fast path, not the slow one of 0 or NaN
  float k_at = 1.f, v_at = 1.f;
  __device__ __forceinline__ void load(const Params& p) {
    if constexpr (Cache::kKind == kCacheFp8) {
      if (p.k_scale_at != nullptr) k_at = *p.k_scale_at;
      if (p.v_scale_at != nullptr) v_at = *p.v_scale_at;
    }
  }
  __device__ __forceinline__ void prepare(const Params& p) {
    if constexpr (Cache::kKind == kCacheFp8) {
      k.r = p.k_scale_at != nullptr ? __drcp_rn(widen(k_at)) : p.k_rcp;
      v.r = p.v_scale_at != nullptr ? __drcp_rn(widen(v_at)) : p.v_rcp;
    }
  }
};

// One 16-byte data vector into the cache: the same bytes, or its FP8 conversion (8 bytes
// for 16-bit data, 4 for fp32) after the division by the scale.
template <class Elem, class Cache>
struct CacheVector {
  static constexpr int kElems = Vec<Elem>::kElems;
  static constexpr int kElemBytes = Cache::kKind == kCacheFp8 ? 1 : (int)sizeof(Elem);

  static __device__ __forceinline__ void store(void* cache, long long at, uint4 v,
                                               const Fp8Divisor& d) {
    char* dst = static_cast<char*>(cache) + at * kElemBytes;
    if constexpr (Cache::kKind == kCacheSame) {
      *reinterpret_cast<uint4*>(dst) = v;
    } else {
      float f[kElems];
      Vec<Elem>::unpack(v, f);
      unsigned int b[kElems / 2];
#pragma unroll
      for (int i = 0; i < kElems / 2; ++i)
        b[i] = fp8x2(d.divide(f[2 * i]), d.divide(f[2 * i + 1]));
      if constexpr (kElems == 8) {
        *reinterpret_cast<uint2*>(dst) = make_uint2(b[0] | b[1] << 16, b[2] | b[3] << 16);
      } else {
        *reinterpret_cast<unsigned int*>(dst) = b[0] | b[1] << 16;
      }
    }
  }
};

// No cache: what the row's stores take where nothing goes to a cache.
struct NoTokenCache {
  static constexpr bool kOn = false;
  __device__ __forceinline__ void store_k(const Params&, long long, int, uint4) const {}
};

// One token's place in the caches, loaded with the token (every thread loads the same
// word) and resolved once its row is stored, and the block's scales (set before the
// stores). Empty without a cache.
template <class Elem, class Cache>
struct TokenCache {
  static constexpr bool kOn = Cache::kOn;
  long long slot;
  CacheScales<Cache> scales;

  __device__ __forceinline__ void load(const Params& p, long long t) {
    if constexpr (kOn)
      slot = p.slot_bytes == 8 ? static_cast<const long long*>(p.slot_mapping)[t]
                               : (long long)static_cast<const int*>(p.slot_mapping)[t];
  }
  __device__ __forceinline__ bool bad(const Params& p) const {
    return slot < -1 || slot >= p.num_slots;
  }
  // the element offset of the token's row in the caches, or -1: nothing to write
  __device__ __forceinline__ long long row(const Params& p) const {
    if (slot < 0 || slot >= p.num_slots) return -1;
    const unsigned int s = (unsigned int)slot, block = s / (unsigned int)p.block_size;
    return (long long)block * p.cache_block +
           (long long)(s - block * (unsigned int)p.block_size) * p.cache_row;
  }
  // element `offset` of k's slice (a 16-byte vector's first) within the token's row
  static __device__ __forceinline__ int place(const Params& p, int offset) {
    return offset / Cache::kHead * (int)p.cache_head + offset % Cache::kHead;
  }
  __device__ __forceinline__ void store_k(const Params& p, long long at, int offset,
                                          uint4 v) const {
    if constexpr (kOn) CacheVector<Elem, Cache>::store(p.k_cache, at + place(p, offset), v,
                                                       scales.k);
  }
};

// Token t of the launch has a slot outside the cache: the record names the call's token,
// the slot (clamped to int range) and the cache's slots.
__device__ void record_slot_error(const Params& p, long long slot, long long t) {
  const int s = slot > 2147483647LL ? 2147483647 : slot < -2147483647LL ? -2147483647 - 1
                                                                         : (int)slot;
  const int n = p.num_slots > 2147483647LL ? 2147483647 : (int)p.num_slots;
  report_error(p, kErrorSlot, -1, p.first_token + (int)t, s, n);
}

// v's row of one token (k's local width), spread over the block's threads in 16-byte
// vectors: loaded early, stored to v_cache at the token's row. Empty without a cache.
template <class Elem, class Cache, int KWidth, int Threads>
struct ValueRow {
  static constexpr int kElems = Vec<Elem>::kElems;
  static constexpr int kVectors = KWidth / kElems;
  static constexpr int kPer = Cache::kOn ? (kVectors + Threads - 1) / Threads : 1;
  uint4 x[kPer];

  __device__ __forceinline__ void load(const Params& p, long long t) {
    if constexpr (Cache::kOn) {
      const uint4* src = reinterpret_cast<const uint4*>(static_cast<const Elem*>(p.v) +
                                                        t * p.v_stride);
#pragma unroll
      for (int u = 0; u < kPer; ++u) {
        const int i = (int)threadIdx.x + u * Threads;
        if (i < kVectors) x[u] = src[i];
      }
    }
  }
  __device__ __forceinline__ void store(const Params& p, long long at,
                                        const TokenCache<Elem, Cache>& tc) const {
    if constexpr (Cache::kOn) {
#pragma unroll
      for (int u = 0; u < kPer; ++u) {
        const int i = (int)threadIdx.x + u * Threads;
        if (i < kVectors)
          CacheVector<Elem, Cache>::store(p.v_cache, at + TokenCache<Elem, Cache>::place(
                                                              p, i * kElems),
                                          x[u], tc.scales.v);
      }
    }
  }
};

}  // namespace qknorm
