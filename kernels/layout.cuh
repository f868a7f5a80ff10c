// Which 16-byte vectors of a token's row each thread of a block holds: the plain layout,
// the paired one (both halves of every NeoX pair in one thread), the choice between them
// per specialization, and the thread's weights for its vectors.
#pragma once

#include "params.cuh"
#include "spec.cuh"
#include "vec.cuh"

namespace qknorm {

// One token's row (its q slice and k slice) spread over the kThreads threads of a block:
// thread `tid` holds slots j = 0 .. kSlots - 1, slot j being 16-byte vector
// tid + j kThreads of the concatenated [q | k] row (the plain layout), so each warp touches
// 512 contiguous bytes per step. A slot is valid where tid + j kThreads < kVectors, in
// every layout.
//
// With PairDistance > 0 (the paired layout, for NeoX RoPE: a head is HeadVectors vectors,
// of which [0, PairDistance) rotate with [PairDistance, 2 PairDistance) and the rest pass
// through), the slots are the same but the vectors behind them are permuted so that a
// thread holds both halves of a rotated pair: in slots 2b and 2b + 1, lanes tid < lanes(b)
// hold pair number b kThreads + tid (head pair / PairDistance, place pair % PairDistance),
// its lower half, then its upper half; every other valid slot holds the pass-through
// vectors in order. A warp's lanes of one slot cover runs of PairDistance (pairs) or
// HeadVectors - 2 PairDistance (pass) vectors within heads: for MiniMax's bf16 heads 64 and
// 128 bytes, whole 32-byte sectors.
template <class ElemType, class Slice, int Threads, int HeadVectors = 0, int PairDistance = 0>
struct Layout {
  using Elem = ElemType;
  static constexpr int kThreads = Threads;
  static constexpr int kElems = Vec<Elem>::kElems;  // elements per 16-byte vector
  static_assert(Slice::kQ % kElems == 0 && Slice::kK % kElems == 0,
                "local widths must be whole 16-byte vectors");
  static constexpr int kQVectors = Slice::kQ / kElems;
  static constexpr int kVectors = kQVectors + Slice::kK / kElems;
  static constexpr int kSlots = (kVectors + kThreads - 1) / kThreads;  // vectors per thread
  static constexpr bool kPaired = PairDistance > 0;
  static constexpr int kPairs =
      kPaired ? kVectors / (HeadVectors > 0 ? HeadVectors : 1) * PairDistance : 0;
  static constexpr int kPassPerHead =
      HeadVectors - 2 * PairDistance > 0 ? HeadVectors - 2 * PairDistance : 1;

  // pair lanes of slot pair b: up to kThreads, while pairs are left, where slot 2b + 1 is
  // valid
  __host__ __device__ static constexpr int lanes(int b) {
    if (2 * b + 1 >= kSlots) return 0;
    int n = kPairs - b * kThreads;
    n = n < kThreads ? n : kThreads;
    const int room = kVectors - (2 * b + 1) * kThreads;
    n = n < room ? n : room;
    return n > 0 ? n : 0;
  }
  // pass-through vectors in the slots before j: their valid lanes less their pair lanes
  __host__ __device__ static constexpr int pass_before(int j) {
    const int valid_before = j * kThreads < kVectors ? j * kThreads : kVectors;
    const int pairs_before =
        2 * (kPairs < j / 2 * kThreads ? kPairs : j / 2 * kThreads);
    return valid_before - pairs_before - (j % 2 ? lanes(j / 2) : 0);
  }
  // Every pair placed, and the vector behind a slot a per-thread base plus a constant of
  // the slot: a pair's place in its head is tid % PairDistance (kThreads % PairDistance
  // == 0), and every slot's run of pass-through vectors starts at a multiple of a head's
  // pass-through vectors.
  __host__ __device__ static constexpr bool fits() {
    if (!kPaired || kVectors % HeadVectors != 0 ||
        kThreads % (PairDistance > 0 ? PairDistance : 1) != 0)
      return false;
    int placed = 0;
    for (int j = 0; j < kSlots; ++j) {
      if (j % 2 == 0) placed += lanes(j / 2);
      if (lanes(j / 2) % kPassPerHead != 0 || pass_before(j) % kPassPerHead != 0) return false;
    }
    return placed == kPairs;
  }
  static constexpr bool kFits = !kPaired || fits();

