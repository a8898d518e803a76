// CPU softmax attention, flash-style: the forward (plain, and decode against a KV cache). Math and
// argument structs in csrc/common/attention.h, the dropout stream in csrc/common/philox.h; the
// backward in attention_backward.cpp, the tile product in attention_gemm.cpp, the helpers both
// passes share in attention_simd.h and attention_tiles.h.
//
// Memory traffic (B batch, Hq/Hk heads, Sq/Sk lengths, D/Dv head dims, R = 64-row query blocks):
//   forward   reads q once and k, v once per query block of their kv head (ceil(Hq/Hk * Sq / R)
//             passes over k and v, mostly from L2/L3), writes out and lse once;
//   backward  reads dout, out once for delta (16-bit data instead q, dout once and k, v once
//             per query block, as the dQ pass), q, dout once per 64-key block (dK/dV sweep);
//             the fused form sums dQ in that sweep, into [G, Sq, D] fp32 per thread; the
//             two-pass form (few (batch, kv head) pairs per thread) reads k, v once more per
//             query block in a dQ pass. Writes dq, dk, dv and delta [B, Hq, Sq] once.
// Extra memory: per-thread tiles (a few 64 x max(D, Dv) fp32 buffers) and, when keys are split
// across threads (few rows, long keys), [tasks, splits, 64, Dv + 2] partial results; backward
// also takes the [B, Hq, Sq] delta workspace from the caller. Nothing grows with Sq * Sk.
//
// Layout of the work. Query rows of one kv head are "stacked": row s of (b, kv head g) is query
// i = s / G of head g * G + s % G (G = Hq / Hk), so one block of 64 rows holds every head of a
// GQA group and shares its k/v tiles. Two tile orientations, chosen so that nothing is transposed
// per (query block, key block) pair:
//   forward, dQ:  S^T [keys, rows]: rows are vector lanes; q^T (and dout^T) are packed once per
//                 task; k and v rows are read in place (fp32) as broadcast operands.
//   dK/dV:        S [rows, keys]: keys are vector lanes; k^T and v^T are packed once per task;
//                 dout rows (in place for fp32) and q * scale rows are the broadcast operands.
// Every product is one register-blocked micro-kernel C (+)= A B with A read by broadcasts through
// two strides (so it can be a transposed view) and B read by rows of vectors.
#include <algorithm>
#include <cstdint>
#include <memory>

#include "cpu/attention.h"
#include "cpu/attention_gemm.h"
#include "cpu/attention_simd.h"
#include "cpu/attention_tiles.h"

