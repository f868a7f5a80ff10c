// Stand-ins for the few sgl_kernel helpers that SGLang's fused TP QK norm kernel uses
// (python/sglang/jit_kernel/csrc/distributed/tp_qknorm.cuh), so that
// scripts/compare_sglang.py can build that kernel standalone with NVRTC: no torch, no
// tvm-ffi, no CUDA headers. Written here from what the kernel calls; no SGLang code is in
// this file, and the kernel itself is read from the user's SGLang checkout at run time.
// bf16 only (the benchmarked dtype).
#pragma once

typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef long long intptr_t;

#define SGL_DEVICE __device__ __forceinline__

namespace std {
constexpr bool has_single_bit(unsigned x) { return x != 0 && (x & (x - 1)) == 0; }
}  // namespace std

struct sgl_bf16 { unsigned short bits; };
struct __align__(4) sgl_bf16x2 { unsigned int bits; };
template <class T> struct packed;
template <> struct packed<sgl_bf16> { using type = sgl_bf16x2; };
template <class T> using packed_t = typename packed<T>::type;
using fp32x2_t = float2;

namespace host {
constexpr uint32_t div_ceil(uint32_t a, uint32_t b) { return (a + b - 1) / b; }
}  // namespace host

namespace device {
constexpr uint32_t kWarpThreads = 32;

template <class To, class From> SGL_DEVICE To cast(const From& v);
template <> SGL_DEVICE float2 cast<float2, sgl_bf16x2>(const sgl_bf16x2& v) {
  return make_float2(__uint_as_float(v.bits << 16), __uint_as_float(v.bits & 0xffff0000u));
}
template <> SGL_DEVICE sgl_bf16x2 cast<sgl_bf16x2, float2>(const float2& f) {
  unsigned int r;  // round to nearest even; .x goes to the low half (the first element)
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(f.y), "f"(f.x));
  return sgl_bf16x2{r};
}

// N values of T as one aligned vector; load/store take the index of the vector in memory.
template <class T, unsigned N>
struct alignas(sizeof(T) * N) AlignedVector {
  T data[N];
  SGL_DEVICE T& operator[](unsigned i) { return data[i]; }
  SGL_DEVICE const T& operator[](unsigned i) const { return data[i]; }
  SGL_DEVICE void load(const void* p, int64_t i) {
    *this = static_cast<const AlignedVector*>(p)[i];
  }
  SGL_DEVICE void store(void* p, int64_t i) const { static_cast<AlignedVector*>(p)[i] = *this; }
  SGL_DEVICE void fill(T v) {
#pragma unroll
    for (unsigned i = 0; i < N; ++i) data[i] = v;
  }
};

namespace pointer {
template <class T = char> SGL_DEVICE void* offset(void* p, int64_t n) {
  return static_cast<T*>(p) + n;
}
template <class T = char> SGL_DEVICE const void* offset(const void* p, int64_t n) {
  return static_cast<const T*>(p) + n;
}
}  // namespace pointer

namespace warp {
// butterfly sum over the first N lanes (N a power of two): every one of them gets it
template <uint32_t N = kWarpThreads>
SGL_DEVICE float reduce_sum(float v, unsigned mask = 0xffffffffu) {
#pragma unroll
  for (uint32_t o = N / 2; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o);
  return v;
}
}  // namespace warp

namespace math {
SGL_DEVICE float rsqrt(float x) { return rsqrtf(x); }
}  // namespace math

template <bool kUse> SGL_DEVICE void PDLWaitPrimary() {
  if constexpr (kUse) asm volatile("griddepcontrol.wait;" ::: "memory");
}
template <bool kUse> SGL_DEVICE void PDLTriggerSecondary() {
  if constexpr (kUse) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

namespace distributed {
inline constexpr uint32_t kMaxNumGPU = 8;

// One 128-byte record per block index, in local memory: word 1 is the block's epoch
// (which half of the push buffer its tokens use), flipped once per call by every index,
// by the block itself (exit) or by a clean-up block for indices the grid did not reach.
struct alignas(128) Semaphore {
  uint32_t flag;
  uint32_t counter;
};

struct PushController {
  static constexpr uint32_t kNumStages = 2;
  Semaphore* signal;
  SGL_DEVICE uint32_t epoch() const { return signal[blockIdx.x].counter; }
  SGL_DEVICE void exit() const {
    __syncthreads();
    if (threadIdx.x == 0) exit_unsafe(blockIdx.x);
  }
  SGL_DEVICE void exit_unsafe(uint32_t i) const {
    signal[i].counter = (signal[i].counter + 1) % kNumStages;
  }
};
}  // namespace distributed
}  // namespace device
