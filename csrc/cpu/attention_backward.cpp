// CPU softmax attention, flash-style: the backward (dq, dk, dv from the saved out and lse). The
// work layout and memory traffic are described in attention_forward.cpp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "cpu/attention.h"
#include "cpu/attention_gemm.h"
#include "cpu/attention_simd.h"
#include "cpu/attention_tiles.h"

namespace engine::cpu {
using namespace attention_detail;
namespace {

template <typename A>
struct BackwardScratch {
  // dK/dV tasks: K^T, V^T [D or Dv, kKeys]; S/P, dP/dS [kRows, kKeys]; q * scale, dout rows
  // [kRows, D/Dv];
  // accumulators [kKeys, D], [kKeys, Dv] (the group's sums, and one head's). dQ tasks: Q^T, dout^T [D/Dv, kRows]; S^T, dP^T
  // [kKeys, kRows]; k, v rows [kKeys, D/Dv]; accumulator [kRows, D]; per-lane lse, delta.
  std::unique_ptr<A[], AlignedFree> kt, vt, s, dp, q, dout, dk, dv, dk_head, dv_head;
  std::unique_ptr<A[], AlignedFree> qt, doutt, st, dpt, k, v, dq, lse, delta;
  BackwardScratch(int64_t D, int64_t Dv)
      : kt(aligned_buffer<A>(D * kKeys)), vt(aligned_buffer<A>(Dv * kKeys)), s(aligned_buffer<A>(kRows * kKeys)),
        dp(aligned_buffer<A>(kRows * kKeys)), q(aligned_buffer<A>(kRows * D)), dout(aligned_buffer<A>(kRows * Dv)),
        dk(aligned_buffer<A>(kKeys * D)), dv(aligned_buffer<A>(kKeys * Dv)), dk_head(aligned_buffer<A>(kKeys * D)),
        dv_head(aligned_buffer<A>(kKeys * Dv)), qt(aligned_buffer<A>(D * kRows)),
        doutt(aligned_buffer<A>(Dv * kRows)), st(aligned_buffer<A>(kKeys * kRows)),
        dpt(aligned_buffer<A>(kKeys * kRows)), k(aligned_buffer<A>(kKeys * D)), v(aligned_buffer<A>(kKeys * Dv)),
        dq(aligned_buffer<A>(kRows * D)), lse(aligned_buffer<A>(kRows)), delta(aligned_buffer<A>(kRows)) {}
};

// The lse that backward subtracts: +inf for a row with no visible key (lse = -inf), so that its
// probabilities e^(s - lse) are all exactly 0.
template <typename A>
A lse_for_backward(A lse) {
  return lse == attention_neg_inf<A>() ? -attention_neg_inf<A>() : lse;
}

// dK, dV of keys [j0, j0 + bk) of (b, kv head): every query row of every head of the group.
// With dq_sums (the fused form), also adds dS K_blk to the group's unscaled dQ sums
// [G, Sq, D], so that dQ needs no second pass over S and dP.
template <typename T>
void dkdv_task(const AttentionBackwardArgs<T>& a, const Shape<AttentionBackwardArgs<T>>& sh, int64_t b, int64_t kvh,
               int64_t j0, BackwardScratch<acc_t<T>>& w, acc_t<T>* dq_sums) {
  using A = acc_t<T>;
  using L = Lanes<A>;
  using V = typename L::V;
  const int64_t D = sh.D, Dv = sh.Dv;
  const int64_t bk = std::min(kKeys, sh.Sk - j0);
  const T* k_rows = a.k + b * a.k_stride_b + kvh * a.k_stride_h + j0 * a.k_stride_s;
  const T* v_rows = a.v + b * a.v_stride_b + kvh * a.v_stride_h + j0 * a.v_stride_s;
  // K^T, V^T [cols, kKeys] (padding lanes 0)
  A* kt = w.kt.get();
  A* vt = w.vt.get();
  for (int64_t j = 0; j < kKeys; ++j) {
    for (int64_t d = 0; d < D; ++d) kt[d * kKeys + j] = j < bk ? to_acc(k_rows[j * a.k_stride_s + d]) : A(0);
    for (int64_t d = 0; d < Dv; ++d) vt[d * kKeys + j] = j < bk ? to_acc(v_rows[j * a.v_stride_s + d]) : A(0);
  }
  A* dk = w.dk.get();
  A* dv = w.dv.get();
  std::fill(dk, dk + bk * D, A(0));
  std::fill(dv, dv + bk * Dv, A(0));
  const PhiloxKey key = philox_key(a.seed);
  const A inv_keep = static_cast<A>(1.0 / (1.0 - a.dropout_p));
  const float p_keep = static_cast<float>(a.dropout_p);  // keep iff u >= p (fp32, as the reference)
  const int64_t lanes = (bk + L::W - 1) / L::W * L::W;
  const RowsView<T> k_block = dq_sums ? rows_as_acc(k_rows, a.k_stride_s, bk, D, w.k.get()) : RowsView<T>{};

  // Each head sums into its own accumulators, added to the group's after the head: the sums are
  // then chains of Sq terms plus a short sum over heads, not one chain of G * Sq terms.
  A* dk_head = sh.G == 1 ? dk : w.dk_head.get();
  A* dv_head = sh.G == 1 ? dv : w.dv_head.get();
  for (int64_t hg = 0; hg < sh.G; ++hg) {
    const int64_t h = kvh * sh.G + hg;
    const int64_t plane = b * sh.Hq + h;
    if (sh.G > 1) {
      std::fill(dk_head, dk_head + bk * D, A(0));
      std::fill(dv_head, dv_head + bk * Dv, A(0));
    }
    // Rows that see any of these keys: with causality (top-left) query i sees j <= i.
    const int64_t i_begin = a.causal ? std::min(j0, sh.Sq) : 0;
    for (int64_t i0 = i_begin; i0 < sh.Sq; i0 += kRows) {
      const int64_t rows = std::min(kRows, sh.Sq - i0);
      // q * scale [rows, D], rounded as forward rounds it (so S matches forward's bit for bit)
      A* q = w.q.get();
      const T* q_src = a.q + b * a.q_stride_b + h * a.q_stride_h + i0 * a.q_stride_s;
      for (int64_t r = 0; r < rows; ++r) {
        load_row(q_src + r * a.q_stride_s, q + r * D, D);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) q[r * D + d] *= a.scale;
      }
      const RowsView<T> dout = rows_as_acc(a.dout + (plane * sh.Sq + i0) * Dv, Dv, rows, Dv, w.dout.get());
      A* s = w.s.get();
      A* dp = w.dp.get();
      gemm<A>(rows, bk, D, q, D, 1, kt, kKeys, s, kKeys, Init::zero);                // S  [rows, bk]
      gemm<A>(rows, bk, Dv, dout.data, dout.stride, 1, vt, kKeys, dp, kKeys, Init::zero);  // dP
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        A* s_row = s + r * kKeys;
        A* dp_row = dp + r * kKeys;
        const int64_t mask_offset = b * a.mask_stride_b + h * a.mask_stride_h + i * a.mask_stride_q;
        add_float_mask_row(s_row, bk, j0, a.mask, a.mask_kind, mask_offset, a.mask_stride_k);
        const V lse = L::set1(lse_for_backward(a.lse[plane * sh.Sq + i]));
        const A delta = a.delta[plane * sh.Sq + i];
        // P = e^(s - lse) in place of S, 0 at hidden keys
        for (int64_t x = 0; x < lanes; x += L::W) L::store(s_row + x, L::exp_diff(L::load(s_row + x), lse));
        hide_keys_row(s_row, bk, j0, attention_key_limit(i, a.causal, 0, sh.Sk), a.mask, a.mask_kind, mask_offset,
                      a.mask_stride_k, A(0));
        if (a.dropout_p > 0) {
          // dS = P (dP Z - delta) in place of dP; P~ = P Z in place of P
#pragma omp simd
          for (int64_t j = 0; j < bk; ++j) {
            const bool keep = dropout_keep(key, p_keep, static_cast<uint32_t>(j0 + j), static_cast<uint32_t>(i),
                                           static_cast<uint32_t>(plane));
            const A z = keep ? inv_keep : A(0);
            dp_row[j] = s_row[j] * (dp_row[j] * z - delta);
            s_row[j] *= z;
          }
        } else {
          // dS = P (dP - delta) in place of dP
          for (int64_t x = 0; x < lanes; x += L::W)
            L::store(dp_row + x, L::mul(L::load(s_row + x), L::sub(L::load(dp_row + x), L::set1(delta))));
        }
      }
      // dV [bk, Dv] += P~^T dout ; dK [bk, D] += dS^T (q scale)   (A operands: transposed views)
      gemm<A>(bk, Dv, rows, s, 1, kKeys, dout.data, dout.stride, dv_head, Dv, Init::accumulate);
      gemm<A>(bk, D, rows, dp, 1, kKeys, q, D, dk_head, D, Init::accumulate);
      // dQ [rows, D] += dS K_blk
      if (dq_sums)
        gemm<A>(rows, D, bk, dp, kKeys, 1, k_block.data, k_block.stride, dq_sums + (hg * sh.Sq + i0) * D, D,
                Init::accumulate);
    }
    if (sh.G > 1) {
#pragma omp simd
      for (int64_t x = 0; x < bk * D; ++x) dk[x] += dk_head[x];
#pragma omp simd
      for (int64_t x = 0; x < bk * Dv; ++x) dv[x] += dv_head[x];
    }
  }
  for (int64_t j = 0; j < bk; ++j) {
    const int64_t key_row = (b * sh.Hk + kvh) * sh.Sk + j0 + j;
    store_row(dk + j * D, a.dk + key_row * D, D);
    store_row(dv + j * Dv, a.dv + key_row * Dv, Dv);
  }
}

