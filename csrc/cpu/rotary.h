// CPU rotary position embedding (csrc/cpu/rotary.cpp). Storage types: float, double,
// engine::half, engine::bfloat16.
#pragma once

#include "common/rotary.h"

namespace engine::cpu {

// Rotates q (and k) of args, one token (b, s) per loop iteration, the tokens split over
// `num_threads` OpenMP threads.
template <typename T>
void rotary(const RotaryArgs<T>& args, int num_threads);

}  // namespace engine::cpu
