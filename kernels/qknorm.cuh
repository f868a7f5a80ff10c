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
  uint4* slots[8];                     // exchange buffer of every rank (slots[rank] is ours)
  unsigned int* counters;              // [max_tokens] uses of each token slot so far
  int* error;                          // device error record, kErrorWords ints
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

// Error record: {code, peer, token, rank, peer's value, our value, 0, 0}. The codes and
// the layout are read by cupy_qknorm/transports.py.
constexpr int kErrorWords = 8;
constexpr int kErrorTimeout = 1;   // the peer's partial sums never came
constexpr int kErrorTokens = 2;    // the peer launched with another token count
constexpr int kErrorSequence = 3;  // the peer's slot holds another use of this token

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
__device__ __forceinline__ void copy_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int PENDING>  // waits until at most PENDING of this thread's newest groups are left
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
}

// Marks the call as failed (first failure wins) in device memory and, if mapped, in host
// memory, where the host reads it without synchronizing.
__device__ void record_error(const Params& p, int code, int peer, int token, int theirs,
                             int ours) {
  if (atomicCAS(p.error, 0, code) != 0) return;
  const int words[kErrorWords] = {code, peer, token, p.rank, theirs, ours, 0, 0};
#pragma unroll
  for (int i = 1; i < kErrorWords; ++i) p.error[i] = words[i];
  if (p.error_host != nullptr) {
#pragma unroll
    for (int i = 1; i < kErrorWords; ++i) p.error_host[i] = words[i];
    __threadfence_system();
    *(volatile int*)p.error_host = code;
  }
}

