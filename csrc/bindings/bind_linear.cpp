// Torch glue for the linear layer with fused epilogue and for GeLU: check the arguments, allocate
// the outputs and call the CPU (cpu/linear_blas.cpp, cpu/linear.cpp) or CUDA kernels.
// Called by engine/ops/linear.py (contract in its docstring) after engine/functional.py
// validated the inputs:
//   linear_forward(x [M, K], weight [N, K], bias [N]?, activation, dropout_p, seed, residual [M, N]?,
//                  return_dropout_mask) -> (out [M, N], pre [M, N] or empty, keep [M, N] bool or empty)
//   linear_backward(grad_out [M, N], x, weight, pre?, activation, dropout_p, seed, need_weight_grad,
//                   need_bias_grad) -> (dx [M, K], dweight [N, K] or empty, dbias [N] or empty)
//   gelu_forward(x, approximate) -> y;  gelu_backward(grad_y, x, approximate) -> dx
// activation is a string: "none", "gelu" (erf form), "gelu_tanh", "relu", "silu", or a gated one,
// "swiglu", "geglu", "geglu_tanh": weight [2H, K] = gate rows then up rows, out,
// residual, keep and grad_out [M, H], out = act(gate) * up (silu, gelu, gelu_tanh); approximate is "none"
// or "tanh" as in torch.nn.functional.gelu.
//
// CPU: tiles of BLAS products with the epilogue on each tile in cache (cpu/linear_blas.cpp).
// CUDA: at::mm / at::addmm on the CUDA tensors (cuBLAS), the epilogue kernels of
// csrc/cuda/linear.cu around them (bias in the GEMM for 16-bit types, so that pre is rounded once, as in torch's own
// F.linear).
#include <string>
#include <type_traits>

#include "bindings/common.h"
#include "cpu/linear.h"
#include "cpu/linear_blas.h"
#ifdef ENGINE_WITH_CUDA
#include "cuda/linear.h"
#endif

namespace engine::bindings {
namespace {

// An activation name: the activation, and for a gated one the gate's activation.
struct EpilogueActivation {
  Activation activation;
  bool gated;
};

EpilogueActivation parse_activation(const std::string& name) {
  if (name == "none") return {Activation::kNone, false};
  if (name == "gelu") return {Activation::kGelu, false};
  if (name == "gelu_tanh") return {Activation::kGeluTanh, false};
  if (name == "relu") return {Activation::kRelu, false};
  if (name == "silu") return {Activation::kSilu, false};
  if (name == "swiglu") return {Activation::kSilu, true};
  if (name == "geglu") return {Activation::kGelu, true};
  if (name == "geglu_tanh") return {Activation::kGeluTanh, true};
  TORCH_CHECK(false, "linear: unknown activation '", name,
              "' (expected none, gelu, gelu_tanh, relu, silu, swiglu, geglu or geglu_tanh)");
}

bool parse_approximate(const std::string& approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh", "gelu: approximate must be 'none' or 'tanh', got '",
              approximate, "'");
  return approximate == "tanh";
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1), "linear: ", name,
              " must be [rows, cols] with unit column stride");
}

}  // namespace

std::vector<at::Tensor> linear_forward(const at::Tensor& x, const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias, const std::string& activation_name,
                                       double dropout_p, int64_t seed, const c10::optional<at::Tensor>& residual,
                                       bool return_dropout_mask) {
  check_rows(x, "x");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "linear: weight must be [N, K] with K = x.size(1)");
  const auto [activation, gated] = parse_activation(activation_name);
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "linear: dropout_p must be in [0, 1)");
  const int64_t m = x.size(0), n = weight.size(0);
  TORCH_CHECK(!gated || n % 2 == 0, "linear: a gated activation needs an even number of weight rows");
  const int64_t width = gated ? n / 2 : n;  // output columns
  // Dropout counters are 32-bit (element [m, n] -> (n, m, 0)).
  TORCH_CHECK(m < (int64_t(1) << 31) && n < (int64_t(1) << 31), "linear: M and N must be below 2^31");
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  TORCH_CHECK(!b.defined() || (b.dim() == 1 && b.size(0) == n), "linear: bias must be [N]");
  at::Tensor r = residual.has_value() && residual->defined() ? *residual : at::Tensor();
  if (r.defined()) {
    if (!(r.dim() == 2 && (r.stride(1) == 1 || width <= 1))) r = r.contiguous();
    TORCH_CHECK(r.size(0) == m && r.size(1) == width, "linear: residual must be [M, N] (gated: [M, N / 2])");
  }
  at::Tensor out = cpu::new_output({m, width}, x.options());
  at::Tensor pre = activation != Activation::kNone ? cpu::new_output({m, n}, x.options()) : at::empty({0}, x.options());
  at::Tensor keep = return_dropout_mask && dropout_p > 0 ? at::empty({m, width}, x.options().dtype(at::kBool))
                                                         : at::empty({0}, x.options().dtype(at::kBool));
  if (m == 0 || n == 0) return {out, pre, keep};
  const uint64_t seed_bits = static_cast<uint64_t>(seed);

  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
