// Element types and the 16-byte vectors every kernel loads and stores, as floats.
// No CUDA headers: the 16-bit conversions are PTX, so NVRTC compiles this with no include
// path and no GPU (the CI compile test relies on that).
#pragma once

namespace qknorm {

// bf16 and fp16 values travel as 16-bit patterns; the tags pick the conversions.
struct bf16_t { unsigned short bits; };
struct f16_t { unsigned short bits; };

// Two 16-bit values packed in a 32-bit word <-> two floats, low half first.
template <class Elem> struct Cvt2;

template <> struct Cvt2<bf16_t> {
  static __device__ __forceinline__ void unpack(unsigned int w, float* f) {
    f[0] = __uint_as_float(w << 16);
    f[1] = __uint_as_float(w & 0xffff0000u);
  }
  static __device__ __forceinline__ unsigned int pack(float lo, float hi) {
    unsigned int r;  // round to nearest even, NaN stays NaN (sm_80+)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
};

template <> struct Cvt2<f16_t> {
  static __device__ __forceinline__ void unpack(unsigned int w, float* f) {
    unsigned short lo = (unsigned short)(w & 0xffffu), hi = (unsigned short)(w >> 16);
    asm("cvt.f32.f16 %0, %1;" : "=f"(f[0]) : "h"(lo));
    asm("cvt.f32.f16 %0, %1;" : "=f"(f[1]) : "h"(hi));
  }
  static __device__ __forceinline__ unsigned int pack(float lo, float hi) {
    unsigned int r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
};

// fp32 -> fp64, exact for subnormals too: CuPy builds every kernel with -ftz=true, which
// makes the compiler's conversion (cvt.ftz.f64.f32) flush them to zero; inline PTX keeps
// its own instruction.
__device__ __forceinline__ double widen(float x) {
  double d;
  asm("cvt.f64.f32 %0, %1;" : "=d"(d) : "f"(x));
  return d;
}

// 16 bytes of Elem <-> kElems floats: eight 16-bit values (bf16_t, f16_t), or four floats.
template <class Elem>
struct Vec {
  static constexpr int kElems = 8;
  static __device__ __forceinline__ void unpack(const uint4 v, float* f) {
    Cvt2<Elem>::unpack(v.x, f); Cvt2<Elem>::unpack(v.y, f + 2);
    Cvt2<Elem>::unpack(v.z, f + 4); Cvt2<Elem>::unpack(v.w, f + 6);
  }
  static __device__ __forceinline__ uint4 pack(const float* f) {
    return make_uint4(Cvt2<Elem>::pack(f[0], f[1]), Cvt2<Elem>::pack(f[2], f[3]),
                      Cvt2<Elem>::pack(f[4], f[5]), Cvt2<Elem>::pack(f[6], f[7]));
  }
};

template <> struct Vec<float> {
  static constexpr int kElems = 4;
  static __device__ __forceinline__ void unpack(const uint4 v, float* f) {
    f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
  }
  static __device__ __forceinline__ uint4 pack(const float* f) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]),
                      __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

}  // namespace qknorm
