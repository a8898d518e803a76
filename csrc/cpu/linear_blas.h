// The CPU linear layer with fused epilogue (csrc/cpu/linear_blas.cpp): tiles of BLAS products
// (at::mm_out, the BLAS torch uses) with the epilogues of cpu/linear.h run on each tile while it
// is in cache. Unlike the other CPU kernels these take ATen tensors, since their products are
// torch's. Storage types T: float, double, engine::half, engine::bfloat16.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common/activations.h"

namespace engine::cpu {

// at::empty, plus (CPU, Linux) the advice to back large outputs with transparent huge pages.
at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options);

// The row stride of a [rows, cols] tensor with unit column stride (cols for a single row).
int64_t row_stride(const at::Tensor& t);

// out [M, N] = dropout(act(x [M, K] @ weight [N, K]^T + bias [N])) + residual [M, N]; pre [M, N]
// (written when activation is not none) = the product plus bias; keep [M, N] bool (written when
// it has elements) = dropout's keep mask. bias and residual may be undefined tensors.
// gated: weight [2H, K] holds the gate's rows then the up projection's; out, residual and keep
// are [M, H], out = dropout(act(gate) * up) + residual, pre [M, 2H] = [gate | up] (+ bias).
template <typename T>
void linear_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, Activation activation,
                    bool gated, double dropout_p, uint64_t seed, const at::Tensor& residual, const at::Tensor& out,
                    const at::Tensor& pre, const at::Tensor& keep);

// dx [M, K] (allocated by the caller) from grad_out [M, N]; dweight [N, K] and dbias [N] are
// assigned when need_weight_grad / need_bias_grad. pre: the saved pre-activation, or undefined
// for activation none. gated: grad_out [M, N / 2], pre [M, N] = [gate | up].
template <typename T>
void linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& pre, Activation activation, bool gated, double dropout_p, uint64_t seed,
                     bool need_weight_grad, bool need_bias_grad, at::Tensor& dx, at::Tensor& dweight,
                     at::Tensor& dbias);

}  // namespace engine::cpu
