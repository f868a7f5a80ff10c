// Entry file of the qknorm module: cupy_qknorm/compile.py compiles this with
// name_expressions such as "qknorm::fused<qknorm::bf16_t, float, 2, 3072, 512, 4>",
// which instantiate exactly the specializations asked for.
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
