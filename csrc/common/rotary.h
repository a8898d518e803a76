// Rotary position embedding: the arguments the CPU and CUDA kernels take, and where a pair's
// features sit. Math as engine/reference.py's rotary: token s of sequence b sits at position
// p = s + offsets[b] (offsets absent: p = s); pair i of each head, (x1, x2), turns by the angle
// whose cos and sin are cos[p, i], sin[p, i] (negated sin when conjugate: the backward):
//   y1 = x1 cos - x2 sin,   y2 = x2 cos + x1 sin
// and features 2 * half .. head_dim - 1 pass through.
#pragma once

#include <cstdint>

#include "common/dtypes.h"

namespace engine {

// One [batch, heads, seq, head_dim] tensor to rotate: its input (unit stride in head_dim) and its
// contiguous output.
template <typename T>
struct RotaryTensor {
  const T* in;  // nullptr: absent (k of a call that rotates q alone)
  int64_t stride_b, stride_h, stride_s;
  T* out;
  int64_t heads;
};

template <typename T>
struct RotaryArgs {
  RotaryTensor<T> q, k;    // k.heads may differ from q.heads (grouped-query attention)
  const T* cos;            // [positions, half], contiguous
  const T* sin;            // [positions, half], contiguous
  const int64_t* offsets;  // [batch] start positions, or nullptr
  int64_t batch, seq, head_dim;
  int64_t half;            // pairs that rotate: the rotary dim is 2 * half <= head_dim
  bool interleaved;        // pairs (x[2i], x[2i + 1]); else (x[i], x[i + half])
  bool conjugate;          // rotate by the opposite angles (the backward)
};

// The features of pair i: (i, i + half) half-split, (2i, 2i + 1) interleaved.
HOST_DEVICE int64_t rotary_first(int64_t i, int64_t half, bool interleaved) { return interleaved ? 2 * i : i; }
HOST_DEVICE int64_t rotary_second(int64_t i, int64_t half, bool interleaved) {
  return interleaved ? 2 * i + 1 : i + half;
}

}  // namespace engine
