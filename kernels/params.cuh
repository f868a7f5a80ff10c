// What the host and the kernels share by layout: the launch parameters and the error
// record. cupy_qknorm/params.py mirrors both; tests/test_compile.py compiles its table of
// fields against this struct, so each side's offsets and sizes are checked by the other.
#pragma once

namespace qknorm {

// The most ranks an object spans: the width of Params::slots and of the unfused path's
// header (unfused.cuh).
constexpr int kMaxWorld = 16;

// Params::flags
constexpr int kFlagRefused = 1;  // this rank refused its input: take part, read no row
// k's slice is a replica of a head that a lower rank holds too (KV heads fewer than the
// ranks): its partial sum of k counts 0, so each distinct head is summed once
constexpr int kFlagKReplica = 2;
constexpr int kFlagNoKStore = 4;  // with a KV cache: k's row goes to the cache only


// Launch parameters, passed by value. The first 112 bytes (q .. flags) are what the host
// packs for each launch (a call's chunk); slots .. max_position are packed once an object;
// the KV cache's fields (v ..) are packed for each launch of a call with a cache.
struct Params {
  const void* q;                       // [tokens, q_stride] rows, this rank's slice
  const void* k;
  void* q_out;                         // may equal q (in place)
  void* k_out;
  const void* q_weight;                // [local q width], the data type or float
  const void* k_weight;
  long long q_stride;                  // elements between rows
  long long k_stride;
  long long q_out_stride;
  long long k_out_stride;
  const void* positions;               // RoPE: [tokens] int32 or int64 position of each row
  int tokens;                          // rows in this launch (a chunk of the call)
  int position_bytes;                  // RoPE: 4 or 8
  int first_token;                     // the call's token that is this launch's row 0
  int call_tokens;                     // the call's T (below 2^24), the same on every rank
  int tag;                             // the call's tag + 1, or 0 for none
  int flags;                           // kFlag*
  uint4* slots[kMaxWorld];             // exchange buffer of every rank (slots[rank] is ours)
  unsigned int* counters;              // [max_tokens] uses of each token slot so far
  int* error;                          // device error record, kErrorWords ints
  int* error_host;                     // host-mapped copy of the record, or null
  float* sums;                         // unfused path: kSumsHeader floats, then [tokens, 2]
  const float* cos_sin;                // RoPE: [max_position, rotary_dim]: cos, then sin
  long long timeout_ns;                // <= 0: wait forever
  int max_tokens;                      // rows the exchange buffer holds per half
  int rank;
  float eps;
  float q_dim;                         // full (unsharded) widths, as divisors
  float k_dim;
  int max_position;                    // RoPE: rows of cos_sin
  const void* v;                       // KV cache: [tokens, v_stride] rows of k's width
  long long v_stride;                  // elements between rows of v
  void* k_cache;                       // [blocks][block_size][heads][head_dim], any strides
  void* v_cache;
  long long cache_block;               // strides of both caches, in their elements
  long long cache_row;
  long long cache_head;
  const void* slot_mapping;            // [tokens] int32 or int64: the token's slot, -1: none
  const float* k_scale_at;             // FP8: the scales on the device, or null: k_rcp
  const float* v_scale_at;
  long long num_slots;                 // blocks * block_size
  int block_size;
  int slot_bytes;                      // 4 or 8 (0: no cache in this launch)
  double k_rcp;                        // FP8: cache = fp8(value / scale); 1 / scale rounded
  double v_rcp;                        // to fp64, where the scale is not on the device
};

// Every field where the host packs it (params.FIELDS): a field moved, resized or swapped
// with one of its size fails the build instead of launching garbage. Checked where the
// compiler has __builtin_offsetof: NVRTC 13.5 has it, 13.0 has neither it in device code
// nor offsetof; CI's builds and tests/test_compile.py's probe of params.FIELDS have it.
#if defined(__has_builtin)
#if __has_builtin(__builtin_offsetof)
#define QKNORM_CHECK_FIELDS 1
#endif
#endif
#ifdef QKNORM_CHECK_FIELDS
#define QKNORM_FIELD(name, offset, bytes)                                                  \
  static_assert(__builtin_offsetof(Params, name) == (offset) &&                            \
                    sizeof(Params::name) == (bytes),                                       \
                "Params::" #name " is not where cupy_qknorm/params.py packs it")
QKNORM_FIELD(q, 0, 8);
QKNORM_FIELD(k, 8, 8);
QKNORM_FIELD(q_out, 16, 8);
QKNORM_FIELD(k_out, 24, 8);
QKNORM_FIELD(q_weight, 32, 8);
QKNORM_FIELD(k_weight, 40, 8);
QKNORM_FIELD(q_stride, 48, 8);
QKNORM_FIELD(k_stride, 56, 8);
QKNORM_FIELD(q_out_stride, 64, 8);
QKNORM_FIELD(k_out_stride, 72, 8);
QKNORM_FIELD(positions, 80, 8);
QKNORM_FIELD(tokens, 88, 4);
QKNORM_FIELD(position_bytes, 92, 4);
QKNORM_FIELD(first_token, 96, 4);
QKNORM_FIELD(call_tokens, 100, 4);
QKNORM_FIELD(tag, 104, 4);
QKNORM_FIELD(flags, 108, 4);
QKNORM_FIELD(slots, 112, 128);
QKNORM_FIELD(counters, 240, 8);
QKNORM_FIELD(error, 248, 8);
QKNORM_FIELD(error_host, 256, 8);
QKNORM_FIELD(sums, 264, 8);
QKNORM_FIELD(cos_sin, 272, 8);
QKNORM_FIELD(timeout_ns, 280, 8);
QKNORM_FIELD(max_tokens, 288, 4);
QKNORM_FIELD(rank, 292, 4);
QKNORM_FIELD(eps, 296, 4);
QKNORM_FIELD(q_dim, 300, 4);
QKNORM_FIELD(k_dim, 304, 4);
QKNORM_FIELD(max_position, 308, 4);
QKNORM_FIELD(v, 312, 8);
QKNORM_FIELD(v_stride, 320, 8);
QKNORM_FIELD(k_cache, 328, 8);
QKNORM_FIELD(v_cache, 336, 8);
QKNORM_FIELD(cache_block, 344, 8);
QKNORM_FIELD(cache_row, 352, 8);
QKNORM_FIELD(cache_head, 360, 8);
QKNORM_FIELD(slot_mapping, 368, 8);
QKNORM_FIELD(k_scale_at, 376, 8);
QKNORM_FIELD(v_scale_at, 384, 8);
QKNORM_FIELD(num_slots, 392, 8);
QKNORM_FIELD(block_size, 400, 4);
QKNORM_FIELD(slot_bytes, 404, 4);
QKNORM_FIELD(k_rcp, 408, 8);
QKNORM_FIELD(v_rcp, 416, 8);
#undef QKNORM_FIELD
#endif
constexpr int kParamsBytes = 424;
static_assert(sizeof(Params) == kParamsBytes, "Params layout is shared with the host");

// Error record: {code, peer, token, rank, theirs, ours, failed, lock}: theirs and ours are
// the peer's and this rank's value of what differs (T, use number, tag code), or a
// position and the table's rows (kErrorPosition), or a slot and the cache's slots
// (kErrorSlot). The host reads words 0-5 (the report); words 6 (1 once this rank's
// exchange failed) and 7 (record_error's lock) are the device's, and start at 0 like the
// rest. Tokens are the call's (first_token + the launch's row).
constexpr int kErrorWords = 8;
constexpr int kErrorTimeout = 1;        // the peer's partial sums never came
constexpr int kErrorTokens = 2;         // the peer's call has another T
constexpr int kErrorSequence = 3;       // the peer's slot holds another use of this token
constexpr int kErrorPosition = 4;       // this rank's position of a row is outside the table
constexpr int kErrorRejected = 5;       // the peer refused its input of this call
constexpr int kErrorTag = 6;            // the peer's call has another tag
constexpr int kErrorPeerPosition = 7;   // the peer's position of a row is outside its table
constexpr int kErrorSlot = 8;           // this rank's slot of a row is outside its KV cache
constexpr int kErrorFailed = 6;         // (words of the record, not codes)
constexpr int kErrorLock = 7;

}  // namespace qknorm
