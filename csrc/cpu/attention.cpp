// CPU softmax attention, flash-style: forward, decode and backward (math and argument structs in
// csrc/common/attention.h, the dropout stream in csrc/common/philox.h).
//
// Memory traffic (B batch, Hq/Hk heads, Sq/Sk lengths, D/Dv head dims, R = 64-row query blocks):
//   forward   reads q once and k, v once per query block of their kv head (ceil(Hq/Hk * Sq / R)
//             passes over k and v, mostly from L2/L3), writes out and lse once;
//   backward  reads dout, out once (for delta), q, dout once per 64-key block (dK/dV pass) and
//             k, v once per query block (dQ pass); writes dq, dk, dv and delta [B, Hq, Sq] once.
// Extra memory: per-thread tiles (a few 64 x max(D, Dv) fp32 buffers) and, when keys are split
// across threads (few rows, long keys), [tasks, splits, 64, Dv + 2] partial results; backward
// also takes the [B, Hq, Sq] delta workspace from the caller. Nothing grows with Sq * Sk.
//
// Layout of the work. Query rows of one kv head are "stacked": row s of (b, kv head g) is query
// i = s / G of head g * G + s % G (G = Hq / Hk), so one block of 64 rows holds every head of a
// GQA group and shares its k/v tiles. Two tile orientations, chosen so that nothing is transposed
// per (query block, key block) pair:
//   forward, dQ:  S^T [keys, rows]: rows are vector lanes; q^T (and dout^T) are packed once per
//                 task; k and v rows are read in place (fp32) as broadcast operands.
//   dK/dV:        S [rows, keys]: keys are vector lanes; k^T and v^T are packed once per task;
//                 dout rows (in place for fp32) and q * scale rows are the broadcast operands.
// Every product is one register-blocked micro-kernel C (+)= A B with A read by broadcasts through
// two strides (so it can be a transposed view) and B read by rows of vectors.
#include "cpu/attention.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu/convert.h"

namespace engine::cpu {
namespace {

constexpr int64_t kRows = 64;  // query rows per block: the lanes of S^T tiles (4 AVX-512 vectors)
constexpr int64_t kKeys = 64;  // keys per block: the lanes of S tiles in the dK/dV pass

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
// exp in fp32, vectorizable: e^x = 2^n e^r with n = round(x log2 e) and r = x - n ln 2 in
// [-ln2/2, ln2/2] (Cody-Waite: ln 2 split into two floats, each product subtracted by one FMA),
// e^r by a degree-6 polynomial (relative-error minimax fit, coefficients rounded to fp32).
// Measured against fp64 exp over [-87, 88]: at most 1.05 ulp, 0.27 ulp on average. Results below
// e^-87 (just above the smallest normal float) are flushed to 0, never a denormal (slow
// arithmetic); -inf gives exactly 0, NaN stays NaN.

constexpr float kExpLn2Hi = 0.693147182464599609375f;        // float(ln 2)
constexpr float kExpLn2Lo = -1.9046542121259336e-09f;        // float(ln 2 - float(ln 2))
constexpr float kExpLog2e = 1.44269502162933349609375f;      // float(log2 e)
constexpr float kExpMin = -87.0f;                            // e^-87 > 2^-126: results stay normal
constexpr float kExpMax = 88.8f;                             // e^88.8 overflows to inf
constexpr float kExpC2 = 0.49999991059303284f;
constexpr float kExpC3 = 0.16666419804096222f;
constexpr float kExpC4 = 0.04166822507977486f;
constexpr float kExpC5 = 0.008374815806746483f;
constexpr float kExpC6 = 0.0013836845755577087f;

inline float exp_scalar(float x) {
  if (x != x) return x;
  if (x < kExpMin) return 0.0f;
  x = std::min(x, kExpMax);
  const float n = std::nearbyint(x * kExpLog2e);
  float r = std::fma(n, -kExpLn2Hi, x);
  r = std::fma(n, -kExpLn2Lo, r);
  float p = kExpC6;
  p = std::fma(p, r, kExpC5);
  p = std::fma(p, r, kExpC4);
  p = std::fma(p, r, kExpC3);
  p = std::fma(p, r, kExpC2);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  return std::ldexp(p, static_cast<int>(n));
}

inline double exp_scalar(double x) { return std::exp(x); }

// ---------------------------------------------------------------------------------------------
// A minimal SIMD layer for the elementwise passes: 16 fp32 lanes with AVX-512, else one scalar
// lane (fp64 data, or a CPU without AVX-512; the compiler vectorizes what it can).

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
  static V exp(V x) { return exp_scalar(x); }
  static V safe_max(V m) { return attention_safe_max(m); }
  // e^(x - y): the difference first, so that it is exactly 1 when x == y
  static V exp_diff(V x, V y) { return exp_scalar(x - y); }
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
  static V exp(V x) {
    const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpMin), _CMP_NLT_UQ);  // NaN kept
    x = _mm512_min_ps(_mm512_set1_ps(kExpMax), x);
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kExpLog2e)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kExpLn2Hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kExpLn2Lo), r);
    V p = _mm512_set1_ps(kExpC6);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC5));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(normal, p, n);
  }
  static V safe_max(V m) {
    const __mmask16 empty = _mm512_cmp_ps_mask(m, _mm512_set1_ps(-HUGE_VALF), _CMP_EQ_OQ);
    return _mm512_mask_blend_ps(empty, m, _mm512_setzero_ps());
  }
  static V exp_diff(V x, V y) { return exp(_mm512_sub_ps(x, y)); }
};
template <typename A>
using Lanes = std::conditional_t<std::is_same_v<A, float>, Avx512Lanes, ScalarLanes<A>>;
#else
template <typename A>
using Lanes = ScalarLanes<A>;
#endif

// ---------------------------------------------------------------------------------------------
// The matrix product of every tile:
//   C[m, n] = beta_m C[m, n] + sum_k A[m * a_ms + k * a_ks] B[k * ldb + n]
// for m < M, n < N, k < K; beta_m = 0 (zero), 1 (accumulate) or row_scale[m] (rescale).