#ifdef ENGINE_WITH_CUDA
    if (x.is_cuda()) {
      // One GEMM of the whole weight: gated, its [M, 2H] product holds the gate's columns then the up ones.
      at::Tensor destination = activation != Activation::kNone ? pre : out;
      const bool bias_in_gemm = b.defined() && (std::is_same_v<T, half> || std::is_same_v<T, bfloat16>);
      if (bias_in_gemm)
        at::addmm_out(destination, b, x, weight.t());
      else
        at::mm_out(destination, x, weight.t());
      cuda::LinearEpilogueArgs<T> args{};
      args.product = static_cast<const T*>(destination.data_ptr());
      args.product_stride = n;
      args.bias = b.defined() && !bias_in_gemm ? static_cast<const T*>(b.data_ptr()) : nullptr;
      args.residual = r.defined() ? static_cast<const T*>(r.data_ptr()) : nullptr;
      args.residual_stride = r.defined() ? cpu::row_stride(r) : 0;
      args.pre = activation != Activation::kNone ? static_cast<T*>(pre.data_ptr()) : nullptr;
      args.out = static_cast<T*>(out.data_ptr());
      args.keep = keep.numel() > 0 ? static_cast<bool*>(keep.data_ptr()) : nullptr;
      args.rows = m;
      args.cols = width;
      args.activation = activation;
      args.gated = gated;
      args.dropout_p = dropout_p;
      args.seed = seed_bits;
      if (activation != Activation::kNone || args.bias || dropout_p > 0 || args.residual)
        cuda::linear_forward_epilogue(args, current_stream());
      return;
    }
#endif
    TORCH_CHECK(x.is_cpu(), "linear: this build runs CPU tensors only");
    cpu::linear_forward<T>(x, weight, b, activation, gated, dropout_p, seed_bits, r, out, pre, keep);
  });
  return {out, pre, keep};
}

std::vector<at::Tensor> linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& pre, const std::string& activation_name,
                                        double dropout_p, int64_t seed, bool need_weight_grad, bool need_bias_grad) {
  check_rows(x, "x");
  const auto [activation, gated] = parse_activation(activation_name);
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(!gated || n % 2 == 0, "linear: a gated activation needs an even number of weight rows");
  const int64_t width = gated ? n / 2 : n;  // columns of grad_out
  TORCH_CHECK(m < (int64_t(1) << 31) && n < (int64_t(1) << 31), "linear: M and N must be below 2^31");
  at::Tensor grad = grad_out;
  if (!(grad.dim() == 2 && (grad.stride(1) == 1 || width <= 1))) grad = grad.contiguous();
  TORCH_CHECK(grad.size(0) == m && grad.size(1) == width, "linear: grad_out must be [M, N] (gated: [M, N / 2])");
  at::Tensor saved_pre = activation != Activation::kNone && pre.has_value() ? *pre : at::Tensor();
  TORCH_CHECK(activation == Activation::kNone || (saved_pre.defined() && saved_pre.size(0) == m &&
                                                  saved_pre.size(1) == n),
              "linear: backward of an activation needs pre_activation [M, N]");
  if (saved_pre.defined() && !(saved_pre.stride(1) == 1 || n <= 1)) saved_pre = saved_pre.contiguous();

  at::Tensor dx = cpu::new_output({m, k}, x.options());
  at::Tensor dweight = need_weight_grad ? at::Tensor() : at::empty({0}, weight.options());
  at::Tensor dbias = need_bias_grad ? at::Tensor() : at::empty({0}, weight.options());
  if (m == 0 || n == 0) {  // nothing flows back (k == 0 runs below: the bias gradient remains)
    dx.zero_();
    if (need_weight_grad) dweight = at::zeros({n, k}, weight.options());
    if (need_bias_grad) dbias = at::zeros({n}, weight.options());
    return {dx, dweight, dbias};
  }
  const uint64_t seed_bits = static_cast<uint64_t>(seed);

  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
#ifdef ENGINE_WITH_CUDA
    if (x.is_cuda()) {
      const bool identity = activation == Activation::kNone && dropout_p == 0;
      at::Tensor g = grad;
      if (identity) {
        if (need_bias_grad) dbias = grad.sum(0, false, accumulator_dtype(x.scalar_type())).to(weight.scalar_type());
      } else {
        g = at::empty({m, n}, x.options());
        const int64_t partials = cuda::linear_bias_grad_partials(m);
        at::Tensor partial = need_bias_grad ? at::empty({partials, n}, x.options().dtype(accumulator_dtype(x.scalar_type())))
                                            : at::Tensor();
        if (need_bias_grad) dbias = at::empty({n}, weight.options());
        cuda::LinearBackwardArgs<T> args{};
        args.grad_out = static_cast<const T*>(grad.data_ptr());
        args.grad_stride = cpu::row_stride(grad);
        args.pre = saved_pre.defined() ? static_cast<const T*>(saved_pre.data_ptr()) : nullptr;
        args.pre_stride = saved_pre.defined() ? cpu::row_stride(saved_pre) : 0;
        args.g = static_cast<T*>(g.data_ptr());
        args.bias_grad_partial = need_bias_grad ? static_cast<acc_t<T>*>(partial.data_ptr()) : nullptr;
        args.bias_grad = need_bias_grad ? static_cast<T*>(dbias.data_ptr()) : nullptr;
        args.partials = partials;
        args.rows = m;
        args.cols = width;
        args.activation = activation;
        args.gated = gated;
        args.dropout_p = dropout_p;
        args.seed = seed_bits;
        cuda::linear_backward_prologue(args, current_stream());
      }
      if (k > 0) at::mm_out(dx, g, weight);
      if (need_weight_grad) dweight = at::mm(g.t(), x);
      return;
    }
#endif
    TORCH_CHECK(x.is_cpu(), "linear: this build runs CPU tensors only");
    cpu::linear_backward<T>(grad, x, weight, saved_pre, activation, gated, dropout_p, seed_bits, need_weight_grad,
                            need_bias_grad, dx, dweight, dbias);
  });
  return {dx, dweight, dbias};
}

