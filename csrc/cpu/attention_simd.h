// Internal to the CPU attention units (attention_forward.cpp, attention_backward.cpp): 64-byte
// aligned scratch tiles and the small SIMD layer of the elementwise passes (online softmax,
// P = e^(s - lse), dS = P (dP - delta)).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common/attention.h"
#include "common/float_math.h"

namespace engine::cpu::attention_detail {

// ---------------------------------------------------------------------------------------------
// Scratch memory: 64-byte aligned, zero-initialized (padding lanes of tiles then hold finite
// values forever: they are computed on but never stored).

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

template <typename A>
std::unique_ptr<A[], AlignedFree> aligned_buffer(int64_t count) {
  const size_t bytes = (static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(A) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  return std::unique_ptr<A[], AlignedFree>(static_cast<A*>(p));
}

// ---------------------------------------------------------------------------------------------
// A minimal SIMD layer for the elementwise passes: 16 fp32 lanes with AVX-512, 8 with AVX2, else
// one scalar lane (fp64 data, or a CPU without either; the compiler vectorizes what it can).

template <typename A>
struct ScalarLanes {
  using V = A;
  static constexpr int W = 1;
  static V load(const A* p) { return *p; }
  static void store(A* p, V v) { *p = v; }
  static V set1(A x) { return x; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V max(V a, V b) { return a > b ? a : b; }
  static V safe_max(V m) { return attention_safe_max(m); }
  // e^(x - y): the difference first, so that it is exactly 1 when x == y
  static V exp_diff(V x, V y) { return math::exp_of(x - y); }
};

#if defined(__AVX512F__)
struct Avx512Lanes {
  using V = __m512;
  static constexpr int W = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  // max(a, b) with a NaN in b propagated (vmaxps returns its second operand on NaN)
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V safe_max(V m) {
    const __mmask16 empty = _mm512_cmp_ps_mask(m, _mm512_set1_ps(-HUGE_VALF), _CMP_EQ_OQ);
    return _mm512_mask_blend_ps(empty, m, _mm512_setzero_ps());
  }
  // e^(x - y) by math::exp_f32 lane by lane: the loop compiles to the vector instructions of one
  // register (two 256-bit halves where GCC prefers 256-bit vectors, as for sapphirerapids), so
  // the CPU code keeps a single fp32 exp (its measured accuracy is in common/float_math.h)
  static V exp_diff(V x, V y) {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, _mm512_sub_ps(x, y));
#pragma omp simd
    for (int i = 0; i < 16; ++i) lanes[i] = math::exp_f32(lanes[i]);
    return _mm512_load_ps(lanes);
  }
};
template <typename A>
using Lanes = std::conditional_t<std::is_same_v<A, float>, Avx512Lanes, ScalarLanes<A>>;
#elif defined(__AVX2__) && defined(__FMA__)
// Avx512Lanes on 8 lanes, for AVX2 machines (such as this project's AMD EPYC development VM):
// with one scalar lane, the online softmax and its exps took about as long as both tile
// products at [1, 4, 16, 16] fp32. The same operations lane by lane, so the same results.
struct Avx2Lanes {
  using V = __m256;
  static constexpr int W = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  // max(a, b) with a NaN in b propagated (vmaxps returns its second operand on NaN)
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V safe_max(V m) {
    const V empty = _mm256_cmp_ps(m, _mm256_set1_ps(-HUGE_VALF), _CMP_EQ_OQ);
    return _mm256_blendv_ps(m, _mm256_setzero_ps(), empty);
  }
  static V exp_diff(V x, V y) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_sub_ps(x, y));
#pragma omp simd
    for (int i = 0; i < 8; ++i) lanes[i] = math::exp_f32(lanes[i]);
    return _mm256_load_ps(lanes);
  }
};
template <typename A>
using Lanes = std::conditional_t<std::is_same_v<A, float>, Avx2Lanes, ScalarLanes<A>>;
#else
template <typename A>
using Lanes = ScalarLanes<A>;
#endif

}  // namespace engine::cpu::attention_detail