enum class Init { zero, accumulate, rescale };

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
// vector (N % 16 != 0).
//
// Accuracy: the sum over k runs in chunks of kChunk terms, each in a fresh register chain that is
// then added to C (kept in L1), rather than in one chain of K terms: sums with cancellation
// (scores, dP, whose terms have both signs) then carry the rounding error of ~kChunk + K / kChunk
// sequential additions instead of K (about 2x lower at K = 64, measured), at the cost of one load
// and one store of the block per chunk, which the store port and spare load slots absorb.
// (Keeping several interleaved chains in registers instead halves the block, and then the loads
// of B and the broadcasts of A, not the FMAs, set the pace: ~2x slower.)
constexpr int64_t kChunk = 16;

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

template <typename A>
void gemm(int64_t M, int64_t N, int64_t K, const A* a, int64_t a_ms, int64_t a_ks, const A* b, int64_t ldb,
          A* c, int64_t ldc, Init init, const A* row_scale = nullptr) {
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

// ---------------------------------------------------------------------------------------------
// Rows of T in the accumulator type: fp32/fp64 rows in place, 16-bit rows converted into `buffer`.

template <typename T>
struct RowsView {
  const acc_t<T>* data;  // first row
  int64_t stride;        // between rows
};

template <typename T>
RowsView<T> rows_as_acc(const T* first, int64_t stride, int64_t rows, int64_t cols, acc_t<T>* buffer) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return {first, stride};
  } else {
    for (int64_t r = 0; r < rows; ++r) load_row(first + r * stride, buffer + r * cols, cols);
    return {buffer, cols};
  }
}

// ---------------------------------------------------------------------------------------------
// Per-call geometry and the rows of one stacked block.

template <typename Args>
struct Shape {
  int64_t B, Hq, Hk, G, Sq, Sk, D, Dv;
  int64_t stacked;     // G * Sq rows per (batch, kv head)
  int64_t row_blocks;  // ceil(stacked / kRows)
  explicit Shape(const Args& a)
      : B(a.batch), Hq(a.heads_q), Hk(a.heads_k), G(a.heads_q / a.heads_k), Sq(a.seq_q), Sk(a.seq_k),
        D(a.head_dim), Dv(a.head_dim_v), stacked(G * Sq), row_blocks((G * Sq + kRows - 1) / kRows) {}
};

// Lane r of a block of stacked rows [s0, s0 + count): query position i, head h, the keys it may
// see ([0, limit)), where its mask row starts, its dropout counters.
struct RowBlock {
  int64_t count = 0;
  int64_t pos[kRows], head[kRows], limit[kRows], mask_offset[kRows];
  uint32_t counter_row[kRows], counter_plane[kRows];  // dropout c1 = i, c2 = b * Hq + h
  int64_t min_limit = 0, max_limit = 0;
  bool uniform_mask = true;  // every lane reads the same mask row (e.g. a [B, 1, 1, Sk] mask)
};

template <typename Args>
void build_rows(const Args& a, const Shape<Args>& sh, int64_t b, int64_t kvh, int64_t s0, const int32_t* seqlens,
                RowBlock& rows) {
  const int64_t key_length = attention_key_length(seqlens, b, sh.Sk);
  const int64_t offset = attention_causal_offset(seqlens, key_length, sh.Sq);
  rows.count = std::min(kRows, sh.stacked - s0);
  rows.min_limit = key_length;
  rows.max_limit = 0;
  for (int64_t r = 0; r < rows.count; ++r) {
    const int64_t s = s0 + r;
    const int64_t i = s / sh.G, h = kvh * sh.G + s % sh.G;
    rows.pos[r] = i;
    rows.head[r] = h;
    rows.limit[r] = attention_key_limit(i, a.causal, offset, key_length);
    rows.mask_offset[r] = b * a.mask_stride_b + h * a.mask_stride_h + i * a.mask_stride_q;
    rows.counter_row[r] = static_cast<uint32_t>(i);
    rows.counter_plane[r] = static_cast<uint32_t>(b * sh.Hq + h);
    rows.min_limit = std::min(rows.min_limit, rows.limit[r]);
    rows.max_limit = std::max(rows.max_limit, rows.limit[r]);
  }
  rows.uniform_mask = true;
  for (int64_t r = 1; r < rows.count; ++r) rows.uniform_mask &= rows.mask_offset[r] == rows.mask_offset[0];
}

// Packs rows^T of the block into dst [cols, kRows] (times `factor`), from per-lane row pointers.
template <typename T, typename RowPtr>
void pack_transposed(const RowBlock& rows, int64_t cols, acc_t<T> factor, RowPtr row_ptr, acc_t<T>* dst) {
  using A = acc_t<T>;
  for (int64_t r = 0; r < rows.count; ++r) {
    const T* src = row_ptr(r);
    for (int64_t d = 0; d < cols; ++d) dst[d * kRows + r] = to_acc(src[d]) * factor;
  }
  for (int64_t r = rows.count; r < kRows; ++r)
    for (int64_t d = 0; d < cols; ++d) dst[d * kRows + r] = A(0);
}

// ---------------------------------------------------------------------------------------------
// Masking. S^T tiles [keys, kRows] (forward, dQ): the mask of lane r at key j is element
// mask_offset[r] + j * mask_stride_k. Then causality / key length: key j >= limit[r] -> -inf.

