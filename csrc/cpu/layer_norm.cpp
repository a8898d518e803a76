// CPU layer norm / RMS norm, forward and backward (math in csrc/common/layer_norm.h).
// Memory traffic per row of N elements: forward reads x (and residual) and writes y (and the
// sum); backward reads dy, x (and dsum) and writes dx. The first pass over a row reads it from
// memory, converts 16-bit rows (and adds the residual) into a thread-local accumulator buffer
// (N * 4 bytes, in L1/L2) while it sums; the passes after it read that buffer (fp32 rows: the row
// itself, now in cache), and the last writes the output straight from the loop that computes it,
// so main memory sees each element once.
#include "cpu/layer_norm.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/convert.h"
#include "cpu/parallel.h"

namespace engine::cpu {

// Row reductions keep kLanes independent partial sums (several vector registers) so that
// consecutive vector adds do not wait on each other's latency; a single accumulator makes these
// loops latency-bound at a few times below the machine's add rate.
constexpr int kLanes = 64;

// The sum of kLanes partial sums, folded in halves: log2(kLanes) vector adds instead of one chain
// of kLanes dependent scalar adds, which alone cost ~0.15 us of a row of 64 (two reductions per
// row in the forward; with the chain the forward took 0.27 us per row of 64 against torch's
// 0.12 us, 256 x 64 fp32, one thread). Fully unrolled, which short rows feel: forward 0.86x ->
// 1.12x torch at 4096 x 256 fp32, 0.69x -> 0.99x at 4096 x 128, bf16 0.97x -> 1.21x at 4096 x 256
// (one thread, rows in cache).
template <typename A>
static A fold_lanes(A (&partial)[kLanes]) {
#pragma GCC unroll 8
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
#pragma omp simd reduction(+ : total)
  for (int64_t k = j; k < n; ++k) total += term(k);
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

// Directly, from the row's sum (`total`, taken in the pass that loaded it) and one pass over v (in
// L1/L2), and for the rare rows outside layer_norm_direct_ok's range again on v / p (three more
// passes; see csrc/common/layer_norm.h).
template <typename A>
static RowStatistics<A> row_statistics(const A* v, A total, int64_t n, A eps, bool rms) {
  const A mean = rms ? A(0) : total / A(n);
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

// Whether GCC vectorizes a loop that converts one element at a time with to_acc / from_acc:
// yes for fp32, fp64 and bfloat16 (bit operations); not for half, whose vector conversions are
// F16C intrinsics that only load_row / store_row use.
template <typename T>
constexpr bool kConvertsInLoops = !std::is_same_v<T, half>;

// Stores the chunk of kLanes results `lanes` at dst, rounded to T (see put_chunk).
template <typename T>
static void store_chunk(const acc_t<T>* lanes, T* dst, bool streaming) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    put_chunk<T, kLanes>(lanes, dst, streaming);
  } else {
    T out[kLanes];
    store_row(lanes, out, kLanes);
    put_chunk<T, kLanes>(out, dst, streaming);
  }
}

// Writes dst[j] = value(j), rounded to T, for j < n, straight from the loop that computes the
// values, without a row buffer copied out in a pass of its own. Streaming stores and half
// conversions go kLanes elements at a time through a chunk in registers / L1.
template <typename T, typename Value>
static void write_row(T* dst, int64_t n, bool streaming, Value value) {
  using A = acc_t<T>;
  if (kConvertsInLoops<T> && !streaming) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = from_acc<T>(value(j));
    return;
  }
  int64_t j = stream_head(dst, n, streaming);
  for (int64_t k = 0; k < j; ++k) dst[k] = from_acc<T>(value(k));
  for (; j + kLanes <= n; j += kLanes) {
    A lanes[kLanes];
#pragma omp simd
    for (int lane = 0; lane < kLanes; ++lane) lanes[lane] = value(j + lane);
    store_chunk(lanes, dst + j, streaming);
  }
#pragma omp simd
  for (int64_t k = j; k < n; ++k) dst[k] = from_acc<T>(value(k));
}

