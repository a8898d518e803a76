// Internal to the CPU attention units (attention_forward.cpp, attention_backward.cpp): the block
// sizes, the per-call geometry, the rows of one stacked block of queries, and the masking and
// dropout of score tiles. The layout of the work is described in attention_forward.cpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/attention.h"
#include "common/philox.h"
#include "cpu/convert.h"

namespace engine::cpu::attention_detail {

constexpr int64_t kRows = 64;  // query rows per block: the lanes of S^T tiles (4 AVX-512 vectors)
constexpr int64_t kKeys = 64;  // keys per block: the lanes of S tiles in the dK/dV pass

// ---------------------------------------------------------------------------------------------
// Rows of T in the accumulator type: fp32/fp64 rows in place, 16-bit rows converted into `buffer`.

template <typename T>
struct RowsView {
  const acc_t<T>* data;  // first row
  int64_t stride;        // between rows
};

template <typename T>
RowsView<T> rows_as_acc(const T* first, int64_t stride, int64_t rows, int64_t cols, acc_t<T>* buffer) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return {first, stride};
  } else {
    for (int64_t r = 0; r < rows; ++r) load_row(first + r * stride, buffer + r * cols, cols);
    return {buffer, cols};
  }
}

// ---------------------------------------------------------------------------------------------
// Per-call geometry and the rows of one stacked block.

template <typename Args>
struct Shape {
  int64_t B, Hq, Hk, G, Sq, Sk, D, Dv;
  int64_t stacked;     // G * Sq rows per (batch, kv head)
  int64_t row_blocks;  // ceil(stacked / kRows)
  explicit Shape(const Args& a)
      : B(a.batch), Hq(a.heads_q), Hk(a.heads_k), G(a.heads_q / a.heads_k), Sq(a.seq_q), Sk(a.seq_k),
        D(a.head_dim), Dv(a.head_dim_v), stacked(G * Sq), row_blocks((G * Sq + kRows - 1) / kRows) {}
};

// Lane r of a block of stacked rows [s0, s0 + count): query position i, head h, the keys it may
// see ([0, limit)), where its mask row starts, its dropout counters.
struct RowBlock {
  int64_t count = 0;
  int64_t pos[kRows], head[kRows], limit[kRows], mask_offset[kRows];
  uint32_t counter_row[kRows], counter_plane[kRows];  // dropout c1 = i, c2 = b * Hq + h
  int64_t min_limit = 0, max_limit = 0;
  bool uniform_mask = true;  // every lane reads the same mask row (e.g. a [B, 1, 1, Sk] mask)
};

template <typename Args>
void build_rows(const Args& a, const Shape<Args>& sh, int64_t b, int64_t kvh, int64_t s0, const int32_t* seqlens,
                RowBlock& rows) {
  const int64_t key_length = attention_key_length(seqlens, b, sh.Sk);
  const int64_t offset = attention_causal_offset(seqlens, key_length, sh.Sq);
  rows.count = std::min(kRows, sh.stacked - s0);
  rows.min_limit = key_length;
  rows.max_limit = 0;
  for (int64_t r = 0; r < rows.count; ++r) {
    const int64_t s = s0 + r;
    const int64_t i = s / sh.G, h = kvh * sh.G + s % sh.G;
    rows.pos[r] = i;
    rows.head[r] = h;
    rows.limit[r] = attention_key_limit(i, a.causal, offset, key_length);
    rows.mask_offset[r] = b * a.mask_stride_b + h * a.mask_stride_h + i * a.mask_stride_q;
    rows.counter_row[r] = static_cast<uint32_t>(i);
    rows.counter_plane[r] = static_cast<uint32_t>(b * sh.Hq + h);
    rows.min_limit = std::min(rows.min_limit, rows.limit[r]);
    rows.max_limit = std::max(rows.max_limit, rows.limit[r]);
  }
  rows.uniform_mask = true;
  for (int64_t r = 1; r < rows.count; ++r) rows.uniform_mask &= rows.mask_offset[r] == rows.mask_offset[0];
}

// Packs rows^T of the block into dst [cols, kRows] (times `factor`), from per-lane row pointers.
template <typename T, typename RowPtr>
void pack_transposed(const RowBlock& rows, int64_t cols, acc_t<T> factor, RowPtr row_ptr, acc_t<T>* dst) {
  using A = acc_t<T>;
  for (int64_t r = 0; r < rows.count; ++r) {
    const T* src = row_ptr(r);
    for (int64_t d = 0; d < cols; ++d) dst[d * kRows + r] = to_acc(src[d]) * factor;
  }
  for (int64_t r = rows.count; r < kRows; ++r)
    for (int64_t d = 0; d < cols; ++d) dst[d * kRows + r] = A(0);
}