template <typename A>
void mask_transposed(A* st, int64_t bk, int64_t j0, const RowBlock& rows, const void* mask, AttentionMaskKind kind,
                     int64_t mask_stride_k) {
  const A neg_inf = attention_neg_inf<A>();
  if (kind != AttentionMaskKind::none) {
    if (rows.uniform_mask) {
      for (int64_t j = 0; j < bk; ++j) {
        const A bias = attention_mask_bias<A>(mask, kind, rows.mask_offset[0] + (j0 + j) * mask_stride_k);
        if (bias == A(0)) continue;
        A* row = st + j * kRows;
#pragma omp simd
        for (int64_t r = 0; r < rows.count; ++r) row[r] += bias;
      }
    } else if (kind == AttentionMaskKind::boolean) {
      const uint8_t* m = static_cast<const uint8_t*>(mask);
      for (int64_t r = 0; r < rows.count; ++r) {
        const uint8_t* lane = m + rows.mask_offset[r] + j0 * mask_stride_k;
        for (int64_t j = 0; j < bk; ++j)
          if (!lane[j * mask_stride_k]) st[j * kRows + r] = neg_inf;
      }
    } else {
      const A* m = static_cast<const A*>(mask);
      for (int64_t r = 0; r < rows.count; ++r) {
        const A* lane = m + rows.mask_offset[r] + j0 * mask_stride_k;
        for (int64_t j = 0; j < bk; ++j) st[j * kRows + r] += lane[j * mask_stride_k];
      }
    }
  }
  if (j0 + bk > rows.min_limit) {
    for (int64_t r = 0; r < rows.count; ++r)
      for (int64_t j = std::max<int64_t>(rows.limit[r] - j0, 0); j < bk; ++j) st[j * kRows + r] = neg_inf;
  }
}

// S tiles [rows, kKeys] (dK/dV pass): one query row `row` (length bk) at keys j0.. with its mask
// row starting at `mask_offset` and keys [0, limit) visible.
template <typename A>
void mask_row(A* row, int64_t bk, int64_t j0, int64_t limit, const void* mask, AttentionMaskKind kind,
              int64_t mask_offset, int64_t mask_stride_k) {
  const A neg_inf = attention_neg_inf<A>();
  if (kind == AttentionMaskKind::boolean) {
    const uint8_t* m = static_cast<const uint8_t*>(mask) + mask_offset + j0 * mask_stride_k;
    if (mask_stride_k == 1) {
#pragma omp simd
      for (int64_t j = 0; j < bk; ++j) row[j] = m[j] ? row[j] : neg_inf;
    } else {
      for (int64_t j = 0; j < bk; ++j)
        if (!m[j * mask_stride_k]) row[j] = neg_inf;
    }
  } else if (kind == AttentionMaskKind::additive) {
    const A* m = static_cast<const A*>(mask) + mask_offset + j0 * mask_stride_k;
    if (mask_stride_k == 1) {
#pragma omp simd
      for (int64_t j = 0; j < bk; ++j) row[j] += m[j];
    } else {
      for (int64_t j = 0; j < bk; ++j) row[j] += m[j * mask_stride_k];
    }
  }
  for (int64_t j = std::max<int64_t>(limit - j0, 0); j < bk; ++j) row[j] = neg_inf;
}

// ---------------------------------------------------------------------------------------------
// Dropout factors Z = keep / (1 - p) multiplied into tiles. Counters (key j, query i, plane).

