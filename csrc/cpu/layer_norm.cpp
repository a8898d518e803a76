// CPU layer norm / RMS norm, forward and backward (math in csrc/common/layer_norm.h).
// Memory traffic per row of N elements: forward reads x (and residual) and writes y (and the
// sum); backward reads dy, x (and dsum) and writes dx. Each row is converted once into a
// thread-local accumulator buffer (N * 4 bytes, in L1/L2), and every pass after the first reads
// that buffer, so main memory sees each element once.
#include "cpu/layer_norm.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/convert.h"

namespace engine::cpu {

// Row reductions keep kLanes independent partial sums (several vector registers) so that
// consecutive vector adds do not wait on each other's latency; a single accumulator makes these
// loops latency-bound at a few times below the machine's add rate.
constexpr int kLanes = 64;

// The sum of kLanes partial sums, folded in halves: log2(kLanes) vector adds instead of one chain
// of kLanes dependent scalar adds, which alone cost ~0.15 us of a row of 64 (two reductions per
// row in the forward; with the chain the forward took 0.27 us per row of 64 against torch's
// 0.12 us, 256 x 64 fp32, one thread).
template <typename A>
static A fold_lanes(A (&partial)[kLanes]) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
#pragma omp simd
    for (int lane = 0; lane < width; ++lane) partial[lane] += partial[lane + width];
  }
  return partial[0];
}

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
  return total + fold_lanes(partial);
}

template <typename A>
static A row_sum(const A* v, int64_t n) {
  return row_reduce<A>(n, [v](int64_t j) { return v[j]; });
}

template <typename A>
static A row_centered_sum_of_squares(const A* v, A center, int64_t n) {
  return row_reduce<A>(n, [v, center](int64_t j) { return (v[j] - center) * (v[j] - center); });
}

template <typename A>
static A row_max_abs(const A* v, int64_t n) {
  A top[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int lane = 0; lane < kLanes; ++lane) top[lane] = std::max(top[lane], std::abs(v[j + lane]));
  }
  A total = 0;
  for (; j < n; ++j) total = std::max(total, std::abs(v[j]));
  for (int lane = 0; lane < kLanes; ++lane) total = std::max(total, top[lane]);
  return total;
}

// The mean and rstd of v * scale (scale = 1, or 1 / p on the slow path), from which
// y = (v[j] * scale - mean) * rstd * w + b; the row's own statistics, which the op stores, are
// mean / scale and rstd * scale (exact: scale is a power of two).
template <typename A>
struct RowStatistics {
  A mean;
  A rstd;
  A scale;
};

// Directly (two passes over v, in L1/L2), and for the rare rows outside layer_norm_direct_ok's
// range again on v / p (three more passes; see csrc/common/layer_norm.h).
template <typename A>
static RowStatistics<A> row_statistics(const A* v, int64_t n, A eps, bool rms) {
  const A mean = rms ? A(0) : row_sum(v, n) / A(n);
  const A sum_of_squares = row_centered_sum_of_squares(v, mean, n);
  if (layer_norm_direct_ok(sum_of_squares, A(n), eps)) return {mean, layer_norm_rstd(sum_of_squares, A(n), eps), A(1)};
  const A scale = layer_norm_row_scale(row_max_abs(v, n));
  const auto scaled = [v, scale](int64_t j) { return v[j] * scale; };
  const A scaled_mean = rms ? A(0) : row_reduce<A>(n, scaled) / A(n);
  const auto square = [v, scale, scaled_mean](int64_t j) {
    return (v[j] * scale - scaled_mean) * (v[j] * scale - scaled_mean);
  };
  return {scaled_mean, layer_norm_rstd(row_reduce<A>(n, square), A(n), eps * scale * scale), scale};
}

// Runs `body`, whose row loop is an `omp for`, on num_threads threads. One thread runs it
// directly: the `omp for` then binds to no region and loops over every row, and the call skips
// entering an OpenMP region, ~0.5-1 us even for a team of one (measured with GCC's libgomp on
// this machine), which is a good share of a small call's time.
template <typename Body>
static void parallel_rows(int num_threads, Body&& body) {
  if (num_threads <= 1) {
    body();
    return;
  }
#pragma omp parallel num_threads(num_threads)
  body();
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

  const int64_t written = args.rows * n * int64_t(sizeof(T)) * (args.residual ? 2 : 1);
  const bool streaming = written > kStreamingBytes;

  parallel_rows(num_threads, [&] {
    std::vector<A> buffer(n), addend(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < args.rows; ++r) {
      const T* x_row = args.x + r * args.x_stride;
      if (r + 1 < args.rows) {
        prefetch_row(x_row + args.x_stride, n);
        if (args.residual) prefetch_row(args.residual + (r + 1) * args.residual_stride, n);
      }
      const A* v;  // the row to normalize, in the accumulator type
      if (args.residual) {
        // Normalize the sum as stored (rounded to T), so that backward, which reads the stored
        // sum, differentiates exactly what forward computed.
        const A* x = row_as_acc(x_row, buffer.data(), n);
        const A* residual = row_as_acc(args.residual + r * args.residual_stride, addend.data(), n);
        A* total = buffer.data();
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) total[j] = x[j] + residual[j];
        T* sum_row = args.sum + r * n;
        write_row(total, sum_row, n, streaming);
        if constexpr (!std::is_same_v<T, A>) load_row(sum_row, total, n);  // round as stored
        v = total;
      } else {
        v = row_as_acc(x_row, buffer.data(), n);
      }
      const RowStatistics<A> stats = row_statistics(v, n, args.eps, args.rms);
      const A mean = stats.mean, rstd = stats.rstd;
      if (args.mean) args.mean[r] = mean / stats.scale;
      args.rstd[r] = rstd * stats.scale;
      A* y = addend.data();
      const A scale = stats.scale;
      if (scale == A(1)) {  // every ordinary row: the loop without the scaling multiply
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) y[j] = (v[j] - mean) * rstd * w[j] + b[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) y[j] = (v[j] * scale - mean) * rstd * w[j] + b[j];
      }
      write_row(y, args.y + r * n, n, streaming);
    }
    if (streaming) finish_streaming();
  });
}