// The forward's first pass over a row, the only one that reads main memory: the row to normalize
// (x, or x + residual rounded to T as stored in `sum`) into `buffer` in the accumulator type
// (fp32 x is used in place), and its sum. Converting and summing in the same loop saves a pass
// over the row in L1 against converting first.
template <typename T>
static acc_t<T> load_row_and_sum(const LayerNormForwardArgs<T>& args, int64_t r, acc_t<T>* buffer,
                                 const acc_t<T>*& v, bool streaming) {
  using A = acc_t<T>;
  const int64_t n = args.cols;
  const T* x = args.x + r * args.x_stride;
  if (!args.residual) {
    if constexpr (std::is_same_v<T, A>) {
      v = x;
      return args.rms ? A(0) : row_sum(x, n);  // RMS norm has no use for the sum
    }
    v = buffer;
    A partial[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      if constexpr (kConvertsInLoops<T>) {
#pragma omp simd
        for (int lane = 0; lane < kLanes; ++lane) partial[lane] += buffer[j + lane] = to_acc(x[j + lane]);
      } else {
        load_row(x + j, buffer + j, kLanes);
#pragma omp simd
        for (int lane = 0; lane < kLanes; ++lane) partial[lane] += buffer[j + lane];
      }
    }
    A total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t k = j; k < n; ++k) total += buffer[k] = to_acc(x[k]);
    return total + fold_lanes(partial);
  }
  // Normalize the sum as stored (rounded to T), so that backward, which reads the stored sum,
  // differentiates exactly what forward computed.
  v = buffer;
  const T* residual = args.residual + r * args.residual_stride;
  T* sum = args.sum + r * n;
  const auto add = [&](int64_t k) {
    sum[k] = from_acc<T>(to_acc(x[k]) + to_acc(residual[k]));
    return buffer[k] = to_acc(sum[k]);
  };
  A total = 0;
  A partial[kLanes] = {};
  int64_t j = 0;
  if (kConvertsInLoops<T> && !streaming) {
    for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
      for (int lane = 0; lane < kLanes; ++lane) partial[lane] += add(j + lane);
    }
  } else {
    j = stream_head(sum, n, streaming);
    for (int64_t k = 0; k < j; ++k) total += add(k);
    for (; j + kLanes <= n; j += kLanes) {
      T rounded[kLanes];  // this chunk of the sum, as stored
      if constexpr (kConvertsInLoops<T>) {
#pragma omp simd
        for (int lane = 0; lane < kLanes; ++lane) {
          rounded[lane] = from_acc<T>(to_acc(x[j + lane]) + to_acc(residual[j + lane]));
          partial[lane] += buffer[j + lane] = to_acc(rounded[lane]);
        }
      } else {
        A x_scratch[kLanes], residual_scratch[kLanes], lanes[kLanes];
        load_row(x + j, x_scratch, kLanes);
        load_row(residual + j, residual_scratch, kLanes);
#pragma omp simd
        for (int lane = 0; lane < kLanes; ++lane) lanes[lane] = x_scratch[lane] + residual_scratch[lane];
        store_row(lanes, rounded, kLanes);
        load_row(rounded, buffer + j, kLanes);
#pragma omp simd
        for (int lane = 0; lane < kLanes; ++lane) partial[lane] += buffer[j + lane];
      }
      put_chunk<T, kLanes>(rounded, sum + j, streaming);
    }
  }
#pragma omp simd reduction(+ : total)
  for (int64_t k = j; k < n; ++k) total += add(k);
  return total + fold_lanes(partial);
}

