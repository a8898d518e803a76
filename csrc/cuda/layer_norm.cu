// CUDA layer norm / RMS norm, forward and backward (math in csrc/common/layer_norm.h).
// Memory traffic per row of N elements: forward reads x (and residual) and writes y (and the
// sum); backward reads dy, x (and dsum) and writes dx. Forward runs one thread block per row,
// each thread holding its strided slice of the row in registers when the row fits, so global
// memory is read once; backward re-reads its row once (from L2) for the second pass.
#include <cuda_runtime.h>

#include "common/layer_norm.h"
#include "cuda/convert.cuh"
#include "cuda/layer_norm.h"

namespace engine::cuda {

constexpr int kThreads = 256;        // threads per row block
constexpr int kMaxPerThread = 16;    // row elements a thread holds: rows up to 4096 in registers
constexpr int kBackwardBlocksPerSM = 4;

// Element j of a row, as the accumulator type.
template <typename T>
__device__ __forceinline__ acc_t<T> load(const T* row, int64_t j) {
  return to_acc(row[j]);
}

// Forward for one row in block blockIdx.x. kHeld: the row fits in registers (at most
// kThreads * kMaxPerThread elements) and the loops unroll over the held slice; otherwise the
// later passes re-read the row from global memory (L2).
template <typename T, bool kHeld>
__global__ void __launch_bounds__(kThreads) layer_norm_forward_kernel(LayerNormForwardArgs<T> args) {
  using A = acc_t<T>;
  __shared__ A scratch[32];
  const int64_t r = blockIdx.x;
  const int64_t n = args.cols;
  const int steps = kHeld ? kMaxPerThread : int((n + kThreads - 1) / kThreads);
  const T* x = args.x + r * args.x_stride;
  const T* source = args.residual ? args.sum + r * n : x;  // what later passes re-read
  A held[kHeld ? kMaxPerThread : 1];                       // constant indices only: registers

  A total = 0;
#pragma unroll
  for (int k = 0; k < steps; ++k) {
    const int j = threadIdx.x + k * kThreads;  // column; the bindings keep cols < 2^31
    A v = 0;
    if (j < n) {
      v = load(x, j);
      if (args.residual) {
        const T stored = from_acc<T>(v + load(args.residual + r * args.residual_stride, j));
        args.sum[r * n + j] = stored;
        v = to_acc(stored);  // normalize the sum as stored, as backward will read it
      }
    }
    if (kHeld) held[k] = v;
    total += v;
  }
  // The statistics of v * scale: directly (scale = 1), and for the rare row outside the direct
  // statistics' range a second time with scale = 1 / p, p a power of two (csrc/common/layer_norm.h).
  // The block sums give every thread the same values, so the exit is uniform over the block. One
  // loop rather than a copy of its body: a second division site gave ptxas's fp64 division
  // subroutine a stack frame and spills.
  A scale = 1, eps = args.eps, mean, sum_of_squares;
#pragma unroll 1
  for (int attempt = 0;; ++attempt) {
    mean = args.rms ? A(0) : block_sum(total, scratch) / A(n);
    A squares = 0;
#pragma unroll
    for (int k = 0; k < steps; ++k) {
      const int j = threadIdx.x + k * kThreads;
      if (j >= n) continue;
      const A d = (kHeld ? held[k] : load(source, j)) * scale - mean;
      squares += d * d;
    }
    sum_of_squares = block_sum(squares, scratch);
    if (attempt == 1 || layer_norm_direct_ok(sum_of_squares, A(n), eps)) break;
    A top = 0;
#pragma unroll
    for (int k = 0; k < steps; ++k) {
      const int j = threadIdx.x + k * kThreads;
      if (j < n) top = fmax(top, fabs(kHeld ? held[k] : load(source, j)));
    }
    scale = layer_norm_row_scale(block_max(top, scratch));
    eps *= scale * scale;
    total = 0;
#pragma unroll
    for (int k = 0; k < steps; ++k) {
      const int j = threadIdx.x + k * kThreads;
      if (j < n) total += (kHeld ? held[k] : load(source, j)) * scale;
    }
  }
  const A rstd = layer_norm_rstd(sum_of_squares, A(n), eps);
  if (threadIdx.x == 0) {
    if (args.mean) args.mean[r] = mean * layer_norm_row_scale(scale);  // layer_norm_row_scale(1 / p) = p
    args.rstd[r] = rstd * scale;
  }

#pragma unroll
  for (int k = 0; k < steps; ++k) {
    const int j = threadIdx.x + k * kThreads;
    if (j >= n) continue;
    const A v = kHeld ? held[k] : load(source, j);
    A out = (v * scale - mean) * rstd;
    if (args.weight) out *= load(args.weight, j);
    if (args.bias) out += load(args.bias, j);
    args.y[r * n + j] = from_acc<T>(out);
  }
}

// Backward: block b handles rows b, b + gridDim.x, ... and accumulates its weight/bias
// gradients in row b of the partial buffers; column j of that row belongs to one thread only.
template <typename T>
__global__ void __launch_bounds__(kThreads) layer_norm_backward_kernel(LayerNormBackwardArgs<T> args) {
  using A = acc_t<T>;
  __shared__ A scratch[32];
  const int64_t n = args.cols;
  A* dweight = args.dweight_partial ? args.dweight_partial + blockIdx.x * n : nullptr;
  A* dbias = args.dbias_partial ? args.dbias_partial + blockIdx.x * n : nullptr;
  for (int64_t r = blockIdx.x; r < args.rows; r += gridDim.x) {
    const T* x = args.x + r * args.x_stride;
    const T* dy = args.dy + r * n;
    const A rstd = args.rstd[r];
    // xhat = (x * half - half_mean) * rstd_twice (see layer_norm_centering)
    const LayerNormCentering<A> c = layer_norm_centering(args.rms ? A(0) : args.mean[r], rstd);
    A g_xhat = 0, g_total = 0;
    for (int j = threadIdx.x; j < n; j += kThreads) {
      const A xhat = (load(x, j) * c.half - c.half_mean) * c.rstd_twice;
      const A g = load(dy, j) * (args.weight ? load(args.weight, j) : A(1));
      g_xhat += g * xhat;
      g_total += g;
    }
    const A c1 = block_sum(g_xhat, scratch) / A(n);
    const A c2 = args.rms ? A(0) : block_sum(g_total, scratch) / A(n);
    for (int j = threadIdx.x; j < n; j += kThreads) {
      const A xhat = (load(x, j) * c.half - c.half_mean) * c.rstd_twice;
      const A d = load(dy, j);
      const A g = d * (args.weight ? load(args.weight, j) : A(1));
      const A dsum = args.dsum ? load(args.dsum + r * n, j) : A(0);
      args.dx[r * n + j] = from_acc<T>(layer_norm_input_grad(g, xhat, c1, c2, rstd) + dsum);
      if (dweight) dweight[j] += d * xhat;
      if (dbias) dbias[j] += d;
    }
  }
}

int layer_norm_backward_blocks(int64_t rows) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t blocks = int64_t(sms) * kBackwardBlocksPerSM;
  return int(rows < blocks ? (rows > 0 ? rows : 1) : blocks);
}

template <typename T>
void layer_norm_forward(const LayerNormForwardArgs<T>& args, void* stream) {
  if (args.rows == 0) return;
  auto launch_stream = static_cast<cudaStream_t>(stream);
  if (args.cols <= int64_t(kThreads) * kMaxPerThread)
    layer_norm_forward_kernel<T, true><<<args.rows, kThreads, 0, launch_stream>>>(args);
  else
    layer_norm_forward_kernel<T, false><<<args.rows, kThreads, 0, launch_stream>>>(args);
}

template <typename T>
void layer_norm_backward(const LayerNormBackwardArgs<T>& args, void* stream) {
  if (args.rows == 0) return;
  layer_norm_backward_kernel<T><<<args.partials, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
}

#define INSTANTIATE(T)                                                                  \
  template void layer_norm_forward<T>(const LayerNormForwardArgs<T>&, void*);           \
  template void layer_norm_backward<T>(const LayerNormBackwardArgs<T>&, void*);
INSTANTIATE(float)
INSTANTIATE(double)
INSTANTIATE(half)
INSTANTIATE(bfloat16)
#undef INSTANTIATE

}  // namespace engine::cuda
