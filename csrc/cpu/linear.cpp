// CPU epilogues of the linear layer and the GeLU kernels (math in csrc/common/activations.h,
// dropout stream in csrc/common/philox.h).
// Memory traffic: the forward epilogue reads the product tile (in cache: the GEMM has just
// written it), the bias and the residual, and writes out and pre; the backward prologue reads
// grad_out and pre and writes g (which the next GEMM reads while it is in cache). GeLU reads x
// (and grad_y) and writes y (dx) once.
// Every loop body is branch-free per element and written for `#pragma omp simd`: the activation
// and whether dropout and residual are present are template parameters, chosen once per tile.
#include "cpu/linear.h"

#include <omp.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/philox.h"
#include "cpu/convert.h"

namespace engine::cpu {

// Everything these loops call (the activation math, Philox) must be inlined into them for the
// loops to vectorize; GCC declines on its own for the larger helpers (a gelu epilogue then runs
// ~100x slower, one scalar call per element). flatten inlines the whole call tree.
#if defined(__GNUC__)
#define ENGINE_FLATTEN __attribute__((flatten))
#else
#define ENGINE_FLATTEN
#endif

namespace {

// u[j] = the dropout stream's uniform number of element (row, col0 + j): counters (n, m, 0),
// bit-identical to common/philox.h (which the tail and machines without AVX use). The vector
// paths run Philox4x32-10 on 16 (AVX-512) or 8 (AVX2) counters per register: the 32 x 32 -> 64
// bit products of even and odd lanes come from two vpmuludq and are blended back into hi/lo
// words. Each round depends on the previous one, so kPhiloxVectors registers are interleaved
// to hide the multiply latency (1 -> 4 registers: ~5x faster on Zen 5). Philox dominates a
// dropout epilogue: ~10 rounds x 2 wide multiplies per element.
constexpr int kPhiloxVectors = 4;

#if defined(__AVX512F__)
using IntVector = __m512i;
constexpr int kLanes = 16;
inline IntVector broadcast(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
inline IntVector lane_index() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
inline IntVector add(IntVector a, IntVector b) { return _mm512_add_epi32(a, b); }
inline IntVector xor3(IntVector a, IntVector b, IntVector c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
inline void mul_hi_lo(IntVector x, IntVector constant, IntVector& hi, IntVector& lo) {
  const IntVector even = _mm512_mul_epu32(x, constant);                        // 64-bit products of lanes 0, 2, ..
  const IntVector odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), constant);  // .. and of lanes 1, 3, ..
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}
inline void store_uniforms(IntVector bits, float* u) {
  // tl.uint_to_uniform_float: as int32, negatives folded (x ^ (x >> 31) == ~x for x < 0)
  const IntVector folded = _mm512_xor_si512(bits, _mm512_srai_epi32(bits, 31));
  _mm512_storeu_ps(u, _mm512_mul_ps(_mm512_cvtepi32_ps(folded), _mm512_set1_ps(4.6566127342e-10f)));
}
#define ENGINE_PHILOX_VECTORS 1
#elif defined(__AVX2__)
using IntVector = __m256i;
constexpr int kLanes = 8;
inline IntVector broadcast(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
inline IntVector lane_index() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
inline IntVector add(IntVector a, IntVector b) { return _mm256_add_epi32(a, b); }
inline IntVector xor3(IntVector a, IntVector b, IntVector c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
inline void mul_hi_lo(IntVector x, IntVector constant, IntVector& hi, IntVector& lo) {
  const IntVector even = _mm256_mul_epu32(x, constant);
  const IntVector odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), constant);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}
inline void store_uniforms(IntVector bits, float* u) {
  const IntVector folded = _mm256_xor_si256(bits, _mm256_srai_epi32(bits, 31));
  _mm256_storeu_ps(u, _mm256_mul_ps(_mm256_cvtepi32_ps(folded), _mm256_set1_ps(4.6566127342e-10f)));
}
#define ENGINE_PHILOX_VECTORS 1
#endif

ENGINE_FLATTEN void dropout_uniforms(PhiloxKey key, int64_t row, int64_t col0, int64_t cols, float* u) {
  const uint32_t c1 = static_cast<uint32_t>(row);
  const uint32_t first = static_cast<uint32_t>(col0);
  int64_t j = 0;
#if defined(ENGINE_PHILOX_VECTORS)
  constexpr int kStep = kLanes * kPhiloxVectors;
  const IntVector round_a = broadcast(kPhiloxRoundA), round_b = broadcast(kPhiloxRoundB);
  for (; j + kStep <= cols; j += kStep) {
    IntVector x0[kPhiloxVectors], x1[kPhiloxVectors], x2[kPhiloxVectors], x3[kPhiloxVectors];
    for (int v = 0; v < kPhiloxVectors; ++v) {
      x0[v] = add(broadcast(first + static_cast<uint32_t>(j + v * kLanes)), lane_index());
      x1[v] = broadcast(c1);
      x2[v] = broadcast(0);
      x3[v] = broadcast(0);
    }
    uint32_t k0 = key.k0, k1 = key.k1;
    for (int round = 0; round < 10; ++round) {
      const IntVector key0 = broadcast(k0), key1 = broadcast(k1);
      for (int v = 0; v < kPhiloxVectors; ++v) {
        IntVector hi_b, lo_b, hi_a, lo_a;
        mul_hi_lo(x2[v], round_b, hi_b, lo_b);
        mul_hi_lo(x0[v], round_a, hi_a, lo_a);
        x0[v] = xor3(hi_b, x1[v], key0);
        x2[v] = xor3(hi_a, x3[v], key1);
        x1[v] = lo_b;
        x3[v] = lo_a;
      }
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    for (int v = 0; v < kPhiloxVectors; ++v) store_uniforms(x0[v], u + j + v * kLanes);
  }
#endif
  for (; j < cols; ++j) u[j] = dropout_uniform(key, first + static_cast<uint32_t>(j), c1, 0u);
}

// A row of a tile in the accumulator type: used in place when it is stored as A, else
// converted into `buffer`.
template <typename A, typename S>
const A* acc_row(const S* row, A* buffer, int64_t n) {
  if constexpr (std::is_same_v<S, A>) {
    return row;
  } else {
    load_row(row, buffer, n);
    return buffer;
  }
}

template <Activation kAct, bool kGated, bool kDropout, bool kResidual, typename T, typename P>
ENGINE_FLATTEN void forward_tile(const LinearForwardTile<T, P>& t, acc_t<T>* scratch) {
  using A = acc_t<T>;
  const int64_t n = t.cols;
  A* bias = scratch;              // [n] the tile's bias in A (0 without bias)
  A* values = scratch + n;        // [n] the product row (converted), then pre = product + bias
  A* results = scratch + 2 * n;   // [n] out before its conversion to T
  A* addend = scratch + 3 * n;    // [n] the residual row (converted)
  float* uniforms = reinterpret_cast<float*>(scratch + 4 * n);  // [n] dropout stream
  A* up_bias = scratch + 5 * n;   // gated: [n] the up projection's bias in A
  A* up_values = scratch + 6 * n; // gated: [n] the up product row, then up + its bias
  for (int64_t j = 0; j < n; ++j) bias[j] = t.bias ? to_acc(t.bias[j]) : A(0);
  if constexpr (kGated) {
    for (int64_t j = 0; j < n; ++j) up_bias[j] = t.up_bias ? to_acc(t.up_bias[j]) : A(0);
  }
  const float p = static_cast<float>(t.dropout_p);  // the stream compares in fp32 (common/philox.h)
  const A scale = kDropout ? A(1.0 / (1.0 - t.dropout_p)) : A(1);
  const PhiloxKey key = philox_key(t.seed);

  for (int64_t r = 0; r < t.rows; ++r) {
    const A* product = acc_row<A>(t.product + r * t.product_stride, values, n);
    const A* residual = kResidual ? acc_row<A>(t.residual + r * t.residual_stride, addend, n) : nullptr;
    if (kDropout) dropout_uniforms(key, t.row0 + r, t.col0, n, uniforms);
    T* pre_row = t.pre ? t.pre + r * t.pre_stride : nullptr;
    T* out_row = t.out + r * t.out_stride;
    // out = dropout(act(v)) + residual for v = product + bias; dropped elements are multiplied
    // by 0 (not replaced by 0), so NaN and inf propagate as in the reference.
    auto finish = [&](A y, int64_t j) {
      if constexpr (kDropout) y *= math::choose<A>(uniforms[j] >= p, scale, A(0));
      if constexpr (kResidual) y += residual[j];
      return y;
    };
    if constexpr (kGated) {
      // act(gate) * up, pre = [gate, up] (+ biases), in A, then converted where T is not A
      const P* up_source = t.up_product + r * t.product_stride;
      const A* up = acc_row<A>(up_source, up_values, n);
      T* up_pre_row = t.up_pre + r * t.pre_stride;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const A v = product[j] + bias[j];
        const A u = up[j] + up_bias[j];
        values[j] = v;
        up_values[j] = u;
        results[j] = finish(activate<kAct, A>(v) * u, j);
      }
      // (pre may be the product tile itself: each row is read whole before it is written back)
      store_row(values, pre_row, n);
      store_row(up_values, up_pre_row, n);
      store_row(results, out_row, n);
    } else if constexpr (std::is_same_v<T, A>) {
      // fp32/fp64: straight into the outputs (pre and out may be the product tile itself).
      if (pre_row) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const A v = product[j] + bias[j];
          pre_row[j] = v;
          out_row[j] = finish(activate<kAct, A>(v), j);
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) out_row[j] = finish(activate<kAct, A>(product[j] + bias[j]), j);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const A v = product[j] + bias[j];
        values[j] = v;
        results[j] = finish(activate<kAct, A>(v), j);
      }
      // pre may be the (bf16) product tile itself with the bias already in it: nothing to write.
      if (pre_row && static_cast<const void*>(pre_row) != static_cast<const void*>(t.product + r * t.product_stride))
        store_row(values, pre_row, n);
      store_row(results, out_row, n);
    }
    if (kDropout && t.keep) {
      bool* keep_row = t.keep + r * t.keep_stride;
      for (int64_t j = 0; j < n; ++j) keep_row[j] = uniforms[j] >= p;
    }
  }
}