template <typename A>
void dropout_transposed(A* st, int64_t bk, int64_t j0, const RowBlock& rows, PhiloxKey key, float p, A inv_keep) {
  for (int64_t j = 0; j < bk; ++j) {
    A* row = st + j * kRows;
    const uint32_t c0 = static_cast<uint32_t>(j0 + j);
#pragma omp simd
    for (int64_t r = 0; r < rows.count; ++r) {
      const float u = dropout_uniform(key, c0, rows.counter_row[r], rows.counter_plane[r]);
      row[r] = u >= p ? row[r] * inv_keep : A(0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward

// Thread-local tiles of the forward.
// Blocks of at most this many query rows (decoding: one row per head, or a few) compute their
// scores as dot products over the head dim instead of the tile GEMM, which puts the rows in the
// vector lanes: one row would keep one lane of each 16-lane FMA busy. Measured with
// bench attention_decode (B=1, H=12, 2048 keys, fp32).
constexpr int64_t kFewRows = 4;

template <typename A>
struct ForwardScratch {
  // qt: Q^T [D, kRows] (scaled) for the tile GEMM; q: Q [kFewRows, D] (scaled) for few rows
  std::unique_ptr<A[], AlignedFree> qt, q, st, o, k, v, m, l, alpha;
  ForwardScratch(int64_t D, int64_t Dv)
      : qt(aligned_buffer<A>(D * kRows)), q(aligned_buffer<A>(D * kFewRows)), st(aligned_buffer<A>(kKeys * kRows)),
        o(aligned_buffer<A>(kRows * Dv)), k(aligned_buffer<A>(kKeys * D)), v(aligned_buffer<A>(kKeys * Dv)),
        m(aligned_buffer<A>(kRows)), l(aligned_buffer<A>(kRows)), alpha(aligned_buffer<A>(kRows)) {}
};

// S^T [bk, kRows] (lanes < count) of a block of few rows: st[j, r] = k_j . q_r, q [count, D].
template <typename A>
void scores_few_rows(const A* k, int64_t k_stride, int64_t bk, int64_t D, const A* q, int64_t count, A* st) {
  for (int64_t j = 0; j < bk; ++j) {
    const A* k_row = k + j * k_stride;
    for (int64_t r = 0; r < count; ++r) {
      const A* q_row = q + r * D;
      A sum = A(0);
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < D; ++d) sum += k_row[d] * q_row[d];
      st[j * kRows + r] = sum;
    }
  }
}

// Online softmax over one S^T tile [bk, kRows]: per lane, the new running max, the rescale
// factor alpha = e^(m_old - m_new) of the previous sum and output, the tile's probabilities
// e^(s - m_new) in place, and the running sum.
template <typename A>
void online_softmax_transposed(A* st, int64_t bk, int64_t lanes, A* m, A* l, A* alpha) {
  using L = Lanes<A>;
  using V = typename L::V;
  for (int64_t x = 0; x < lanes; x += L::W) {
    const V m_old = L::load(m + x);
    V m0 = m_old, m1 = m_old;  // two chains: the max is latency-bound otherwise
    int64_t j = 0;
    for (; j + 2 <= bk; j += 2) {
      m0 = L::max(m0, L::load(st + j * kRows + x));
      m1 = L::max(m1, L::load(st + (j + 1) * kRows + x));
    }
    if (j < bk) m0 = L::max(m0, L::load(st + j * kRows + x));
    const V m_new = L::max(m0, m1);
    const V safe = L::safe_max(m_new);
    const V scale_old = L::exp_diff(m_old, safe);
    V sum0 = L::set1(A(0)), sum1 = L::set1(A(0));
    for (j = 0; j + 2 <= bk; j += 2) {
      const V p0 = L::exp_diff(L::load(st + j * kRows + x), safe);
      const V p1 = L::exp_diff(L::load(st + (j + 1) * kRows + x), safe);
      L::store(st + j * kRows + x, p0);
      L::store(st + (j + 1) * kRows + x, p1);
      sum0 = L::add(sum0, p0);
      sum1 = L::add(sum1, p1);
    }
    if (j < bk) {
      const V p0 = L::exp_diff(L::load(st + j * kRows + x), safe);
      L::store(st + j * kRows + x, p0);
      sum0 = L::add(sum0, p0);
    }
    L::store(l + x, L::fma(L::load(l + x), scale_old, L::add(sum0, sum1)));
    L::store(m + x, m_new);
    L::store(alpha + x, scale_old);
  }
}

// Where a forward task leaves its rows: the output (finished rows) or a split's partial slot.
template <typename A>
struct PartialSlot {
  A* o;  // [kRows, Dv] unnormalized output
  A* m;  // [kRows] running max
  A* l;  // [kRows] running sum
};

template <typename T>
void forward_task(const AttentionForwardArgs<T>& a, const Shape<AttentionForwardArgs<T>>& sh, int64_t b, int64_t kvh,
                  int64_t block, int64_t key_begin, int64_t key_end, ForwardScratch<acc_t<T>>& w,
                  const PartialSlot<acc_t<T>>* partial) {
  using A = acc_t<T>;
  RowBlock rows;
  build_rows(a, sh, b, kvh, block * kRows, a.seqlens, rows);
  const int64_t D = sh.D, Dv = sh.Dv;
  const auto q_row = [&](int64_t r) {
    return a.q + b * a.q_stride_b + rows.head[r] * a.q_stride_h + rows.pos[r] * a.q_stride_s;
  };
  const bool few_rows = rows.count <= kFewRows;
  if (few_rows) {
    for (int64_t r = 0; r < rows.count; ++r)
      for (int64_t d = 0; d < D; ++d) w.q[r * D + d] = to_acc(q_row(r)[d]) * a.scale;
  } else {
    pack_transposed<T>(rows, D, a.scale, q_row, w.qt.get());
  }
  A* m = w.m.get();
  A* l = w.l.get();
  for (int64_t r = 0; r < kRows; ++r) {
    m[r] = attention_neg_inf<A>();
    l[r] = A(0);
  }
  const int64_t lanes = (rows.count + Lanes<A>::W - 1) / Lanes<A>::W * Lanes<A>::W;
  const T* k_head = a.k + b * a.k_stride_b + kvh * a.k_stride_h;
  const T* v_head = a.v + b * a.v_stride_b + kvh * a.v_stride_h;
  const PhiloxKey key = philox_key(a.seed);
  const A inv_keep = static_cast<A>(1.0 / (1.0 - a.dropout_p));
  const float p_keep = static_cast<float>(a.dropout_p);  // keep iff u >= p (fp32, as the reference)
  A* o = w.o.get();
  bool first = true;
  key_end = std::min(key_end, rows.max_limit);
  for (int64_t j0 = key_begin; j0 < key_end; j0 += kKeys) {
    const int64_t bk = std::min(kKeys, key_end - j0);
    const RowsView<T> k_rows = rows_as_acc(k_head + j0 * a.k_stride_s, a.k_stride_s, bk, D, w.k.get());
    const RowsView<T> v_rows = rows_as_acc(v_head + j0 * a.v_stride_s, a.v_stride_s, bk, Dv, w.v.get());
    // S^T [bk, rows] = K_blk (Q scale)^T
    if (few_rows)
      scores_few_rows(k_rows.data, k_rows.stride, bk, D, w.q.get(), rows.count, w.st.get());
    else
      gemm<A>(bk, rows.count, D, k_rows.data, k_rows.stride, 1, w.qt.get(), kRows, w.st.get(), kRows, Init::zero);
    mask_transposed(w.st.get(), bk, j0, rows, a.mask, a.mask_kind, a.mask_stride_k);
    online_softmax_transposed(w.st.get(), bk, lanes, m, l, w.alpha.get());
    if (a.dropout_p > 0) dropout_transposed(w.st.get(), bk, j0, rows, key, p_keep, inv_keep);
    // O [rows, Dv] = alpha O + P V_blk   (A = the P^T tile read transposed)
    gemm<A>(rows.count, Dv, bk, w.st.get(), 1, kRows, v_rows.data, v_rows.stride, o, Dv,
            first ? Init::zero : Init::rescale, w.alpha.get());
    first = false;
  }
  if (first) std::fill(o, o + rows.count * Dv, A(0));

  if (partial != nullptr) {
    std::copy(o, o + rows.count * Dv, partial->o);
    std::copy(m, m + rows.count, partial->m);
    std::copy(l, l + rows.count, partial->l);
    return;
  }
  for (int64_t r = 0; r < rows.count; ++r) {
    const int64_t row_index = (b * sh.Hq + rows.head[r]) * sh.Sq + rows.pos[r];
    // o / l (a division, not a product with 1 / l: one rounding instead of two); 0 if l = 0
    const A l_row = l[r] > A(0) ? l[r] : A(1);
    const A keep = l[r] > A(0) ? A(1) : A(0);
    A* o_row = o + r * Dv;
#pragma omp simd
    for (int64_t d = 0; d < Dv; ++d) o_row[d] = o_row[d] * keep / l_row;
    store_row(o_row, a.out + row_index * Dv, Dv);
    a.lse[row_index] = attention_lse(m[r], l[r]);
  }
}

// Merges the splits of one block of rows into the output.
template <typename T>
void merge_task(const AttentionForwardArgs<T>& a, const Shape<AttentionForwardArgs<T>>& sh, int64_t b, int64_t kvh,
                int64_t block, int64_t splits, const acc_t<T>* o_parts, const acc_t<T>* m_parts,
                const acc_t<T>* l_parts, acc_t<T>* buffer) {
  using A = acc_t<T>;
  const int64_t Dv = sh.Dv;
  RowBlock rows;
  build_rows(a, sh, b, kvh, block * kRows, a.seqlens, rows);
  for (int64_t r = 0; r < rows.count; ++r) {
    A m_total = attention_neg_inf<A>();
    for (int64_t s = 0; s < splits; ++s) m_total = std::max(m_total, m_parts[s * kRows + r]);
    A l_total = 0;
    std::fill(buffer, buffer + Dv, A(0));
    for (int64_t s = 0; s < splits; ++s) {
      const A weight = attention_merge_weight(m_parts[s * kRows + r], m_total);
      if (weight == A(0)) continue;
      l_total += weight * l_parts[s * kRows + r];
      const A* o_part = o_parts + (s * kRows + r) * Dv;
#pragma omp simd
      for (int64_t d = 0; d < Dv; ++d) buffer[d] += weight * o_part[d];
    }
    const A l_row = l_total > A(0) ? l_total : A(1);
    const A keep = l_total > A(0) ? A(1) : A(0);
#pragma omp simd
    for (int64_t d = 0; d < Dv; ++d) buffer[d] = buffer[d] * keep / l_row;
    const int64_t row_index = (b * sh.Hq + rows.head[r]) * sh.Sq + rows.pos[r];
    store_row(buffer, a.out + row_index * Dv, Dv);
    a.lse[row_index] = attention_lse(m_total, l_total);
  }
}

template <typename T>
void fill_dropout_mask(const AttentionForwardArgs<T>& a, int num_threads) {
  const PhiloxKey key = philox_key(a.seed);
  const float p_keep = static_cast<float>(a.dropout_p);
  const int64_t planes = a.batch * a.heads_q;
#pragma omp parallel for num_threads(num_threads) schedule(static) collapse(2)
  for (int64_t plane = 0; plane < planes; ++plane) {
    for (int64_t i = 0; i < a.seq_q; ++i) {
      uint8_t* row = a.dropout_mask + (plane * a.seq_q + i) * a.seq_k;
#pragma omp simd
      for (int64_t j = 0; j < a.seq_k; ++j)
        row[j] = dropout_keep(key, p_keep, static_cast<uint32_t>(j), static_cast<uint32_t>(i),
                              static_cast<uint32_t>(plane));
    }
  }
}

}  // namespace

template <typename T>
void attention_forward(const AttentionForwardArgs<T>& a, int num_threads) {
  using A = acc_t<T>;
  const Shape<AttentionForwardArgs<T>> sh(a);
  if (a.dropout_mask != nullptr && a.dropout_p > 0) fill_dropout_mask(a, num_threads);
  if (sh.B == 0 || sh.Hq == 0 || sh.Sq == 0) return;
  num_threads = std::max(num_threads, 1);

  // Flash-decoding: when the row blocks alone cannot keep every thread busy for long, the keys of
  // each block are split into ranges computed by separate tasks and merged by their (m, l).
  const int64_t base_tasks = sh.B * sh.Hk * sh.row_blocks;
  int64_t longest = 0;
  for (int64_t b = 0; b < sh.B; ++b) longest = std::max(longest, attention_key_length(a.seqlens, b, sh.Sk));
  const int64_t key_blocks = (longest + kKeys - 1) / kKeys;
  int64_t splits = 1;
  if (base_tasks < 4 * num_threads && key_blocks >= 4)
    splits = std::min((4 * num_threads + base_tasks - 1) / base_tasks, key_blocks / 2);
  // Range of split s for batch b: whole key blocks, about the same number in each split.
  auto split_range = [&](int64_t b, int64_t s, int64_t& begin, int64_t& end) {
    const int64_t length = attention_key_length(a.seqlens, b, sh.Sk);
    const int64_t blocks = (length + kKeys - 1) / kKeys;
    const int64_t per_split = (blocks + splits - 1) / splits;
    begin = std::min(length, s * per_split * kKeys);
    end = std::min(length, (s + 1) * per_split * kKeys);
  };

  std::unique_ptr<A[], AlignedFree> o_parts, m_parts, l_parts;
  if (splits > 1) {
    o_parts = aligned_buffer<A>(base_tasks * splits * kRows * sh.Dv);
    m_parts = aligned_buffer<A>(base_tasks * splits * kRows);
    l_parts = aligned_buffer<A>(base_tasks * splits * kRows);
  }
  const int64_t tasks = base_tasks * splits;
#pragma omp parallel num_threads(num_threads)
  {
    ForwardScratch<A> w(sh.D, sh.Dv);
    // Heaviest first for dynamic scheduling: with causality, late row blocks see the most keys.
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t s = t % splits;
      const int64_t base = t / splits;
      const int64_t block = sh.row_blocks - 1 - base % sh.row_blocks;
      const int64_t bh = base / sh.row_blocks;
      const int64_t b = bh / sh.Hk, kvh = bh % sh.Hk;
      const int64_t slot = bh * sh.row_blocks + block;
      if (splits == 1) {
        forward_task(a, sh, b, kvh, block, 0, attention_key_length(a.seqlens, b, sh.Sk), w, nullptr);
      } else {
        int64_t begin, end;
        split_range(b, s, begin, end);
        const PartialSlot<A> partial{o_parts.get() + (slot * splits + s) * kRows * sh.Dv,
                                     m_parts.get() + (slot * splits + s) * kRows,
                                     l_parts.get() + (slot * splits + s) * kRows};
        forward_task(a, sh, b, kvh, block, begin, end, w, &partial);
      }
    }
    if (splits > 1) {
      auto buffer = aligned_buffer<A>(sh.Dv);
#pragma omp for schedule(static)
      for (int64_t slot = 0; slot < base_tasks; ++slot) {
        const int64_t block = slot % sh.row_blocks, bh = slot / sh.row_blocks;
        merge_task(a, sh, bh / sh.Hk, bh % sh.Hk, block, splits, o_parts.get() + slot * splits * kRows * sh.Dv,
                   m_parts.get() + slot * splits * kRows, l_parts.get() + slot * splits * kRows, buffer.get());
      }
    }
  }
}

template <typename T>
void attention_decode(const AttentionForwardArgs<T>& args, int num_threads) {
  attention_forward(args, num_threads);
}

// ---------------------------------------------------------------------------------------------
// Backward

namespace {

template <typename A>
struct BackwardScratch {
  // dK/dV tasks: K^T, V^T [D or Dv, kKeys]; S/P, dP/dS [kRows, kKeys]; q * scale, dout rows
  // [kRows, D/Dv];
  // accumulators [kKeys, D], [kKeys, Dv] (the group's sums, and one head's). dQ tasks: Q^T, dout^T [D/Dv, kRows]; S^T, dP^T
  // [kKeys, kRows]; k, v rows [kKeys, D/Dv]; accumulator [kRows, D]; per-lane lse, delta.
  std::unique_ptr<A[], AlignedFree> kt, vt, s, dp, q, dout, dk, dv, dk_head, dv_head;
  std::unique_ptr<A[], AlignedFree> qt, doutt, st, dpt, k, v, dq, lse, delta;
  BackwardScratch(int64_t D, int64_t Dv)
      : kt(aligned_buffer<A>(D * kKeys)), vt(aligned_buffer<A>(Dv * kKeys)), s(aligned_buffer<A>(kRows * kKeys)),
        dp(aligned_buffer<A>(kRows * kKeys)), q(aligned_buffer<A>(kRows * D)), dout(aligned_buffer<A>(kRows * Dv)),
        dk(aligned_buffer<A>(kKeys * D)), dv(aligned_buffer<A>(kKeys * Dv)), dk_head(aligned_buffer<A>(kKeys * D)),
        dv_head(aligned_buffer<A>(kKeys * Dv)), qt(aligned_buffer<A>(D * kRows)),
        doutt(aligned_buffer<A>(Dv * kRows)), st(aligned_buffer<A>(kKeys * kRows)),
        dpt(aligned_buffer<A>(kKeys * kRows)), k(aligned_buffer<A>(kKeys * D)), v(aligned_buffer<A>(kKeys * Dv)),
        dq(aligned_buffer<A>(kRows * D)), lse(aligned_buffer<A>(kRows)), delta(aligned_buffer<A>(kRows)) {}
};

// The lse that backward subtracts: +inf for a row with no visible key (lse = -inf), so that its
// probabilities e^(s - lse) are all exactly 0.
template <typename A>
A lse_for_backward(A lse) {
  return lse == attention_neg_inf<A>() ? -attention_neg_inf<A>() : lse;
}

// dK, dV of keys [j0, j0 + bk) of (b, kv head): every query row of every head of the group.
template <typename T>
void dkdv_task(const AttentionBackwardArgs<T>& a, const Shape<AttentionBackwardArgs<T>>& sh, int64_t b, int64_t kvh,
               int64_t j0, BackwardScratch<acc_t<T>>& w) {
  using A = acc_t<T>;
  using L = Lanes<A>;
  using V = typename L::V;
  const int64_t D = sh.D, Dv = sh.Dv;
  const int64_t bk = std::min(kKeys, sh.Sk - j0);
  const T* k_rows = a.k + b * a.k_stride_b + kvh * a.k_stride_h + j0 * a.k_stride_s;
  const T* v_rows = a.v + b * a.v_stride_b + kvh * a.v_stride_h + j0 * a.v_stride_s;
  // K^T, V^T [cols, kKeys] (padding lanes 0)
  A* kt = w.kt.get();
  A* vt = w.vt.get();
  for (int64_t j = 0; j < kKeys; ++j) {
    for (int64_t d = 0; d < D; ++d) kt[d * kKeys + j] = j < bk ? to_acc(k_rows[j * a.k_stride_s + d]) : A(0);
    for (int64_t d = 0; d < Dv; ++d) vt[d * kKeys + j] = j < bk ? to_acc(v_rows[j * a.v_stride_s + d]) : A(0);
  }
  A* dk = w.dk.get();
  A* dv = w.dv.get();
  std::fill(dk, dk + bk * D, A(0));
  std::fill(dv, dv + bk * Dv, A(0));
  const PhiloxKey key = philox_key(a.seed);
  const A inv_keep = static_cast<A>(1.0 / (1.0 - a.dropout_p));
  const float p_keep = static_cast<float>(a.dropout_p);  // keep iff u >= p (fp32, as the reference)
  const int64_t lanes = (bk + L::W - 1) / L::W * L::W;

  // Each head sums into its own accumulators, added to the group's after the head: the sums are
  // then chains of Sq terms plus a short sum over heads, not one chain of G * Sq terms.
  A* dk_head = sh.G == 1 ? dk : w.dk_head.get();
  A* dv_head = sh.G == 1 ? dv : w.dv_head.get();
  for (int64_t hg = 0; hg < sh.G; ++hg) {
    const int64_t h = kvh * sh.G + hg;
    const int64_t plane = b * sh.Hq + h;
    if (sh.G > 1) {
      std::fill(dk_head, dk_head + bk * D, A(0));
      std::fill(dv_head, dv_head + bk * Dv, A(0));
    }
    // Rows that see any of these keys: with causality (top-left) query i sees j <= i.
    const int64_t i_begin = a.causal ? std::min(j0, sh.Sq) : 0;
    for (int64_t i0 = i_begin; i0 < sh.Sq; i0 += kRows) {
      const int64_t rows = std::min(kRows, sh.Sq - i0);
      // q * scale [rows, D], rounded as forward rounds it (so S matches forward's bit for bit)
      A* q = w.q.get();
      const T* q_src = a.q + b * a.q_stride_b + h * a.q_stride_h + i0 * a.q_stride_s;
      for (int64_t r = 0; r < rows; ++r) {
        load_row(q_src + r * a.q_stride_s, q + r * D, D);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) q[r * D + d] *= a.scale;
      }
      const RowsView<T> dout = rows_as_acc(a.dout + (plane * sh.Sq + i0) * Dv, Dv, rows, Dv, w.dout.get());
      A* s = w.s.get();
      A* dp = w.dp.get();
      gemm<A>(rows, bk, D, q, D, 1, kt, kKeys, s, kKeys, Init::zero);                // S  [rows, bk]
      gemm<A>(rows, bk, Dv, dout.data, dout.stride, 1, vt, kKeys, dp, kKeys, Init::zero);  // dP
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        A* s_row = s + r * kKeys;
        A* dp_row = dp + r * kKeys;
        const int64_t mask_offset = b * a.mask_stride_b + h * a.mask_stride_h + i * a.mask_stride_q;
        mask_row(s_row, bk, j0, attention_key_limit(i, a.causal, 0, sh.Sk), a.mask, a.mask_kind, mask_offset,
                 a.mask_stride_k);
        const V lse = L::set1(lse_for_backward(a.lse[plane * sh.Sq + i]));
        const A delta = a.delta[plane * sh.Sq + i];
        // P = e^(s - lse) in place of S
        for (int64_t x = 0; x < lanes; x += L::W) L::store(s_row + x, L::exp_diff(L::load(s_row + x), lse));
        if (a.dropout_p > 0) {
          // dS = P (dP Z - delta) in place of dP; P~ = P Z in place of P
#pragma omp simd
          for (int64_t j = 0; j < bk; ++j) {
            const bool keep = dropout_keep(key, p_keep, static_cast<uint32_t>(j0 + j), static_cast<uint32_t>(i),
                                           static_cast<uint32_t>(plane));
            const A z = keep ? inv_keep : A(0);
            dp_row[j] = s_row[j] * (dp_row[j] * z - delta);
            s_row[j] *= z;
          }
        } else {
          // dS = P (dP - delta) in place of dP
          for (int64_t x = 0; x < lanes; x += L::W)
            L::store(dp_row + x, L::mul(L::load(s_row + x), L::sub(L::load(dp_row + x), L::set1(delta))));
        }
      }
      // dV [bk, Dv] += P~^T dout ; dK [bk, D] += dS^T (q scale)   (A operands: transposed views)
      gemm<A>(bk, Dv, rows, s, 1, kKeys, dout.data, dout.stride, dv_head, Dv, Init::accumulate);
      gemm<A>(bk, D, rows, dp, 1, kKeys, q, D, dk_head, D, Init::accumulate);
    }
    if (sh.G > 1) {
#pragma omp simd
      for (int64_t x = 0; x < bk * D; ++x) dk[x] += dk_head[x];
#pragma omp simd
      for (int64_t x = 0; x < bk * Dv; ++x) dv[x] += dv_head[x];
    }
  }
  for (int64_t j = 0; j < bk; ++j) {
    const int64_t key_row = (b * sh.Hk + kvh) * sh.Sk + j0 + j;
    store_row(dk + j * D, a.dk + key_row * D, D);
    store_row(dv + j * Dv, a.dv + key_row * Dv, Dv);
  }
}

