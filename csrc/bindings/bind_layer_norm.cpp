// Torch glue for layer norm / RMS norm: allocate outputs, call the CPU or CUDA kernel.
// Called by engine/ops/layer_norm.py with [rows, cols] tensors of unit column stride, after
// engine/functional.py validated the inputs.
#include "bindings/common.h"
#include "cpu/layer_norm.h"
#ifdef ENGINE_WITH_CUDA
#include "cuda/layer_norm.h"
#endif

namespace engine::bindings {

static int64_t row_stride(const at::Tensor& rows) { return rows.size(0) > 1 ? rows.stride(0) : rows.size(1); }

static void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && (t.stride(1) == 1 || t.size(1) == 1), "layer_norm: ", name,
              " must be [rows, cols] with unit column stride");
  TORCH_CHECK(t.size(1) > 0 && t.size(1) < (int64_t(1) << 31), "layer_norm: cols out of range");
}

// x, residual: [rows, N]. Returns (y, sum, mean, rstd): y and sum [rows, N] (sum empty without
// residual), mean and rstd [rows] in the accumulator dtype (mean empty for RMS norm).
std::vector<at::Tensor> layer_norm_forward(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                           const c10::optional<at::Tensor>& weight,
                                           const c10::optional<at::Tensor>& bias, double eps, bool rms) {
  check_rows(x, "x");
  const at::Tensor r = residual.has_value() ? *residual : at::Tensor();
  if (r.defined()) check_rows(r, "residual");
  const int64_t rows = x.size(0), cols = x.size(1);
  const auto stats_options = x.options().dtype(accumulator_dtype(x.scalar_type()));
  at::Tensor y = at::empty({rows, cols}, x.options());
  at::Tensor sum = r.defined() ? at::empty({rows, cols}, x.options()) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({rms ? 0 : rows}, stats_options);
  at::Tensor rstd = at::empty({rows}, stats_options);
  const c10::optional<at::Tensor> w = weight.has_value() ? c10::optional<at::Tensor>(weight->contiguous()) : c10::nullopt;
  const c10::optional<at::Tensor> b = bias.has_value() ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;

  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    LayerNormForwardArgs<T> args{};
    args.x = static_cast<const T*>(x.data_ptr());
    args.x_stride = row_stride(x);
    args.residual = r.defined() ? static_cast<const T*>(r.data_ptr()) : nullptr;
    args.residual_stride = r.defined() ? row_stride(r) : 0;
    args.weight = data_or_null<T>(w);
    args.bias = data_or_null<T>(b);
    args.y = mutable_data<T>(y);
    args.sum = mutable_data<T>(sum);
    args.mean = mutable_data<A>(mean);
    args.rstd = mutable_data<A>(rstd);
    args.rows = rows;
    args.cols = cols;
    args.eps = static_cast<A>(eps);
    args.rms = rms;
    if (rows == 0) return;
#ifdef ENGINE_WITH_CUDA
    if (x.is_cuda()) return cuda::layer_norm_forward(args, current_stream());
#endif
    TORCH_CHECK(x.is_cpu(), "layer_norm: this build runs CPU tensors only");
    cpu::layer_norm_forward(args, cpu_threads(rows * cols));
  });
  return {y, sum, mean, rstd};
}

// grad_y, grad_sum (the sum output's gradient, optional), x (the normalized input): [rows, N].
// Returns (dx, dweight, dbias): dx [rows, N]; dweight/dbias [N] in the weight's dtype, or empty.
std::vector<at::Tensor> layer_norm_backward(const at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_sum,
                                            const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                            const c10::optional<at::Tensor>& mean, const at::Tensor& rstd,
                                            bool rms, bool need_weight_grad, bool need_bias_grad) {
  check_rows(x, "x");
  const at::Tensor dy = grad_y.contiguous();
  const at::Tensor dsum = grad_sum.has_value() ? grad_sum->contiguous() : at::Tensor();
  const int64_t rows = x.size(0), cols = x.size(1);
  const c10::optional<at::Tensor> w = weight.has_value() ? c10::optional<at::Tensor>(weight->contiguous()) : c10::nullopt;
  int64_t partials = 1;
#ifdef ENGINE_WITH_CUDA
  if (x.is_cuda()) partials = cuda::layer_norm_backward_blocks(rows);
#endif
  if (x.is_cpu()) partials = cpu_threads(rows * cols);
  const auto acc_options = x.options().dtype(accumulator_dtype(x.scalar_type()));
  at::Tensor dx = at::empty({rows, cols}, x.options());
  // [partials, cols] per-thread sums, or [cols] when there is one: that row is then the gradient
  // itself, without a reduction (~2 us of a small call).
  const std::vector<int64_t> partial_shape =
      partials == 1 ? std::vector<int64_t>{cols} : std::vector<int64_t>{partials, cols};
  at::Tensor dweight_partial = need_weight_grad ? at::zeros(partial_shape, acc_options) : at::Tensor();
  at::Tensor dbias_partial = need_bias_grad ? at::zeros(partial_shape, acc_options) : at::Tensor();

  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    LayerNormBackwardArgs<T> args{};
    args.dy = static_cast<const T*>(dy.data_ptr());
    args.dsum = dsum.defined() ? static_cast<const T*>(dsum.data_ptr()) : nullptr;
    args.x = static_cast<const T*>(x.data_ptr());
    args.x_stride = row_stride(x);
    args.weight = data_or_null<T>(w);
    args.mean = rms ? nullptr : data_or_null<A>(mean);
    args.rstd = static_cast<const A*>(rstd.data_ptr());
    args.dx = mutable_data<T>(dx);
    args.dweight_partial = mutable_data<A>(dweight_partial);
    args.dbias_partial = mutable_data<A>(dbias_partial);
    args.partials = partials;
    args.rows = rows;
    args.cols = cols;
    args.rms = rms;
    if (rows == 0) return;
#ifdef ENGINE_WITH_CUDA
    if (x.is_cuda()) return cuda::layer_norm_backward(args, current_stream());
#endif
    TORCH_CHECK(x.is_cpu(), "layer_norm: this build runs CPU tensors only");
    cpu::layer_norm_backward(args, cpu_threads(rows * cols));
  });
  const auto grad_dtype = weight.has_value() ? weight->scalar_type() : x.scalar_type();
  const auto total = [&](const at::Tensor& partial) {
    return (partials == 1 ? partial : partial.sum(0)).to(grad_dtype);
  };
  at::Tensor dweight = need_weight_grad ? total(dweight_partial) : at::Tensor();
  at::Tensor dbias = need_bias_grad ? total(dbias_partial) : at::Tensor();
  return {dx, dweight, dbias};
}

void bind_layer_norm(pybind11::module& m) {
  m.def("layer_norm_forward", &layer_norm_forward, "layer norm / RMS norm forward -> (y, sum, mean, rstd)");
  m.def("layer_norm_backward", &layer_norm_backward, "layer norm / RMS norm backward -> (dx, dweight, dbias)");
}

}  // namespace engine::bindings
