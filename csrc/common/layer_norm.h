// Layer norm / RMS norm math shared by the CPU and CUDA kernels, and the argument structs both
// take. For one row v[0..N) (the input, or input + residual):
//   mean = sum(v) / N                 (0 for RMS norm)
//   rstd = 1 / sqrt(sum((v - mean)^2) / N + eps)
//   xhat = (v - mean) * rstd
//   y    = xhat * w + b
// Backward, with g = dy * w:
//   c1 = sum(g * xhat) / N,   c2 = sum(g) / N   (0 for RMS norm)
//   dv = (g - xhat * c1 - c2) * rstd
//   dw = sum over rows of dy * xhat,   db = sum over rows of dy
#pragma once

#include <cmath>

#include "common/dtypes.h"

namespace engine {

template <typename A>
HOST_DEVICE A layer_norm_rstd(A sum_of_squares, A cols, A eps) {
  using std::sqrt;  // host: std::sqrt; device: CUDA's float/double overloads
  return A(1) / sqrt(sum_of_squares / cols + eps);
}

template <typename A>
HOST_DEVICE A layer_norm_input_grad(A g, A xhat, A c1, A c2, A rstd) {
  return (g - xhat * c1 - c2) * rstd;
}

// Pointers are element pointers of the kernel's storage type T (float, double, the backend's
// half and bfloat16 types); strides are in elements; "[rows, cols]" tensors have unit column stride.
template <typename T>
struct LayerNormForwardArgs {
  using A = acc_t<T>;
  const T* x;                // [rows, cols] input
  int64_t x_stride;          // row stride of x
  const T* residual;         // [rows, cols] added to x before normalizing, or nullptr
  int64_t residual_stride;   // row stride of residual
  const T* weight;           // [cols] or nullptr (no scale)
  const T* bias;             // [cols] or nullptr (no shift)
  T* y;                      // [rows, cols] contiguous output
  T* sum;                    // [rows, cols] contiguous output x + residual; written when residual
  A* mean;                   // [rows] output; nullptr for RMS norm
  A* rstd;                   // [rows] output
  int64_t rows;
  int64_t cols;
  A eps;
  bool rms;                  // RMS norm: no mean subtraction, no bias
};

template <typename T>
struct LayerNormBackwardArgs {
  using A = acc_t<T>;
  const T* dy;               // [rows, cols] contiguous gradient of y
  const T* dsum;             // [rows, cols] contiguous gradient of the sum output, or nullptr
  const T* x;                // [rows, cols] the normalized input (x, or the saved x + residual)
  int64_t x_stride;          // row stride of x
  const T* weight;           // [cols] or nullptr
  const A* mean;             // [rows]; nullptr for RMS norm
  const A* rstd;             // [rows]
  T* dx;                     // [rows, cols] contiguous output (also the residual's gradient)
  A* dweight_partial;        // [partials, cols] per-worker sums of dy * xhat, or nullptr
  A* dbias_partial;          // [partials, cols] per-worker sums of dy, or nullptr
  int64_t partials;          // rows of the partial buffers: one per worker, reduced by the caller
  int64_t rows;
  int64_t cols;
  bool rms;
};

}  // namespace engine