// ---------------------------------------------------------------------------------------------
// Masking, in two steps: a float mask is added to the scores, and hidden keys (a bool mask's
// zeros, and keys past causality or the key length) are set to `hidden`. The forward hides with
// -inf before its softmax. The backward hides with 0 after P = e^(s - lse): written over P, a
// hidden key's probability is 0 whatever q, k and the lse hold (a NaN score there, or a row whose
// lse is NaN, would make e^(-inf - lse) NaN), while a visible score of -inf still gives NaN in a
// NaN row, as in torch.
//
// S^T tiles [keys, kRows] (forward, dQ): the mask of lane r at key j is element
// mask_offset[r] + j * mask_stride_k; lane r sees keys j < limit[r].

template <typename A>
void add_float_mask_transposed(A* st, int64_t bk, int64_t j0, const RowBlock& rows, const void* mask,
                               AttentionMaskKind kind, int64_t mask_stride_k) {
  if (kind != AttentionMaskKind::additive) return;
  const A* m = static_cast<const A*>(mask);
  if (rows.uniform_mask) {
    for (int64_t j = 0; j < bk; ++j) {
      const A bias = m[rows.mask_offset[0] + (j0 + j) * mask_stride_k];
      A* row = st + j * kRows;
#pragma omp simd
      for (int64_t r = 0; r < rows.count; ++r) row[r] += bias;
    }
  } else {
    for (int64_t r = 0; r < rows.count; ++r) {
      const A* lane = m + rows.mask_offset[r] + j0 * mask_stride_k;
      for (int64_t j = 0; j < bk; ++j) st[j * kRows + r] += lane[j * mask_stride_k];
    }
  }
}

template <typename A>
void hide_keys_transposed(A* st, int64_t bk, int64_t j0, const RowBlock& rows, const void* mask,
                          AttentionMaskKind kind, int64_t mask_stride_k, A hidden) {
  if (kind == AttentionMaskKind::boolean) {
    const uint8_t* m = static_cast<const uint8_t*>(mask);
    if (rows.uniform_mask) {
      for (int64_t j = 0; j < bk; ++j) {
        A* row = st + j * kRows;
        if (!m[rows.mask_offset[0] + (j0 + j) * mask_stride_k]) std::fill(row, row + rows.count, hidden);
      }
    } else {
      for (int64_t r = 0; r < rows.count; ++r) {
        const uint8_t* lane = m + rows.mask_offset[r] + j0 * mask_stride_k;
        for (int64_t j = 0; j < bk; ++j)
          if (!lane[j * mask_stride_k]) st[j * kRows + r] = hidden;
      }
    }
  }
  if (j0 + bk > rows.min_limit) {
    for (int64_t r = 0; r < rows.count; ++r)
      for (int64_t j = std::max<int64_t>(rows.limit[r] - j0, 0); j < bk; ++j) st[j * kRows + r] = hidden;
  }
}

// S tiles [rows, kKeys] (dK/dV pass): one query row `row` (length bk) at keys j0.. with its mask
// row starting at `mask_offset` and keys [0, limit) visible.
template <typename A>
void add_float_mask_row(A* row, int64_t bk, int64_t j0, const void* mask, AttentionMaskKind kind,
                        int64_t mask_offset, int64_t mask_stride_k) {
  if (kind != AttentionMaskKind::additive) return;
  const A* m = static_cast<const A*>(mask) + mask_offset + j0 * mask_stride_k;
  if (mask_stride_k == 1) {
#pragma omp simd
    for (int64_t j = 0; j < bk; ++j) row[j] += m[j];
  } else {
    for (int64_t j = 0; j < bk; ++j) row[j] += m[j * mask_stride_k];
  }
}

template <typename A>
void hide_keys_row(A* row, int64_t bk, int64_t j0, int64_t limit, const void* mask, AttentionMaskKind kind,
                   int64_t mask_offset, int64_t mask_stride_k, A hidden) {
  if (kind == AttentionMaskKind::boolean) {
    const uint8_t* m = static_cast<const uint8_t*>(mask) + mask_offset + j0 * mask_stride_k;
    if (mask_stride_k == 1) {
#pragma omp simd
      for (int64_t j = 0; j < bk; ++j) row[j] = m[j] ? row[j] : hidden;
    } else {
      for (int64_t j = 0; j < bk; ++j)
        if (!m[j * mask_stride_k]) row[j] = hidden;
    }
  }
  for (int64_t j = std::max<int64_t>(limit - j0, 0); j < bk; ++j) row[j] = hidden;
}

// ---------------------------------------------------------------------------------------------
// Dropout factors Z = keep / (1 - p) multiplied into tiles. Counters (key j, query i, plane).

template <typename A>
void dropout_transposed(A* st, int64_t bk, int64_t j0, const RowBlock& rows, PhiloxKey key, float p, A inv_keep) {
  for (int64_t j = 0; j < bk; ++j) {
    A* row = st + j * kRows;
    const uint32_t c0 = static_cast<uint32_t>(j0 + j);
#pragma omp simd
    for (int64_t r = 0; r < rows.count; ++r) {
      const float u = dropout_uniform(key, c0, rows.counter_row[r], rows.counter_plane[r]);
      row[r] = u >= p ? row[r] * inv_keep : A(0);
    }
  }
}

}  // namespace engine::cpu::attention_detail