  // threadIdx.x, which the compiler takes to be below kThreads (blocks of kThreads), so
  // that a slot every thread holds is no runtime test
  static __device__ __forceinline__ unsigned tid() {
    const unsigned t = threadIdx.x;
    __builtin_assume(t < kThreads);
    return t;
  }
  static __device__ __forceinline__ bool valid(int j) {
    return tid() + j * kThreads < kVectors;
  }
  // the paired layout: whether slot j of this thread holds half of a rotated pair
  static __device__ __forceinline__ bool paired(int j) {
    return kPaired && (int)tid() < lanes(j / 2);
  }
  // vector index (in the [q | k] row) behind slot j of thread tid
  __host__ __device__ static constexpr int index_of(unsigned tid, int j) {
    if constexpr (!kPaired) {
      return (int)tid + j * kThreads;
    } else {
      // pair j / 2 kThreads + tid, or pass-through vector pass_before(j) + tid - lanes
      constexpr int pass = kPassPerHead;
      const int here = lanes(j / 2);
      const int in_pair = (int)(tid / PairDistance * HeadVectors + tid % PairDistance) +
                          j / 2 * (kThreads / PairDistance) * HeadVectors +
                          j % 2 * PairDistance;
      const int in_pass = (int)(tid / pass * HeadVectors + tid % pass) +
                          (pass_before(j) - here) / pass * HeadVectors + 2 * PairDistance;
      return (int)tid < here ? in_pair : in_pass;
    }
  }
  static __device__ __forceinline__ int index(int j) { return index_of(tid(), j); }

  // Checked by the compiler for every paired layout it builds: the valid slots of all
  // threads hold every vector of the row once; a pair lane's slots 2b and 2b + 1 are both
  // valid and hold a pair's lower and upper half, at place tid % PairDistance of its head
  // (where Angles::load reads the angles); every other slot holds a vector that is not
  // rotated.
  __host__ __device__ static constexpr bool one_to_one() {
    constexpr int head = HeadVectors > 0 ? HeadVectors : 1;  // (the plain layout too)
    bool seen[kVectors] = {};
    for (int tid = 0; tid < kThreads; ++tid) {
      for (int j = 0; j < kSlots; ++j) {
        if (tid + j * kThreads >= kVectors) continue;
        const int i = index_of(tid, j);
        if (i < 0 || i >= kVectors || seen[i]) return false;
        seen[i] = true;
        const bool pair = tid < lanes(j / 2);
        if (pair && j % 2 == 0 &&
            (i % head != tid % (PairDistance > 0 ? PairDistance : 1) ||
             tid + (j + 1) * kThreads >= kVectors || index_of(tid, j + 1) != i + PairDistance))
          return false;
        if (!pair && i % head < 2 * PairDistance) return false;
      }
    }
    return true;
  }
  static_assert(!kPaired || !kFits || one_to_one(), "the paired layout misplaces a vector");
  static __device__ __forceinline__ bool is_q(int j) { return index(j) < kQVectors; }
  // whether any lane of this thread's warp holds a vector j: a warp's 32 slots of one j
  // are consecutive, so with kVectors a multiple of 32 they are all in the row or none is
  static __device__ __forceinline__ bool warp_valid(int j) {
    if constexpr (kVectors % 32 == 0) return valid(j);
    return (int)(tid() & ~31u) + j * kThreads < kVectors;
  }
  // element offset of vector j within its (q or k) slice
  static __device__ __forceinline__ int offset(int j) {
    const int i = index(j);
    return (i < kQVectors ? i : i - kQVectors) * kElems;
  }
};

template <bool Cond, class IfTrue, class IfFalse> struct Pick { using type = IfTrue; };
template <class IfTrue, class IfFalse> struct Pick<false, IfTrue, IfFalse> {
  using type = IfFalse;
};

// The layout of the kernels of one specialization: paired for NeoX RoPE where every pair
// fits in a thread's slots (no shuffle), else the plain one. Paired on sm_90 only, where
// it was measured: sm_100's compiler gave its wide kernels 198 (fused) and 236 (apply)
// registers with it.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ != 900
constexpr bool kPairedArch = false;
#else
constexpr bool kPairedArch = true;
#endif

template <class Elem, class Slice, int Threads, class Rope>
struct LayoutFor {
  static constexpr int kElems = Vec<Elem>::kElems;
  static constexpr int kHead = Rope::kHead, kRotary = Rope::kRotary;
  static constexpr bool kTry = kPairedArch && Rope::kStyle == kRopeNeox && kHead > 0 &&
                               kHead % kElems == 0 && kRotary > 0 &&
                               kRotary % (2 * kElems) == 0 && Slice::kQ % kHead == 0 &&
                               Slice::kK % kHead == 0;
  using Paired = Layout<Elem, Slice, Threads, kTry ? kHead / kElems : 0,
                        kTry ? kRotary / (2 * kElems) : 0>;
  using type = typename Pick<kTry && Paired::kFits, Paired, Layout<Elem, Slice, Threads>>::type;
};

// This thread's weights, kept in registers across tokens.
template <class Weight, class RowLayout>
struct Weights {
  // 16-byte weight vectors per data vector
  static constexpr int kVectors = RowLayout::kElems * sizeof(Weight) / 16;
  uint4 w[RowLayout::kSlots][kVectors];

  __device__ __forceinline__ void load(const Params& p) {
#pragma unroll
    for (int j = 0; j < RowLayout::kSlots; ++j) {
      if (!RowLayout::valid(j)) continue;
      const Weight* base =
          static_cast<const Weight*>(RowLayout::is_q(j) ? p.q_weight : p.k_weight) +
          RowLayout::offset(j);
#pragma unroll
      for (int u = 0; u < kVectors; ++u) w[j][u] = reinterpret_cast<const uint4*>(base)[u];
    }
  }
};

}  // namespace qknorm
