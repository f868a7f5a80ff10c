// Entry file of the qknorm module: cupy_qknorm/compile.py compiles this with
// name_expressions such as "qknorm::fused<qknorm::bf16_t, float, 2, 3072, 512, 4>",
// which instantiate exactly the specializations asked for.
#include "qknorm.cuh"

// Writes one value with a plain store (through NVLink when `dst` is a peer mapping):
// the proof that peer writes really arrive, made once per buffer before first use.
extern "C" __global__ void qknorm_probe(unsigned long long* dst, unsigned long long value) {
  qknorm::store_volatile(dst, value);
}
