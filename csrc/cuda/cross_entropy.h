// CUDA cross-entropy row step (csrc/cuda/cross_entropy.cu). A host function that launches on
// `stream` (a cudaStream_t passed as void*, so that this header needs no CUDA headers).
#pragma once

#include "common/cross_entropy.h"

namespace engine::cuda {

template <typename T>
void cross_entropy_rows(const CrossEntropyRowsArgs<T>& args, void* stream);

}  // namespace engine::cuda
