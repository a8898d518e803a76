// The dropout random stream shared by every backend (CPU, CUDA, Triton, reference), bit for bit:
// engine/reference.py dropout_uniform is the specification.
//
//   bits = word 0 of Philox4x32-10(counter = (c0, c1, c2, 0), key = (seed lo, seed hi))
//          (the generator of Triton's tl.philox / tl.rand)
//   u    = float(bits as int32, negatives folded to ~x) * 4.6566127342e-10f   in [0, 1)
//          (tl.uint_to_uniform_float)
//   keep = u >= p (p rounded to fp32, as torch compares a float32 tensor with a Python float)
//
// Attention uses the counters (key j, query i, b * Hq + h); an [M, N] activation (n, m, 0).
// Kept values are scaled by 1 / (1 - p) by the caller.
#pragma once

#include <cstdint>

#include "common/dtypes.h"

namespace engine {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;    // key increments per round
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;  // round multipliers
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;

// Word 0 of Philox4x32-10 for counter (c0, c1, c2, 0) and key (k0, k1). Each round multiplies
// 32 x 32 -> 64 bits (one IMAD.WIDE on the GPU, vpmuludq in a vectorized CPU loop).
HOST_DEVICE uint32_t philox_word0(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t k0, uint32_t k1) {
  uint32_t c3 = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t product_b = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint64_t product_a = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint32_t next0 = static_cast<uint32_t>(product_b >> 32) ^ c1 ^ k0;
    const uint32_t next2 = static_cast<uint32_t>(product_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(product_b);
    c3 = static_cast<uint32_t>(product_a);
    c0 = next0;
    c2 = next2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// tl.uint_to_uniform_float: the word as int32, negatives folded (~x), times the largest float
// that keeps the result below 1. Exactly two roundings (int -> float, the product), as the
// reference does them.
HOST_DEVICE float philox_uniform(uint32_t bits) {
  const int32_t as_int = static_cast<int32_t>(bits);
  const int32_t folded = as_int < 0 ? ~as_int : as_int;
  return static_cast<float>(folded) * 4.6566127342e-10f;
}

// The key of the stream for a 64-bit seed.
struct PhiloxKey {
  uint32_t k0;  // seed bits 0..31
  uint32_t k1;  // seed bits 32..63
};

HOST_DEVICE PhiloxKey philox_key(uint64_t seed) {
  return PhiloxKey{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
}

// Uniform [0, 1) number of the dropout stream for counters (c0, c1, c2).
HOST_DEVICE float dropout_uniform(PhiloxKey key, uint32_t c0, uint32_t c1, uint32_t c2) {
  return philox_uniform(philox_word0(c0, c1, c2, key.k0, key.k1));
}

// Whether dropout with probability p (as fp32) keeps the element at counters (c0, c1, c2).
HOST_DEVICE bool dropout_keep(PhiloxKey key, float p, uint32_t c0, uint32_t c1, uint32_t c2) {
  return dropout_uniform(key, c0, c1, c2) >= p;
}

}  // namespace engine