template <Activation kAct, bool kGated, bool kDropout, typename T, typename G>
ENGINE_FLATTEN void backward_tile(const LinearBackwardTile<T, G>& t, acc_t<T>* scratch) {
  using A = acc_t<T>;
  const int64_t n = t.cols;
  const int64_t width = kGated ? 2 * n : n;                     // columns of pre and g
  A* grad_buffer = scratch;                                     // [n] grad_out row (converted)
  A* pre_buffer = scratch + n;                                  // [width] pre row (converted)
  A* g_buffer = scratch + 3 * n;                                // [width] g before its conversion
  float* uniforms = reinterpret_cast<float*>(scratch + 5 * n);  // [n] dropout stream
  const float p = static_cast<float>(t.dropout_p);  // the stream compares in fp32 (common/philox.h)
  const A scale = kDropout ? A(1.0 / (1.0 - t.dropout_p)) : A(1);
  const PhiloxKey key = philox_key(t.seed);
  double* bias_grad = t.bias_grad;

  for (int64_t r = 0; r < t.rows; ++r) {
    const A* grad = acc_row<A>(t.grad_out + r * t.grad_stride, grad_buffer, n);
    const A* pre = kAct != Activation::kNone ? acc_row<A>(t.pre + r * t.pre_stride, pre_buffer, width) : nullptr;
    if (kDropout) dropout_uniforms(key, t.row0 + r, t.col0, n, uniforms);
    G* g_row = t.g + r * t.g_stride;
    A* g = std::is_same_v<G, A> ? reinterpret_cast<A*>(g_row) : g_buffer;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      A v = grad[j];
      if constexpr (kDropout) v *= math::choose<A>(uniforms[j] >= p, scale, A(0));
      if constexpr (kGated) {
        // pre = [gate | up]: g = [v * up * act'(gate) | v * act(gate)]
        g[j] = v * pre[n + j] * activation_grad<kAct, A>(pre[j]);
        g[n + j] = v * activate<kAct, A>(pre[j]);
      } else {
        if constexpr (kAct != Activation::kNone) v *= activation_grad<kAct, A>(pre[j]);
        g[j] = v;
      }
    }
    if (bias_grad) {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) bias_grad[j] += static_cast<double>(g[j]);
    }
    if constexpr (!std::is_same_v<G, A>) store_row(g, g_row, width);
  }
}

}  // namespace

