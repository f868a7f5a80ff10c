// The PTX the kernels need beyond plain C++: volatile loads and stores (the exchange's
// words, read and written across GPUs), the GPU's clock, programmatic dependent launch,
// asynchronous copies into shared memory and L2 prefetch. No CUDA headers.
#pragma once

namespace qknorm {

// Volatile: every read goes to memory (a peer writes the word through NVLink while we
// spin on it), and no write is merged or kept back.
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

// Nanoseconds of the GPU's global timer: timeouts are measured on the device, which has
// no other clock that runs at a known rate.
__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Programmatic dependent launch (sm_90+): the host launches the fused kernel with the
// programmatic-serialization attribute, so it may start while the previous kernel of the
// stream is still running. Nothing before grid_dependency_wait() may read memory that an
// earlier kernel writes, except to steer a prefetch (rope.cuh's early_position: read
// through L2, its value picks only the lines); after it, everything of the previous
// kernel is visible.
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
// Asks L2 (or this SM's L1 and L2) for the 128-byte line holding `p` (no register waits
// for it).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}
__device__ __forceinline__ void prefetch_l1(const void* p) {
  asm volatile("prefetch.global.L1 [%0];" ::"l"(p));
}
// A word read through L2 only (ld.global.cg): no line of it is left in this SM's L1, where
// a later plain load could find it stale.
__device__ __forceinline__ int load_cg(const int* p) {
  int v;
  asm volatile("ld.global.cg.b32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ void copy_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int Pending>  // waits until at most Pending of this thread's newest groups are left
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(Pending) : "memory");
}

}  // namespace qknorm
