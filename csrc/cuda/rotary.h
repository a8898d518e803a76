// CUDA rotary position embedding (csrc/cuda/rotary.cu). A host function that launches on
// `stream` (a cudaStream_t passed as void*, so that this header needs no CUDA headers).
#pragma once

#include "common/rotary.h"

namespace engine::cuda {

template <typename T>
void rotary(const RotaryArgs<T>& args, void* stream);

}  // namespace engine::cuda
