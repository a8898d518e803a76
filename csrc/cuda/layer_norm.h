// CUDA layer norm / RMS norm (csrc/cuda/layer_norm.cu). Host functions that launch on `stream`
// (a cudaStream_t passed as void*, so that this header needs no CUDA headers).
#pragma once

#include "common/layer_norm.h"

namespace engine::cuda {

template <typename T>
void layer_norm_forward(const LayerNormForwardArgs<T>& args, void* stream);

// args.partials is the number of blocks; each block accumulates weight/bias gradients in its
// row of the zeroed partial buffers, and the caller sums the rows (no atomics).
template <typename T>
void layer_norm_backward(const LayerNormBackwardArgs<T>& args, void* stream);

// How many row-blocks layer_norm_backward launches for `rows` rows: args.partials must be this.
int layer_norm_backward_blocks(int64_t rows);

}  // namespace engine::cuda