template <typename T, typename P>
void linear_forward_tile(const LinearForwardTile<T, P>& tile, acc_t<T>* scratch) {
  if (tile.rows <= 0 || tile.cols <= 0) return;
  const bool dropout = tile.dropout_p > 0.0;
  const bool residual = tile.residual != nullptr;
  auto run = [&](auto gated) {
    constexpr bool kGated = decltype(gated)::value;
    with_activation(tile.activation, [&](auto act) {
      constexpr Activation kAct = decltype(act)::value;
      if (dropout && residual) forward_tile<kAct, kGated, true, true>(tile, scratch);
      else if (dropout) forward_tile<kAct, kGated, true, false>(tile, scratch);
      else if (residual) forward_tile<kAct, kGated, false, true>(tile, scratch);
      else forward_tile<kAct, kGated, false, false>(tile, scratch);
    });
  };
  if (tile.gated) run(std::true_type{});
  else run(std::false_type{});
}

template <typename T, typename G>
void linear_backward_tile(const LinearBackwardTile<T, G>& tile, acc_t<T>* scratch) {
  if (tile.rows <= 0 || tile.cols <= 0) return;
  auto run = [&](auto gated) {
    constexpr bool kGated = decltype(gated)::value;
    with_activation(tile.activation, [&](auto act) {
      constexpr Activation kAct = decltype(act)::value;
      if (tile.dropout_p > 0.0) backward_tile<kAct, kGated, true>(tile, scratch);
      else backward_tile<kAct, kGated, false>(tile, scratch);
    });
  };
  if (tile.gated) run(std::true_type{});
  else run(std::false_type{});
}

