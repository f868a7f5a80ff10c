// What the host and the kernels share by layout: the launch parameters and the error
// record. cupy_qknorm/params.py mirrors both; tests/test_compile.py compiles its table of
// fields against this struct, so each side's offsets and sizes are checked by the other.
#pragma once

namespace qknorm {

// Launch parameters, passed by value. The first 96 bytes (q .. position_bytes) are what
// the host repacks for each launch; the rest is packed once.
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
  int tokens;                          // rows in this launch
  int position_bytes;                  // RoPE: 4 or 8
  uint4* slots[8];                     // exchange buffer of every rank (slots[rank] is ours)
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
};

// Every field where the host packs it (params.FIELDS): a field moved, resized or swapped
// with one of its size fails the build instead of launching garbage.
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
QKNORM_FIELD(slots, 96, 64);
QKNORM_FIELD(counters, 160, 8);
QKNORM_FIELD(error, 168, 8);
QKNORM_FIELD(error_host, 176, 8);
QKNORM_FIELD(sums, 184, 8);
QKNORM_FIELD(cos_sin, 192, 8);
QKNORM_FIELD(timeout_ns, 200, 8);
QKNORM_FIELD(max_tokens, 208, 4);
QKNORM_FIELD(rank, 212, 4);
QKNORM_FIELD(eps, 216, 4);
QKNORM_FIELD(q_dim, 220, 4);
QKNORM_FIELD(k_dim, 224, 4);
QKNORM_FIELD(max_position, 228, 4);
#undef QKNORM_FIELD
constexpr int kParamsBytes = 232;
static_assert(sizeof(Params) == kParamsBytes, "Params layout is shared with the host");

// Error record: {code, peer, token, rank, peer's value, our value, 0, lock}. The codes and
// words 0-5 are read by the host; word 7 is the device's own (record_error's lock) and
// starts at 0 like the rest.
constexpr int kErrorWords = 8;
constexpr int kErrorTimeout = 1;   // the peer's partial sums never came
constexpr int kErrorTokens = 2;    // the peer launched with another token count
constexpr int kErrorSequence = 3;  // the peer's slot holds another use of this token
constexpr int kErrorPosition = 4;  // a row's position is outside [0, max_position)
constexpr int kErrorRejected = 5;  // the peer's host rejected its input (qknorm::reject)
constexpr int kErrorLock = 7;

}  // namespace qknorm
