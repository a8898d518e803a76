// The CPU attention tile product (declared in cpu/attention_gemm.h): a register-blocked micro-kernel
// for fp32 (AVX-512, or AVX2 with FMA), a generic blocked loop for fp64 (and for CPUs with neither).
#include "cpu/attention_gemm.h"

#include <algorithm>
#include <array>
#include <type_traits>
#include <utility>

#if defined(ENGINE_ATTENTION_MICRO_KERNEL)
#include <immintrin.h>
#endif

namespace engine::cpu::attention_detail {
namespace {

template <typename A>
void gemm_generic(int64_t M, int64_t N, int64_t K, const A* a, int64_t a_ms, int64_t a_ks, const A* b,
                  int64_t ldb, A* c, int64_t ldc, Init init, const A* row_scale) {
  constexpr int64_t MB = 4, NB = 64 / sizeof(A) * 4;  // 4 rows x 4 vectors of accumulators
  for (int64_t n0 = 0; n0 < N; n0 += NB) {
    const int64_t nb = std::min(NB, N - n0);
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      const int64_t mb = std::min(MB, M - m0);
      A acc[MB][NB];
      for (int64_t mm = 0; mm < mb; ++mm) {
        const A beta = init == Init::zero ? A(0) : init == Init::accumulate ? A(1) : row_scale[m0 + mm];
        for (int64_t nn = 0; nn < nb; ++nn)
          acc[mm][nn] = init == Init::zero ? A(0) : beta * c[(m0 + mm) * ldc + n0 + nn];
      }
      for (int64_t kk = 0; kk < K; ++kk) {
        const A* b_row = b + kk * ldb + n0;
        for (int64_t mm = 0; mm < mb; ++mm) {
          const A av = a[(m0 + mm) * a_ms + kk * a_ks];
#pragma omp simd
          for (int64_t nn = 0; nn < nb; ++nn) acc[mm][nn] += av * b_row[nn];
        }
      }
      for (int64_t mm = 0; mm < mb; ++mm)
        for (int64_t nn = 0; nn < nb; ++nn) c[(m0 + mm) * ldc + n0 + nn] = acc[mm][nn];
    }
  }
}

#if defined(ENGINE_ATTENTION_MICRO_KERNEL)
// One fp32 vector register of the micro-kernel, with masked loads and stores for the last,
// partial vector of a row (N % W != 0).
#if defined(__AVX512F__)
struct Vec {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int W = 16;
  static Mask first_lanes(int count) { return static_cast<Mask>(count == 16 ? 0xffffu : (1u << count) - 1u); }
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const float* p, Mask lanes) { return _mm512_maskz_loadu_ps(lanes, p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(float* p, V v, Mask lanes) { _mm512_mask_storeu_ps(p, lanes, v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
};
// A 6 x 4-vector block: 24 accumulators + 4 B vectors + one broadcast, 29 of the 32 zmm
// registers. Per k: 4 vector loads of B, 6 broadcasts of A, 24 FMAs, which keeps the FMA units
// (two per cycle, one 512-bit load per cycle) the bottleneck.
constexpr int kMR = 6;
constexpr int kNV = 4;
#else
struct Vec {
  using V = __m256;
  using Mask = __m256i;
  static constexpr int W = 8;
  static Mask first_lanes(int count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const float* p, Mask lanes) { return _mm256_maskload_ps(p, lanes); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store(float* p, V v, Mask lanes) { _mm256_maskstore_ps(p, lanes, v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
};
// A 6 x 2-vector block (BLIS's choice for Haswell-class AVX2): 12 accumulators + 2 B vectors +
// one broadcast, 15 of the 16 ymm registers. Without it the generic loop ran the tiles: attention
// fwd 4x12x512x64 fp32 took 0.45x torch's SDPA time ratio on this project's AVX2 VM.
constexpr int kMR = 6;
constexpr int kNV = 2;
#endif

// An MR x (W NV) block of C in registers. With Tail, the last vector holds `tail` < W columns
// (N % W != 0) and is loaded and stored through a mask; full panels take plain loads and stores. The sum over k runs in chunks of kChunk
// terms (see cpu/attention_gemm.h).
template <int MR, int NV, bool Tail>
__attribute__((always_inline)) inline Vec::V load_vector(const float* p, int v, Vec::Mask last) {
  return Tail && v == NV - 1 ? Vec::load(p, last) : Vec::load(p);
}

template <int MR, int NV, bool Tail>
__attribute__((always_inline)) inline void load_block(Vec::V (&acc)[MR][NV], const float* c, int64_t ldc,
                                                      Vec::Mask last) {
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = load_vector<MR, NV, Tail>(c + m * ldc + Vec::W * v, v, last);
}

template <int MR, int NV, bool Tail>
inline void micro_kernel(int64_t K, const float* a, int64_t a_ms, int64_t a_ks, const float* b, int64_t ldb,
                         float* c, int64_t ldc, Init init, const float* row_scale, int tail) {
  const Vec::Mask last = Vec::first_lanes(tail);
  Vec::V acc[MR][NV];
  if (init == Init::zero) {
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = Vec::zero();
  } else {
    load_block<MR, NV, Tail>(acc, c, ldc, last);
    if (init == Init::rescale) {
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const Vec::V beta = Vec::set1(row_scale[m]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = Vec::mul(acc[m][v], beta);
      }
    }
  }
  // The A element of row m at step k is a_low[m * a_ms] (m < 3) or a_high[(m - 3) * a_ms]: two base
  // pointers and one stride, which x86 addressing scales by 1 and 2. With one pointer per row,
  // AVX2's 6-row block ran out of general registers and reloaded them from the stack before each
  // broadcast (perf annotate: the hottest instructions of micro_kernel<6, 2> were those reloads).
  const float* a_low = a;
  const float* a_high = a + 3 * a_ms;
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    if (k0 > 0) {
      // C holds the chunks so far: continue in a fresh chain
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = Vec::zero();
    }
    const int64_t k1 = std::min(K, k0 + kChunk);
#pragma GCC unroll 2
    for (int64_t k = k0; k < k1; ++k) {
      Vec::V bv[NV];
      const float* b_row = b + k * ldb;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = load_vector<MR, NV, Tail>(b_row + Vec::W * v, v, last);
      const float* low = a_low + k * a_ks;
      const float* high = a_high + k * a_ks;
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const Vec::V av = Vec::set1(m < 3 ? low[m * a_ms] : high[(m - 3) * a_ms]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = Vec::fma(av, bv[v], acc[m][v]);
      }
    }
    if (k0 > 0) {
      Vec::V old[MR][NV];
      load_block<MR, NV, Tail>(old, c, ldc, last);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = Vec::add(old[m][v], acc[m][v]);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        if (Tail && v == NV - 1)
          Vec::store(c + m * ldc + Vec::W * v, acc[m][v], last);
        else
          Vec::store(c + m * ldc + Vec::W * v, acc[m][v]);
      }
    }
  }
}

using MicroKernel = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t,
                             Init, const float*, int);

// The table of micro-kernels [mr - 1][nv - 1] for register blocks of up to MR x NV vectors.
template <bool Tail, int MR, int NV, int... Vs>
constexpr std::array<MicroKernel, NV> kernels_for_rows(std::integer_sequence<int, Vs...>) {
  return {&micro_kernel<MR, Vs + 1, Tail>...};
}

template <bool Tail, int NV, int... Ms>
constexpr std::array<std::array<MicroKernel, NV>, sizeof...(Ms)> kernel_table(std::integer_sequence<int, Ms...>) {
  return {kernels_for_rows<Tail, Ms + 1, NV>(std::make_integer_sequence<int, NV>{})...};
}

void gemm_micro_kernels(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_ms, int64_t a_ks,
                        const float* b, int64_t ldb, float* c, int64_t ldc, Init init, const float* row_scale) {
  static constexpr auto full_kernels = kernel_table<false, kNV>(std::make_integer_sequence<int, kMR>{});
  static constexpr auto tail_kernels = kernel_table<true, kNV>(std::make_integer_sequence<int, kMR>{});
  // n outer: one B panel [K, W * kNV] stays in L1 while every row block of A passes over it.
  for (int64_t n0 = 0; n0 < N; n0 += Vec::W * kNV) {
    const int64_t width = std::min<int64_t>(Vec::W * kNV, N - n0);
    const int nv = static_cast<int>((width + Vec::W - 1) / Vec::W);
    const int tail = static_cast<int>(width - Vec::W * (nv - 1));
    const auto& kernels = tail == Vec::W ? full_kernels : tail_kernels;
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m0));
      kernels[mr - 1][nv - 1](K, a + m0 * a_ms, a_ms, a_ks, b + n0, ldb, c + m0 * ldc + n0, ldc, init,
                              row_scale ? row_scale + m0 : nullptr, tail);
    }
  }
}
#endif

}  // namespace

template <typename A>
void gemm(int64_t M, int64_t N, int64_t K, const A* a, int64_t a_ms, int64_t a_ks, const A* b, int64_t ldb,
          A* c, int64_t ldc, Init init, const A* row_scale) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0 && init != Init::zero) {
    if (init == Init::rescale)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) c[m * ldc + n] *= row_scale[m];
    return;
  }
#if defined(ENGINE_ATTENTION_MICRO_KERNEL)
  if constexpr (std::is_same_v<A, float>)
    return gemm_micro_kernels(M, N, K, a, a_ms, a_ks, b, ldb, c, ldc, init, row_scale);
#endif
  gemm_generic(M, N, K, a, a_ms, a_ks, b, ldb, c, ldc, init, row_scale);
}

template void gemm<float>(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                          int64_t, Init, const float*);
template void gemm<double>(int64_t, int64_t, int64_t, const double*, int64_t, int64_t, const double*, int64_t,
                           double*, int64_t, Init, const double*);

}  // namespace engine::cpu::attention_detail