template <typename T>
void column_sums(const T* matrix, int64_t stride, int64_t rows, int64_t cols, double* sums) {
  using A = acc_t<T>;
  std::vector<A> buffer(cols);
  for (int64_t r = 0; r < rows; ++r) {
    const A* row = acc_row<A>(matrix + r * stride, buffer.data(), cols);
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) sums[j] += static_cast<double>(row[j]);
  }
}

// GeLU: chunks of kChunk elements (a few KB: L1) converted to A, computed, converted back.
constexpr int64_t kChunk = 2048;

template <typename T>
void gelu_forward(const T* x, T* y, int64_t count, bool tanh, int num_threads) {
  using A = acc_t<T>;
  const int64_t chunks = (count + kChunk - 1) / kChunk;
  with_activation(tanh ? Activation::kGeluTanh : Activation::kGelu, [&](auto act) {
    constexpr Activation kAct = decltype(act)::value;
#pragma omp parallel num_threads(num_threads)
    {
      std::vector<A> in_buffer(kChunk), out_buffer(kChunk);
#pragma omp for schedule(static)
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t start = c * kChunk, n = std::min(kChunk, count - start);
        const A* in = acc_row<A>(x + start, in_buffer.data(), n);
        A* out = std::is_same_v<T, A> ? reinterpret_cast<A*>(y + start) : out_buffer.data();
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) out[j] = activate<kAct, A>(in[j]);
        if constexpr (!std::is_same_v<T, A>) store_row(out, y + start, n);
      }
    }
  });
}

template <typename T>
void gelu_backward(const T* grad_y, const T* x, T* dx, int64_t count, bool tanh, int num_threads) {
  using A = acc_t<T>;
  const int64_t chunks = (count + kChunk - 1) / kChunk;
  with_activation(tanh ? Activation::kGeluTanh : Activation::kGelu, [&](auto act) {
    constexpr Activation kAct = decltype(act)::value;
#pragma omp parallel num_threads(num_threads)
    {
      std::vector<A> x_buffer(kChunk), grad_buffer(kChunk), out_buffer(kChunk);
#pragma omp for schedule(static)
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t start = c * kChunk, n = std::min(kChunk, count - start);
        const A* in = acc_row<A>(x + start, x_buffer.data(), n);
        const A* grad = acc_row<A>(grad_y + start, grad_buffer.data(), n);
        A* out = std::is_same_v<T, A> ? reinterpret_cast<A*>(dx + start) : out_buffer.data();
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) out[j] = grad[j] * activation_grad<kAct, A>(in[j]);
        if constexpr (!std::is_same_v<T, A>) store_row(out, dx + start, n);
      }
    }
  });
}

// Product (and g) types: A for float, double and half (whose products run in fp32); bf16 for
// bf16 on torch's bf16 GEMM, or fp32 where the CPU has no bf16 dot products (cpu/linear_blas.cpp).
#define INSTANTIATE_TILES(T, P)                                                              \
  template void linear_forward_tile<T, P>(const LinearForwardTile<T, P>&, acc_t<T>*);      \
  template void linear_backward_tile<T, P>(const LinearBackwardTile<T, P>&, acc_t<T>*);
INSTANTIATE_TILES(float, float)
INSTANTIATE_TILES(double, double)
INSTANTIATE_TILES(half, float)
INSTANTIATE_TILES(bfloat16, bfloat16)
INSTANTIATE_TILES(bfloat16, float)
#undef INSTANTIATE_TILES

#define INSTANTIATE(T)                                                                        \
  template void column_sums<T>(const T*, int64_t, int64_t, int64_t, double*);                 \
  template void gelu_forward<T>(const T*, T*, int64_t, bool, int);                            \
  template void gelu_backward<T>(const T*, const T*, T*, int64_t, bool, int);
INSTANTIATE(float)
INSTANTIATE(double)
INSTANTIATE(half)
INSTANTIATE(bfloat16)
#undef INSTANTIATE

}  // namespace engine::cpu