// dK, dV and dQ of (b, kv head) in one sweep over its key blocks: dQ is summed from the dS
// tiles the dK/dV products already made, 5 products per tile where the two-pass form makes 7
// (S and dP once more for dQ). dq_sums: scratch [G * Sq * D].
template <typename T>
void fused_task(const AttentionBackwardArgs<T>& a, const Shape<AttentionBackwardArgs<T>>& sh, int64_t b,
                int64_t kvh, BackwardScratch<acc_t<T>>& w, acc_t<T>* dq_sums) {
  using A = acc_t<T>;
  const int64_t D = sh.D;
  std::fill(dq_sums, dq_sums + sh.G * sh.Sq * D, A(0));
  for (int64_t j0 = 0; j0 < sh.Sk; j0 += kKeys) dkdv_task(a, sh, b, kvh, j0, w, dq_sums);
  const A scale = a.scale;
  for (int64_t hg = 0; hg < sh.G; ++hg) {
    const int64_t plane = b * sh.Hq + kvh * sh.G + hg;
    for (int64_t i = 0; i < sh.Sq; ++i) {
      A* dq_row = dq_sums + (hg * sh.Sq + i) * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dq_row[d] *= scale;
      store_row(dq_row, a.dq + (plane * sh.Sq + i) * D, D);
    }
  }
}

