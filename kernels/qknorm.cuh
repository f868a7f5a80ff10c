// Tensor-parallel QK RMSNorm, with RoPE after it or not: header-only device code.
//
//   out = round(rope(x * w / sqrt(sum over all ranks of sum(x^2) / full_width + eps)))
//
// for q and k of every token, where each of G ranks holds a contiguous slice of the row
// (whole heads, with RoPE), rounded once.
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
// Launch parameters, passed by value. The Python side builds the same layout and checks
// its size against kParamsBytes. The first 96 bytes (q .. position_bytes) are what the
// host repacks for each launch; the rest is packed once.
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
  const void* positions;               // RoPE: [tokens] int32 or int64 position of each row
  int tokens;                          // rows in this launch
  int position_bytes;                  // RoPE: 4 or 8
  uint4* slots[8];                     // exchange buffer of every rank (slots[rank] is ours)
  unsigned int* counters;              // [max_tokens] uses of each token slot so far
  int* error;                          // device error record, kErrorWords ints
  int* error_host;                     // host-mapped copy of the record, or null
  float* sums;                         // unfused path: kSumsHeader floats, then [tokens, 2]
  const float* cos_sin;                // RoPE: [max_position, ROT]: cos, then sin
  long long timeout_ns;                // <= 0: wait forever
  int max_tokens;                      // rows the exchange buffer holds per half
  int rank;
  float eps;
  float q_dim;                         // full (unsharded) widths, as divisors
  float k_dim;
  int max_position;                    // RoPE: rows of cos_sin
};
constexpr int kParamsBytes = 232;
static_assert(sizeof(Params) == kParamsBytes, "Params layout is shared with the host");

// Error record: {code, peer, token, rank, peer's value, our value, 0, lock}. The codes and
// words 0-5 are read by the host; word 7 is the device's own (record_error's lock) and
// starts at 0 like the rest.
constexpr int kErrorWords = 8;
constexpr int kErrorTimeout = 1;   // the peer's partial sums never came
constexpr int kErrorTokens = 2;    // the peer launched with another token count
constexpr int kErrorSequence = 3;  // the peer's slot holds another use of this token
constexpr int kErrorPosition = 4;  // a row's position is outside [0, max_position)
constexpr int kErrorRejected = 5;  // the peer's host rejected its input (qknorm::reject)
constexpr int kErrorLock = 7;

// ---------------------------------------------------------------------------------------
// Exchange slots. Each rank owns slots[2][max_tokens][G] of 16 bytes: slot [h][t][r] holds
// rank r's {sum_q, sum_k, tokens in its launch, use number of token t} for token t.
// The value is its own flag, word by word: an empty word holds 0x80000000, which no word
// of a written slot can hold (the sums are sums of squares: +0.0 or more, or NaN with other
// bits, never -0.0; token counts and use numbers stay below 2^31). So zero rows, eps = 0,
// Inf and NaN all pass through, and a slot read while its 16-byte store lands part by part
// is simply read again. The reader resets a slot to empty after reading it. Consecutive
// uses of a token slot alternate halves (counters[t] & 1), so a peer that runs one call
// ahead writes the other half and never overwrites a value not yet read; it cannot run two
// calls ahead, since that needs our partial of the next call, written only after this
// launch finished. The token count and the use number let a reader see a peer that
// launched something else (T differs between ranks) instead of mixing two calls.
constexpr unsigned int kEmptyWord = 0x80000000u;
// The token count of a slot that qknorm::reject pushes: a rank whose host rejected its
// input says so in token 0's slot, where its peers wait, instead of leaving them to their
// timeout. No launch has that many tokens.
constexpr unsigned int kRejectTokens = 0x7ffffffeu;

