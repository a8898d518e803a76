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
//
// Extreme rows. The sums above overflow the accumulator for |v| beyond ~2^64 (fp32: 1.8e19; bf16
// and fp32 inputs reach 3.4e38), and the squares lose their digits below ~2^-63 (subnormal), which
// matters only when eps is as small (eps = 0). The forward computes the statistics directly and
// checks them (layer_norm_direct_ok); a row outside the range takes a second, rare pass: v is
// multiplied by scale = layer_norm_row_scale(max |v|) = 1 / p, p a power of two (so the scaling
// is exact), the statistics are computed on v / p (|v / p| < 4) with eps / p^2, and mean = mean' p,
// rstd = rstd' / p are the true ones (rstd may be subnormal: for |v| ~ 3e38 it is ~3e-39).
// Backward computes x - mean as (x / 2 - mean / 2) * 2 in rows whose std exceeds 1
// (layer_norm_centering), where x - mean could overflow.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstring>

#include "common/dtypes.h"

namespace engine {

template <typename A>
HOST_DEVICE A layer_norm_rstd(A sum_of_squares, A cols, A eps) {
  using std::sqrt;  // host: std::sqrt; device: CUDA's float/double overloads
  return A(1) / sqrt(sum_of_squares / cols + eps);
}

// Whether the direct statistics are exact: the sum of squares did not overflow (NaN: false) and
// variance + eps >= 2^-100 (fp32; fp64 2^-958), where subnormal squares cannot matter.
template <typename A>
HOST_DEVICE bool layer_norm_direct_ok(A sum_of_squares, A cols, A eps) {
  constexpr A kMax = sizeof(A) == 4 ? A(FLT_MAX) : A(DBL_MAX);
  constexpr A kTiny = sizeof(A) == 4 ? A(0x1p-100f) : A(0x1p-958);
  return sum_of_squares <= kMax && (eps >= kTiny || sum_of_squares >= kTiny * cols);
}

// The scale the slow path multiplies a row by: 1 / p, p = 2^floor(log2 top) (top = max |v|)
// clamped to [2^-126, 2^126] (fp64: [2^-1022, 2^1022]), so that p and 1 / p are normal and the
// scaling exact; inf or NaN give 2^-126. Built from the exponent bits, without a division
// (whose slow path made the CUDA kernels use a stack frame). For a power of two in that range
// it is the exact reciprocal: layer_norm_row_scale(scale) = p scales the statistics back.
template <typename A>
HOST_DEVICE A layer_norm_row_scale(A top) {
  if constexpr (sizeof(A) == 4) {
    const uint32_t exponent = (float_as_bits(top) >> 23) & 0xffu;
    const uint32_t clamped = exponent < 1u ? 1u : (exponent > 253u ? 253u : exponent);
    return bits_as_float((254u - clamped) << 23);
  } else {
    uint64_t bits;
#if defined(__CUDA_ARCH__)
    bits = static_cast<uint64_t>(__double_as_longlong(top));
#else
    std::memcpy(&bits, &top, 8);
#endif
    const uint64_t exponent = (bits >> 52) & 0x7ffu;
    const uint64_t clamped = exponent < 1u ? 1u : (exponent > 2045u ? 2045u : exponent);
    bits = (2046u - clamped) << 52;
#if defined(__CUDA_ARCH__)
    return __longlong_as_double(static_cast<long long>(bits));
#else
    A scale;
    std::memcpy(&scale, &bits, 8);
    return scale;
#endif
  }
}

// Backward's centering: xhat = (x * half - mean * half) * (rstd * twice) with (half, twice) =
// (1/2, 2) when rstd < 1, else (1, 1): exact either way for normal x, and x / 2 - mean / 2 cannot
// overflow (|x|, |mean| <= max). Where std <= 1, |x - mean| <= sqrt(N) std is far from overflow.
template <typename A>
struct LayerNormCentering {
  A half_mean;   // mean * half
  A half;
  A rstd_twice;  // rstd * twice
};

template <typename A>
HOST_DEVICE LayerNormCentering<A> layer_norm_centering(A mean, A rstd) {
  const A half = rstd < A(1) ? A(0.5) : A(1);
  return {mean * half, half, rstd < A(1) ? rstd * A(2) : rstd};
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