// dQ of one block of stacked rows of (b, kv head).
template <typename T>
void dq_task(const AttentionBackwardArgs<T>& a, const Shape<AttentionBackwardArgs<T>>& sh, int64_t b, int64_t kvh,
             int64_t block, BackwardScratch<acc_t<T>>& w) {
  using A = acc_t<T>;
  using L = Lanes<A>;
  using V = typename L::V;
  const int64_t D = sh.D, Dv = sh.Dv;
  RowBlock rows;
  build_rows(a, sh, b, kvh, block * kRows, nullptr, rows);
  pack_transposed<T>(rows, D, a.scale, [&](int64_t r) {
    return a.q + b * a.q_stride_b + rows.head[r] * a.q_stride_h + rows.pos[r] * a.q_stride_s;
  }, w.qt.get());
  pack_transposed<T>(rows, Dv, A(1), [&](int64_t r) {
    return a.dout + ((b * sh.Hq + rows.head[r]) * sh.Sq + rows.pos[r]) * Dv;
  }, w.doutt.get());
  A* lse = w.lse.get();
  A* delta = w.delta.get();
  for (int64_t r = 0; r < kRows; ++r) {
    const int64_t row_index = r < rows.count ? (b * sh.Hq + rows.head[r]) * sh.Sq + rows.pos[r] : -1;
    lse[r] = r < rows.count ? lse_for_backward(a.lse[row_index]) : A(0);
    delta[r] = r < rows.count ? a.delta[row_index] : A(0);
  }
  const int64_t lanes = (rows.count + L::W - 1) / L::W * L::W;
  A* dq = w.dq.get();
  std::fill(dq, dq + rows.count * D, A(0));
  const T* k_head = a.k + b * a.k_stride_b + kvh * a.k_stride_h;
  const T* v_head = a.v + b * a.v_stride_b + kvh * a.v_stride_h;
  const PhiloxKey key = philox_key(a.seed);
  const A inv_keep = static_cast<A>(1.0 / (1.0 - a.dropout_p));
  const float p_keep = static_cast<float>(a.dropout_p);  // keep iff u >= p (fp32, as the reference)
  A* st = w.st.get();
  A* dpt = w.dpt.get();
  for (int64_t j0 = 0; j0 < rows.max_limit; j0 += kKeys) {
    const int64_t bk = std::min(kKeys, rows.max_limit - j0);
    const RowsView<T> k_rows = rows_as_acc(k_head + j0 * a.k_stride_s, a.k_stride_s, bk, D, w.k.get());
    const RowsView<T> v_rows = rows_as_acc(v_head + j0 * a.v_stride_s, a.v_stride_s, bk, Dv, w.v.get());
    gemm<A>(bk, rows.count, D, k_rows.data, k_rows.stride, 1, w.qt.get(), kRows, st, kRows, Init::zero);
    mask_transposed(st, bk, j0, rows, a.mask, a.mask_kind, a.mask_stride_k);
    gemm<A>(bk, rows.count, Dv, v_rows.data, v_rows.stride, 1, w.doutt.get(), kRows, dpt, kRows,
                          Init::zero);
    for (int64_t j = 0; j < bk; ++j) {
      A* st_row = st + j * kRows;
      A* dpt_row = dpt + j * kRows;
      if (a.dropout_p > 0) {
        // P^T in place of S^T, then dS^T = P (dP Z - delta) in place of dP^T
        for (int64_t x = 0; x < lanes; x += L::W)
          L::store(st_row + x, L::exp_diff(L::load(st_row + x), L::load(lse + x)));
        const uint32_t c0 = static_cast<uint32_t>(j0 + j);
#pragma omp simd
        for (int64_t r = 0; r < rows.count; ++r) {
          const bool keep = dropout_keep(key, p_keep, c0, rows.counter_row[r], rows.counter_plane[r]);
          dpt_row[r] = st_row[r] * (dpt_row[r] * (keep ? inv_keep : A(0)) - delta[r]);
        }
      } else {
        // dS^T = P (dP - delta) in place of dP^T
        for (int64_t x = 0; x < lanes; x += L::W) {
          const V p = L::exp_diff(L::load(st_row + x), L::load(lse + x));
          L::store(dpt_row + x, L::mul(p, L::sub(L::load(dpt_row + x), L::load(delta + x))));
        }
      }
    }
    // dQ [rows, D] += dS K_blk   (A = the dS^T tile read transposed)
    gemm<A>(rows.count, D, bk, dpt, 1, kRows, k_rows.data, k_rows.stride, dq, D, Init::accumulate);
  }
  const A scale = a.scale;
  for (int64_t r = 0; r < rows.count; ++r) {
    A* dq_row = dq + r * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dq_row[d] *= scale;
    store_row(dq_row, a.dq + ((b * sh.Hq + rows.head[r]) * sh.Sq + rows.pos[r]) * D, D);
  }
}

}  // namespace

