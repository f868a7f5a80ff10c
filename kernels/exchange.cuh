// The exchange of partial sums between ranks: the slot protocol, and the error record a
// failed exchange leaves for the host.
//
// Each rank owns slots[2][max_tokens][G] of 16 bytes: slot [h][t][r] holds rank r's
// {sum_q, sum_k, call word, use word} for token t of a launch:
//   call word: the call's T (bits 0-29; below 2^24), and bit 30 where rank r's position of
//              the token is outside its RoPE table (the peers learn it with the sums);
//   use word:  the use number of token slot t (bits 0-15) and the call's tag + 1 (bits
//              16-30; 0: no tag).
// The value is its own flag, word by word: an empty word holds 0x80000000, which no word
// of a written slot can hold (the sums are sums of squares: +0.0 or more, or NaN with other
// bits, never -0.0; the other two words keep bit 31 clear). So zero rows, eps = 0, Inf and
// NaN all pass through, and a slot read while its 16-byte store lands part by part is
// simply read again. The reader resets a slot to empty after reading it. Consecutive uses
// of a token slot alternate halves (counters[t] & 1), so a peer that runs one call ahead
// writes the other half and never overwrites a value not yet read; it cannot run two calls
// ahead, since that needs our partial of the next call, written only after this launch
// finished. T, the use number and the tag let a reader see a peer that made another call
// (another T, calls out of step, another layer) instead of mixing two calls; 16 bits of
// use number suffice, since a peer is never more than one call away.
#pragma once

#include "params.cuh"
#include "ptx.cuh"

namespace qknorm {

constexpr unsigned int kEmptyWord = 0x80000000u;
constexpr unsigned int kCallTokens = 0x3fffffffu;     // call word: the call's T
constexpr unsigned int kBadPosition = 0x40000000u;    // call word: the position is outside
constexpr unsigned int kUseNumber = 0xffffu;          // use word: the use number
constexpr int kTagShift = 16;                         // use word: the tag code above it
// The call word of a slot that qknorm::reject pushes: a rank whose host refused its input
// says so in token 0's slot, where its peers wait, instead of leaving them to their
// timeout. No call has that many tokens.
constexpr unsigned int kRejectTokens = 0x7ffffffeu;

__device__ __forceinline__ bool complete(const uint4 v) {
  return v.x != kEmptyWord && v.y != kEmptyWord && v.z != kEmptyWord && v.w != kEmptyWord;
}

__device__ __forceinline__ uint4 make_slot(float sq, float sk, unsigned int call,
                                           unsigned int uses, int tag) {
  unsigned int q = __float_as_uint(sq), k = __float_as_uint(sk);
  if (q == kEmptyWord) q = 0u;  // never true for a sum of squares; keeps the marker unique
  if (k == kEmptyWord) k = 0u;
  return make_uint4(q, k, call, (uses & kUseNumber) | ((unsigned int)tag << kTagShift));
}

// Whether a code is a failure of the exchange (the sums of that launch are not whole, and
// nothing more of this rank's exchange can be trusted), unlike a position out of range,
// this rank's or a peer's, which leaves the exchange in step.
__device__ __forceinline__ bool breaks_exchange(int code) {
  return code != kErrorPosition && code != kErrorPeerPosition;
}

// Records an error in device memory and, if mapped, in host memory, where the host reads
// it without synchronizing. Two things: a failure of the exchange sets the record's failed
// word, which ends every wait and store of this rank from then on (exchange_failed); and
// the report {code, peer, token, rank, theirs, ours} is the first error's, except that
// this rank's own position error takes it over from a peer's. The first error is the
// cause: a wait that later times out because the ranks' hosts stopped at different calls
// does not hide it. A lock keeps two owners' words from mixing, an owner that finds the
// code no longer its own writes nothing, and the host's code word is cleared while the
// words under it change.
// report_error is the report alone: for a finding that leaves the exchange in step and is
// no position (a slot outside the KV cache).
__device__ __forceinline__ void report_error(const Params& p, int code, int peer, int token,
                                             int theirs, int ours) {
  int old = atomicCAS(p.error, 0, code);
  if (old == kErrorPeerPosition && code == kErrorPosition)
    old = atomicCAS(p.error, kErrorPeerPosition, code) == kErrorPeerPosition ? 0 : old;
  if (old != 0) return;
  while (atomicCAS(p.error + kErrorLock, 0, 1) != 0) {}
  if (*(volatile int*)p.error == code) {
    const int words[kErrorFailed] = {code, peer, token, p.rank, theirs, ours};
#pragma unroll
    for (int i = 1; i < kErrorFailed; ++i) p.error[i] = words[i];
    if (p.error_host != nullptr) {
      *(volatile int*)p.error_host = 0;  // (a takeover: the host must not pair old and new)
      __threadfence_system();
#pragma unroll
      for (int i = 1; i < kErrorFailed; ++i) p.error_host[i] = words[i];
      __threadfence_system();
      *(volatile int*)p.error_host = code;
    }
  }
  __threadfence();
  atomicExch(p.error + kErrorLock, 0);
}

__device__ void record_error(const Params& p, int code, int peer, int token, int theirs,
                             int ours) {
  if (breaks_exchange(code)) atomicExch(p.error + kErrorFailed, 1);
  report_error(p, code, peer, token, theirs, ours);
}

// Whether the exchange already failed on this rank (a failure of the exchange was recorded,
// in this launch or an earlier one, or the host's watchdog ended an all-reduce).
__device__ __forceinline__ bool exchange_failed(const Params& p) {
  return *(volatile int*)(p.error + kErrorFailed) != 0;
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