namespace engine::cpu {
using namespace attention_detail;
namespace {

// Thread-local tiles of the forward.
// Blocks of at most this many query rows (decoding: one row per head, or a few) compute their
// scores as dot products over the head dim instead of the tile GEMM, which puts the rows in the
// vector lanes: one row would keep one lane of each 16-lane FMA busy. Measured with
// bench attention_decode (B=1, H=12, 2048 keys, fp32).
constexpr int64_t kFewRows = 4;

template <typename A>
struct ForwardScratch {
  // qt: Q^T [D, kRows] (scaled) for the tile GEMM; q: Q [kFewRows, D] (scaled) for few rows
  std::unique_ptr<A[], AlignedFree> qt, q, st, o, k, v, m, l, alpha;
  ForwardScratch(int64_t D, int64_t Dv)
      : qt(aligned_buffer<A>(D * kRows)), q(aligned_buffer<A>(D * kFewRows)), st(aligned_buffer<A>(kKeys * kRows)),
        o(aligned_buffer<A>(kRows * Dv)), k(aligned_buffer<A>(kKeys * D)), v(aligned_buffer<A>(kKeys * Dv)),
        m(aligned_buffer<A>(kRows)), l(aligned_buffer<A>(kRows)), alpha(aligned_buffer<A>(kRows)) {}
};

// S^T [bk, kRows] (lanes < count) of a block of few rows: st[j, r] = k_j . q_r, q [count, D].
template <typename A>
void scores_few_rows(const A* k, int64_t k_stride, int64_t bk, int64_t D, const A* q, int64_t count, A* st) {
  for (int64_t j = 0; j < bk; ++j) {
    const A* k_row = k + j * k_stride;
    for (int64_t r = 0; r < count; ++r) {
      const A* q_row = q + r * D;
      A sum = A(0);
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < D; ++d) sum += k_row[d] * q_row[d];
      st[j * kRows + r] = sum;
    }
  }
}

// Online softmax over one S^T tile [bk, kRows]: per lane, the new running max, the rescale
// factor alpha = e^(m_old - m_new) of the previous sum and output, the tile's probabilities
// e^(s - m_new) in place, and the running sum.
template <typename A>
void online_softmax_transposed(A* st, int64_t bk, int64_t lanes, A* m, A* l, A* alpha) {
  using L = Lanes<A>;
  using V = typename L::V;
  for (int64_t x = 0; x < lanes; x += L::W) {
    const V m_old = L::load(m + x);
    V m0 = m_old, m1 = m_old;  // two chains: the max is latency-bound otherwise
    int64_t j = 0;
    for (; j + 2 <= bk; j += 2) {
      m0 = L::max(m0, L::load(st + j * kRows + x));
      m1 = L::max(m1, L::load(st + (j + 1) * kRows + x));
    }
    if (j < bk) m0 = L::max(m0, L::load(st + j * kRows + x));
    const V m_new = L::max(m0, m1);
    const V safe = L::safe_max(m_new);
    const V scale_old = L::exp_diff(m_old, safe);
    V sum0 = L::set1(A(0)), sum1 = L::set1(A(0));
    for (j = 0; j + 2 <= bk; j += 2) {
      const V p0 = L::exp_diff(L::load(st + j * kRows + x), safe);
      const V p1 = L::exp_diff(L::load(st + (j + 1) * kRows + x), safe);
      L::store(st + j * kRows + x, p0);
      L::store(st + (j + 1) * kRows + x, p1);
      sum0 = L::add(sum0, p0);
      sum1 = L::add(sum1, p1);
    }
    if (j < bk) {
      const V p0 = L::exp_diff(L::load(st + j * kRows + x), safe);
      L::store(st + j * kRows + x, p0);
      sum0 = L::add(sum0, p0);
    }
    L::store(l + x, L::fma(L::load(l + x), scale_old, L::add(sum0, sum1)));
    L::store(m + x, m_new);
    L::store(alpha + x, scale_old);
  }
}

// Where a forward task leaves its rows: the output (finished rows) or a split's partial slot.
template <typename A>
struct PartialSlot {
  A* o;  // [kRows, Dv] unnormalized output
  A* m;  // [kRows] running max
  A* l;  // [kRows] running sum
};

template <typename T>
void forward_task(const AttentionForwardArgs<T>& a, const Shape<AttentionForwardArgs<T>>& sh, int64_t b, int64_t kvh,
                  int64_t block, int64_t key_begin, int64_t key_end, ForwardScratch<acc_t<T>>& w,
                  const PartialSlot<acc_t<T>>* partial) {
  using A = acc_t<T>;
  RowBlock rows;
  build_rows(a, sh, b, kvh, block * kRows, a.seqlens, rows);
  const int64_t D = sh.D, Dv = sh.Dv;
  const auto q_row = [&](int64_t r) {
    return a.q + b * a.q_stride_b + rows.head[r] * a.q_stride_h + rows.pos[r] * a.q_stride_s;
  };
  const bool few_rows = rows.count <= kFewRows;
  if (few_rows) {
    for (int64_t r = 0; r < rows.count; ++r)
      for (int64_t d = 0; d < D; ++d) w.q[r * D + d] = to_acc(q_row(r)[d]) * a.scale;
  } else {
    pack_transposed<T>(rows, D, a.scale, q_row, w.qt.get());
  }
  A* m = w.m.get();
  A* l = w.l.get();
  for (int64_t r = 0; r < kRows; ++r) {
    m[r] = attention_neg_inf<A>();
    l[r] = A(0);
  }
  const int64_t lanes = (rows.count + Lanes<A>::W - 1) / Lanes<A>::W * Lanes<A>::W;
  const T* k_head = a.k + b * a.k_stride_b + kvh * a.k_stride_h;
  const T* v_head = a.v + b * a.v_stride_b + kvh * a.v_stride_h;
  const PhiloxKey key = philox_key(a.seed);
  const A inv_keep = static_cast<A>(1.0 / (1.0 - a.dropout_p));
  const float p_keep = static_cast<float>(a.dropout_p);  // keep iff u >= p (fp32, as the reference)
  A* o = w.o.get();
  bool first = true;
  key_end = std::min(key_end, rows.max_limit);
  for (int64_t j0 = key_begin; j0 < key_end; j0 += kKeys) {
    const int64_t bk = std::min(kKeys, key_end - j0);
    const RowsView<T> k_rows = rows_as_acc(k_head + j0 * a.k_stride_s, a.k_stride_s, bk, D, w.k.get());
    const RowsView<T> v_rows = rows_as_acc(v_head + j0 * a.v_stride_s, a.v_stride_s, bk, Dv, w.v.get());
    // S^T [bk, rows] = K_blk (Q scale)^T
    if (few_rows)
      scores_few_rows(k_rows.data, k_rows.stride, bk, D, w.q.get(), rows.count, w.st.get());
    else
      gemm<A>(bk, rows.count, D, k_rows.data, k_rows.stride, 1, w.qt.get(), kRows, w.st.get(), kRows, Init::zero);
    add_float_mask_transposed(w.st.get(), bk, j0, rows, a.mask, a.mask_kind, a.mask_stride_k);
    hide_keys_transposed(w.st.get(), bk, j0, rows, a.mask, a.mask_kind, a.mask_stride_k, attention_neg_inf<A>());
    online_softmax_transposed(w.st.get(), bk, lanes, m, l, w.alpha.get());
    if (a.dropout_p > 0) dropout_transposed(w.st.get(), bk, j0, rows, key, p_keep, inv_keep);
    // O [rows, Dv] = alpha O + P V_blk   (A = the P^T tile read transposed)
    gemm<A>(rows.count, Dv, bk, w.st.get(), 1, kRows, v_rows.data, v_rows.stride, o, Dv,
            first ? Init::zero : Init::rescale, w.alpha.get());
    first = false;
  }
  if (first) std::fill(o, o + rows.count * Dv, A(0));

  if (partial != nullptr) {
    std::copy(o, o + rows.count * Dv, partial->o);
    std::copy(m, m + rows.count, partial->m);
    std::copy(l, l + rows.count, partial->l);
    return;
  }
  for (int64_t r = 0; r < rows.count; ++r) {
    const int64_t row_index = (b * sh.Hq + rows.head[r]) * sh.Sq + rows.pos[r];
    // o / l (a division, not a product with 1 / l: one rounding instead of two); 0 if l = 0
    const A l_row = l[r] > A(0) ? l[r] : A(1);
    const A keep = l[r] > A(0) ? A(1) : A(0);
    A* o_row = o + r * Dv;
#pragma omp simd
    for (int64_t d = 0; d < Dv; ++d) o_row[d] = o_row[d] * keep / l_row;
    store_row(o_row, a.out + row_index * Dv, Dv);
    a.lse[row_index] = attention_lse(m[r], l[r]);
  }
}

// Merges the splits of one block of rows into the output.
template <typename T>
void merge_task(const AttentionForwardArgs<T>& a, const Shape<AttentionForwardArgs<T>>& sh, int64_t b, int64_t kvh,
                int64_t block, int64_t splits, const acc_t<T>* o_parts, const acc_t<T>* m_parts,
                const acc_t<T>* l_parts, acc_t<T>* buffer) {
  using A = acc_t<T>;
  const int64_t Dv = sh.Dv;
  RowBlock rows;
  build_rows(a, sh, b, kvh, block * kRows, a.seqlens, rows);
  for (int64_t r = 0; r < rows.count; ++r) {
    A m_total = attention_neg_inf<A>();
    for (int64_t s = 0; s < splits; ++s) m_total = std::max(m_total, m_parts[s * kRows + r]);
    A l_total = 0;
    std::fill(buffer, buffer + Dv, A(0));
    for (int64_t s = 0; s < splits; ++s) {
      const A weight = attention_merge_weight(m_parts[s * kRows + r], m_total);
      if (weight == A(0)) continue;
      l_total += weight * l_parts[s * kRows + r];
      const A* o_part = o_parts + (s * kRows + r) * Dv;
#pragma omp simd
      for (int64_t d = 0; d < Dv; ++d) buffer[d] += weight * o_part[d];
    }
    const A l_row = l_total > A(0) ? l_total : A(1);
    const A keep = l_total > A(0) ? A(1) : A(0);
#pragma omp simd
    for (int64_t d = 0; d < Dv; ++d) buffer[d] = buffer[d] * keep / l_row;
    const int64_t row_index = (b * sh.Hq + rows.head[r]) * sh.Sq + rows.pos[r];
    store_row(buffer, a.out + row_index * Dv, Dv);
    a.lse[row_index] = attention_lse(m_total, l_total);
  }
}

template <typename T>
void fill_dropout_mask(const AttentionForwardArgs<T>& a, int num_threads) {
  const PhiloxKey key = philox_key(a.seed);
  const float p_keep = static_cast<float>(a.dropout_p);
  const int64_t planes = a.batch * a.heads_q;
#pragma omp parallel for num_threads(num_threads) schedule(static) collapse(2)
  for (int64_t plane = 0; plane < planes; ++plane) {
    for (int64_t i = 0; i < a.seq_q; ++i) {
      uint8_t* row = a.dropout_mask + (plane * a.seq_q + i) * a.seq_k;
#pragma omp simd
      for (int64_t j = 0; j < a.seq_k; ++j)
        row[j] = dropout_keep(key, p_keep, static_cast<uint32_t>(j), static_cast<uint32_t>(i),
                              static_cast<uint32_t>(plane));
    }
  }
}

}  // namespace

