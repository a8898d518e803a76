// The CPU attention tile product (declared in cpu/attention_gemm.h): an AVX-512 register-blocked
// micro-kernel for fp32, a generic blocked loop for fp64 (and for CPUs without AVX-512).
#include "cpu/attention_gemm.h"

#include <algorithm>
#include <array>
#include <type_traits>
#include <utility>

#if defined(__AVX512F__)
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

#if defined(__AVX512F__)
// An MR x (16 NV) block of C in registers (MR * NV <= 24 accumulators, + NV B vectors + one
// broadcast: at most 29 of the 32 zmm registers). Per k: NV vector loads of B, MR broadcasts of
// A, MR * NV FMAs: at MR = 6, NV = 4, 10 loads per 24 FMAs keep this machine's FMA units (two
// per cycle, one 512-bit load per cycle) the bottleneck. `last` masks the lanes of the last
// vector (N % 16 != 0). The sum over k runs in chunks of kChunk terms (see cpu/attention_gemm.h).
template <int MR, int NV>
__attribute__((always_inline)) inline void load_block(__m512 (&acc)[MR][NV], const float* c, int64_t ldc,
                                                      __mmask16 last) {
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[m][v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, c + m * ldc + 16 * v) : _mm512_loadu_ps(c + m * ldc + 16 * v);
}

template <int MR, int NV>
inline void micro_kernel(int64_t K, const float* a, int64_t a_ms, int64_t a_ks, const float* b, int64_t ldb,
                         float* c, int64_t ldc, Init init, const float* row_scale, __mmask16 last) {
  __m512 acc[MR][NV];
  if (init == Init::zero) {
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  } else {
    load_block<MR, NV>(acc, c, ldc, last);
    if (init == Init::rescale) {
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m512 beta = _mm512_set1_ps(row_scale[m]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_mul_ps(acc[m][v], beta);
      }
    }
  }
  const float* a_rows[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) a_rows[m] = a + m * a_ms;
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    if (k0 > 0) {
      // C holds the chunks so far: continue in a fresh chain
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
    }
    const int64_t k1 = std::min(K, k0 + kChunk);
#pragma GCC unroll 2
    for (int64_t k = k0; k < k1; ++k) {
      __m512 bv[NV];
      const float* b_row = b + k * ldb;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        bv[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, b_row + 16 * v) : _mm512_loadu_ps(b_row + 16 * v);
      const int64_t a_offset = k * a_ks;
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m512 av = _mm512_set1_ps(a_rows[m][a_offset]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(av, bv[v], acc[m][v]);
      }
    }
    if (k0 > 0) {
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          const __m512 old = v == NV - 1 ? _mm512_maskz_loadu_ps(last, c + m * ldc + 16 * v)
                                         : _mm512_loadu_ps(c + m * ldc + 16 * v);
          acc[m][v] = _mm512_add_ps(old, acc[m][v]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        if (v == NV - 1)
          _mm512_mask_storeu_ps(c + m * ldc + 16 * v, last, acc[m][v]);
        else
          _mm512_storeu_ps(c + m * ldc + 16 * v, acc[m][v]);
      }
    }
  }
}

using MicroKernel = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t,
                             Init, const float*, __mmask16);

// The table of micro-kernels [mr - 1][nv - 1] for register blocks of up to MR x NV vectors.
template <int MR, int NV, int... Vs>
constexpr std::array<MicroKernel, NV> kernels_for_rows(std::integer_sequence<int, Vs...>) {
  return {&micro_kernel<MR, Vs + 1>...};
}

template <int NV, int... Ms>
constexpr std::array<std::array<MicroKernel, NV>, sizeof...(Ms)> kernel_table(std::integer_sequence<int, Ms...>) {
  return {kernels_for_rows<Ms + 1, NV>(std::make_integer_sequence<int, NV>{})...};
}

constexpr int kMR = 6;  // rows of a register block
constexpr int kNV = 4;  // vectors of a register block

inline void gemm_avx512(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_ms, int64_t a_ks,
                        const float* b, int64_t ldb, float* c, int64_t ldc, Init init, const float* row_scale) {
  static constexpr auto kernels = kernel_table<kNV>(std::make_integer_sequence<int, kMR>{});
  // n outer: one B panel [K, 64] stays in L1 while every row block of A passes over it.
  for (int64_t n0 = 0; n0 < N; n0 += 16 * kNV) {
    const int64_t width = std::min<int64_t>(16 * kNV, N - n0);
    const int nv = static_cast<int>((width + 15) / 16);
    const int tail = static_cast<int>(width - 16 * (nv - 1));
    const __mmask16 last = static_cast<__mmask16>(tail == 16 ? 0xffffu : (1u << tail) - 1u);
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m0));
      kernels[mr - 1][nv - 1](K, a + m0 * a_ms, a_ms, a_ks, b + n0, ldb, c + m0 * ldc + n0, ldc, init,
                              row_scale ? row_scale + m0 : nullptr, last);
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
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<A, float>) return gemm_avx512(M, N, K, a, a_ms, a_ks, b, ldb, c, ldc, init, row_scale);
#endif
  gemm_generic(M, N, K, a, a_ms, a_ks, b, ldb, c, ldc, init, row_scale);
}

template void gemm<float>(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                          int64_t, Init, const float*);
template void gemm<double>(int64_t, int64_t, int64_t, const double*, int64_t, int64_t, const double*, int64_t,
                           double*, int64_t, Init, const double*);

}  // namespace engine::cpu::attention_detail