// The widest row the forward prefetches the next one of (see there).
constexpr int64_t kPrefetchRowBytes = 8192;

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
    std::vector<A> buffer(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < args.rows; ++r) {
      // Prefetching the next row pays for short rows (fp32 one thread: 1.30x against 1.04x torch
      // at 512 wide, 1.63x against 1.18x at 1024) and costs for long ones, which the hardware
      // prefetcher follows anyway (1.44x against 1.63x at 8192). The backward, which reads two
      // rows, lost with it at every width (1.07x against 1.34x at 768), and does without.
      if (r + 1 < args.rows && n * int64_t(sizeof(T)) <= kPrefetchRowBytes) {
        prefetch_row(args.x + (r + 1) * args.x_stride, n);
        if (args.residual) prefetch_row(args.residual + (r + 1) * args.residual_stride, n);
      }
      const A* v;  // the row to normalize, in the accumulator type
      const A total = load_row_and_sum(args, r, buffer.data(), v, streaming);
      const RowStatistics<A> stats = row_statistics(v, total, n, args.eps, args.rms);
      const A mean = stats.mean, rstd = stats.rstd, scale = stats.scale;
      if (args.mean) args.mean[r] = mean / scale;
      args.rstd[r] = rstd * scale;
      T* y = args.y + r * n;
      if (scale == A(1)) {  // every ordinary row: the loop without the scaling multiply
        write_row(y, n, streaming, [=](int64_t j) { return (v[j] - mean) * rstd * w[j] + b[j]; });
      } else {
        write_row(y, n, streaming, [=](int64_t j) { return (v[j] * scale - mean) * rstd * w[j] + b[j]; });
      }
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
    std::vector<A> x_buffer(n), dy_buffer(n);
    // This thread's rows of the partial weight/bias gradients; absent ones point at a scratch
    // row, so the loops below need no branch (the caller ignores it).
    std::vector<A> unused(n);
    A* dweight = args.dweight_partial ? args.dweight_partial + thread * n : unused.data();
    A* dbias = args.dbias_partial ? args.dbias_partial + thread * n : unused.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < args.rows; ++r) {
      const T* x_row = args.x + r * args.x_stride;
      const T* dy_row = args.dy + r * n;
      // x and dy in the accumulator type: fp32 rows in place, 16-bit ones converted in pass 1.
      const A* x = x_buffer.data();
      const A* dy = dy_buffer.data();
      if constexpr (std::is_same_v<T, A>) x = x_row, dy = dy_row;
      const A rstd = args.rstd[r];
      // xhat = (x * half - half_mean) * rstd_twice (see layer_norm_centering)
      const LayerNormCentering<A> centering = layer_norm_centering(args.rms ? A(0) : args.mean[r], rstd);
      const A half = centering.half, half_mean = centering.half_mean, rstd_twice = centering.rstd_twice;

      // Pass 1: the row sums of g * xhat and g (g = dy * w) in kLanes independent partial sums
      // (see row_reduce), and this row's share of the weight and bias gradients.
      A g_xhat_lanes[kLanes] = {}, g_lanes[kLanes] = {};
      int64_t j = 0;
      for (; j + kLanes <= n; j += kLanes) {
        if constexpr (!std::is_same_v<T, A>) {
          load_row(x_row + j, x_buffer.data() + j, kLanes);
          load_row(dy_row + j, dy_buffer.data() + j, kLanes);
        }
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
#pragma omp simd reduction(+ : g_xhat, g_total)
      for (int64_t k = j; k < n; ++k) {
        if constexpr (!std::is_same_v<T, A>) x_buffer[k] = to_acc(x_row[k]), dy_buffer[k] = to_acc(dy_row[k]);
        const A xhat = (x[k] * half - half_mean) * rstd_twice;
        const A g = dy[k] * w[k];
        g_xhat += g * xhat;
        g_total += g;
        dweight[k] += dy[k] * xhat;
        dbias[k] += dy[k];
      }
      g_xhat += fold_lanes(g_xhat_lanes);
      g_total += fold_lanes(g_lanes);
      const A c1 = g_xhat / A(n);
      const A c2 = args.rms ? A(0) : g_total / A(n);

      // Pass 2 (x and dy are in L1 now): dx, plus the sum output's gradient, which flows
      // straight into input and residual.
      const auto dx = [=](int64_t k) {
        return layer_norm_input_grad(dy[k] * w[k], (x[k] * half - half_mean) * rstd_twice, c1, c2, rstd);
      };
      T* dx_row = args.dx + r * n;
      if (args.dsum) {
        const T* dsum = args.dsum + r * n;
        write_row(dx_row, n, streaming, [=](int64_t k) { return dx(k) + to_acc(dsum[k]); });
      } else {
        write_row(dx_row, n, streaming, dx);
      }
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