// One block of stacked rows of (b, kv head) for the dQ and delta passes: builds `rows`, packs
// (q * scale)^T and dout^T [D/Dv, kRows] and the lanes' lse.
template <typename T>
void prepare_query_rows(const AttentionBackwardArgs<T>& a, const Shape<AttentionBackwardArgs<T>>& sh, int64_t b,
                        int64_t kvh, int64_t block, RowBlock& rows, BackwardScratch<acc_t<T>>& w) {
  using A = acc_t<T>;
  build_rows(a, sh, b, kvh, block * kRows, nullptr, rows);
  pack_transposed<T>(rows, sh.D, a.scale, [&](int64_t r) {
    return a.q + b * a.q_stride_b + rows.head[r] * a.q_stride_h + rows.pos[r] * a.q_stride_s;
  }, w.qt.get());
  pack_transposed<T>(rows, sh.Dv, A(1), [&](int64_t r) {
    return a.dout + ((b * sh.Hq + rows.head[r]) * sh.Sq + rows.pos[r]) * sh.Dv;
  }, w.doutt.get());
  for (int64_t r = 0; r < kRows; ++r)
    w.lse[r] = r < rows.count ? lse_for_backward(a.lse[(b * sh.Hq + rows.head[r]) * sh.Sq + rows.pos[r]]) : A(0);
}

