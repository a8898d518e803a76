// CPU softmax attention (csrc/cpu/attention_forward.cpp, attention_backward.cpp): forward (plain
// and decode) and backward, flash-style (tiles of queries against tiles of keys, online softmax
// in the accumulator type, the [Sq, Sk] score matrix never stored). Storage types: float, double, engine::half, engine::bfloat16.
#pragma once

#include "common/attention.h"

namespace engine::cpu {

// Plain attention (args.seqlens == nullptr) or attention against a KV cache (args.seqlens set,
// args.causal true, no dropout): writes out, lse and, when args.dropout_mask is set, the keep
// mask. Tasks are (batch, kv head, block of query rows [, key split]) over num_threads threads.
template <typename T>
void attention_forward(const AttentionForwardArgs<T>& args, int num_threads);

// dq, dk, dv from the saved out and lse (fills args.delta first).
template <typename T>
void attention_backward(const AttentionBackwardArgs<T>& args, int num_threads);

}  // namespace engine::cpu
