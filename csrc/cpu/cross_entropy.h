// CPU cross-entropy row step (csrc/cpu/cross_entropy.cpp). Storage types: float, double,
// engine::half, engine::bfloat16.
#pragma once

#include "common/cross_entropy.h"

namespace engine::cpu {

// One row per loop iteration, rows split over `num_threads` OpenMP threads.
template <typename T>
void cross_entropy_rows(const CrossEntropyRowsArgs<T>& args, int num_threads);

}  // namespace engine::cpu