__device__ __forceinline__ unsigned long long load_volatile(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.volatile.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void store_volatile(unsigned long long* p, unsigned long long v) {
  asm volatile("st.volatile.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ uint4 load_volatile(const uint4* p) {
  uint4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void store_volatile(uint4* p, uint4 v) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};"
               ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}
__device__ __forceinline__ bool complete(const uint4 v) {
  return v.x != kEmptyWord && v.y != kEmptyWord && v.z != kEmptyWord && v.w != kEmptyWord;
}
__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint4 make_slot(float sq, float sk, int tokens, unsigned int uses) {
  unsigned int q = __float_as_uint(sq), k = __float_as_uint(sk);
  if (q == kEmptyWord) q = 0u;  // never true for a sum of squares; keeps the marker unique
  if (k == kEmptyWord) k = 0u;
  return make_uint4(q, k, (unsigned int)tokens, uses & 0x7fffffffu);
}

// Programmatic dependent launch (sm_90+): the host launches the fused kernel with the
// programmatic-serialization attribute, so it may start while the previous kernel of the
// stream is still running. Nothing before grid_dependency_wait() may read memory that an
// earlier kernel writes; after it, everything of the previous kernel is visible.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Asynchronous copies global -> shared (sm_80+), 16 bytes each, through L2 only. A thread
// waits for its own copies (by commit group) and then reads what it copied itself, so no
// other thread's barrier is involved. An empty group (a commit with no copy) is legal and
// keeps the group count of every phase the same.
__device__ __forceinline__ void copy_async16(void* dst_shared, const void* src) {
  const unsigned int dst = static_cast<unsigned int>(__cvta_generic_to_shared(dst_shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
// Asks L2 for the 128-byte line holding `p` (no register waits for it).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}
__device__ __forceinline__ void copy_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int PENDING>  // waits until at most PENDING of this thread's newest groups are left
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
}

// Marks the call as failed in device memory and, if mapped, in host memory, where the host
// reads it without synchronizing. The first failure wins, except that a failure of the
// exchange takes the record over from a position error: a position error leaves the
// exchange in step, any other failure does not, and the host must learn that. So the
// record has two owners at most; a lock keeps their words from mixing, and an owner that
// finds the code no longer its own writes nothing.
__device__ void record_error(const Params& p, int code, int peer, int token, int theirs,
                             int ours) {
  int old = atomicCAS(p.error, 0, code);
  if (old == kErrorPosition && code != kErrorPosition)
    old = atomicCAS(p.error, kErrorPosition, code) == kErrorPosition ? 0 : old;
  if (old != 0) return;
  while (atomicCAS(p.error + kErrorLock, 0, 1) != 0) {}
  if (*(volatile int*)p.error == code) {
    const int words[kErrorLock] = {code, peer, token, p.rank, theirs, ours, 0};
#pragma unroll
    for (int i = 1; i < kErrorLock; ++i) p.error[i] = words[i];
    if (p.error_host != nullptr) {
#pragma unroll
      for (int i = 1; i < kErrorLock; ++i) p.error_host[i] = words[i];
      __threadfence_system();
      *(volatile int*)p.error_host = code;
    }
  }
  __threadfence();
  atomicExch(p.error + kErrorLock, 0);
}

// Whether the exchange already failed on this rank (any recorded error but a position one).
__device__ __forceinline__ bool exchange_failed(const Params& p) {
  const int code = *(volatile int*)p.error;
  return code != 0 && code != kErrorPosition;
}

// Spins until every word of `slot` is written. Gives up (returns false) past the timeout,
// read from the GPU's own clock, or as soon as the exchange failed elsewhere.
__device__ bool wait_slot(const uint4* slot, const Params& p, int peer, int token,
                          uint4& value) {
  value = load_volatile(slot);
  if (complete(value)) return true;
  const unsigned long long start = global_timer_ns();
  for (unsigned int spin = 1;; ++spin) {
    value = load_volatile(slot);
    if (complete(value)) return true;
    if ((spin & 63u) == 0) {
      if (exchange_failed(p)) return false;
      if (p.timeout_ns > 0 && (long long)(global_timer_ns() - start) > p.timeout_ns) {
        record_error(p, kErrorTimeout, peer, token, 0, 0);
        return false;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// One token's row (its q slice and k slice) spread over the NT threads of a block: thread
// `tid` holds slots j = 0 .. NV - 1, slot j being 16-byte vector tid + j NT of the
// concatenated [q | k] row (the plain layout), so each warp touches 512 contiguous bytes
// per step. A slot is valid where tid + j NT < V, in every layout.
//
// With D > 0 (the paired layout, for NeoX RoPE: a head is HV vectors, of which [0, D)
// rotate with [D, 2D) and the rest pass through), the slots are the same but the vectors
// behind them are permuted so that a thread holds both halves of a rotated pair: in slots
// 2b and 2b + 1, lanes tid < lanes(b) hold pair number b NT + tid (head pair / D, place
// pair % D), its lower half, then its upper half; every other valid slot holds the
// pass-through vectors in order. A warp's lanes of one slot cover runs of D (pairs) or
// HV - 2D (pass) vectors within heads: for MiniMax's bf16 heads 64 and 128 bytes, whole
// 32-byte sectors.
template <class T_, int DQ, int DK, int NT_, int HV = 0, int D = 0>
struct Layout {
  using T = T_;
  static constexpr int NT = NT_;
  static constexpr int N = Vec<T>::N;  // elements per 16-byte vector
  static_assert(DQ % N == 0 && DK % N == 0, "local widths must be whole 16-byte vectors");
  static constexpr int VQ = DQ / N;
  static constexpr int V = VQ + DK / N;
  static constexpr int NV = (V + NT - 1) / NT;  // vectors per thread
  static constexpr bool kPaired = D > 0;
  static constexpr int kPairs = kPaired ? V / (HV > 0 ? HV : 1) * D : 0;
  static constexpr int kPassPerHead = HV - 2 * D > 0 ? HV - 2 * D : 1;

  // pair lanes of slot pair b: up to NT, while pairs are left, where slot 2b + 1 is valid
  __host__ __device__ static constexpr int lanes(int b) {
    if (2 * b + 1 >= NV) return 0;
    int n = kPairs - b * NT;
    n = n < NT ? n : NT;
    const int room = V - (2 * b + 1) * NT;
    n = n < room ? n : room;
    return n > 0 ? n : 0;
  }
  // pass-through vectors in the slots before j: their valid lanes less their pair lanes
  __host__ __device__ static constexpr int pass_before(int j) {
    const int valid_before = j * NT < V ? j * NT : V;
    const int pairs_before = 2 * (kPairs < j / 2 * NT ? kPairs : j / 2 * NT);
    return valid_before - pairs_before - (j % 2 ? lanes(j / 2) : 0);
  }
  // Every pair placed, and the vector behind a slot a per-thread base plus a constant of
  // the slot: a pair's place in its head is tid % D (NT % D == 0), and every slot's run
  // of pass-through vectors starts at a multiple of a head's pass-through vectors.
  __host__ __device__ static constexpr bool fits() {
    if (!kPaired || V % HV != 0 || NT % (D > 0 ? D : 1) != 0) return false;
    int placed = 0;
    for (int j = 0; j < NV; ++j) {
      if (j % 2 == 0) placed += lanes(j / 2);
      if (lanes(j / 2) % kPassPerHead != 0 || pass_before(j) % kPassPerHead != 0) return false;
    }
    return placed == kPairs;
  }
  static constexpr bool kFits = !kPaired || fits();

  static __device__ __forceinline__ bool valid(int j) { return threadIdx.x + j * NT < V; }
  // the paired layout: whether slot j of this thread holds half of a rotated pair
  static __device__ __forceinline__ bool paired(int j) {
    return kPaired && (int)threadIdx.x < lanes(j / 2);
  }
  // vector index (in the [q | k] row) behind slot j of thread tid
  __host__ __device__ static constexpr int index_of(unsigned tid, int j) {
    if constexpr (!kPaired) {
      return (int)tid + j * NT;
    } else {
      // pair j / 2 NT + tid, or pass-through vector pass_before(j) + tid - lanes
      constexpr int P = kPassPerHead;
      const int here = lanes(j / 2);
      const int in_pair = (int)(tid / D * HV + tid % D) + j / 2 * (NT / D) * HV + j % 2 * D;
      const int in_pass = (int)(tid / P * HV + tid % P) + (pass_before(j) - here) / P * HV +
                          2 * D;
      return (int)tid < here ? in_pair : in_pass;
    }
  }
  static __device__ __forceinline__ int index(int j) { return index_of(threadIdx.x, j); }

  // Checked by the compiler for every paired layout it builds: the valid slots of all
  // threads hold every vector of the row once; a pair lane's slots 2b and 2b + 1 are both
  // valid and hold a pair's lower and upper half, at place tid % D of its head (where
  // Rope::load reads the angles); every other slot holds a vector that is not rotated.
  __host__ __device__ static constexpr bool one_to_one() {
    constexpr int H = HV > 0 ? HV : 1;  // (instantiated for the plain layout too)
    bool seen[V] = {};
    for (int tid = 0; tid < NT; ++tid) {
      for (int j = 0; j < NV; ++j) {
        if (tid + j * NT >= V) continue;
        const int i = index_of(tid, j);
        if (i < 0 || i >= V || seen[i]) return false;
        seen[i] = true;
        const bool pair = tid < lanes(j / 2);
        if (pair && j % 2 == 0 &&
            (i % H != tid % (D > 0 ? D : 1) || tid + (j + 1) * NT >= V ||
             index_of(tid, j + 1) != i + D))
          return false;
        if (!pair && i % H < 2 * D) return false;
      }
    }
    return true;
  }
  static_assert(!kPaired || !kFits || one_to_one(), "the paired layout misplaces a vector");
  static __device__ __forceinline__ bool is_q(int j) { return index(j) < VQ; }
  // whether any lane of this thread's warp holds a vector j: a warp's 32 slots of one j
  // are consecutive, so with V a multiple of 32 they are all in the row or none is
  static __device__ __forceinline__ bool warp_valid(int j) {
    if constexpr (V % 32 == 0) return valid(j);
    return (int)(threadIdx.x & ~31u) + j * NT < V;
  }
  // element offset of vector j within its (q or k) slice
  static __device__ __forceinline__ int offset(int j) {
    const int i = index(j);
    return (i < VQ ? i : i - VQ) * N;
  }
};

// This thread's weights, kept in registers across tokens.
template <class W, class L>
struct Weights {
  static constexpr int WV = L::N * sizeof(W) / 16;  // 16-byte weight vectors per data vector
  uint4 w[L::NV][WV];

  __device__ __forceinline__ void load(const Params& p) {
#pragma unroll
    for (int j = 0; j < L::NV; ++j) {
      if (!L::valid(j)) continue;
      const W* base = static_cast<const W*>(L::is_q(j) ? p.q_weight : p.k_weight) +
                      L::offset(j);
#pragma unroll
      for (int u = 0; u < WV; ++u) w[j][u] = reinterpret_cast<const uint4*>(base)[u];
    }
  }
};

// ---------------------------------------------------------------------------------------
// Rotary position embedding after the norm. Head h of a full row is its elements
// [h HEAD, (h + 1) HEAD); the first ROT elements of every head of q and of k rotate by the
// angles of the token's position, the rest pass through. With H = ROT / 2:
//   NeoX (rotate-half): y[i] = x[i] c_i - x[i+H] s_i,   y[i+H] = x[i+H] c_i + x[i] s_i
//   GPT-J (pairs):      y[2i] = x[2i] c_i - x[2i+1] s_i, y[2i+1] = x[2i+1] c_i + x[2i] s_i
// for i < H, with c_i = cos_sin[pos][i] and s_i = cos_sin[pos][H + i]. x is the
// normalized value in fp32, and y is rounded once. Each rank's slices hold whole heads, so a
// vector's place in its head is its index in the slice mod HEAD / N. A GPT-J pair sits in
// one vector. A NeoX pair sits ROT / 2N vectors apart: in the paired layout (Layout with
// D > 0, see LayoutFor) in two slots of one thread; otherwise in two lanes of one warp
// (VQ and NT are multiples of the head's vectors, so a vector's place is a lane's, and the
// rotated vectors of a head are 32 or fewer, within one aligned run of 32).
constexpr int kRopeNone = 0, kRopeNeox = 1, kRopeGptj = 2;

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

// Row t's position was out of range: nothing of the row is stored.
__device__ void record_position_error(const Params& p, long long t) {
  const PositionWords w = load_position(p, t);
  int pos = w.lo;  // the position clamped to int range
  if (p.position_bytes == 8 && w.hi != (w.lo >> 31))
    pos = w.hi < 0 ? -2147483647 - 1 : 2147483647;
  record_error(p, kErrorPosition, -1, (int)t, pos, p.max_position);
}

template <int K>  // K floats from 8-byte (K = 2) or 16-byte (K % 4 == 0) aligned memory
__device__ __forceinline__ void load_floats(const float* src, float* dst) {
  if constexpr (K % 4 == 0) {
#pragma unroll
    for (int i = 0; i < K / 4; ++i) {
      const float4 v = reinterpret_cast<const float4*>(src)[i];
      dst[4 * i] = v.x; dst[4 * i + 1] = v.y; dst[4 * i + 2] = v.z; dst[4 * i + 3] = v.w;
    }
  } else {
    static_assert(K == 2, "two floats, or a multiple of four");
    const float2 v = *reinterpret_cast<const float2*>(src);
    dst[0] = v.x; dst[1] = v.y;
  }
}

// The angles of one token for this thread's rotated vectors, and the rotation itself.
template <class L, int HEAD, int ROT, int STYLE>
struct Rope {
  static constexpr int NT = L::NT;
  static constexpr int N = L::N;
  static constexpr bool kOn = true;
  // NeoX in the paired layout: both halves of a pair in this thread's slots 2b and 2b + 1
  static constexpr bool kPaired = L::kPaired;
  static constexpr bool kExchange = STYLE == kRopeNeox && !kPaired;  // pairs span two lanes
  static constexpr int HV = HEAD / N;  // vectors a head
  static constexpr int RV = ROT / N;   // rotated vectors a head
  static constexpr int D = RV / 2;     // NeoX: vectors between the two elements of a pair
  static constexpr int CN = STYLE == kRopeNeox ? N : N / 2;  // cos (and sin) values a vector
  static_assert(STYLE == kRopeNeox || STYLE == kRopeGptj, "STYLE: 1 NeoX, 2 GPT-J");
  static_assert(HEAD > 0 && HEAD % N == 0, "a head is whole 16-byte vectors");
  static_assert(L::VQ * N % HEAD == 0 && (L::V - L::VQ) * N % HEAD == 0,
                "each rank's slices hold whole heads");
  static_assert(ROT > 0 && ROT % 2 == 0 && ROT <= HEAD, "0 < ROT <= HEAD, ROT even");
  static_assert(ROT % (STYLE == kRopeNeox ? 2 * N : N) == 0,
                "rotated elements are whole vectors (NeoX: both halves)");
  static_assert(kPaired || 32 % HV == 0 || HV % 32 == 0,
                "a head's vectors divide 32 or are a multiple");
  static_assert(!kExchange || RV <= 32, "NeoX: a head's rotated vectors fit one warp's 32");
  // Every vector of a thread has the same place in its head when NT is a multiple of a
  // head's vectors (always, for heads of 32 vectors or fewer). Otherwise (a head of 64 or
  // more vectors) vector j's place is 32 k + lane for some k that depends on j, and it is
  // rotated only for k = 0 when the rotated vectors are 32 or fewer. Either way one set
  // of angles serves all of a thread's rotated vectors.
  static constexpr bool kUniform = NT % HV == 0;
  static_assert(kPaired || kUniform || RV <= 32, "at most 32 rotated vectors a head, or NT a "
                                                "multiple of a head's vectors");

  // Per token, between load() and push() the position's words, from push() to finish()
  // the row of cos_sin (-1: out of range).
  struct Token {
    PositionWords words;
    int row;
  };

  float c[CN], s[CN];

  static __device__ __forceinline__ int place(int j) {  // vector j's index in its head
    return (int)(threadIdx.x + (kUniform ? 0 : j * NT)) % HV;
  }
  static __device__ __forceinline__ bool rotated(int j) {
    if constexpr (kPaired) return L::paired(j);
    return place(j) < RV;
  }

  // Brings cos_sin row `row` (ROT floats) into L2, one line a thread of the first few, so
  // that load() a phase later finds it there: positions are arbitrary, and with a table
  // larger than L2 (MiniMax's is 48 MiB) a row read from memory at finish() was a DRAM
  // latency on every token's path.
  static __device__ __forceinline__ void prefetch(const Params& p, int row) {
    constexpr int kLines = (ROT * 4 + 127) / 128 + 1;  // + 1: a row need not start a line
    if (row >= 0 && threadIdx.x < kLines)
      prefetch_l2(p.cos_sin + (long long)row * ROT + min((int)threadIdx.x * 32, ROT - 1));
  }

  // Issues the loads of this thread's angles at cos_sin row `row`; nothing waits for them.
  // Every thread loads, with no branch (a branch around the loads cost the narrow layout
  // 12 registers): a lane with no rotated vector reads its warp's first angles, and a row
  // out of range (-1: nothing of it is stored) reads row 0, so no read leaves the table.
  // NeoX: a lane of the lower half keeps -sin (its partner's term is subtracted), so that
  // rotate() is two multiply-adds an element with no select.
  // Paired: every pair of a thread sits at place tid % D of its head (NT % D == 0).
  __device__ __forceinline__ void load(const Params& p, int row) {
    const int m = kPaired ? (int)threadIdx.x % D : kUniform ? place(0) : (int)(threadIdx.x & 31);
    const int first = kPaired ? m * N
                      : m >= RV ? 0 : kExchange ? (m < D ? m : m - D) * N : m * (N / 2);
    const float* at = p.cos_sin + (long long)(row < 0 ? 0 : row) * ROT + first;
    load_floats<CN>(at, c);
    load_floats<CN>(at + ROT / 2, s);
    if constexpr (kExchange) {
      if (lower()) {
#pragma unroll
        for (int e = 0; e < CN; ++e) s[e] = -s[e];
      }
    }
  }

  // NeoX: whether this lane's rotated vectors are in the first half of the rotation (a
  // lane's place in its head, from the lane alone: heads of fewer than 32 vectors tile
  // the warp; a longer head's rotated vectors are its first 32).
  static __device__ __forceinline__ bool lower() {
    const int lane = threadIdx.x & 31;
    return (HV < 32 ? lane % HV : lane) < D;
  }

  // Paired: rotates a pair held by this thread, its lower half lo and upper half hi (the
  // normalized values of slots 2b and 2b + 1) in place.
  __device__ __forceinline__ void rotate_pair(float* lo, float* hi) const {
#pragma unroll
    for (int e = 0; e < N; ++e) {
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
      const int from = lower() ? lane + D : lane - D;  // in the warp for every lane
      float g[N];
#pragma unroll
      for (int e = 0; e < N; ++e) g[e] = __shfl_sync(0xffffffffu, f[e], from);
      if (on) {
#pragma unroll
        for (int e = 0; e < N; ++e) f[e] = fmaf(g[e], s[e], f[e] * c[e]);  // s signed
      }
    } else {
      if (on) {
#pragma unroll
        for (int i = 0; i < N / 2; ++i) {
          const float x0 = f[2 * i], x1 = f[2 * i + 1];
          f[2 * i] = fmaf(-x1, s[i], x0 * c[i]);
          f[2 * i + 1] = fmaf(x0, s[i], x1 * c[i]);
        }
      }
    }
  }
};

template <class L, int HEAD, int ROT>
struct Rope<L, HEAD, ROT, kRopeNone> {  // the norm alone
  static_assert(HEAD == 0 && ROT == 0, "no rotary embedding: HEAD = ROT = 0");
  static constexpr bool kOn = false;
  static constexpr bool kExchange = false;
  static constexpr bool kPaired = false;
  struct Token {};
};

// The arithmetic on this thread's part of one token's row, wherever the row is held:
// `get(j)` returns its vector j (a register, or a read of shared memory).
template <class L>
struct RowMath {
  using T = typename L::T;
  static constexpr int N = L::N;

  static __device__ __forceinline__ const void* source(const Params& p, long long t, int j) {
    return L::is_q(j) ? static_cast<const void*>(static_cast<const T*>(p.q) + t * p.q_stride +
                                                 L::offset(j))
                      : static_cast<const void*>(static_cast<const T*>(p.k) + t * p.k_stride +
                                                 L::offset(j));
  }

  // this thread's share of sum(q^2) and sum(k^2)
  template <class Get>
  static __device__ __forceinline__ float2 sums(const Get& get) {
    float2 s = make_float2(0.f, 0.f);
#pragma unroll
    for (int j = 0; j < L::NV; ++j) {
      if (!L::valid(j)) continue;
      float f[N];
      Vec<T>::unpack(get(j), f);
      float a = 0.f;
#pragma unroll
      for (int e = 0; e < N; ++e) a = fmaf(f[e], f[e], a);
      if (L::is_q(j)) s.x += a; else s.y += a;
    }
    return s;
  }

  // Scales, weights, rotates (Ro: a Rope, or the empty one of kRopeNone) and stores the row.
  template <class W, class Ro, class Get>
  static __device__ __forceinline__ void scale_store(const Params& p, long long t,
                                                     float2 scale,
                                                     const Weights<W, L>& wt,
                                                     const Ro& rope, const Get& get) {
    constexpr int WV = Weights<W, L>::WV;
    auto scaled = [&](int j, float* f) {  // slot j's normalized values
      float wf[N];
      Vec<T>::unpack(get(j), f);
#pragma unroll
      for (int u = 0; u < WV; ++u) Vec<W>::unpack(wt.w[j][u], wf + u * Vec<W>::N);
      const float s = L::is_q(j) ? scale.x : scale.y;
#pragma unroll
      for (int e = 0; e < N; ++e) f[e] = f[e] * s * wf[e];
    };
#pragma unroll
    for (int j = 0; j < L::NV; ++j) {
      if constexpr (Ro::kPaired) {  // slots 2b and 2b + 1 together: a pair is both
        if (j % 2 == 1) continue;
        if (j + 1 < L::NV) {
          float lo[N], hi[N];
          const bool v0 = L::valid(j), v1 = L::valid(j + 1);
          if (v0) scaled(j, lo);
          if (v1) scaled(j + 1, hi);
          if (L::paired(j)) rope.rotate_pair(lo, hi);  // a pair's two slots are valid
          if (v0) store(p, t, j, lo);
          if (v1) store(p, t, j + 1, hi);
          continue;
        }
      }
      // a NeoX rotation across lanes needs every lane of the warp, even one past the row
      if (Ro::kExchange ? !L::warp_valid(j) : !L::valid(j)) continue;
      float f[N];
      scaled(j, f);
      if constexpr (Ro::kOn) {
        rope.rotate(j, f);
        if (Ro::kExchange && !L::valid(j)) continue;
      }
      store(p, t, j, f);
    }
  }

  static __device__ __forceinline__ void store(const Params& p, long long t, int j,
                                               const float* f) {
    T* dst = L::is_q(j) ? static_cast<T*>(p.q_out) + t * p.q_out_stride + L::offset(j)
                        : static_cast<T*>(p.k_out) + t * p.k_out_stride + L::offset(j);
    *reinterpret_cast<uint4*>(dst) = Vec<T>::pack(f);
  }
};

// This thread's part of one token's row, held in registers.
template <class L>
struct Row {
  using T = typename L::T;
  static constexpr int NT = L::NT;
  using M = RowMath<L>;
  uint4 x[L::NV];

  __device__ __forceinline__ void load(const Params& p, long long t) {
#pragma unroll
    for (int j = 0; j < L::NV; ++j)
      if (L::valid(j)) x[j] = *static_cast<const uint4*>(M::source(p, t, j));
  }
  static __device__ __forceinline__ void skip() {}  // no row to load in this phase
  template <int PENDING>
  __device__ __forceinline__ void ready() const {}  // a register load is waited for on use
  __device__ __forceinline__ float2 sums() const {
    return M::sums([&](int j) { return x[j]; });
  }
  template <class W, class Ro>
  __device__ __forceinline__ void scale_store(const Params& p, long long t, float2 scale,
                                              const Weights<W, L>& wt,
                                              const Ro& rope) const {
    M::scale_store(p, t, scale, wt, rope, [&](int j) { return x[j]; });
  }
};

// This thread's part of one token's row, held in shared memory: vector j at at[j * NT],
// copied there asynchronously, so a block keeps several rows' loads in flight for the
// price of shared memory, not registers. Each load is one commit group; ready<P>() waits
// for this row's group while the P groups committed after it may still be in flight. A
// stage is refilled only after the same thread's last reads of it have returned: their
// values went into the stores of finish(), issued before the next load of the stage.
template <class L>
struct StagedRow {
  using T = typename L::T;
  static constexpr int NT = L::NT;
  using M = RowMath<L>;
  uint4* at;  // this thread's first vector in the row's stage

  __device__ __forceinline__ void load(const Params& p, long long t) {
#pragma unroll
    for (int j = 0; j < L::NV; ++j)
      if (L::valid(j)) copy_async16(at + j * NT, M::source(p, t, j));
    copy_async_commit();
  }
  static __device__ __forceinline__ void skip() { copy_async_commit(); }
  template <int PENDING>
  __device__ __forceinline__ void ready() const { copy_async_wait<PENDING>(); }
  __device__ __forceinline__ float2 sums() const {
    return M::sums([&](int j) { return at[j * NT]; });
  }
  template <class W, class Ro>
  __device__ __forceinline__ void scale_store(const Params& p, long long t, float2 scale,
                                              const Weights<W, L>& wt,
                                              const Ro& rope) const {
    M::scale_store(p, t, scale, wt, rope, [&](int j) { return at[j * NT]; });
  }
};

template <bool C, class A, class B> struct Pick { using type = A; };
template <class A, class B> struct Pick<false, A, B> { using type = B; };

// The layout of the kernels of one specialization: paired for NeoX RoPE where every pair
// fits in a thread's slots (no shuffle), else the plain one. Paired on sm_90 only, where
// it was measured: sm_100's compiler gave its wide kernels 198 (fused) and 236 (apply)
// registers with it.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ != 900
constexpr bool kPairedArch = false;
#else
constexpr bool kPairedArch = true;
#endif

template <class T, int DQ, int DK, int NT, int HEAD, int ROT, int STYLE>
struct LayoutFor {
  static constexpr int N = Vec<T>::N;
  static constexpr bool kTry = kPairedArch && STYLE == kRopeNeox && HEAD > 0 &&
                               HEAD % N == 0 && ROT > 0 && ROT % (2 * N) == 0 &&
                               DQ % HEAD == 0 && DK % HEAD == 0;
  using Paired = Layout<T, DQ, DK, NT, kTry ? HEAD / N : 0, kTry ? ROT / (2 * N) : 0>;
  using type = typename Pick<kTry && Paired::kFits, Paired, Layout<T, DQ, DK, NT>>::type;
};

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
template <int WARPS>
__device__ __forceinline__ float2 block_sum(float2 v, float2* scratch) {
  v = warp_sum(v);
  if constexpr (WARPS == 1) {
    __syncwarp();  // the barrier callers rely on: earlier shared reads are done
    return v;
  }
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) scratch[warp] = v;
  __syncthreads();
  float2 s = make_float2(0.f, 0.f);
  if (threadIdx.x < 32) {
#pragma unroll
    for (int i = 0; i < WARPS; ++i) { s.x += scratch[i].x; s.y += scratch[i].y; }
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

// Where a block's time goes (a diagnostic build: QKNORM_TRACE=1, from CUPY_QKNORM_TRACE=1;
// scripts/trace_fused.py reads it). Thread 0 of each block counts SM cycles and writes one
// record of kTraceWords to p.sums (the IPC transport allocates it for the trace):
//   {globaltimer at entry, cycles to pass griddepcontrol.wait, cycles from there to the
//    first push, cycles waiting for partials (every token), cycles of the block, tokens,
//    globaltimer at the end, cycles waiting for rows and the block's sum (every token),
//    cycles waiting for the first token's partials, longest single wait}
// Off (the default), Trace is empty and every call on it compiles to nothing.
#ifndef QKNORM_TRACE
#define QKNORM_TRACE 0
#endif
constexpr int kTraceWords = 10;

struct Trace {
#if QKNORM_TRACE
  struct Data {  // thread 0's counters, in shared memory (registers would cost blocks)
    unsigned long long g_entry;
    long long entry, passed, pushed, wait, ready, first_wait, longest, mark;
    int tokens;
  };
  Data* d;
  static __device__ __forceinline__ bool mine() { return threadIdx.x == 0; }
  __device__ __forceinline__ void start(Data* data) {
    d = data;
    if (!mine()) return;
    d->g_entry = global_timer_ns();
    d->entry = clock64();
    d->wait = d->ready = d->first_wait = d->longest = 0;
    d->tokens = 0;
  }
  __device__ __forceinline__ void passed() { if (mine()) d->passed = clock64(); }
  __device__ __forceinline__ void pushed() { if (mine()) d->pushed = clock64(); }
  __device__ __forceinline__ void begin() { if (mine()) d->mark = clock64(); }
  __device__ __forceinline__ void waited() {  // a finish()'s wait for partials ended
    if (!mine()) return;
    const long long t = clock64() - d->mark;
    if (d->tokens == 0) d->first_wait = t;
    d->wait += t;
    d->longest = t > d->longest ? t : d->longest;
    ++d->tokens;
  }
  __device__ __forceinline__ void summed() { if (mine()) d->ready += clock64() - d->mark; }
  __device__ __forceinline__ void write(const Params& p) {
    if (!mine()) return;
    unsigned long long* r = reinterpret_cast<unsigned long long*>(p.sums) +
                            (long long)blockIdx.x * kTraceWords;
    const long long end = clock64();
    const unsigned long long words[kTraceWords] = {
        d->g_entry, (unsigned long long)(d->passed - d->entry),
        (unsigned long long)(d->pushed - d->passed), (unsigned long long)d->wait,
        (unsigned long long)(end - d->entry), (unsigned long long)d->tokens,
        global_timer_ns(), (unsigned long long)d->ready, (unsigned long long)d->first_wait,
        (unsigned long long)d->longest};
#pragma unroll
    for (int i = 0; i < kTraceWords; ++i) r[i] = words[i];
  }
#else
  struct Data {};
  __device__ __forceinline__ void start(Data*) {}
  __device__ __forceinline__ void passed() {}
  __device__ __forceinline__ void pushed() {}
  __device__ __forceinline__ void begin() {}
  __device__ __forceinline__ void waited() {}
  __device__ __forceinline__ void summed() {}
  __device__ __forceinline__ void write(const Params&) {}
#endif
};

// ---------------------------------------------------------------------------------------
template <int V> struct Constant { static constexpr int value = V; };

// f(Constant<I>{}) for I = FROM, FROM + 1, ... < TO while it returns true; true if all did.
template <int FROM, int TO, class Fn>
__device__ __forceinline__ bool each_phase(Fn& f) {
  if constexpr (FROM < TO) {
    if (!f(Constant<FROM>{})) return false;
    return each_phase<FROM + 1, TO>(f);
  }
  return true;
}

// The fused kernel: per token, local sums -> push to every rank's slot -> wait for all G
// partials -> sum them in rank order (identical on every rank) -> scale, rotate (STYLE)
// and store. A persistent grid walks the tokens; every rank launches the same grid for the
// same call. Each block keeps DEPTH tokens in flight: while it waits for the partials of
// token t it has already pushed token t + 1, and it has issued the loads of tokens up to
// t + DEPTH - 1, so the peers' latency and the memory latency of the next rows overlap.
// DEPTH = 2: the next row's load is issued only once the current row is done; DEPTH = 3:
// two rows' loads are in flight while the third waits for its partials. STAGED = 0 holds
// the rows in registers (DEPTH 3 then costs blocks: slower on H100 and H200,
// BENCHMARKS.md); STAGED = 1 holds them in shared memory, filled by asynchronous copies.
// A block pushes one token ahead of the one it waits for: two ahead was 5-7% slower at
// 4096-8192 tokens on H200.
template <class T, class W, int G, int DQ, int DK, int WARPS, int DEPTH, int STAGED, int HEAD,
          int ROT, int STYLE>
struct Fused {
  static_assert(DEPTH >= 2, "at least two tokens in flight");
  static constexpr int NT = WARPS * 32;
  using L = typename LayoutFor<T, DQ, DK, NT, HEAD, ROT, STYLE>::type;
  using R = typename Pick<STAGED != 0, StagedRow<L>, Row<L>>::type;
  using Ro = Rope<L, HEAD, ROT, STYLE>;
  static constexpr int kStageVectors = STAGED ? L::NV * NT : 0;

  // One set per row: a set is rewritten only by the next push() and finish() of the same
  // row, DEPTH tokens later, after the barrier of another row's finish() that every thread
  // reaches after its last read of the set.
  struct Shared {
    float2 scratch[DEPTH][WARPS];
    float2 scale[DEPTH];
    int ok[DEPTH];
  };

  // A token between load() and finish(): the slot's use and the sums as warp 0 knows
  // them, the position as every thread does.
  struct Pending {
    unsigned int uses;  // use number of the token's slot: which half of the buffer it takes
    float2 part;        // this rank's sums of squares
    typename Ro::Token pos;
  };

  static __device__ __forceinline__ uint4* slot(const Params& p, unsigned int uses,
                                                long long t, int from) {
    uint4* mine = nullptr;
#pragma unroll
    for (int r = 0; r < G; ++r) if (p.rank == r) mine = p.slots[r];
    return mine + ((long long)(uses & 1u) * p.max_tokens + t) * G + from;
  }

  // Issues the loads of token t's row, its position and its slot's use count; nothing
  // waits for them.
  static __device__ __forceinline__ void load(const Params& p, R& row, long long t,
                                              Pending& pending) {
    if (G > 1 && threadIdx.x == 0) pending.uses = p.counters[t];
    if constexpr (Ro::kOn) pending.pos.words = load_position(p, t);
    row.load(p, t);
  }

  // Sums token t's row (waiting for its loads, while the PENDING rows loaded after it may
  // still be in flight) and pushes the partials to every rank.
  template <int PENDING>
  static __device__ __forceinline__ void push(const Params& p, const R& row, long long t,
                                              Pending& pending, float2* scratch, Trace& tr) {
    tr.begin();
    row.template ready<PENDING>();
    const float2 part = block_sum<WARPS>(row.sums(), scratch);
    tr.summed();
    pending.part = part;
    if (G > 1 && threadIdx.x < 32) {
      const int lane = threadIdx.x;
      const unsigned int uses = __shfl_sync(0xffffffffu, pending.uses, 0);
      pending.uses = uses;
      if (lane < G) {
        uint4* peer = nullptr;
#pragma unroll
        for (int r = 0; r < G; ++r) if (lane == r) peer = p.slots[r];
        const long long base = ((long long)(uses & 1u) * p.max_tokens + t) * G;
        store_volatile(peer + base + p.rank, make_slot(part.x, part.y, p.tokens, uses));
      }
    }
    // loaded with the row, so here by now; the angles are read a phase later, in finish()
    if constexpr (Ro::kOn) {
      pending.pos.row = angle_row(p, pending.pos.words);
      Ro::prefetch(p, pending.pos.row);
    }
  }

  // Waits for token t's partials from every rank, then scales, rotates and stores the row.
  // A row whose position is out of range still takes its part in the exchange, so the
  // peers' calls and the slots stay in step; only its store is left out.
  template <class WT>
  static __device__ __forceinline__ void finish(const Params& p, const R& row, long long t,
                                                const Pending& pending, const WT& wt,
                                                Shared& sh, int set, Trace& tr) {
    Ro angles;  // loaded while warp 0 waits for the partials
    if constexpr (Ro::kOn) angles.load(p, pending.pos.row);
    if (threadIdx.x < 32) {
      tr.begin();
      const unsigned int uses = pending.uses;
      const int lane = threadIdx.x;
      float sq, sk;
      bool ok = true;
      if constexpr (G > 1) {
        const uint4 empty = make_uint4(kEmptyWord, kEmptyWord, kEmptyWord, kEmptyWord);
        uint4 got = empty;
        if (lane < G) {
          uint4* const from = slot(p, uses, t, lane);
          ok = wait_slot(from, p, lane, (int)t, got);
          if (ok && got.z != (unsigned int)p.tokens) {
            if (got.z == kRejectTokens)
              record_error(p, kErrorRejected, lane, (int)t, 0, p.tokens);
            else
              record_error(p, kErrorTokens, lane, (int)t, (int)got.z, p.tokens);
            ok = false;
          } else if (ok && got.w != (uses & 0x7fffffffu)) {
            record_error(p, kErrorSequence, lane, (int)t, (int)got.w,
                         (int)(uses & 0x7fffffffu));
            ok = false;
          }
          store_volatile(from, empty);
        }
        ok = __all_sync(0xffffffffu, ok);
        tr.waited();
        sq = 0.f;
        sk = 0.f;
#pragma unroll
        for (int r = 0; r < G; ++r) {
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
        if (G > 1) p.counters[t] = uses + 1;
      }
    }
    __syncthreads();
    if constexpr (Ro::kOn) {
      if (pending.pos.row < 0) {  // the same for every thread: all read one position
        if (threadIdx.x == 0) record_position_error(p, t);
        return;
      }
    }
    if (sh.ok[set]) row.scale_store(p, t, sh.scale[set], wt, angles);
  }
};

template <class T, class W, int G, int DQ, int DK, int WARPS, int DEPTH, int STAGED, int HEAD,
          int ROT, int STYLE>
__global__ void __launch_bounds__(WARPS * 32, 1) fused(const Params p) {
  using F = Fused<T, W, G, DQ, DK, WARPS, DEPTH, STAGED, HEAD, ROT, STYLE>;
  __shared__ typename F::Shared sh;
  __shared__ uint4 stages[STAGED ? DEPTH * F::kStageVectors : 1];  // STAGED: the rows
  __shared__ Trace::Data trace_data;
  Trace tr;
  tr.start(&trace_data);
  grid_dependency_wait();  // the previous kernel of the stream is complete from here on
  allow_dependents();      // the next launch may start its own wait now
  tr.passed();
  const long long step = gridDim.x;
  long long t = blockIdx.x;
  if (t >= p.tokens) return;
  Weights<W, typename F::L> wt;
  wt.load(p);
  // Row i of the ring holds token t + ((i - phase) mod DEPTH) * step. Each phase is its
  // own copy of the code (a compiler loop kept DEPTH = 2 in local memory), so every index
  // into the ring is a constant and the rows stay in registers. Every phase loads one row
  // or skips (an empty commit group, for staged rows), so a push finds its row's group a
  // constant number of groups back.
  typename F::R rows[DEPTH];
  if constexpr (STAGED != 0) {
#pragma unroll
    for (int i = 0; i < DEPTH; ++i) rows[i].at = stages + i * F::kStageVectors + threadIdx.x;
  }
  typename F::Pending pend[DEPTH] = {};
#pragma unroll
  for (int i = 0; i + 1 < DEPTH; ++i) {
    if (t + i * step < p.tokens) F::load(p, rows[i], t + i * step, pend[i]);
    else F::R::skip();
  }
  F::template push<DEPTH - 2>(p, rows[0], t, pend[0], sh.scratch[0], tr);
  tr.pushed();
  // Phase `cur` finishes token t (row cur), after loading token t + (DEPTH - 1) step into
  // the row the last phase finished and pushing token t + step, loaded DEPTH - 2 phases
  // ago (one group a phase: that many may still be in flight).
  auto phase = [&](auto cur_) {  // false once the block's last token is done
    constexpr int D = DEPTH, cur = decltype(cur_)::value;
    constexpr int last = (cur + D - 1) % D, pushed = (cur + 1) % D;
    const long long ahead = t + (D - 1) * step;
    if (ahead < p.tokens) F::load(p, rows[last], ahead, pend[last]);
    else F::R::skip();
    const long long next = t + step;
    if (next < p.tokens)
      F::template push<D - 2>(p, rows[pushed], next, pend[pushed], sh.scratch[pushed], tr);
    F::finish(p, rows[cur], t, pend[cur], wt, sh, cur, tr);
    t += step;
    return t < p.tokens;
  };
  while (each_phase<0, DEPTH>(phase)) {}
  tr.write(p);
}

// A rank whose host rejected its input launches this (one block of 32 threads, on the
// stream where the fused kernel would have run) in place of the fused kernel. It pushes
// token 0's slot of this call, in the half the fused kernel would have used, with the token
// count kRejectTokens, into every rank's buffer: the peers' fused kernels wait for token 0
// first and fail at once (kErrorRejected) instead of at their timeout. It leaves the
// counters alone; the call fails on every rank, and the object is out of step from there.
template <int G>
__global__ void __launch_bounds__(32) reject(const Params p) {
  grid_dependency_wait();  // counters[0] as the previous call left it
  const int lane = threadIdx.x;
  if (lane >= G) return;
  const unsigned int uses = p.counters[0];
  uint4* peer = nullptr;
#pragma unroll
  for (int r = 0; r < G; ++r) if (lane == r) peer = p.slots[r];
  store_volatile(peer + (long long)(uses & 1u) * p.max_tokens * G + p.rank,
                 make_slot(0.f, 0.f, (int)kRejectTokens, uses));
}

// ---------------------------------------------------------------------------------------
// The unfused path: partial sums -> (NCCL or MPI all-reduce of sums[kSumsHeader + 2 tokens])
// -> apply. The all-reduce also checks that every rank launched the same token count T,
// with no collective of its own: partial_sums writes a header of T's base-1024 digits
// d_i, their squares and a 1, which the all-reduce sums over the n ranks with the rest.
// Sums of n digits equal n d_i and sums of their squares n d_i^2 only if all n are d_i
// (the squared deviations from d_i sum to zero), so every rank of a call whose ranks
// disagree on T sees it. All are integers below 2^24: exact in fp32 in any order.
//   header = {d0, d1, d2, d0^2, d1^2, d2^2, 1, 0}, then {sum_q, sum_k} per token
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
template <class T, int DQ, int DK, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) partial_sums(const Params p) {
  using R = Row<Layout<T, DQ, DK, WARPS * 32>>;
  __shared__ float2 scratch[WARPS];
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
  R row;
  for (long long t = blockIdx.x; t < p.tokens; t += gridDim.x) {
    row.load(p, t);
    const float2 s = block_sum<WARPS>(row.sums(), scratch);
    if (threadIdx.x == 0) sums[t] = s;
    if constexpr (WARPS > 1) __syncthreads();  // scratch is reused by the next token
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
template <class T, class W, int DQ, int DK, int WARPS, int HEAD, int ROT, int STYLE>
__global__ void __launch_bounds__(WARPS * 32, STYLE == kRopeNone ? 0 : 1)
    apply(const Params p) {
  constexpr int NT = WARPS * 32;
  using L = typename LayoutFor<T, DQ, DK, NT, HEAD, ROT, STYLE>::type;
  using Ro = Rope<L, HEAD, ROT, STYLE>;
  // a failure already recorded (the watchdog ended the all-reduce: the sums are not whole)
  const bool failed = *reinterpret_cast<volatile int*>(p.error) != 0;
  if (blockIdx.x == 0 && threadIdx.x == 0 && p.counters != nullptr)
    p.counters[1] = p.counters[0];  // launches followed
  Weights<W, L> wt;
  wt.load(p);
  const float2* const sums = reinterpret_cast<const float2*>(p.sums + kSumsHeader);
  // Failures are recorded once, after the loop: a record_error inside it made ptxas spill.
  const bool same = same_tokens(p);  // checked by every block before any store
  if (failed) return;
  int bad = -1;                      // a row whose position is out of range
  Row<L> row;
  for (long long t = blockIdx.x; same && t < p.tokens; t += gridDim.x) {
    PositionWords words;
    if constexpr (Ro::kOn) words = load_position(p, t);
    const float2 s = sums[t];
    row.load(p, t);
    Ro angles;
    if constexpr (Ro::kOn) {
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

// RoPE alone, in place after a norm (the benchmark's unfused baseline): reads the rotated
// vectors of every head of rows q and k, rotates them by the angles of positions[t] and
// writes them to q_out and k_out; the other elements are neither read nor written.
// Any grid, WARPS * 32 threads a block; launch bounds as apply's with RoPE.
template <class T, int DQ, int DK, int WARPS, int HEAD, int ROT, int STYLE>
__global__ void __launch_bounds__(WARPS * 32, 1) rope(const Params p) {
  static_assert(STYLE != kRopeNone, "rope needs a STYLE");
  constexpr int NT = WARPS * 32, N = Vec<T>::N;
  using L = typename LayoutFor<T, DQ, DK, NT, HEAD, ROT, STYLE>::type;
  using M = RowMath<L>;
  using Ro = Rope<L, HEAD, ROT, STYLE>;
  int bad = -1;  // a row whose position is out of range, recorded after the loop
  for (long long t = blockIdx.x; t < p.tokens; t += gridDim.x) {
    const PositionWords words = load_position(p, t);
    uint4 x[L::NV];
#pragma unroll
    for (int j = 0; j < L::NV; ++j) {
      x[j] = make_uint4(0u, 0u, 0u, 0u);
      if (L::valid(j) && Ro::rotated(j))
        x[j] = *static_cast<const uint4*>(M::source(p, t, j));
    }
    const int r = angle_row(p, words);  // the same for every thread
    if (r < 0) {
      bad = (int)t;
      continue;
    }
    Ro angles;
    angles.load(p, r);
#pragma unroll
    for (int j = 0; j < L::NV; ++j) {
      if constexpr (Ro::kPaired) {  // the pair in slots j and j + 1 (a pair's are valid)
        if (j % 2 == 0 && j + 1 < L::NV && L::paired(j)) {
          float lo[N], hi[N];
          Vec<T>::unpack(x[j], lo);
          Vec<T>::unpack(x[j + 1], hi);
          angles.rotate_pair(lo, hi);
          M::store(p, t, j, lo);
          M::store(p, t, j + 1, hi);
        }
        continue;
      }
      if (Ro::kExchange ? !L::warp_valid(j) : !L::valid(j)) continue;
      float f[N];
      Vec<T>::unpack(x[j], f);
      angles.rotate(j, f);
      if (!L::valid(j) || !Ro::rotated(j)) continue;
      M::store(p, t, j, f);
    }
  }
  if (bad >= 0 && threadIdx.x == 0) record_position_error(p, bad);
}

}  // namespace qknorm
