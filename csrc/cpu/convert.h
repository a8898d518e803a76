// Conversions between the storage types (common/dtypes.h) and the accumulator type on the CPU.
// Every CPU kernel converts a row into an fp32 (fp64 for double) buffer, does its arithmetic
// there in loops the compiler vectorizes, and converts the result back once.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "common/dtypes.h"

namespace engine::cpu {

inline float half_bits_to_float(uint16_t h) {
  // Exact for normals, subnormals, infinities and NaN: move exponent and mantissa into place,
  // then rescale the exponent bias (15 -> 127) with one multiply that also normalizes subnormals.
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t magnitude = static_cast<uint32_t>(h & 0x7fffu) << 13;
  float value;
  std::memcpy(&value, &magnitude, 4);
  value *= 0x1p112f;
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if ((h & 0x7c00u) == 0x7c00u) bits = 0x7f800000u | magnitude;  // inf / NaN
  bits |= sign;
  std::memcpy(&value, &bits, 4);
  return value;
}

inline uint16_t float_to_half_bits(float value) {
#if defined(__F16C__)
  return static_cast<uint16_t>(_cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT));
#else
  _Float16 rounded = static_cast<_Float16>(value);  // GCC >= 12 and Clang: correct rounding
  uint16_t bits;
  std::memcpy(&bits, &rounded, 2);
  return bits;
#endif
}

// to_acc: one stored element -> accumulator type; from_acc: the reverse (rounded once).
inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(half v) { return half_bits_to_float(v.bits); }
inline float to_acc(bfloat16 v) { return bf16_bits_to_float(v.bits); }

template <typename T>
inline T from_acc(acc_t<T> v);
template <>
inline float from_acc<float>(float v) { return v; }
template <>
inline double from_acc<double>(double v) { return v; }
template <>
inline half from_acc<half>(float v) { return half{float_to_half_bits(v)}; }
template <>
inline bfloat16 from_acc<bfloat16>(float v) { return bfloat16{float_to_bf16_bits(v)}; }

// Whole rows, vectorized: F16C converts 8 halves per instruction; the bfloat16 bit operations
// and the float/double copies vectorize as plain loops.
template <typename T>
inline void load_row(const T* src, acc_t<T>* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = to_acc(src[j]);
}

template <typename T>
inline void store_row(const acc_t<T>* src, T* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = from_acc<T>(src[j]);
}

// Asks the cache for the n elements at `row` (one prefetch per 64-byte line). The row kernels
// prefetch the next row while computing on the current one: their passes over a row in L1 leave
// the memory bus idle, and the hardware prefetcher alone does not run far enough ahead.
template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < n * int64_t(sizeof(T)); offset += 64) __builtin_prefetch(bytes + offset);
}

#if defined(__F16C__)
template <>
inline void load_row<half>(const half* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(packed));
  }
  for (; j < n; ++j) dst[j] = to_acc(src[j]);
}

template <>
inline void store_row<half>(const float* src, half* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m128i packed = _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), packed);
  }
  for (; j < n; ++j) dst[j] = from_acc<half>(src[j]);
}
#endif

// Outputs larger than this are written with streaming (non-temporal) stores: they would not
// stay in cache until the next op reads them, and streaming skips reading each destination
// line into cache before overwriting it, which saves a third of the memory traffic of a write.
constexpr int64_t kStreamingBytes = int64_t(16) << 20;

// Streaming stores start at a cache line: a line that takes both streaming and plain stores (the
// row's neighbours are written plainly) is read into cache and flushed again: with 32-byte
// alignment add layer norm ran at 0.75x torch at 4097 x 1025 fp32 against 0.99x (one thread).
constexpr int kStreamAlign = 64;

inline bool stream_aligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) & (kStreamAlign - 1)) == 0; }

// Copies `count` elements (count * sizeof(T) a multiple of kStreamAlign) from `chunk` to `dst`,
// with streaming stores (32 bytes each, AVX) when asked and dst is aligned for them.
template <typename T, int count>
inline void put_chunk(const T* chunk, T* dst, bool streaming) {
  static_assert(count * sizeof(T) % kStreamAlign == 0);
#if defined(__AVX__)
  if (streaming && stream_aligned(dst)) {
    for (int offset = 0; offset < count * int(sizeof(T)); offset += 32) {
      const char* from = reinterpret_cast<const char*>(chunk) + offset;
      _mm256_stream_si256(reinterpret_cast<__m256i*>(reinterpret_cast<char*>(dst) + offset),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from)));
    }
    return;
  }
#endif
  std::memcpy(dst, chunk, count * sizeof(T));
}

// Elements to handle one at a time before dst + j is aligned for streaming stores (0 without).
template <typename T>
inline int64_t stream_head(const T* dst, int64_t n, bool streaming) {
  if (!streaming) return 0;
  int64_t j = 0;
  while (j < n && !stream_aligned(dst + j)) ++j;
  return j;
}

// Streaming stores are weakly ordered: fence them before another thread or op reads the data.
inline void finish_streaming() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

}  // namespace engine::cpu