template <typename T>
void attention_backward(const AttentionBackwardArgs<T>& a, int num_threads) {
  using A = acc_t<T>;
  const Shape<AttentionBackwardArgs<T>> sh(a);
  num_threads = std::max(num_threads, 1);
  const int64_t rows_total = sh.B * sh.Hq * sh.Sq;
  // delta = rowsum(dout * out), in the accumulator type, summed in the order (and with the FMAs
  // and chunks) the dP tiles use, 16 rows at a time so that their chains overlap: where a row
  // sees a single key, out = v and dP - delta is then exactly 0, as it is mathematically.
  constexpr int64_t kDeltaRows = 16;
#if defined(__AVX512F__)
  const int64_t chunk = std::is_same_v<A, float> ? kChunk : sh.Dv;  // as the dP micro-kernel sums
#else
  const int64_t chunk = sh.Dv;
#endif
#pragma omp parallel num_threads(num_threads)
  {
    auto dout_rows = aligned_buffer<A>(kDeltaRows * sh.Dv);
    auto out_rows = aligned_buffer<A>(kDeltaRows * sh.Dv);
#pragma omp for schedule(static)
    for (int64_t row0 = 0; row0 < rows_total; row0 += kDeltaRows) {
      const int64_t count = std::min(kDeltaRows, rows_total - row0);
      const RowsView<T> x = rows_as_acc(a.dout + row0 * sh.Dv, sh.Dv, count, sh.Dv, dout_rows.get());
      const RowsView<T> y = rows_as_acc(a.out + row0 * sh.Dv, sh.Dv, count, sh.Dv, out_rows.get());
      A total[kDeltaRows] = {};
      for (int64_t d0 = 0; d0 < sh.Dv; d0 += chunk) {
        A part[kDeltaRows] = {};
        for (int64_t d = d0; d < std::min(sh.Dv, d0 + chunk); ++d) {
#pragma omp simd
          for (int64_t r = 0; r < kDeltaRows; ++r)
            if (r < count) part[r] = std::fma(x.data[r * x.stride + d], y.data[r * y.stride + d], part[r]);
        }
        for (int64_t r = 0; r < kDeltaRows; ++r) total[r] = d0 == 0 ? part[r] : total[r] + part[r];
      }
      for (int64_t r = 0; r < count; ++r) a.delta[row0 + r] = total[r];
    }
  }
  // One pool of tasks: dK/dV per (b, kv head, key block), heaviest (first key blocks) first,
  // then dQ per (b, kv head, row block), heaviest (last row blocks) first.
  const int64_t key_blocks = (sh.Sk + kKeys - 1) / kKeys;
  const int64_t dkdv_tasks = sh.B * sh.Hk * key_blocks;
  const int64_t dq_tasks = sh.B * sh.Hk * sh.row_blocks;
#pragma omp parallel num_threads(num_threads)
  {
    BackwardScratch<A> w(sh.D, sh.Dv);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < dkdv_tasks + dq_tasks; ++t) {
      if (t < dkdv_tasks) {
        const int64_t block = t / (sh.B * sh.Hk), bh = t % (sh.B * sh.Hk);
        dkdv_task(a, sh, bh / sh.Hk, bh % sh.Hk, block * kKeys, w);
      } else {
        const int64_t u = t - dkdv_tasks;
        const int64_t block = sh.row_blocks - 1 - u / (sh.B * sh.Hk), bh = u % (sh.B * sh.Hk);
        dq_task(a, sh, bh / sh.Hk, bh % sh.Hk, block, w);
      }
    }
  }
}

void attention_exp(const float* x, float* y, int64_t n) {
  using L = Lanes<float>;
  int64_t i = 0;
  for (; i + L::W <= n; i += L::W) L::store(y + i, L::exp(L::load(x + i)));
  for (; i < n; ++i) y[i] = exp_scalar(x[i]);
}

#define INSTANTIATE(T)                                                              \
  template void attention_forward<T>(const AttentionForwardArgs<T>&, int);          \
  template void attention_decode<T>(const AttentionForwardArgs<T>&, int);           \
  template void attention_backward<T>(const AttentionBackwardArgs<T>&, int);
INSTANTIATE(float)
INSTANTIATE(double)
INSTANTIATE(half)
INSTANTIATE(bfloat16)
#undef INSTANTIATE

}  // namespace engine::cpu
