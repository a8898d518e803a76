// CUDA softmax attention (csrc/cuda/attention.cu): forward, decode and backward, flash-style.
// Host functions that launch on `stream` (a cudaStream_t passed as void*, so that this header
// needs no CUDA headers). Storage types: float, half, bfloat16 (fp16/bf16 on tensor cores).
#pragma once

#include <cstdint>

#include "common/attention.h"

namespace engine::cuda {

// Bytes of device workspace attention_forward needs for `args` (partial
// results when the keys are split across thread blocks; at least 1).
template <typename T>
int64_t attention_forward_workspace_bytes(const AttentionForwardArgs<T>& args);

// Plain attention (args.seqlens == nullptr) or attention against a KV cache (args.seqlens: device
// int32 [B]; args.causal set, no dropout): out, lse and, when args.dropout_mask is set, the keep
// mask. `workspace`: attention_forward_workspace_bytes(args) bytes of device memory.
template <typename T>
void attention_forward(const AttentionForwardArgs<T>& args, void* workspace, void* stream);

// dq, dk, dv from the saved out and lse (fills args.delta first). No atomics: one kernel owns
// each dk/dv key block (summing its GQA group), another each dq query block.
template <typename T>
void attention_backward(const AttentionBackwardArgs<T>& args, void* stream);

}  // namespace engine::cuda
