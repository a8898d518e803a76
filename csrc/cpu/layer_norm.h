// CPU layer norm / RMS norm (csrc/cpu/layer_norm.cpp). Storage types: float, double,
// engine::half, engine::bfloat16.
#pragma once

#include "common/layer_norm.h"

namespace engine::cpu {

// One row per loop iteration, rows split over `num_threads` OpenMP threads.
template <typename T>
void layer_norm_forward(const LayerNormForwardArgs<T>& args, int num_threads);

// args.partials must be >= num_threads and the partial buffers zeroed: thread t accumulates
// weight/bias gradients in row t, and the caller sums the rows (no atomics, no races).
template <typename T>
void layer_norm_backward(const LayerNormBackwardArgs<T>& args, int num_threads);

}  // namespace engine::cpu
