// Softmax attention (flash-style) math shared by the CPU and CUDA kernels, and the argument
// structs both take. The op contract is engine/ops/attention.py; engine/reference.py is the
// specification of every number.
//
// For one query row i of head h (key/value head h / group) the kernels compute, over key blocks,
// without ever storing the [Sq, Sk] score matrix:
//   s_j  = sum_d k_jd (q_id * scale) + bias_ij     bias: 0 / -inf for a bool mask, the value of
//          a float mask; -inf where causality or the key length hides key j
//   m    = running max of s_j, l = running sum of e^(s_j - m), o = running sum of e^(s_j - m) v_j
//          (a new block with max m' rescales l and o by e^(m - m'))
//   out  = o / l,  lse = m + log l
// Exponentials take the difference first, e^(x - y), so that the largest score of a row gives
// exactly 1, and backward's e^(s - lse) recomputes from the same rounded s (forward and backward
// round q * scale and the dot products identically) the probabilities forward summed.
// A row with no visible key keeps m = -inf, l = 0: out = 0, lse = -inf (and zero gradients).
// Exponentials use a "safe" max (0 when m = -inf), so that e^(-inf - safe) = 0, never NaN.
//
// Backward, from the saved lse (P recomputed, Z = keep / (1 - p) the dropout factor):
//   P_ij = e^(s_ij - lse_i),  delta_i = sum_d dO_id O_id
//   dV_j += sum_i P_ij Z_ij dO_i,  dP_ij = (dO_i . v_j) Z_ij,  dS_ij = P_ij (dP_ij - delta_i)
//   dQ_i  = scale * sum_j dS_ij k_j,  dK_j = sum_i dS_ij (q_i * scale)   (dK, dV summed over
//   the query heads of a GQA group)
#pragma once

#include <cmath>
#include <cstdint>

#include "common/dtypes.h"
#include "common/float_math.h"
#include "common/philox.h"

