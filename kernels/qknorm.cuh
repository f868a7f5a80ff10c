// Tensor-parallel QK RMSNorm: header-only device code.
//
//   out = round(x * w / sqrt(sum over all ranks of sum(x^2) / full_width + eps))
//
// for q and k of every token, where each of G ranks holds a contiguous slice of the row.
// No CUDA headers are needed: 16-bit conversions use PTX directly, so NVRTC compiles this
// with no include path and no GPU (the CI compile test relies on that).
#pragma once

namespace qknorm {

// ---------------------------------------------------------------------------------------
// Element types. bf16 and fp16 values travel as 16-bit patterns; the tags pick conversions.
struct bf16_t { unsigned short bits; };
struct f16_t { unsigned short bits; };

template <class T> struct Vec;  // 16 bytes of T <-> floats

template <> struct Vec<float> {
  static constexpr int N = 4;
  static __device__ __forceinline__ void unpack(const uint4 v, float* f) {
    f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
  }
  static __device__ __forceinline__ uint4 pack(const float* f) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]),
                      __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

__device__ __forceinline__ void unpack_bf16x2(unsigned int w, float* f) {
  f[0] = __uint_as_float(w << 16);
  f[1] = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ unsigned int pack_bf16x2(float lo, float hi) {
  unsigned int r;  // round to nearest even, NaN stays NaN (sm_80+)
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ void unpack_f16x2(unsigned int w, float* f) {
  unsigned short lo = (unsigned short)(w & 0xffffu), hi = (unsigned short)(w >> 16);
  asm("cvt.f32.f16 %0, %1;" : "=f"(f[0]) : "h"(lo));
  asm("cvt.f32.f16 %0, %1;" : "=f"(f[1]) : "h"(hi));
}
__device__ __forceinline__ unsigned int pack_f16x2(float lo, float hi) {
  unsigned int r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

template <> struct Vec<bf16_t> {
  static constexpr int N = 8;
  static __device__ __forceinline__ void unpack(const uint4 v, float* f) {
    unpack_bf16x2(v.x, f); unpack_bf16x2(v.y, f + 2);
    unpack_bf16x2(v.z, f + 4); unpack_bf16x2(v.w, f + 6);
  }
  static __device__ __forceinline__ uint4 pack(const float* f) {
    return make_uint4(pack_bf16x2(f[0], f[1]), pack_bf16x2(f[2], f[3]),
                      pack_bf16x2(f[4], f[5]), pack_bf16x2(f[6], f[7]));
  }
};

template <> struct Vec<f16_t> {
  static constexpr int N = 8;
  static __device__ __forceinline__ void unpack(const uint4 v, float* f) {
    unpack_f16x2(v.x, f); unpack_f16x2(v.y, f + 2);
    unpack_f16x2(v.z, f + 4); unpack_f16x2(v.w, f + 6);
  }
  static __device__ __forceinline__ uint4 pack(const float* f) {
    return make_uint4(pack_f16x2(f[0], f[1]), pack_f16x2(f[2], f[3]),
                      pack_f16x2(f[4], f[5]), pack_f16x2(f[6], f[7]));
  }
};

// ---------------------------------------------------------------------------------------
// Launch parameters, passed by value. cupy_qknorm/compile.py builds the same layout as a
// numpy structured dtype and checks its size against kParamsBytes.
struct Params {
  const void* q;                       // [tokens, q_stride] rows, this rank's slice
  const void* k;
  void* q_out;                         // may equal q (in place)
  void* k_out;
  const void* q_weight;                // [local q width], T or float
  const void* k_weight;
  long long q_stride;                  // elements between rows
  long long k_stride;
  long long q_out_stride;
  long long k_out_stride;
  unsigned long long* slots[8];        // exchange buffer of every rank (slots[rank] is ours)
  unsigned int* counters;              // [max_tokens] uses of each token slot so far
  int* error;                          // device error record {code, peer, token, rank}
  int* error_host;                     // host-mapped copy of the record, or null
  float* sums;                         // [tokens, 2] sums of squares, unfused path only
  long long timeout_ns;                // <= 0: wait forever
  int tokens;                          // rows in this launch
  int max_tokens;                      // rows the exchange buffer holds per half
  int rank;
  float eps;
  float q_dim;                         // full (unsharded) widths, as divisors
  float k_dim;
};
constexpr int kParamsBytes = 208;
static_assert(sizeof(Params) == kParamsBytes, "Params layout is shared with compile.py");

constexpr int kErrorTimeout = 1;

// ---------------------------------------------------------------------------------------
// Exchange slots. Each rank owns slots[2][max_tokens][G] of 8 bytes: slot [h][t][r] holds
// rank r's (sum_q, sum_k) for token t. The value is its own flag: an empty slot holds the
// pair (-0.0f, -0.0f), which no sum of squares can be (sums start at +0.0 and add values
// >= +0.0; NaN has other bits), so zero rows, eps = 0, Inf and NaN all pass through.
// The reader resets a slot to empty after reading it. Consecutive uses of a token slot
// alternate halves (counters[t] & 1), so a peer that runs one call ahead writes the other
// half and never overwrites a value not yet read; it cannot run two calls ahead, since
// that needs our partial of the next call, written only after this launch finished.
constexpr unsigned long long kEmpty = 0x8000000080000000ull;

__device__ __forceinline__ unsigned long long load_volatile(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.volatile.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void store_volatile(unsigned long long* p, unsigned long long v) {
  asm volatile("st.volatile.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ unsigned long long pack_sums(float sq, float sk) {
  unsigned int lo = __float_as_uint(sq);
  if (lo == 0x80000000u) lo = 0u;  // never true for a sum of squares; keeps kEmpty unique
  return ((unsigned long long)__float_as_uint(sk) << 32) | lo;
}

// Marks the call as failed (first failure wins) in device memory and, if mapped, in host
// memory, where the host reads it without synchronizing.
__device__ void record_error(const Params& p, int code, int peer, int token) {
  if (atomicCAS(p.error, 0, code) != 0) return;
  p.error[1] = peer;
  p.error[2] = token;
  p.error[3] = p.rank;
  if (p.error_host != nullptr) {
    p.error_host[1] = peer;
    p.error_host[2] = token;
    p.error_host[3] = p.rank;
    __threadfence_system();
    *(volatile int*)p.error_host = code;
  }
}

// Spins until `slot` is written. Gives up (returns false) past the timeout, read from the
// GPU's own clock, or as soon as an earlier wait of this object failed.
__device__ bool wait_slot(unsigned long long* slot, const Params& p, int peer, int token,
                          unsigned long long& value) {
  value = load_volatile(slot);
  if (value != kEmpty) return true;
  const unsigned long long start = global_timer_ns();
  for (unsigned int spin = 1;; ++spin) {
    value = load_volatile(slot);
    if (value != kEmpty) return true;
    if ((spin & 63u) == 0) {
      if (*(volatile int*)p.error != 0) return false;
      if (p.timeout_ns > 0 && (long long)(global_timer_ns() - start) > p.timeout_ns) {
        record_error(p, kErrorTimeout, peer, token);
        return false;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// One token's row (its q slice and k slice) spread over the NT threads of a block: thread
// `tid` holds 16-byte vectors tid, tid + NT, ... of the concatenated [q | k] row, so each
// warp touches 512 contiguous bytes per step.
template <class T, class W, int DQ, int DK, int NT>
struct Row {
  static constexpr int N = Vec<T>::N;  // elements per 16-byte vector
  static_assert(DQ % N == 0 && DK % N == 0, "local widths must be whole 16-byte vectors");
  static constexpr int VQ = DQ / N;
  static constexpr int V = VQ + DK / N;
  static constexpr int NV = (V + NT - 1) / NT;  // vectors per thread
  static constexpr int WV = N * sizeof(W) / 16;  // 16-byte weight vectors per data vector

  uint4 x[NV];
  uint4 w[NV][WV];  // weights stay in registers across tokens

  static __device__ __forceinline__ bool valid(int j) { return threadIdx.x + j * NT < V; }
  static __device__ __forceinline__ bool is_q(int j) { return threadIdx.x + j * NT < VQ; }
  // element offset of vector j within its (q or k) slice
  static __device__ __forceinline__ int offset(int j) {
    const int i = threadIdx.x + j * NT;
    return (i < VQ ? i : i - VQ) * N;
  }

  __device__ __forceinline__ void load_weights(const Params& p) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      if (!valid(j)) continue;
      const W* base = static_cast<const W*>(is_q(j) ? p.q_weight : p.k_weight) + offset(j);
#pragma unroll
      for (int u = 0; u < WV; ++u) w[j][u] = reinterpret_cast<const uint4*>(base)[u];
    }
  }

  __device__ __forceinline__ void load(const Params& p, long long t) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      if (!valid(j)) continue;
      const T* src = is_q(j) ? static_cast<const T*>(p.q) + t * p.q_stride + offset(j)
                             : static_cast<const T*>(p.k) + t * p.k_stride + offset(j);
      x[j] = *reinterpret_cast<const uint4*>(src);
    }
  }

  // this thread's share of sum(q^2) and sum(k^2)
  __device__ __forceinline__ float2 sums() const {
    float2 s = make_float2(0.f, 0.f);
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      if (!valid(j)) continue;
      float f[N];
      Vec<T>::unpack(x[j], f);
      float a = 0.f;
#pragma unroll
      for (int e = 0; e < N; ++e) a = fmaf(f[e], f[e], a);
      if (is_q(j)) s.x += a; else s.y += a;
    }
    return s;
  }

  __device__ __forceinline__ void scale_store(const Params& p, long long t, float2 scale) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      if (!valid(j)) continue;
      float f[N], wf[N];
      Vec<T>::unpack(x[j], f);
#pragma unroll
      for (int u = 0; u < WV; ++u) Vec<W>::unpack(w[j][u], wf + u * Vec<W>::N);
      const float s = is_q(j) ? scale.x : scale.y;
#pragma unroll
      for (int e = 0; e < N; ++e) f[e] = f[e] * s * wf[e];
      T* dst = is_q(j) ? static_cast<T*>(p.q_out) + t * p.q_out_stride + offset(j)
                       : static_cast<T*>(p.k_out) + t * p.k_out_stride + offset(j);
      *reinterpret_cast<uint4*>(dst) = Vec<T>::pack(f);
    }
  }
};

__device__ __forceinline__ float2 warp_sum(float2 v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
  }
  return v;
}

// Sum over the block, in a fixed order. Every thread calls it; lane 0 of warp 0 gets it.
template <int WARPS>
__device__ __forceinline__ float2 block_sum(float2 v, float2* scratch) {
  v = warp_sum(v);
  if constexpr (WARPS == 1) return v;
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) scratch[warp] = v;
  __syncthreads();
  float2 s = make_float2(0.f, 0.f);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < WARPS; ++i) { s.x += scratch[i].x; s.y += scratch[i].y; }
  }
  return s;
}

