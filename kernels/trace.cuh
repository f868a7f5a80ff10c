// Where a block's time goes (a diagnostic build: QKNORM_TRACE=1, from CUPY_QKNORM_TRACE=1;
// scripts/trace_fused.py reads it). Thread 0 of each block counts SM cycles and writes one
// record of kTraceWords to p.sums (the IPC transport allocates it for the trace):
//   {globaltimer at entry, cycles to pass griddepcontrol.wait, cycles from there to the
//    first push, cycles waiting for partials (every token), cycles of the block, tokens,
//    globaltimer at the end, cycles waiting for rows and the block's sum (every token),
//    cycles waiting for the first token's partials, longest single wait}
// Off (the default), Trace is empty and every call on it compiles to nothing.
#pragma once

#include "params.cuh"
#include "ptx.cuh"

namespace qknorm {

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

}  // namespace qknorm