namespace engine {

constexpr double kAttentionLog2e = 1.4426950408889634074;

// How the mask is stored. boolean: 1-byte values (torch.bool), nonzero = attend. additive: the
// accumulator type (float, or double for double data), added to the scores; -inf hides a key.
enum class AttentionMaskKind : int32_t { none = 0, boolean = 1, additive = 2 };

template <typename A>
HOST_DEVICE A attention_neg_inf() {
  return -static_cast<A>(HUGE_VAL);
}

// The additive form of mask element `offset` (0 or -inf for a bool mask).
template <typename A>
HOST_DEVICE A attention_mask_bias(const void* mask, AttentionMaskKind kind, int64_t offset) {
  if (kind == AttentionMaskKind::boolean)
    return static_cast<const uint8_t*>(mask)[offset] ? A(0) : attention_neg_inf<A>();
  return static_cast<const A*>(mask)[offset];
}

// Geometry of batch element b. Keys j < key_length exist; with causality query i sees j <= i +
// causal_offset. Plain attention: key_length = Sk, offset 0 (top-left, as torch's is_causal).
// Decode (seqlens given): L = min(seqlens[b], Sk) valid keys, and query i sits at position
// L - Sq + i (engine.reference.decode_mask).
HOST_DEVICE int64_t attention_key_length(const int32_t* seqlens, int64_t b, int64_t seq_k) {
  if (seqlens == nullptr) return seq_k;
  const int64_t length = seqlens[b];
  return length < 0 ? 0 : (length > seq_k ? seq_k : length);
}

HOST_DEVICE int64_t attention_causal_offset(const int32_t* seqlens, int64_t key_length, int64_t seq_q) {
  return seqlens == nullptr ? 0 : key_length - seq_q;
}

// One past the last key query i may see: keys [0, limit) pass causality and the key length
// (the mask may still hide some of them).
HOST_DEVICE int64_t attention_key_limit(int64_t i, bool causal, int64_t causal_offset, int64_t key_length) {
  if (!causal) return key_length;
  const int64_t limit = i + causal_offset + 1;
  return limit < 0 ? 0 : (limit > key_length ? key_length : limit);
}

// The max that exponentials subtract: 0 for a row that has seen no visible key yet.
template <typename A>
HOST_DEVICE A attention_safe_max(A m) {
  return m == attention_neg_inf<A>() ? A(0) : m;
}

// Log-sum-exp of a finished row from its running max m and sum l: -inf for a row with no visible
// key (l = 0), NaN for a row whose scores held NaN (so that backward's P is NaN there too).
template <typename A>
HOST_DEVICE A attention_lse(A m, A l) {
  using std::log;
  return l == A(0) ? attention_neg_inf<A>() : m + log(l);
}

// The output element o / l of a finished row, or 0 for a row with no visible key (l = 0); NaN
// stays NaN. A division, not a product with 1 / l: one rounding instead of two.
template <typename A>
HOST_DEVICE A attention_normalize(A o, A l) {
  return l == A(0) ? A(0) : o / l;
}

// Merging partial results of one row over disjoint key ranges (flash-decoding): partial p has
// running max m_p and sum l_p; its weight in the merged row is e^(m_p - M), M = max_p m_p.
template <typename A>
HOST_DEVICE A attention_merge_weight(A m_partial, A m_total) {
  return m_partial == attention_neg_inf<A>() ? A(0) : math::exp_of(m_partial - attention_safe_max(m_total));
}

// Pointers are element pointers of the kernel's storage type T (float, double, half,
// bfloat16); strides are in elements; the last dim of every tensor has unit stride.
template <typename T>
struct AttentionForwardArgs {
  using A = acc_t<T>;
  const T* q;                  // [B, Hq, Sq, D]
  int64_t q_stride_b, q_stride_h, q_stride_s;
  const T* k;                  // [B, Hk, Sk, D]  (decode: the cache, Sk = S_max)
  int64_t k_stride_b, k_stride_h, k_stride_s;
  const T* v;                  // [B, Hk, Sk, Dv]
  int64_t v_stride_b, v_stride_h, v_stride_s;
  const void* mask;            // [B, Hq, Sq, Sk] view (stride 0 on broadcast dims), or nullptr
  AttentionMaskKind mask_kind;
  int64_t mask_stride_b, mask_stride_h, mask_stride_q, mask_stride_k;
  const int32_t* seqlens;      // [B] valid cache lengths (decode), or nullptr (plain attention)
  T* out;                      // [B, Hq, Sq, Dv] contiguous output
  A* lse;                      // [B, Hq, Sq] contiguous output, -inf for rows with no visible key
  uint8_t* dropout_mask;       // [B, Hq, Sq, Sk] contiguous bool output (kept = 1), or nullptr
  int64_t batch, heads_q, heads_k, seq_q, seq_k, head_dim, head_dim_v;
  A scale;                     // multiplies q . k
  bool causal;                 // query i sees keys j <= i + causal offset (decode: always set)
  double dropout_p;            // in [0, 1); 0 = no dropout (0 for decode). Keep iff u >= float(p);
                               // kept values times 1 / (1 - p) (computed in double, as the reference)
  uint64_t seed;               // dropout stream key (common/philox.h)
};

template <typename T>
struct AttentionBackwardArgs {
  using A = acc_t<T>;
  const T* dout;               // [B, Hq, Sq, Dv] contiguous gradient of out
  const T* q;                  // [B, Hq, Sq, D]
  int64_t q_stride_b, q_stride_h, q_stride_s;
  const T* k;                  // [B, Hk, Sk, D]
  int64_t k_stride_b, k_stride_h, k_stride_s;
  const T* v;                  // [B, Hk, Sk, Dv]
  int64_t v_stride_b, v_stride_h, v_stride_s;
  const T* out;                // [B, Hq, Sq, Dv] contiguous forward output
  const A* lse;                // [B, Hq, Sq] contiguous forward log-sum-exp
  const void* mask;            // as in AttentionForwardArgs
  AttentionMaskKind mask_kind;
  int64_t mask_stride_b, mask_stride_h, mask_stride_q, mask_stride_k;
  T* dq;                       // [B, Hq, Sq, D] contiguous output
  T* dk;                       // [B, Hk, Sk, D] contiguous output (summed over each GQA group)
  T* dv;                       // [B, Hk, Sk, Dv] contiguous output
  A* delta;                    // [B, Hq, Sq] workspace: rowsum(dout * out), written by the kernel
                               // (for 16-bit data as rowsum(P * dP Z), free of out's rounding)
  int64_t batch, heads_q, heads_k, seq_q, seq_k, head_dim, head_dim_v;
  A scale;
  bool causal;
  double dropout_p;
  uint64_t seed;
};

}  // namespace engine
