// CPU layer norm / RMS norm, forward and backward (math in csrc/common/layer_norm.h).
// Memory traffic per row of N elements: forward reads x (and residual) and writes y (and the
// sum); backward reads dy, x (and dsum) and writes dx. Each row is converted once into a
// thread-local accumulator buffer (N * 4 bytes, in L1/L2), and every pass after the first reads
// that buffer, so main memory sees each element once.
#include "cpu/layer_norm.h"

#include <omp.h>

#include <type_traits>
#include <vector>

#include "cpu/convert.h"

namespace engine::cpu {

// Row reductions keep kLanes independent partial sums (several vector registers) so that
// consecutive vector adds do not wait on each other's latency; a single accumulator makes these
// loops latency-bound at a few times below the machine's add rate.
constexpr int kLanes = 64;

template <typename A, typename Term>
static A row_reduce(int64_t n, Term term) {
  A partial[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int lane = 0; lane < kLanes; ++lane) partial[lane] += term(j + lane);
  }
  A total = 0;
  for (; j < n; ++j) total += term(j);
  for (int lane = 0; lane < kLanes; ++lane) total += partial[lane];
  return total;
}

template <typename A>
static A row_sum(const A* v, int64_t n) {
  return row_reduce<A>(n, [v](int64_t j) { return v[j]; });
}

template <typename A>
static A row_centered_sum_of_squares(const A* v, A center, int64_t n) {
  return row_reduce<A>(n, [v, center](int64_t j) { return (v[j] - center) * (v[j] - center); });
}

template <typename T>
void layer_norm_forward(const LayerNormForwardArgs<T>& args, int num_threads) {
  using A = acc_t<T>;
  const int64_t n = args.cols;
  // Weight and bias in the accumulator type once, shared by every thread (absent ones are 1 / 0).
  std::vector<A> weight(n, A(1)), bias(n, A(0));
  if (args.weight) load_row(args.weight, weight.data(), n);
  if (args.bias) load_row(args.bias, bias.data(), n);
  const A* w = weight.data();
  const A* b = bias.data();

#pragma omp parallel num_threads(num_threads)
  {
    std::vector<A> buffer(n), addend(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < args.rows; ++r) {
      if (r + 1 < args.rows) {
        prefetch_row(args.x + (r + 1) * args.x_stride, n);
        if (args.residual) prefetch_row(args.residual + (r + 1) * args.residual_stride, n);
      }
      // v: the row in the accumulator type. fp32/fp64 rows without a residual are read in
      // place; the others are converted into `buffer` once.
      const A* v = buffer.data();
      if constexpr (std::is_same_v<T, A>) {
        if (!args.residual) v = args.x + r * args.x_stride;
      }
      if (v == buffer.data()) load_row(args.x + r * args.x_stride, buffer.data(), n);
      if (args.residual) {
        // Normalize the sum as stored (rounded to T), so that backward, which reads the stored
        // sum, differentiates exactly what forward computed.
        T* sum = args.sum + r * n;
        A* total = buffer.data();
        load_row(args.residual + r * args.residual_stride, addend.data(), n);
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) total[j] += addend[j];
        store_row(total, sum, n);
        load_row(sum, total, n);
      }
      const A mean = args.rms ? A(0) : row_sum(v, n) / A(n);
      const A rstd = layer_norm_rstd(row_centered_sum_of_squares(v, mean, n), A(n), args.eps);
      if (args.mean) args.mean[r] = mean;
      args.rstd[r] = rstd;
      T* y = args.y + r * n;
      if constexpr (std::is_same_v<T, A>) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) y[j] = (v[j] - mean) * rstd * w[j] + b[j];
      } else {
        A* out = buffer.data();
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) out[j] = (v[j] - mean) * rstd * w[j] + b[j];
        store_row(out, y, n);
      }
    }
  }
}

template <typename T>
void layer_norm_backward(const LayerNormBackwardArgs<T>& args, int num_threads) {
  using A = acc_t<T>;
  const int64_t n = args.cols;
  std::vector<A> weight(n, A(1));
  if (args.weight) load_row(args.weight, weight.data(), n);
  const A* w = weight.data();

#pragma omp parallel num_threads(num_threads)
  {
    const int thread = omp_get_thread_num();
    std::vector<A> xhat_buffer(n), g_buffer(n), dy_buffer(n), extra(n);
    A* xhat = xhat_buffer.data();
    A* g = g_buffer.data();
    A* dy = dy_buffer.data();
    A* dweight = args.dweight_partial ? args.dweight_partial + thread * n : nullptr;
    A* dbias = args.dbias_partial ? args.dbias_partial + thread * n : nullptr;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < args.rows; ++r) {
      load_row(args.x + r * args.x_stride, xhat, n);
      load_row(args.dy + r * n, dy, n);
      const A mean = args.rms ? A(0) : args.mean[r];
      const A rstd = args.rstd[r];
      A g_xhat = 0, g_total = 0;
#pragma omp simd reduction(+ : g_xhat, g_total)
      for (int64_t j = 0; j < n; ++j) {
        xhat[j] = (xhat[j] - mean) * rstd;
        g[j] = dy[j] * w[j];
        g_xhat += g[j] * xhat[j];
        g_total += g[j];
      }
      const A c1 = g_xhat / A(n);
      const A c2 = args.rms ? A(0) : g_total / A(n);
      if (dweight) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) dweight[j] += dy[j] * xhat[j];
      }
      if (dbias) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) dbias[j] += dy[j];
      }
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) g[j] = layer_norm_input_grad(g[j], xhat[j], c1, c2, rstd);
      if (args.dsum) {  // the sum output's gradient flows straight into input and residual
        load_row(args.dsum + r * n, extra.data(), n);
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) g[j] += extra[j];
      }
      store_row(g, args.dx + r * n, n);
    }
  }
}

#define INSTANTIATE(T)                                                                  \
  template void layer_norm_forward<T>(const LayerNormForwardArgs<T>&, int);             \
  template void layer_norm_backward<T>(const LayerNormBackwardArgs<T>&, int);
INSTANTIATE(float)
INSTANTIATE(double)
INSTANTIATE(half)
INSTANTIATE(bfloat16)
#undef INSTANTIATE

}  // namespace engine::cpu
