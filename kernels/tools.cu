// Entry file of the tools module: the kernels outside the op's module, compiled only where
// they are used (cupy_qknorm/compile.py: load_plain for the extern "C" kernels, load_rope
// and load_cache_write for the templates, whose name expressions tuning.Spec writes):
//   qknorm_probe                       the P2P write probe (cupy_qknorm/peers.py)
//   qknorm_empty, qknorm_pingpong,     the benchmark's floors (cupy_qknorm/bench.py)
//   qknorm_copy, qknorm_exchange
//   qknorm::rope<Elem, Widths<QWidth, KWidth>, Warps, Rope>
//                                      the benchmark's unfused baseline: RoPE alone
//   qknorm::cache_write<Elem, KWidth, Warps, Cache>
//                                      the KV-cache write alone: the op's second launch
//                                      in long launches ("ipc"), and the baseline's
// e.g. "qknorm::rope<qknorm::bf16_t, qknorm::Widths<3072, 512>, 7, qknorm::NeoX<128, 64>>".
#include "kvcache.cuh"
#include "layout.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "rope.cuh"
#include "row.cuh"
#include "spec.cuh"
#include "vec.cuh"

// Writes one value with a plain store (through NVLink when `dst` is a peer mapping):
// the proof that peer writes really arrive, made once per buffer before first use.
extern "C" __global__ void qknorm_probe(unsigned long long* dst, unsigned long long value) {
  qknorm::store_volatile(dst, value);
}

// Benchmark floors (cupy_qknorm/bench.py): a launch that does nothing, and a flag
// ping-pong between two GPUs through IPC memory (round trip = two one-way latencies).
extern "C" __global__ void qknorm_empty() {}

extern "C" __global__ void qknorm_pingpong(unsigned long long* mine, unsigned long long* peer,
                                           int iters, int initiator) {
  for (int i = 1; i <= iters; ++i) {
    if (initiator) qknorm::store_volatile(peer, i);
    while (qknorm::load_volatile(mine) != (unsigned long long)i) {}
    if (!initiator) qknorm::store_volatile(peer, i);
  }
}

// The bench's per-T memory floor: the bytes the op must move (read q and k, write them),
// copied by a plain kernel in 16-byte vectors, one launch for both, four vectors in flight
// a thread. Timed like the fused kernel (a graph of calls on distinct input sets), it
// includes what the launch and the ramp cost at this size.
extern "C" __global__ void qknorm_copy(const uint4* q, uint4* q_out, long long nq,
                                       const uint4* k, uint4* k_out, long long nk) {
  const long long n = nq + nk, step = (long long)gridDim.x * blockDim.x;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += 4 * step) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const long long j = i + u * step;
      if (j < n) v[u] = j < nq ? q[j] : k[j - nq];
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const long long j = i + u * step;
      if (j < n) {
        if (j < nq) q_out[j] = v[u]; else k_out[j - nq] = v[u];
      }
    }
  }
}

// The bench's decode floor (`bench --exchange-floor`): the exchange alone, with no row to
// load or store. One warp: lanes < world push this call's number into slot [rank] of their
// rank's buffer, then wait until every slot of ours holds it or a later one (a peer may be
// one call ahead, never two: its next push needs ours of the next call). state[0] counts
// the calls made; state[1] is set to 1 if a wait passed timeout_ns, and the kernel stops.
__device__ __forceinline__ unsigned long long* qknorm_pick(
    int i, unsigned long long* p0, unsigned long long* p1, unsigned long long* p2,
    unsigned long long* p3, unsigned long long* p4, unsigned long long* p5,
    unsigned long long* p6, unsigned long long* p7) {
  unsigned long long* const p[8] = {p0, p1, p2, p3, p4, p5, p6, p7};
  unsigned long long* out = nullptr;
#pragma unroll
  for (int r = 0; r < 8; ++r) if (i == r) out = p[r];  // selects, not a local array
  return out;
}

extern "C" __global__ void qknorm_exchange(
    unsigned long long* p0, unsigned long long* p1, unsigned long long* p2,
    unsigned long long* p3, unsigned long long* p4, unsigned long long* p5,
    unsigned long long* p6, unsigned long long* p7, unsigned long long* state, int world,
    int rank, long long timeout_ns) {
  qknorm::grid_dependency_wait();
  if (qknorm::load_volatile(state + 1) != 0) return;  // a wait already timed out
  const int lane = threadIdx.x;
  const unsigned long long call = qknorm::load_volatile(state) + 1;
  bool ok = true;
  if (lane < world) {
    qknorm::store_volatile(qknorm_pick(lane, p0, p1, p2, p3, p4, p5, p6, p7) + rank, call);
    const unsigned long long* mine =
        qknorm_pick(rank, p0, p1, p2, p3, p4, p5, p6, p7) + lane;
    const unsigned long long start = qknorm::global_timer_ns();
    for (unsigned int spin = 0; qknorm::load_volatile(mine) < call; ++spin) {
      if ((spin & 63u) == 63u &&
          (long long)(qknorm::global_timer_ns() - start) > timeout_ns) {
        ok = false;
        break;
      }
    }
  }
  ok = __all_sync(0xffffffffu, ok);
  if (lane == 0) {
    if (!ok) qknorm::store_volatile(state + 1, 1ull);
    qknorm::store_volatile(state, call);
  }
}