// Spins until every word of `slot` is written. Gives up (returns false) past the timeout,
// read from the GPU's own clock, or as soon as an earlier wait of this object failed.
__device__ bool wait_slot(const uint4* slot, const Params& p, int peer, int token,
                          uint4& value) {
  value = load_volatile(slot);
  if (complete(value)) return true;
  const unsigned long long start = global_timer_ns();
  for (unsigned int spin = 1;; ++spin) {
    value = load_volatile(slot);
    if (complete(value)) return true;
    if ((spin & 63u) == 0) {
      if (*(volatile int*)p.error != 0) return false;
      if (p.timeout_ns > 0 && (long long)(global_timer_ns() - start) > p.timeout_ns) {
        record_error(p, kErrorTimeout, peer, token, 0, 0);
        return false;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// One token's row (its q slice and k slice) spread over the NT threads of a block: thread
// `tid` holds 16-byte vectors tid, tid + NT, ... of the concatenated [q | k] row, so each
// warp touches 512 contiguous bytes per step.
template <class T, int DQ, int DK, int NT>
struct Layout {
  static constexpr int N = Vec<T>::N;  // elements per 16-byte vector
  static_assert(DQ % N == 0 && DK % N == 0, "local widths must be whole 16-byte vectors");
  static constexpr int VQ = DQ / N;
  static constexpr int V = VQ + DK / N;
  static constexpr int NV = (V + NT - 1) / NT;  // vectors per thread

  static __device__ __forceinline__ bool valid(int j) { return threadIdx.x + j * NT < V; }
  static __device__ __forceinline__ bool is_q(int j) { return threadIdx.x + j * NT < VQ; }
  // element offset of vector j within its (q or k) slice
  static __device__ __forceinline__ int offset(int j) {
    const int i = threadIdx.x + j * NT;
    return (i < VQ ? i : i - VQ) * N;
  }
};

// This thread's weights, kept in registers across tokens.
template <class T, class W, int DQ, int DK, int NT>
struct Weights {
  using L = Layout<T, DQ, DK, NT>;
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

// The arithmetic on this thread's part of one token's row, wherever the row is held:
// `get(j)` returns its vector j (a register, or a read of shared memory).
template <class T, int DQ, int DK, int NT>
struct RowMath {
  using L = Layout<T, DQ, DK, NT>;
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

  template <class W, class Get>
  static __device__ __forceinline__ void scale_store(const Params& p, long long t,
                                                     float2 scale,
                                                     const Weights<T, W, DQ, DK, NT>& wt,
                                                     const Get& get) {
    constexpr int WV = Weights<T, W, DQ, DK, NT>::WV;
#pragma unroll
    for (int j = 0; j < L::NV; ++j) {
      if (!L::valid(j)) continue;
      float f[N], wf[N];
      Vec<T>::unpack(get(j), f);
#pragma unroll
      for (int u = 0; u < WV; ++u) Vec<W>::unpack(wt.w[j][u], wf + u * Vec<W>::N);
      const float s = L::is_q(j) ? scale.x : scale.y;
#pragma unroll
      for (int e = 0; e < N; ++e) f[e] = f[e] * s * wf[e];
      T* dst = L::is_q(j) ? static_cast<T*>(p.q_out) + t * p.q_out_stride + L::offset(j)
                          : static_cast<T*>(p.k_out) + t * p.k_out_stride + L::offset(j);
      *reinterpret_cast<uint4*>(dst) = Vec<T>::pack(f);
    }
  }
};

// This thread's part of one token's row, held in registers.
template <class T, int DQ, int DK, int NT>
struct Row {
  using L = Layout<T, DQ, DK, NT>;
  using M = RowMath<T, DQ, DK, NT>;
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
  template <class W>
  __device__ __forceinline__ void scale_store(const Params& p, long long t, float2 scale,
                                              const Weights<T, W, DQ, DK, NT>& wt) const {
    M::scale_store(p, t, scale, wt, [&](int j) { return x[j]; });
  }
};

// This thread's part of one token's row, held in shared memory: vector j at at[j * NT],
// copied there asynchronously, so a block keeps several rows' loads in flight for the
// price of shared memory, not registers. Each load is one commit group; ready<P>() waits
// for this row's group while the P groups committed after it may still be in flight. A
// stage is refilled only after the same thread's last reads of it have returned: their
// values went into the stores of finish(), issued before the next load of the stage.
template <class T, int DQ, int DK, int NT>
struct StagedRow {
  using L = Layout<T, DQ, DK, NT>;
  using M = RowMath<T, DQ, DK, NT>;
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
  template <class W>
  __device__ __forceinline__ void scale_store(const Params& p, long long t, float2 scale,
                                              const Weights<T, W, DQ, DK, NT>& wt) const {
    M::scale_store(p, t, scale, wt, [&](int j) { return at[j * NT]; });
  }
};

template <bool C, class A, class B> struct Pick { using type = A; };
template <class A, class B> struct Pick<false, A, B> { using type = B; };

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
// orders of magnitude below a 16-bit output's unit, inside fp32's tolerance. On H200 at G=2
// it made calls 6-7% faster from T=4096 up and up to 0.5 us faster at small T than IEEE
// division and square root, whose special-case branches sit on the serial path between the
// peers' partials arriving and the block barrier, once per token (BENCHMARKS.md).
// QKNORM_IEEE_RSQRT=1 (an experiment knob, compile.py) restores those.
#ifndef QKNORM_IEEE_RSQRT
#define QKNORM_IEEE_RSQRT 0
#endif

__device__ __forceinline__ float2 inv_rms(const Params& p, float sq, float sk) {
#if QKNORM_IEEE_RSQRT
  return make_float2(1.0f / sqrtf(sq / p.q_dim + p.eps), 1.0f / sqrtf(sk / p.k_dim + p.eps));
#else
  return make_float2(rsqrtf(__fdividef(sq, p.q_dim) + p.eps),
                     rsqrtf(__fdividef(sk, p.k_dim) + p.eps));
#endif
}

// Where a block's time goes (an experiment knob, compile.py: CUPY_QKNORM_TRACE=1, read by
// scripts/trace_fused.py). Thread 0 of each block counts SM cycles and writes one record
// of kTraceWords to p.sums (the IPC transport allocates it for the trace):
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
// partials -> sum them in rank order (identical on every rank) -> scale and store.
// A persistent grid walks the tokens; every rank launches the same grid for the same call.
// Each block keeps DEPTH tokens in flight: while it waits for the partials of token t it
// has already pushed token t + 1, and it has issued the loads of tokens up to
// t + DEPTH - 1, so the peers' latency and the memory latency of the next rows overlap.
// DEPTH = 2: the next row's load is issued only once the current row is done; DEPTH = 3:
// two rows' loads are in flight while the third waits for its partials. STAGED = 0 holds
// the rows in registers (DEPTH 3 then costs blocks: slower on H100 and H200,
// BENCHMARKS.md); STAGED = 1 holds them in shared memory, filled by asynchronous copies.
// An experiment knob (compile.py): QKNORM_AHEAD=2 pushes the partials of two tokens ahead
// of the one a block waits for, where DEPTH allows it (a row is loaded before it is
// pushed), instead of one. Not faster on H200 (BENCHMARKS.md, sixth session).
#ifndef QKNORM_AHEAD
#define QKNORM_AHEAD 1
#endif

template <class T, class W, int G, int DQ, int DK, int WARPS, int DEPTH, int STAGED>
struct Fused {
  static_assert(DEPTH >= 2, "at least two tokens in flight");
  static constexpr int NT = WARPS * 32;
  // tokens pushed ahead of the one a block waits for
  static constexpr int AHEAD = QKNORM_AHEAD < DEPTH - 1 ? QKNORM_AHEAD : DEPTH - 1;
  using R = typename Pick<STAGED != 0, StagedRow<T, DQ, DK, NT>, Row<T, DQ, DK, NT>>::type;
  static constexpr int kStageVectors = STAGED ? Layout<T, DQ, DK, NT>::NV * NT : 0;

  // One set per row: a set is rewritten only by the next push() and finish() of the same
  // row, DEPTH tokens later, after the barrier of another row's finish() that every thread
  // reaches after its last read of the set.
  struct Shared {
    float2 scratch[DEPTH][WARPS];
    float2 scale[DEPTH];
    int ok[DEPTH];
  };

  // A token between load() and finish(), as warp 0 knows it.
  struct Pending {
    unsigned int uses;  // use number of the token's slot: which half of the buffer it takes
    float2 part;        // this rank's sums of squares
  };

  static __device__ __forceinline__ uint4* slot(const Params& p, unsigned int uses,
                                                long long t, int from) {
    uint4* mine = nullptr;
#pragma unroll
    for (int r = 0; r < G; ++r) if (p.rank == r) mine = p.slots[r];
    return mine + ((long long)(uses & 1u) * p.max_tokens + t) * G + from;
  }

  // Issues the loads of token t's row and of its slot's use count; nothing waits for them.
  static __device__ __forceinline__ void load(const Params& p, R& row, long long t,
                                              Pending& pending) {
    if (G > 1 && threadIdx.x == 0) pending.uses = p.counters[t];
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
  }

  // Waits for token t's partials from every rank, then scales and stores the row.
  template <class WT>
  static __device__ __forceinline__ void finish(const Params& p, const R& row, long long t,
                                                const Pending& pending, const WT& wt,
                                                Shared& sh, int set, Trace& tr) {
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
    if (sh.ok[set]) row.scale_store(p, t, sh.scale[set], wt);
  }
};

// Blocks an SM must fit (a register cap): 1 unless an experiment sets it (compile.py).
#ifndef QKNORM_MIN_BLOCKS
#define QKNORM_MIN_BLOCKS 1
#endif

template <class T, class W, int G, int DQ, int DK, int WARPS, int DEPTH, int STAGED>
__global__ void __launch_bounds__(WARPS * 32, QKNORM_MIN_BLOCKS) fused(const Params p) {
  using F = Fused<T, W, G, DQ, DK, WARPS, DEPTH, STAGED>;
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
  Weights<T, W, DQ, DK, F::NT> wt;
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
  auto first = [&](auto i_) {  // pushes the block's first AHEAD tokens
    constexpr int i = decltype(i_)::value;
    if (t + i * step < p.tokens)
      F::template push<DEPTH - 2 - i>(p, rows[i], t + i * step, pend[i], sh.scratch[i], tr);
    return true;
  };
  each_phase<0, F::AHEAD>(first);
  tr.pushed();
  // Phase `cur` finishes token t (row cur), after loading token t + (DEPTH - 1) step into
  // the row the last phase finished and pushing token t + AHEAD step, loaded
  // DEPTH - 1 - AHEAD phases ago (one group a phase: that many may still be in flight).
  auto phase = [&](auto cur_) {  // false once the block's last token is done
    constexpr int D = DEPTH, A = F::AHEAD, cur = decltype(cur_)::value;
    constexpr int last = (cur + D - 1) % D, pushed = (cur + A) % D;
    const long long ahead = t + (D - 1) * step;
    if (ahead < p.tokens) F::load(p, rows[last], ahead, pend[last]);
    else F::R::skip();
    const long long next = t + A * step;
    if (next < p.tokens)
      F::template push<D - 1 - A>(p, rows[pushed], next, pend[pushed], sh.scratch[pushed], tr);
    F::finish(p, rows[cur], t, pend[cur], wt, sh, cur, tr);
    t += step;
    return t < p.tokens;
  };
  while (each_phase<0, DEPTH>(phase)) {}
  tr.write(p);
}

// ---------------------------------------------------------------------------------------
// The unfused path: partial sums -> (NCCL or MPI all-reduce of sums[tokens, 2]) -> apply.
template <class T, int DQ, int DK, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) partial_sums(const Params p) {
  using R = Row<T, DQ, DK, WARPS * 32>;
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
  constexpr int NT = WARPS * 32;
  Weights<T, W, DQ, DK, NT> wt;
  wt.load(p);
  Row<T, DQ, DK, NT> row;
  for (long long t = blockIdx.x; t < p.tokens; t += gridDim.x) {
    const float2 s = reinterpret_cast<const float2*>(p.sums)[t];
    row.load(p, t);
    row.scale_store(p, t, inv_rms(p, s.x, s.y), wt);
  }
}

}  // namespace qknorm
