// The exchange of partial sums between ranks: the slot protocol, and the error record a
// failed exchange leaves for the host.
//
// Each rank owns slots[2][max_tokens][G] of 16 bytes: slot [h][t][r] holds rank r's
// {sum_q, sum_k, tokens in its launch, use number of token t} for token t.
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
#pragma once

#include "params.cuh"
#include "ptx.cuh"

namespace qknorm {

constexpr unsigned int kEmptyWord = 0x80000000u;
// The token count of a slot that qknorm::reject pushes: a rank whose host rejected its
// input says so in token 0's slot, where its peers wait, instead of leaving them to their
// timeout. No launch has that many tokens.
constexpr unsigned int kRejectTokens = 0x7ffffffeu;

__device__ __forceinline__ bool complete(const uint4 v) {
  return v.x != kEmptyWord && v.y != kEmptyWord && v.z != kEmptyWord && v.w != kEmptyWord;
}

__device__ __forceinline__ uint4 make_slot(float sq, float sk, int tokens, unsigned int uses) {
  unsigned int q = __float_as_uint(sq), k = __float_as_uint(sk);
  if (q == kEmptyWord) q = 0u;  // never true for a sum of squares; keeps the marker unique
  if (k == kEmptyWord) k = 0u;
  return make_uint4(q, k, (unsigned int)tokens, uses & 0x7fffffffu);
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

}  // namespace qknorm
