// Entry file of the qknorm module: cupy_qknorm/compile.py compiles this with
// name_expressions, which instantiate exactly the specializations asked for:
//   qknorm::fused<T, W, G, DQ, DK, WARPS, DEPTH, STAGED, HEAD, ROT, STYLE>
//   qknorm::partial_sums<T, DQ, DK, WARPS>
//   qknorm::apply<T, W, DQ, DK, WARPS, HEAD, ROT, STYLE>
//   qknorm::rope<T, DQ, DK, WARPS, HEAD, ROT, STYLE>
//   qknorm::reject<G>
// e.g. "qknorm::fused<qknorm::bf16_t, float, 2, 3072, 512, 7, 2, 0, 128, 64, 1>" (STYLE
// 0: no RoPE, with HEAD = ROT = 0; 1: NeoX; 2: GPT-J).
#include "qknorm.cuh"

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