// P^T in place of S^T (w.st) and dP^T Z (w.dpt) [bk, kRows] of the rows against keys
// [j0, j0 + bk); returns those keys' rows (in the accumulator type) for dQ's product.
template <typename T>
RowsView<T> probabilities_transposed(const AttentionBackwardArgs<T>& a, const Shape<AttentionBackwardArgs<T>>& sh,
                                     int64_t b, int64_t kvh, const RowBlock& rows, int64_t j0, int64_t bk,
                                     BackwardScratch<acc_t<T>>& w) {
  using A = acc_t<T>;
  using L = Lanes<A>;
  const T* k_head = a.k + b * a.k_stride_b + kvh * a.k_stride_h;
  const T* v_head = a.v + b * a.v_stride_b + kvh * a.v_stride_h;
  const RowsView<T> k_rows = rows_as_acc(k_head + j0 * a.k_stride_s, a.k_stride_s, bk, sh.D, w.k.get());
  const RowsView<T> v_rows = rows_as_acc(v_head + j0 * a.v_stride_s, a.v_stride_s, bk, sh.Dv, w.v.get());
  A* st = w.st.get();
  A* dpt = w.dpt.get();
  gemm<A>(bk, rows.count, sh.D, k_rows.data, k_rows.stride, 1, w.qt.get(), kRows, st, kRows, Init::zero);
  add_float_mask_transposed(st, bk, j0, rows, a.mask, a.mask_kind, a.mask_stride_k);
  gemm<A>(bk, rows.count, sh.Dv, v_rows.data, v_rows.stride, 1, w.doutt.get(), kRows, dpt, kRows, Init::zero);
  const int64_t lanes = (rows.count + L::W - 1) / L::W * L::W;
  for (int64_t j = 0; j < bk; ++j) {
    A* st_row = st + j * kRows;
    for (int64_t x = 0; x < lanes; x += L::W)
      L::store(st_row + x, L::exp_diff(L::load(st_row + x), L::load(w.lse.get() + x)));
  }
  hide_keys_transposed(st, bk, j0, rows, a.mask, a.mask_kind, a.mask_stride_k, A(0));
  if (a.dropout_p > 0)
    dropout_transposed(dpt, bk, j0, rows, philox_key(a.seed), static_cast<float>(a.dropout_p),
                       static_cast<A>(1.0 / (1.0 - a.dropout_p)));
  return k_rows;
}

// delta = rowsum(P * dP Z) of one block of stacked rows, for 16-bit data: rowsum(dout * out)
// with out as the forward accumulated it, where the stored out is rounded to 8 (bf16) or 11
// (fp16) bits. From the rounded out, delta errs by ~2^-9 |dout| |out| (bf16), which
// dS = P (dP - delta) does not survive where the softmax is peaked (dP - delta cancels): dq/dk
// erred up to 15x the allowance of engine/accuracy.py (tests/test_attention.py, attention sinks).
template <typename T>
void delta_task(const AttentionBackwardArgs<T>& a, const Shape<AttentionBackwardArgs<T>>& sh, int64_t b,
                int64_t kvh, int64_t block, BackwardScratch<acc_t<T>>& w) {
  using A = acc_t<T>;
  using L = Lanes<A>;
  RowBlock rows;
  prepare_query_rows(a, sh, b, kvh, block, rows, w);
  A* delta = w.delta.get();
  std::fill(delta, delta + kRows, A(0));
  const int64_t lanes = (rows.count + L::W - 1) / L::W * L::W;
  for (int64_t j0 = 0; j0 < rows.max_limit; j0 += kKeys) {
    const int64_t bk = std::min(kKeys, rows.max_limit - j0);
    probabilities_transposed(a, sh, b, kvh, rows, j0, bk, w);
    for (int64_t j = 0; j < bk; ++j) {
      const A* p = w.st.get() + j * kRows;
      const A* dp = w.dpt.get() + j * kRows;
      for (int64_t x = 0; x < lanes; x += L::W)
        L::store(delta + x, L::fma(L::load(p + x), L::load(dp + x), L::load(delta + x)));
    }
  }
  for (int64_t r = 0; r < rows.count; ++r) a.delta[(b * sh.Hq + rows.head[r]) * sh.Sq + rows.pos[r]] = delta[r];
}

