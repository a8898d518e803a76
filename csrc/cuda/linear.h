// CUDA epilogues of the linear layer and the GeLU kernels (csrc/cuda/linear.cu). Host functions
// that launch on `stream` (a cudaStream_t passed as void*, so that this header needs no CUDA
// headers). The matrix products themselves are cuBLAS calls made by the bindings (at::mm on CUDA
// tensors); these kernels run around them:
//   forward   out = dropout(act(product + bias)) + residual, pre = product + bias
//   backward  g = grad_out * keep / (1 - p) * act'(pre), dbias = column sums of g
// Gated activations (SwiGLU, GeGLU): the product [M, 2N] holds the gate's columns then the up
// projection's (one GEMM with the weight [2N, K]), out [M, N] = dropout(act(gate) * up) +
// residual, and the backward writes g [M, 2N] = [g_out * up * act'(gate), g_out * act(gate)]
// with g_out = grad_out * keep / (1 - p).
// Storage types T: float, double, engine::half, engine::bfloat16; math in acc_t<T>.
#pragma once

#include <cstdint>

#include "common/activations.h"
#include "common/dtypes.h"

namespace engine::cuda {

template <typename T>
struct LinearEpilogueArgs {
  const T* product;          // [rows, cols] x @ W^T (with the bias already added when bias == nullptr);
                             // gated: [rows, 2 * cols]
  int64_t product_stride;    // row stride of product (elements)
  const T* bias;             // [cols] or nullptr (gated: [2 * cols])
  const T* residual;         // [rows, cols] added after dropout, or nullptr
  int64_t residual_stride;   // row stride of residual
  T* pre;                    // [rows, cols] contiguous output product + bias, or nullptr; may be
                             // the product itself (then it is written only when bias != nullptr);
                             // gated: [rows, 2 * cols]
  T* out;                    // [rows, cols] contiguous output
  bool* keep;                // [rows, cols] contiguous output: dropout's keep mask, or nullptr
  int64_t rows;              // M
  int64_t cols;              // N, the output's columns (< 2^31)
  Activation activation;     // gated: the gate's activation
  bool gated;
  double dropout_p;          // in [0, 1); 0: no dropout (compared in fp32, scale 1 / (1 - p) in A)
  uint64_t seed;             // dropout seed (counters (n, m, 0) for element [m, n])
};

template <typename T>
struct LinearBackwardArgs {
  const T* grad_out;         // [rows, cols] gradient of out
  int64_t grad_stride;       // row stride of grad_out
  const T* pre;              // [rows, cols] saved pre-activation, or nullptr (activation none);
                             // gated: [rows, 2 * cols]
  int64_t pre_stride;        // row stride of pre
  T* g;                      // [rows, cols] contiguous output: the gradient of pre (gated: [rows, 2 * cols])
  acc_t<T>* bias_grad_partial;  // [partials, cols] scratch for per-block column sums, or nullptr
                                // (gated: [partials, 2 * cols])
  T* bias_grad;              // [cols] output: column sums of g, or nullptr (gated: [2 * cols])
  int64_t partials;          // linear_bias_grad_partials(rows)
  int64_t rows;
  int64_t cols;              // columns of grad_out (< 2^31)
  Activation activation;     // gated: the gate's activation
  bool gated;
  double dropout_p;          // in [0, 1); 0: no dropout
  uint64_t seed;             // dropout seed
};

template <typename T>
void linear_forward_epilogue(const LinearEpilogueArgs<T>& args, void* stream);

// Writes g, and when bias_grad != nullptr the per-block column sums into bias_grad_partial and
// then (a second small kernel, no atomics) their sums into bias_grad.
template <typename T>
void linear_backward_prologue(const LinearBackwardArgs<T>& args, void* stream);

// Rows of the bias-gradient partial buffer linear_backward_prologue needs for `rows` rows.
int64_t linear_bias_grad_partials(int64_t rows);

// Elementwise GeLU on `count` contiguous elements; tanh: the approximate="tanh" form.
template <typename T>
void gelu_forward(const T* x, T* y, int64_t count, bool tanh, void* stream);

// dx = grad_y * gelu'(x), elementwise on contiguous tensors.
template <typename T>
void gelu_backward(const T* grad_y, const T* x, T* dx, int64_t count, bool tanh, void* stream);

}  // namespace engine::cuda