template <typename T>
void layer_norm_backward(const LayerNormBackwardArgs<T>& args, int num_threads) {
  using A = acc_t<T>;
  const int64_t n = args.cols;
  std::vector<A> weight(n, A(1));
  if (args.weight) load_row(args.weight, weight.data(), n);
  const A* w = weight.data();

  const bool streaming = args.rows * n * int64_t(sizeof(T)) > kStreamingBytes;

  parallel_rows(num_threads, [&] {
    const int thread = omp_get_thread_num();
    std::vector<A> x_buffer(n), dy_buffer(n), dx_buffer(n), dsum_buffer(n);
    // This thread's rows of the partial weight/bias gradients; absent ones point at a scratch
    // row, so the loops below need no branch (the caller ignores it).
    std::vector<A> unused(n);
    A* dweight = args.dweight_partial ? args.dweight_partial + thread * n : unused.data();
    A* dbias = args.dbias_partial ? args.dbias_partial + thread * n : unused.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < args.rows; ++r) {
      const T* x_row = args.x + r * args.x_stride;
      const T* dy_row = args.dy + r * n;
      if (r + 1 < args.rows) {
        prefetch_row(x_row + args.x_stride, n);
        prefetch_row(dy_row + n, n);
        if (args.dsum) prefetch_row(args.dsum + (r + 1) * n, n);
      }
      const A* x = row_as_acc(x_row, x_buffer.data(), n);
      const A* dy = row_as_acc(dy_row, dy_buffer.data(), n);
      const A rstd = args.rstd[r];
      // xhat = (x * half - half_mean) * rstd_twice (see layer_norm_centering)
      const LayerNormCentering<A> centering = layer_norm_centering(args.rms ? A(0) : args.mean[r], rstd);
      const A half = centering.half, half_mean = centering.half_mean, rstd_twice = centering.rstd_twice;

      // Pass 1: the row sums of g * xhat and g (g = dy * w) in kLanes independent partial sums
      // (see row_reduce), and this row's share of the weight and bias gradients.
      A g_xhat_lanes[kLanes] = {}, g_lanes[kLanes] = {};
      int64_t j = 0;
      for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
        for (int lane = 0; lane < kLanes; ++lane) {
          const int64_t k = j + lane;
          const A xhat = (x[k] * half - half_mean) * rstd_twice;
          const A g = dy[k] * w[k];
          g_xhat_lanes[lane] += g * xhat;
          g_lanes[lane] += g;
          dweight[k] += dy[k] * xhat;
          dbias[k] += dy[k];
        }
      }
      A g_xhat = 0, g_total = 0;
      for (; j < n; ++j) {
        const A xhat = (x[j] * half - half_mean) * rstd_twice;
        const A g = dy[j] * w[j];
        g_xhat += g * xhat;
        g_total += g;
        dweight[j] += dy[j] * xhat;
        dbias[j] += dy[j];
      }
      g_xhat += fold_lanes(g_xhat_lanes);
      g_total += fold_lanes(g_lanes);
      const A c1 = g_xhat / A(n);
      const A c2 = args.rms ? A(0) : g_total / A(n);

      // Pass 2 (x and dy are in L1 now): dx, plus the sum output's gradient, which flows
      // straight into input and residual.
      A* dx = dx_buffer.data();
      if (args.dsum) {
        const A* dsum = row_as_acc(args.dsum + r * n, dsum_buffer.data(), n);
#pragma omp simd
        for (int64_t k = 0; k < n; ++k)
          dx[k] = layer_norm_input_grad(dy[k] * w[k], (x[k] * half - half_mean) * rstd_twice, c1, c2, rstd) + dsum[k];
      } else {
#pragma omp simd
        for (int64_t k = 0; k < n; ++k)
          dx[k] = layer_norm_input_grad(dy[k] * w[k], (x[k] * half - half_mean) * rstd_twice, c1, c2, rstd);
      }
      write_row(dx, args.dx + r * n, n, streaming);
    }
    if (streaming) finish_streaming();
  });
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