// dQ of one block of stacked rows of (b, kv head).
template <typename T>
void dq_task(const AttentionBackwardArgs<T>& a, const Shape<AttentionBackwardArgs<T>>& sh, int64_t b, int64_t kvh,
             int64_t block, BackwardScratch<acc_t<T>>& w) {
  using A = acc_t<T>;
  using L = Lanes<A>;
  const int64_t D = sh.D;
  RowBlock rows;
  prepare_query_rows(a, sh, b, kvh, block, rows, w);
  A* delta = w.delta.get();
  for (int64_t r = 0; r < kRows; ++r)
    delta[r] = r < rows.count ? a.delta[(b * sh.Hq + rows.head[r]) * sh.Sq + rows.pos[r]] : A(0);
  const int64_t lanes = (rows.count + L::W - 1) / L::W * L::W;
  A* dq = w.dq.get();
  std::fill(dq, dq + rows.count * D, A(0));
  for (int64_t j0 = 0; j0 < rows.max_limit; j0 += kKeys) {
    const int64_t bk = std::min(kKeys, rows.max_limit - j0);
    const RowsView<T> k_rows = probabilities_transposed(a, sh, b, kvh, rows, j0, bk, w);
    // dS^T = P^T (dP^T Z - delta) in place of dP^T
    for (int64_t j = 0; j < bk; ++j) {
      const A* p = w.st.get() + j * kRows;
      A* dpt_row = w.dpt.get() + j * kRows;
      for (int64_t x = 0; x < lanes; x += L::W)
        L::store(dpt_row + x, L::mul(L::load(p + x), L::sub(L::load(dpt_row + x), L::load(delta + x))));
    }
    // dQ [rows, D] += dS K_blk   (A = the dS^T tile read transposed)
    gemm<A>(rows.count, D, bk, w.dpt.get(), 1, kRows, k_rows.data, k_rows.stride, dq, D, Init::accumulate);
  }
  const A scale = a.scale;
  for (int64_t r = 0; r < rows.count; ++r) {
    A* dq_row = dq + r * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dq_row[d] *= scale;
    store_row(dq_row, a.dq + ((b * sh.Hq + rows.head[r]) * sh.Sq + rows.pos[r]) * D, D);
  }
}

// delta = rowsum(dout * out) for fp32/fp64 data (out is stored in the accumulator type), summed
// in the order (and with the FMAs and chunks) the dP tiles use, 16 rows at a time so that their
// chains overlap: where a row sees a single key, out = v and dP - delta is then exactly 0, as it
// is mathematically.
template <typename T>
void delta_from_out(const AttentionBackwardArgs<T>& a, const Shape<AttentionBackwardArgs<T>>& sh, int num_threads) {
  using A = acc_t<T>;
  const int64_t rows_total = sh.B * sh.Hq * sh.Sq;
  constexpr int64_t kDeltaRows = 16;
#if defined(ENGINE_ATTENTION_MICRO_KERNEL)
  const int64_t chunk = std::is_same_v<A, float> ? kChunk : sh.Dv;  // as the dP micro-kernel sums
#else
  const int64_t chunk = sh.Dv;
#endif
#pragma omp parallel num_threads(num_threads)
  {
    auto dout_rows = aligned_buffer<A>(kDeltaRows * sh.Dv);
    auto out_rows = aligned_buffer<A>(kDeltaRows * sh.Dv);
#pragma omp for schedule(static)
    for (int64_t row0 = 0; row0 < rows_total; row0 += kDeltaRows) {
      const int64_t count = std::min(kDeltaRows, rows_total - row0);
      const RowsView<T> x = rows_as_acc(a.dout + row0 * sh.Dv, sh.Dv, count, sh.Dv, dout_rows.get());
      const RowsView<T> y = rows_as_acc(a.out + row0 * sh.Dv, sh.Dv, count, sh.Dv, out_rows.get());
      A total[kDeltaRows] = {};
      for (int64_t d0 = 0; d0 < sh.Dv; d0 += chunk) {
        A part[kDeltaRows] = {};
        for (int64_t d = d0; d < std::min(sh.Dv, d0 + chunk); ++d) {
#pragma omp simd
          for (int64_t r = 0; r < kDeltaRows; ++r)
            if (r < count) part[r] = std::fma(x.data[r * x.stride + d], y.data[r * y.stride + d], part[r]);
        }
        for (int64_t r = 0; r < kDeltaRows; ++r) total[r] = d0 == 0 ? part[r] : total[r] + part[r];
      }
      for (int64_t r = 0; r < count; ++r) a.delta[row0 + r] = total[r];
    }
  }
}