at::Tensor gelu_forward(const at::Tensor& x, const std::string& approximate) {
  const bool tanh = parse_approximate(approximate);
  const at::Tensor input = x.contiguous();
  at::Tensor y = cpu::new_output(input.sizes(), input.options());
  const int64_t count = input.numel();
  if (count == 0) return y;
  dispatch_float_types(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(input.data_ptr());
    T* out = static_cast<T*>(y.data_ptr());
#ifdef ENGINE_WITH_CUDA
    if (input.is_cuda()) return cuda::gelu_forward(in, out, count, tanh, current_stream());
#endif
    TORCH_CHECK(input.is_cpu(), "gelu: this build runs CPU tensors only");
    cpu::gelu_forward(in, out, count, tanh, cpu_threads(count));
  });
  return y;
}

at::Tensor gelu_backward(const at::Tensor& grad_y, const at::Tensor& x, const std::string& approximate) {
  const bool tanh = parse_approximate(approximate);
  const at::Tensor input = x.contiguous();
  const at::Tensor grad = grad_y.contiguous();
  TORCH_CHECK(grad.sizes() == input.sizes(), "gelu: grad_y and x must have the same shape");
  at::Tensor dx = cpu::new_output(input.sizes(), input.options());
  const int64_t count = input.numel();
  if (count == 0) return dx;
  dispatch_float_types(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(input.data_ptr());
    const T* dy = static_cast<const T*>(grad.data_ptr());
    T* out = static_cast<T*>(dx.data_ptr());
#ifdef ENGINE_WITH_CUDA
    if (input.is_cuda()) return cuda::gelu_backward(dy, in, out, count, tanh, current_stream());
#endif
    TORCH_CHECK(input.is_cpu(), "gelu: this build runs CPU tensors only");
    cpu::gelu_backward(dy, in, out, count, tanh, cpu_threads(count));
  });
  return dx;
}

void bind_linear(pybind11::module& m) {
  m.def("linear_forward", &linear_forward,
        "linear with fused epilogue: (x, weight, bias, activation, dropout_p, seed, residual, "
        "return_dropout_mask) -> (out, pre_activation, dropout_mask)");
  m.def("linear_backward", &linear_backward,
        "linear backward: (grad_out, x, weight, pre_activation, activation, dropout_p, seed, need_weight_grad, "
        "need_bias_grad) -> (dx, dweight, dbias)");
  m.def("gelu_forward", &gelu_forward, "gelu(x, approximate) -> y");
  m.def("gelu_backward", &gelu_backward, "gelu backward(grad_y, x, approximate) -> dx");
}

}  // namespace engine::bindings