__device__ __forceinline__ float2 inv_rms(const Params& p, float sq, float sk) {
  // IEEE division and square root: the scale matches the reference to one rounding
  return make_float2(1.0f / sqrtf(sq / p.q_dim + p.eps), 1.0f / sqrtf(sk / p.k_dim + p.eps));
}

// ---------------------------------------------------------------------------------------
// The fused kernel: per token, local sums -> push to every rank's slot -> wait for all G
// partials -> sum them in rank order (identical on every rank) -> scale and store.
// A persistent grid walks the tokens; every rank launches the same grid for the same call.
template <class T, class W, int G, int DQ, int DK, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) fused(const Params p) {
  constexpr int NT = WARPS * 32;
  using R = Row<T, W, DQ, DK, NT>;
  __shared__ float2 scratch[WARPS];
  __shared__ float2 scale_shared;
  __shared__ int ok_shared;
  R row;
  row.load_weights(p);
  const int lane = threadIdx.x & 31;
  for (long long t = blockIdx.x; t < p.tokens; t += gridDim.x) {
    unsigned int uses = 0;
    if (G > 1 && threadIdx.x == 0) uses = p.counters[t];
    row.load(p, t);
    const float2 part = block_sum<WARPS>(row.sums(), scratch);
    if (threadIdx.x < 32) {
      float sq = __shfl_sync(0xffffffffu, part.x, 0);
      float sk = __shfl_sync(0xffffffffu, part.y, 0);
      bool ok = true;
      if constexpr (G > 1) {
        uses = __shfl_sync(0xffffffffu, uses, 0);
        const long long base = ((long long)(uses & 1u) * p.max_tokens + t) * G;
        unsigned long long got = 0;
        if (lane < G) {
          unsigned long long* peer = nullptr;
#pragma unroll
          for (int r = 0; r < G; ++r) if (lane == r) peer = p.slots[r];
          unsigned long long* mine = nullptr;
#pragma unroll
          for (int r = 0; r < G; ++r) if (p.rank == r) mine = p.slots[r];
          store_volatile(peer + base + p.rank, pack_sums(sq, sk));
          ok = wait_slot(mine + base + lane, p, lane, (int)t, got);
          store_volatile(mine + base + lane, kEmpty);
        }
        ok = __all_sync(0xffffffffu, ok);
        sq = 0.f;
        sk = 0.f;
#pragma unroll
        for (int r = 0; r < G; ++r) {
          const unsigned long long v = __shfl_sync(0xffffffffu, got, r);
          sq += __uint_as_float((unsigned int)v);
          sk += __uint_as_float((unsigned int)(v >> 32));
        }
      }
      if (lane == 0) {
        scale_shared = inv_rms(p, sq, sk);
        ok_shared = ok;
        if (G > 1) p.counters[t] = uses + 1;
      }
    }
    __syncthreads();
    if (ok_shared) row.scale_store(p, t, scale_shared);
    // scratch, scale_shared and ok_shared are rewritten next token only after another
    // barrier that every thread reaches after reading them, so one barrier here suffices.
  }
}

// ---------------------------------------------------------------------------------------
// The unfused path: partial sums -> (NCCL or MPI all-reduce of sums[tokens, 2]) -> apply.
template <class T, int DQ, int DK, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) partial_sums(const Params p) {
  using R = Row<T, T, DQ, DK, WARPS * 32>;
  __shared__ float2 scratch[WARPS];
  R row;
  for (long long t = blockIdx.x; t < p.tokens; t += gridDim.x) {
    row.load(p, t);
    const float2 s = block_sum<WARPS>(row.sums(), scratch);
    if (threadIdx.x == 0) reinterpret_cast<float2*>(p.sums)[t] = s;
    if constexpr (WARPS > 1) __syncthreads();  // scratch is reused by the next token
  }
}

template <class T, class W, int DQ, int DK, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) apply(const Params p) {
  using R = Row<T, W, DQ, DK, WARPS * 32>;
  R row;
  row.load_weights(p);
  for (long long t = blockIdx.x; t < p.tokens; t += gridDim.x) {
    const float2 s = reinterpret_cast<const float2*>(p.sums)[t];
    row.load(p, t);
    row.scale_store(p, t, inv_rms(p, s.x, s.y));
  }
}

}  // namespace qknorm