// delta = rowsum(P * dP Z) for 16-bit data (delta_task), one task per block of stacked rows.
template <typename T>
void delta_from_probabilities(const AttentionBackwardArgs<T>& a, const Shape<AttentionBackwardArgs<T>>& sh,
                              int num_threads) {
  const int64_t tasks = sh.B * sh.Hk * sh.row_blocks;
#pragma omp parallel num_threads(num_threads)
  {
    BackwardScratch<acc_t<T>> w(sh.D, sh.Dv);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t block = t / (sh.B * sh.Hk), bh = t % (sh.B * sh.Hk);
      delta_task(a, sh, bh / sh.Hk, bh % sh.Hk, block, w);
    }
  }
}

}  // namespace

template <typename T>
void attention_backward(const AttentionBackwardArgs<T>& a, int num_threads) {
  using A = acc_t<T>;
  const Shape<AttentionBackwardArgs<T>> sh(a);
  num_threads = std::max(num_threads, 1);
  // delta for every row, before the tasks that read it
  if constexpr (std::is_same_v<T, A>) {
    delta_from_out(a, sh, num_threads);
  } else {
    delta_from_probabilities(a, sh, num_threads);
  }
  // The fused form gives each thread whole (b, kv head) pairs: it is used where they share out
  // among the threads with at most 1/5 of the thread time idle (4x12 heads on 2 threads: none),
  // and the dQ sums of a group fit in 16 MiB per thread.
  const int64_t pairs = sh.B * sh.Hk;
  const int64_t idle = (pairs + num_threads - 1) / num_threads * num_threads - pairs;
  constexpr int64_t kFusedMaxDqBytes = int64_t(16) << 20;
  if (idle * 4 <= pairs && sh.G * sh.Sq * sh.D * int64_t(sizeof(A)) <= kFusedMaxDqBytes) {
#pragma omp parallel num_threads(num_threads)
    {
      BackwardScratch<A> w(sh.D, sh.Dv);
      auto dq_sums = aligned_buffer<A>(sh.G * sh.Sq * sh.D);
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < pairs; ++t) fused_task(a, sh, t / sh.Hk, t % sh.Hk, w, dq_sums.get());
    }
    return;
  }
  // Two passes in one pool of tasks: dK/dV per (b, kv head, key block), heaviest (first key
  // blocks) first, then dQ per (b, kv head, row block), heaviest (last row blocks) first.
  const int64_t key_blocks = (sh.Sk + kKeys - 1) / kKeys;
  const int64_t dkdv_tasks = pairs * key_blocks;
  const int64_t dq_tasks = pairs * sh.row_blocks;
#pragma omp parallel num_threads(num_threads)
  {
    BackwardScratch<A> w(sh.D, sh.Dv);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < dkdv_tasks + dq_tasks; ++t) {
      if (t < dkdv_tasks) {
        const int64_t block = t / pairs, bh = t % pairs;
        dkdv_task(a, sh, bh / sh.Hk, bh % sh.Hk, block * kKeys, w, static_cast<A*>(nullptr));
      } else {
        const int64_t u = t - dkdv_tasks;
        const int64_t block = sh.row_blocks - 1 - u / pairs, bh = u % pairs;
        dq_task(a, sh, bh / sh.Hk, bh % sh.Hk, block, w);
      }
    }
  }
}

#define INSTANTIATE(T) template void attention_backward<T>(const AttentionBackwardArgs<T>&, int);
INSTANTIATE(float)
INSTANTIATE(double)
INSTANTIATE(half)
INSTANTIATE(bfloat16)
#undef INSTANTIATE

}  // namespace engine::cpu