template <typename T>
void attention_forward(const AttentionForwardArgs<T>& a, int num_threads) {
  using A = acc_t<T>;
  const Shape<AttentionForwardArgs<T>> sh(a);
  if (a.dropout_mask != nullptr && a.dropout_p > 0) fill_dropout_mask(a, num_threads);
  if (sh.B == 0 || sh.Hq == 0 || sh.Sq == 0) return;
  num_threads = std::max(num_threads, 1);

  // Flash-decoding: when the row blocks alone cannot keep every thread busy for long, the keys of
  // each block are split into ranges computed by separate tasks and merged by their (m, l).
  const int64_t base_tasks = sh.B * sh.Hk * sh.row_blocks;
  int64_t longest = 0;
  for (int64_t b = 0; b < sh.B; ++b) longest = std::max(longest, attention_key_length(a.seqlens, b, sh.Sk));
  const int64_t key_blocks = (longest + kKeys - 1) / kKeys;
  int64_t splits = 1;
  if (base_tasks < 4 * num_threads && key_blocks >= 4)
    splits = std::min((4 * num_threads + base_tasks - 1) / base_tasks, key_blocks / 2);
  // Range of split s for batch b: whole key blocks, about the same number in each split.
  auto split_range = [&](int64_t b, int64_t s, int64_t& begin, int64_t& end) {
    const int64_t length = attention_key_length(a.seqlens, b, sh.Sk);
    const int64_t blocks = (length + kKeys - 1) / kKeys;
    const int64_t per_split = (blocks + splits - 1) / splits;
    begin = std::min(length, s * per_split * kKeys);
    end = std::min(length, (s + 1) * per_split * kKeys);
  };

  std::unique_ptr<A[], AlignedFree> o_parts, m_parts, l_parts;
  if (splits > 1) {
    o_parts = aligned_buffer<A>(base_tasks * splits * kRows * sh.Dv);
    m_parts = aligned_buffer<A>(base_tasks * splits * kRows);
    l_parts = aligned_buffer<A>(base_tasks * splits * kRows);
  }
  const int64_t tasks = base_tasks * splits;
#pragma omp parallel num_threads(num_threads)
  {
    ForwardScratch<A> w(sh.D, sh.Dv);
    // Heaviest first for dynamic scheduling: with causality, late row blocks see the most keys.
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t s = t % splits;
      const int64_t base = t / splits;
      const int64_t block = sh.row_blocks - 1 - base % sh.row_blocks;
      const int64_t bh = base / sh.row_blocks;
      const int64_t b = bh / sh.Hk, kvh = bh % sh.Hk;
      const int64_t slot = bh * sh.row_blocks + block;
      if (splits == 1) {
        forward_task(a, sh, b, kvh, block, 0, attention_key_length(a.seqlens, b, sh.Sk), w, nullptr);
      } else {
        int64_t begin, end;
        split_range(b, s, begin, end);
        const PartialSlot<A> partial{o_parts.get() + (slot * splits + s) * kRows * sh.Dv,
                                     m_parts.get() + (slot * splits + s) * kRows,
                                     l_parts.get() + (slot * splits + s) * kRows};
        forward_task(a, sh, b, kvh, block, begin, end, w, &partial);
      }
    }
    if (splits > 1) {
      auto buffer = aligned_buffer<A>(sh.Dv);
#pragma omp for schedule(static)
      for (int64_t slot = 0; slot < base_tasks; ++slot) {
        const int64_t block = slot % sh.row_blocks, bh = slot / sh.row_blocks;
        merge_task(a, sh, bh / sh.Hk, bh % sh.Hk, block, splits, o_parts.get() + slot * splits * kRows * sh.Dv,
                   m_parts.get() + slot * splits * kRows, l_parts.get() + slot * splits * kRows, buffer.get());
      }
    }
  }
}

#define INSTANTIATE(T) template void attention_forward<T>(const AttentionForwardArgs<T>&, int);
INSTANTIATE(float)
INSTANTIATE(double)
INSTANTIATE(half)
INSTANTIATE(bfloat16)
#undef INSTANTIATE

}  // namespace engine::cpu