namespace qknorm {

// RoPE alone, in place after a norm (the benchmark's unfused baseline): reads the rotated
// vectors of every head of rows q and k, rotates them by the angles of positions[t] and
// writes them to q_out and k_out; the other elements are neither read nor written.
// Any grid, Warps * 32 threads a block; launch bounds as apply's with RoPE.
template <class Elem, class Slice, int Warps, class Rope>
__global__ void __launch_bounds__(Warps * 32, 1) rope(const Params p) {
  static_assert(Rope::kStyle != kRopeNone, "rope needs a rotary embedding: NeoX or GptJ");
  constexpr int kThreads = Warps * 32, kElems = Vec<Elem>::kElems;
  using RowLayout = typename LayoutFor<Elem, Slice, kThreads, Rope>::type;
  using Math = RowMath<RowLayout>;
  using TokenAngles = Angles<RowLayout, Rope>;
  int bad = -1;  // a row whose position is out of range, recorded after the loop
  for (long long t = blockIdx.x; t < p.tokens; t += gridDim.x) {
    const PositionWords words = load_position(p, t);
    uint4 x[RowLayout::kSlots];
#pragma unroll
    for (int j = 0; j < RowLayout::kSlots; ++j) {
      x[j] = make_uint4(0u, 0u, 0u, 0u);
      if (RowLayout::valid(j) && TokenAngles::rotated(j))
        x[j] = *static_cast<const uint4*>(Math::source(p, t, j));
    }
    const int r = angle_row(p, words);  // the same for every thread
    if (r < 0) {
      bad = (int)t;
      continue;
    }
    TokenAngles angles;
    angles.load(p, r);
#pragma unroll
    for (int j = 0; j < RowLayout::kSlots; ++j) {
      if constexpr (TokenAngles::kPaired) {  // the pair in slots j and j + 1 (both valid)
        if (j % 2 == 0 && j + 1 < RowLayout::kSlots && RowLayout::paired(j)) {
          float lo[kElems], hi[kElems];
          Vec<Elem>::unpack(x[j], lo);
          Vec<Elem>::unpack(x[j + 1], hi);
          angles.rotate_pair(lo, hi);
          Math::store(p, t, j, lo);
          Math::store(p, t, j + 1, hi);
        }
        continue;
      }
      if (TokenAngles::kExchange ? !RowLayout::warp_valid(j) : !RowLayout::valid(j)) continue;
      float f[kElems];
      Vec<Elem>::unpack(x[j], f);
      angles.rotate(j, f);
      if (!RowLayout::valid(j) || !TokenAngles::rotated(j)) continue;
      Math::store(p, t, j, f);
    }
  }
  if (bad >= 0 && threadIdx.x == 0) record_position_error(p, bad);
}

// The KV-cache write as a launch of its own: token t's rows of k_out and v to its slot of
// k_cache and v_cache, 16-byte loads, each thread's vectors loaded before any is stored.
// Any grid, Warps * 32 threads a block. The "ipc" transport's second launch from
// split_from tokens a launch, after the fused kernel without a cache (its Params), and the
// benchmark's unfused baseline (as vLLM's reshape_and_cache_flash; no positions). As the
// fused kernel's epilogue does, it writes nothing once the exchange failed on this rank
// and leaves out a row whose position is out of range (the norm did not store it). The
// failure word, the position, the slot and both rows are loaded together, and only then
// looked at: one memory latency a token, not three in a row (every row read exists,
// whatever the position or the slot say).
template <class Elem, int KWidth, int Warps, class Cache>
__global__ void __launch_bounds__(Warps * 32) cache_write(const Params p) {
  static_assert(Cache::kOn, "cache_write needs a cache");
  constexpr int kThreads = Warps * 32, kElems = Vec<Elem>::kElems;
  constexpr int kVectors = KWidth / kElems;
  constexpr int kPer = (kVectors + kThreads - 1) / kThreads;
  using Slot = TokenCache<Elem, Cache>;
  grid_dependency_wait();  // the norm's rows and error record are complete from here on
  const bool failed = exchange_failed(p);  // waited for at the first token's check
  CacheScales<Cache> scales;
  scales.load(p);
  for (long long t = blockIdx.x; t < p.tokens; t += gridDim.x) {
    PositionWords words = {0, 0};
    if (p.positions != nullptr) words = load_position(p, t);
    Slot slot;
    slot.load(p, t);
    ValueRow<Elem, Cache, KWidth, kThreads> values;
    values.load(p, t);
    const uint4* k = reinterpret_cast<const uint4*>(static_cast<const Elem*>(p.k_out) +
                                                    t * p.k_out_stride);
    uint4 x[kPer];
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int i = (int)threadIdx.x + u * kThreads;
      if (i < kVectors) x[u] = k[i];
    }
    if (t == blockIdx.x) scales.prepare(p);  // behind the first token's loads
    if (failed) return;
    if (p.positions != nullptr && angle_row(p, words) < 0) continue;
    slot.scales = scales;
    const long long at = slot.row(p);
    if (at < 0) {
      if (threadIdx.x == 0 && slot.bad(p)) record_slot_error(p, slot.slot, t);
      continue;
    }
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int i = (int)threadIdx.x + u * kThreads;
      if (i < kVectors) slot.store_k(p, at, i * kElems, x[u]);
    }
    values.store(p, at, slot);
  }
}

}  // namespace qknorm
