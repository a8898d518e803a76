// The cross-entropy row step shared by the CPU and CUDA kernels (the per-chunk step of
// engine/ops/cross_entropy.py), and the argument struct both take. For one row x[0..V) of logits
// with target t and label smoothing ls:
//   lse  = m + log(sum_j exp(x_j - m)),  m = max_j x_j
//   loss = (1 - ls) * (lse - x_t) + ls * (lse - sum_j x_j / V)
//   d_j  = exp(x_j - lse) - ls / V - (1 - ls) * [j == t]      (written over x)
// A row whose target is ignore_index has loss 0 and d = 0.
#pragma once

#include <cmath>

#include "common/dtypes.h"

namespace engine {

template <typename T>
struct CrossEntropyRowsArgs {
  T* logits;               // [rows, vocab] contiguous, overwritten with d
  const int64_t* targets;  // [rows], each in [0, vocab) or ignore_index
  acc_t<T>* loss;          // [rows]
  int64_t rows;
  int64_t vocab;           // < 2^31
  int64_t ignore_index;
  acc_t<T> label_smoothing;
};

// A row's loss from its statistics (the formula above).
template <typename A>
HOST_DEVICE A cross_entropy_row_loss(A lse, A target_logit, A logit_sum, A vocab, A label_smoothing) {
  return (A(1) - label_smoothing) * (lse - target_logit) + label_smoothing * (lse - logit_sum / vocab);
}

}  // namespace engine
