// CPU epilogues of the linear layer (csrc/cpu/linear.cpp) and the GeLU kernels. Storage types
// T: float, double, engine::half, engine::bfloat16; accumulator A = acc_t<T>.
//
// The matrix products themselves go through the BLAS torch uses (csrc/bindings/bind_linear.cpp
// calls at::mm_out per tile, one tile per thread at a time); these functions run on one tile
// while it is still in cache:
//   forward   out = dropout(act(product + bias)) + residual, pre = product + bias
//   backward  g = grad_out * keep / (1 - p) * act'(pre), and the column sums of g (bias gradient)
// Gated activations (SwiGLU, GeGLU) multiply two products, gate and up, of the same outputs:
//   forward   out = dropout(act(gate + bias_gate) * (up + bias_up)) + residual
//   backward  with g_out = grad_out * keep / (1 - p):  g = [g_out * up * act'(gate), g_out * act(gate)]
// A tile is the [rows, cols] block whose first element is element (row0, col0) of the whole
// [M, N] output; the dropout counters of element [m, n] are (n, m, 0) (common/philox.h), so a
// tile's mask does not depend on how the output was cut into tiles.
#pragma once

#include <cstdint>

#include "common/activations.h"
#include "common/dtypes.h"

namespace engine::cpu {

// Forward epilogue of one tile. P is the storage type of the product tile: the accumulator type
// A (fp32/fp64 data, and fp16 data whose product is computed in fp32), or T itself (bf16 data
// multiplied by a bf16 GEMM that has already added the bias: then bias is nullptr and pre may be
// the product tile itself). Pointers may alias exactly (pre == product, out == product for
// T == P): each element is read before it is written.
template <typename T, typename P>
struct LinearForwardTile {
  const P* product;          // [rows, cols] tile of x @ W^T (+ bias when bias == nullptr)
  int64_t product_stride;    // row stride of product (elements)
  const T* bias;             // [cols] bias of this tile's columns, or nullptr
  const T* residual;         // [rows, cols] added after dropout, or nullptr
  int64_t residual_stride;   // row stride of residual
  T* pre;                    // [rows, cols] output: product + bias (pre-activation), or nullptr
  int64_t pre_stride;        // row stride of pre
  T* out;                    // [rows, cols] output
  int64_t out_stride;        // row stride of out
  bool* keep;                // [rows, cols] output: dropout's keep mask (debug path), or nullptr
  int64_t keep_stride;       // row stride of keep
  int64_t rows;              // tile height
  int64_t cols;              // tile width
  int64_t row0;              // first row of the tile in the whole output (dropout counter c1)
  int64_t col0;              // first column of the tile (dropout counter c0)
  Activation activation;     // gated: the gate's activation
  double dropout_p;          // in [0, 1); 0: no dropout (compared in fp32, scale 1 / (1 - p) in A)
  uint64_t seed;             // dropout seed (common/philox.h key)
  // Gated: product, bias and pre above hold the gate's columns of the tile's outputs, these the
  // up projection's (same strides); out = act(gate) * up. Unread when not gated.
  bool gated;
  const P* up_product;       // [rows, cols] (+ up bias when bias == nullptr, as product)
  const T* up_bias;          // [cols] or nullptr
  T* up_pre;                 // [rows, cols] output: up product + up bias, or nullptr
};

// `scratch` holds kTileScratch * cols accumulator values (thread-local, reused across tiles).
constexpr int64_t kTileScratch = 7;

template <typename T, typename P>
void linear_forward_tile(const LinearForwardTile<T, P>& tile, acc_t<T>* scratch);

// Backward prologue of one tile: g = grad_out * keep / (1 - p) * act'(pre), written in G (the
// type the products dx = g W, dW = g^T x take: A, or T for the bf16 GEMMs), and g's column sums
// added to bias_grad (a per-thread partial, reduced by the caller: no races). The column sums
// run over up to M rows, so they are kept in double whatever T is: the bias gradient then carries
// only the final rounding.
template <typename T, typename G>
struct LinearBackwardTile {
  const T* grad_out;         // [rows, cols] gradient of out
  int64_t grad_stride;       // row stride of grad_out
  const T* pre;              // [rows, cols] saved pre-activation, or nullptr for activation none
                             // (gated: [rows, 2 * cols], the gate's columns then the up ones)
  int64_t pre_stride;        // row stride of pre
  G* g;                      // [rows, cols] output: the gradient of pre (gated: [rows, 2 * cols])
  int64_t g_stride;          // row stride of g
  double* bias_grad;         // [cols] partial sums of g over rows (accumulated into), or nullptr
                             // (gated: [2 * cols])
  int64_t rows;
  int64_t cols;              // columns of grad_out
  int64_t row0;              // first row of the tile in the whole output (dropout counter c1)
  int64_t col0;              // first column (dropout counter c0)
  Activation activation;     // gated: the gate's activation
  bool gated;                // out was act(gate) * up
  double dropout_p;          // in [0, 1); 0: no dropout
  uint64_t seed;             // dropout seed
};

// `scratch` holds kTileScratch * cols accumulator values.
template <typename T, typename G>
void linear_backward_tile(const LinearBackwardTile<T, G>& tile, acc_t<T>* scratch);

// Column sums of a [rows, cols] matrix (row stride `stride`) added into sums[cols] (double): the
// bias gradient when g is grad_out itself (no activation, no dropout).
template <typename T>
void column_sums(const T* matrix, int64_t stride, int64_t rows, int64_t cols, double* sums);

// Elementwise GeLU on `count` contiguous elements, split over num_threads OpenMP threads.
// tanh: the approximate="tanh" form.
template <typename T>
void gelu_forward(const T* x, T* y, int64_t count, bool tanh, int num_threads);

// dx = grad_y * gelu'(x), elementwise.
template <typename T>
void gelu_backward(const T* grad_y, const T* x, T* dx, int64_t count, bool tanh, int num_threads);

}  // namespace engine::cpu
