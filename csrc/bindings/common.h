// Torch glue shared by the per-op binding files: dtype dispatch to the kernels' storage types,
// the stream and thread count to launch with, and checks of what the Python side promised.
// User-facing validation happens earlier, in engine/functional.py; a failed TORCH_CHECK here
// is a bug in the caller inside the engine.
#pragma once

#include <torch/extension.h>

#include "common/dtypes.h"

#ifdef ENGINE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace engine::bindings {

// Calls fn(T{}) with T the kernel storage type of `dtype` (float, double, engine::half,
// engine::bfloat16).
template <typename Fn>
void dispatch_float_types(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kDouble: return fn(double{});
    case at::kHalf: return fn(half{});
    case at::kBFloat16: return fn(bfloat16{});
    default: TORCH_CHECK(false, "engine kernels take float16, bfloat16, float32 or float64, got ", dtype);
  }
}

template <typename T>
const T* data_or_null(const c10::optional<at::Tensor>& tensor) {
  return tensor.has_value() && tensor->defined() ? static_cast<const T*>(tensor->data_ptr()) : nullptr;
}

template <typename T>
T* mutable_data(at::Tensor& tensor) {
  return tensor.defined() && tensor.numel() > 0 ? static_cast<T*>(tensor.data_ptr()) : nullptr;
}

// The accumulator dtype of the kernels for data of `dtype`: fp64 for fp64, else fp32.
inline at::ScalarType accumulator_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// OpenMP threads for CPU kernels: torch's intra-op thread count (torch.set_num_threads).
inline int cpu_threads() { return at::get_num_threads(); }

// Threads for a call that touches `elements` values: one below kParallelElements, where
// waking the OpenMP team (microseconds when it spins, far more when its threads sleep or the
// machine is shared) costs more than the work itself, as in a decode step's single rows.
constexpr int64_t kParallelElements = int64_t(1) << 15;
inline int cpu_threads(int64_t elements) { return elements < kParallelElements ? 1 : cpu_threads(); }

#ifdef ENGINE_WITH_CUDA
inline void* current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }
#endif

}  // namespace engine::bindings
