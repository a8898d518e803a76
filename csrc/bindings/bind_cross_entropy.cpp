// Torch glue for the cross-entropy row step: allocate the loss, call the CPU or CUDA kernel.
// Called by engine/ops/cross_entropy.py's chunk loop with a contiguous logits chunk, after
// engine/functional.py validated the inputs (targets in range or ignore_index).
#include "bindings/common.h"
#include "cpu/cross_entropy.h"
#ifdef ENGINE_WITH_CUDA
#include "cuda/cross_entropy.h"
#endif

namespace engine::bindings {

// logits: [rows, vocab] contiguous, overwritten with d loss / d logits; targets: [rows] int64.
// Returns the loss per row [rows] in the accumulator dtype.
at::Tensor cross_entropy_rows(at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                              double label_smoothing) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(),
              "cross_entropy_rows: logits must be contiguous [rows, vocab]");
  TORCH_CHECK(logits.size(1) > 0 && logits.size(1) < (int64_t(1) << 31), "cross_entropy_rows: vocab out of range");
  TORCH_CHECK(targets.dim() == 1 && targets.is_contiguous() && targets.scalar_type() == at::kLong &&
                  targets.size(0) == logits.size(0),
              "cross_entropy_rows: targets must be contiguous int64 [rows]");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor loss = at::empty({rows}, logits.options().dtype(accumulator_dtype(logits.scalar_type())));

  dispatch_float_types(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    CrossEntropyRowsArgs<T> args{};
    args.logits = mutable_data<T>(logits);
    args.targets = targets.data_ptr<int64_t>();
    args.loss = mutable_data<A>(loss);
    args.rows = rows;
    args.vocab = vocab;
    args.ignore_index = ignore_index;
    args.label_smoothing = static_cast<A>(label_smoothing);
    if (rows == 0) return;
#ifdef ENGINE_WITH_CUDA
    if (logits.is_cuda()) return cuda::cross_entropy_rows(args, current_stream());
#endif
    TORCH_CHECK(logits.is_cpu(), "cross_entropy_rows: this build runs CPU tensors only");
    cpu::cross_entropy_rows(args, cpu_threads(rows * vocab));
  });
  return loss;
}

void bind_cross_entropy(pybind11::module& m) {
  m.def("cross_entropy_rows", &cross_entropy_rows,
        "cross-entropy row step: loss per row, logits overwritten with their gradient");
}

}  // namespace engine::bindings
