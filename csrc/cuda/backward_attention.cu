// CUDA softmax attention, flash-style: the backward (fp32's delta, dQ, then dK/dV kernels), its
// launch and the entry point of cuda/attention.h for it. The shared device code is in
// attention_kernels.cuh, the tensor-core wrappers in mma.cuh.
//
// Memory traffic (B batch, Hq/Hk heads, Sq/Sk lengths, D/Dv head dims): fp32 reads dout, out once
// (delta); the dK/dV kernel reads q, dout, lse, delta once per 64-key block and writes dk, dv
// once; the dQ kernel reads k, v once per 64-row block (twice for 16-bit data, whose delta it
// computes and writes) and writes dq once. No atomics: every output element has one writer.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/attention.h"
#include "cuda/attention_kernels.cuh"

namespace engine::cuda {
namespace attention_detail {

// ---------------------------------------------------------------------------------------------
// Backward

struct BackwardPlan {
  int64_t group, stacked, row_blocks;
  bool q_vectors, k_vectors, v_vectors, dout_vectors;
};

// delta = rowsum(dout * out) in fp32 for fp32 data (16-bit data: see attention_dq_kernel): one
// warp per row.
template <typename T>
__global__ void __launch_bounds__(256) attention_delta_kernel(const AttentionBackwardArgs<T> a) {
  const int64_t row = (int64_t(blockIdx.x) * 256 + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= a.batch * a.heads_q * a.seq_q) return;
  const int64_t Dv = a.head_dim_v;
  float total = 0.0f;
  for (int64_t col = lane; col < Dv; col += 32)
    total = fmaf(to_acc(a.dout[row * Dv + col]), to_acc(a.out[row * Dv + col]), total);
  for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_xor_sync(0xffffffffu, total, offset);
  if (lane == 0) a.delta[row] = total;
}

// dK/dV: grid (ceil(Sk / 64), B * Hk); warp w owns keys [16 w, 16 w + 16) of the block, as the
// rows of its tiles: S^T = k q^T, dP^T = v dout^T, then dV += P~^T dout, dK += dS^T q over every
// query row of every head of the group (no atomics: the group's sum stays in this block). This
// launch accumulates the output columns [kColBlock * kCols, (kColBlock + 1) * kCols).
template <typename T, int kHead, int kColBlock>
__global__ void __launch_bounds__(kThreads, 1) attention_dkdv_kernel(const AttentionBackwardArgs<T> a,
                                                                  const BackwardPlan plan) {
  using C = Tiles<T, kHead>;
  using Math = MathFor<T, kHead>;
  constexpr int kRowsB = C::kRowsB, kStride = C::kStride, kCols = C::kCols, kCol0 = kColBlock * C::kCols;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  constexpr bool kCore = kUseWgmma<T>;
  constexpr int kRowTile = kCore ? kRowsB * kHead : kRowsB * kStride;  // elements of one rows tile
  T* k_s = reinterpret_cast<T*>(shared_bytes);     // [64, kStride]: this block's keys (A operand)
  T* v_s = k_s + kBlockRows * kStride;             // [64, kStride]: their values (A operand)
  T* q_s = v_s + kBlockRows * kStride;             // query rows of this step: [kRowsB, kStride], or
                                                   //   wgmma: core tile n = row, k = head dim
  T* do_s = q_s + kRowTile;                        // their output gradients, the same way
  T* qt_s = do_s + kRowTile;                       // wgmma only: core tile n = head dim, k = row
  T* dot_s = qt_s + kRowTile;                      // wgmma only: the same for the gradients
  T* rows_end = q_s + (kCore ? 4 : 2) * kRowTile;
  float* lse_s = reinterpret_cast<float*>(rows_end);  // [kRowsB] (+inf: no visible key)
  float* delta_s = lse_s + kRowsB;                     // [kRowsB]
  float* p_s = delta_s + kRowsB;                   // fp32 path: [4 warps, 16, kPStrideB]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t bh = blockIdx.y, b = bh / a.heads_k, kvh = bh % a.heads_k;
  const int64_t j0 = int64_t(blockIdx.x) * kBlockRows;
  const int keys_valid = int(min64(kBlockRows, a.seq_k - j0));
  const T* k_head = a.k + b * a.k_stride_b + kvh * a.k_stride_h;
  const T* v_head = a.v + b * a.v_stride_b + kvh * a.v_stride_h;
  load_tile<T, kHead, kStride>(k_s, kBlockRows, int(a.head_dim), plan.k_vectors, [&](int r) -> const T* {
    return r < keys_valid ? k_head + (j0 + r) * a.k_stride_s : nullptr;
  });
  load_tile<T, kHead, kStride>(v_s, kBlockRows, int(a.head_dim_v), plan.v_vectors, [&](int r) -> const T* {
    return r < keys_valid ? v_head + (j0 + r) * a.v_stride_s : nullptr;
  });

  float dv[kCols / 8][4], dk[kCols / 8][4];  // columns kCol0 + [0, kCols) of this lane's two keys
#pragma unroll
  for (int n = 0; n < kCols / 8; ++n) {
    dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.0f;
    dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.0f;
  }
  const PhiloxKey key = philox_key(a.seed);
  const float p_drop = static_cast<float>(a.dropout_p);
  const float inv_keep = static_cast<float>(1.0 / (1.0 - a.dropout_p));
  // this lane's keys (rows of its tiles): g and g + 8 of the warp's 16
  const int64_t key_lo = j0 + warp * 16 + g, key_hi = key_lo + 8;

  for (int64_t hg = 0; hg < plan.group; ++hg) {
    const int64_t h = kvh * plan.group + hg;
    const int64_t plane = b * a.heads_q + h;
    // with causality (top-left), query i sees key j iff j <= i: rows before j0 see none of these
    const int64_t i_begin = a.causal ? min64(j0, a.seq_q) : 0;
    for (int64_t i0 = i_begin; i0 < a.seq_q; i0 += kRowsB) {
      const int rows_valid = int(min64(kRowsB, a.seq_q - i0));
      __syncthreads();  // the previous step's tiles are no longer read
      auto query_row = [&](int r) -> const T* {
        return r < rows_valid ? a.q + b * a.q_stride_b + h * a.q_stride_h + (i0 + r) * a.q_stride_s : nullptr;
      };
      auto dout_row = [&](int r) -> const T* {
        return r < rows_valid ? a.dout + (plane * a.seq_q + i0 + r) * a.head_dim_v : nullptr;
      };
      if constexpr (kCore) {
        for_each_chunk<T, kHead>(kRowsB, int(a.head_dim), plan.q_vectors, query_row, [&](int r, int c, const Chunk<T>& x) {
          store_core(q_s, kRowsB, r, c, x);
          store_core_transposed(qt_s, kHead, r, c, x);
        });
        for_each_chunk<T, kHead>(kRowsB, int(a.head_dim_v), plan.dout_vectors, dout_row,
                                 [&](int r, int c, const Chunk<T>& x) {
                                   store_core(do_s, kRowsB, r, c, x);
                                   store_core_transposed(dot_s, kHead, r, c, x);
                                 });
        async_proxy_fence();
      } else {
        load_tile<T, kHead, kStride>(q_s, kRowsB, int(a.head_dim), plan.q_vectors, query_row);
        load_tile<T, kHead, kStride>(do_s, kRowsB, int(a.head_dim_v), plan.dout_vectors, dout_row);
      }
      for (int r = threadIdx.x; r < kRowsB; r += kThreads) {
        const bool valid = r < rows_valid;
        const float lse = valid ? a.lse[plane * a.seq_q + i0 + r] : neg_inf();
        lse_s[r] = lse == neg_inf() ? -neg_inf() : lse;  // +inf: probabilities e^(s - lse) = 0
        delta_s[r] = valid ? a.delta[plane * a.seq_q + i0 + r] : 0.0f;
      }
      __syncthreads();

      // S^T [16 keys, kRowsB rows] of this warp, scaled and masked; then P^T = e^(s - lse).
      float p[kRowsB / 8][4];
      Math::template scores<kRowsB, kHead>(p, k_s + warp * 16 * kStride, BOperand<T>{q_s, q_s, kRowsB}, lane, nullptr);
#pragma unroll
      for (int n = 0; n < kRowsB / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t j = e < 2 ? key_lo : key_hi;
          const int rr = 8 * n + 2 * t + (e & 1);
          const int64_t i = i0 + rr;
          // as masked_score (common to the forward and dQ) for this kernel's transposed tiles
          float x = p[n][e] * float(a.scale);
          bool hidden = rr >= rows_valid || j >= a.seq_k || j >= attention_key_limit(i, a.causal, 0, a.seq_k);
          if (!hidden && a.mask_kind != AttentionMaskKind::none) {
            const float bias = attention_mask_bias<float>(
                a.mask, a.mask_kind, b * a.mask_stride_b + h * a.mask_stride_h + i * a.mask_stride_q + j * a.mask_stride_k);
            if (a.mask_kind == AttentionMaskKind::boolean)
              hidden = bias != 0.0f;
            else
              x += bias;
          }
          p[n][e] = hidden ? 0.0f : exp_of<T>(x - lse_s[rr]);
        }
      }
      // dP^T = v dout^T, then dS^T = P^T (dP^T Z - delta) and P~^T = P^T Z
      float ds[kRowsB / 8][4];
      Math::template scores<kRowsB, kHead>(ds, v_s + warp * 16 * kStride, BOperand<T>{do_s, do_s, kRowsB}, lane,
                                           nullptr);
#pragma unroll
      for (int n = 0; n < kRowsB / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int rr = 8 * n + 2 * t + (e & 1);
          float z = 1.0f;
          if (a.dropout_p > 0) {
            const uint32_t j = static_cast<uint32_t>(e < 2 ? key_lo : key_hi);
            z = dropout_keep(key, p_drop, j, static_cast<uint32_t>(i0 + rr), static_cast<uint32_t>(plane)) ? inv_keep
                                                                                                            : 0.0f;
          }
          ds[n][e] = p[n][e] * (ds[n][e] * z - delta_s[rr]);
          p[n][e] *= z;
        }
      }
      float* p_warp = p_s + warp * 16 * C::kPStrideB;
      // B = dout [rows, columns kCol0..] and q [rows, columns kCol0..]; as wgmma core tiles, their
      // transposes from n-group kCol0 / 8 on
      Math::template accumulate<kRowsB, kCols>(dv, p, BOperand<T>{do_s + kCol0, dot_s + core_offset(kCol0, 0, kHead), kHead},
                                               lane, p_warp);
      Math::template accumulate<kRowsB, kCols>(dk, ds, BOperand<T>{q_s + kCol0, qt_s + core_offset(kCol0, 0, kHead), kHead},
                                               lane, p_warp);
    }
  }

  // dk = scale * sum dS^T q, dv = sum P~^T dout: rows key_lo, key_hi of this lane.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t j = r == 0 ? key_lo : key_hi;
    if (j >= a.seq_k) continue;
    const int64_t key_row = (b * a.heads_k + kvh) * a.seq_k + j;
#pragma unroll
    for (int n = 0; n < kCols / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t col = kCol0 + 8 * n + 2 * t + e;
        if (col < a.head_dim_v) a.dv[key_row * a.head_dim_v + col] = from_acc<T>(dv[n][2 * r + e]);
        if (col < a.head_dim) a.dk[key_row * a.head_dim + col] = from_acc<T>(dk[n][2 * r + e] * float(a.scale));
      }
    }
  }
}

// dQ: grid (row blocks, B * Hk) over stacked rows, as the forward; S = q k^T, dP = dout v^T,
// dS = P (dP Z - delta), dQ += dS k over every key block the rows see. 16-bit data: delta comes
// from a first sweep over the same key blocks, and is written for the dK/dV kernel.
template <typename T, int kHead>
__global__ void __launch_bounds__(kThreads, 1) attention_dq_kernel(const AttentionBackwardArgs<T> a,
                                                                const BackwardPlan plan) {
  using C = Tiles<T, kHead>;
  using Math = MathFor<T, kHead>;
  constexpr int kKeys = C::kKeys, kStride = C::kStride;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  constexpr bool kCore = kUseWgmma<T>;
  constexpr int kKeyTile = kCore ? kKeys * kHead : kKeys * kStride;  // elements of one key tile
  T* q_s = reinterpret_cast<T*>(shared_bytes);   // [64, kStride]: the block's query rows (A operand)
  T* do_s = q_s + kBlockRows * kStride;          // [64, kStride]: their output gradients (A operand)
  T* k_s = do_s + kBlockRows * kStride;          // keys of this step: [kKeys, kStride], or wgmma:
                                                 //   core tile n = key, k = head dim
  T* v_s = k_s + kKeyTile;                       // values of this step, the same way
  T* kt_s = v_s + kKeyTile;                      // wgmma only: core tile n = head dim, k = key
  float* p_s = reinterpret_cast<float*>(v_s + kKeyTile);  // fp32 path: [4 warps, 16, kPStride]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t block = blockIdx.x, bh = blockIdx.y;
  const int64_t b = bh / a.heads_k, kvh = bh % a.heads_k;
  const int64_t s0 = block * kBlockRows;
  LaneRow rows[2];
  rows[0] = lane_row(a, b, kvh, s0 + warp * 16 + g, plan.stacked, plan.group, a.seq_k, 0);
  rows[1] = lane_row(a, b, kvh, s0 + warp * 16 + g + 8, plan.stacked, plan.group, a.seq_k, 0);
  float lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float value = rows[r].index >= 0 ? a.lse[rows[r].index] : neg_inf();
    lse[r] = value == neg_inf() ? -neg_inf() : value;  // +inf: probabilities e^(s - lse) = 0
  }
  auto row_pointer = [&](int r, const T* base, int64_t stride_h, int64_t stride_s) -> const T* {
    const int64_t s = s0 + r;
    if (s >= plan.stacked) return nullptr;
    const int64_t i = s / plan.group, h = kvh * plan.group + s % plan.group;
    return base + h * stride_h + i * stride_s;
  };
  load_tile<T, kHead, kStride>(q_s, kBlockRows, int(a.head_dim), plan.q_vectors, [&](int r) {
    return row_pointer(r, a.q + b * a.q_stride_b, a.q_stride_h, a.q_stride_s);
  });
  load_tile<T, kHead, kStride>(do_s, kBlockRows, int(a.head_dim_v), plan.dout_vectors, [&](int r) {
    return row_pointer(r, a.dout + b * a.heads_q * a.seq_q * a.head_dim_v, a.seq_q * a.head_dim_v, a.head_dim_v);
  });

  const PhiloxKey key = philox_key(a.seed);
  const float p_drop = static_cast<float>(a.dropout_p);
  const float inv_keep = static_cast<float>(1.0 / (1.0 - a.dropout_p));
  const T* k_head = a.k + b * a.k_stride_b + kvh * a.k_stride_h;
  const T* v_head = a.v + b * a.v_stride_b + kvh * a.v_stride_h;
  const int64_t last_row = min64(plan.stacked, s0 + kBlockRows) - 1;
  const int64_t key_end = attention_key_limit(last_row / plan.group, a.causal, 0, a.seq_k);

  // P = e^(q k^T scaled and masked - lse) into s and dP Z = (dout v^T) Z into dp: this warp's 16 rows
  // against keys [j0, j0 + kKeys), whose tiles k_s (kt_s) stay for dQ's product.
  auto block_scores = [&](int64_t j0, float (&s)[kKeys / 8][4], float (&dp)[kKeys / 8][4]) {
    const int valid = int(min64(kKeys, key_end - j0));
    __syncthreads();
    auto key_row = [&](int r) -> const T* { return r < valid ? k_head + (j0 + r) * a.k_stride_s : nullptr; };
    auto value_row = [&](int r) -> const T* { return r < valid ? v_head + (j0 + r) * a.v_stride_s : nullptr; };
    if constexpr (kCore) {
      for_each_chunk<T, kHead>(kKeys, int(a.head_dim), plan.k_vectors, key_row, [&](int r, int c, const Chunk<T>& x) {
        store_core(k_s, kKeys, r, c, x);
        store_core_transposed(kt_s, kHead, r, c, x);
      });
      for_each_chunk<T, kHead>(kKeys, int(a.head_dim_v), plan.v_vectors, value_row,
                               [&](int r, int c, const Chunk<T>& x) { store_core(v_s, kKeys, r, c, x); });
      async_proxy_fence();
    } else {
      load_tile<T, kHead, kStride>(k_s, kKeys, int(a.head_dim), plan.k_vectors, key_row);
      load_tile<T, kHead, kStride>(v_s, kKeys, int(a.head_dim_v), plan.v_vectors, value_row);
    }
    __syncthreads();
    Math::template scores<kKeys, kHead>(s, q_s + warp * 16 * kStride, BOperand<T>{k_s, k_s, kKeys}, lane, nullptr);
    probabilities<T, kKeys>(s, a, rows, j0, key_end, t, lse);
    Math::template scores<kKeys, kHead>(dp, do_s + warp * 16 * kStride, BOperand<T>{v_s, v_s, kKeys}, lane,
                                        nullptr);
    if (a.dropout_p > 0) apply_dropout<kKeys>(dp, rows, j0, t, key, p_drop, inv_keep);
  };

  float delta[2];
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int r = 0; r < 2; ++r) delta[r] = rows[r].index >= 0 ? a.delta[rows[r].index] : 0.0f;
  } else {
    // 16-bit data: delta = rowsum(P * dP Z) in a first sweep over the keys, stored for the dK/dV
    // kernel (launched after this one): rowsum(dout * out) with out as the forward accumulated
    // it, where the stored out is rounded to 8 (bf16) or 11 (fp16) bits and delta from it errs
    // by ~2^-9 |dout| |out| (bf16), which dS = P (dP Z - delta) does not survive where the
    // softmax is peaked (dP - delta cancels). The CPU and Triton backwards measured dq/dk at up
    // to 15x (cpu) and 38x (triton) the accuracy rule's allowance that way (attention sinks).
    delta[0] = delta[1] = 0.0f;
    for (int64_t j0 = 0; j0 < key_end; j0 += kKeys) {
      float s[kKeys / 8][4], dp[kKeys / 8][4];
      block_scores(j0, s, dp);
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) delta[e / 2] = fmaf(s[n][e], dp[n][e], delta[e / 2]);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // the row's columns are spread over the 4 lanes t of its quad
      delta[r] += __shfl_xor_sync(0xffffffffu, delta[r], 1);
      delta[r] += __shfl_xor_sync(0xffffffffu, delta[r], 2);
      if (t == 0 && rows[r].index >= 0) a.delta[rows[r].index] = delta[r];
    }
  }

  float dq[kHead / 8][4];
#pragma unroll
  for (int n = 0; n < kHead / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;
  for (int64_t j0 = 0; j0 < key_end; j0 += kKeys) {
    float s[kKeys / 8][4], dp[kKeys / 8][4];
    block_scores(j0, s, dp);
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[n][e] = s[n][e] * (dp[n][e] - delta[e / 2]);  // dS
    }
    Math::template accumulate<kKeys, kHead>(dq, dp, BOperand<T>{k_s, kt_s, kHead}, lane, p_s + warp * 16 * C::kPStride);
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r].index < 0) continue;
    T* out = a.dq + rows[r].index * a.head_dim;
#pragma unroll
    for (int n = 0; n < kHead / 8; ++n) {
      const int64_t col = 8 * n + 2 * t;
      if (col < a.head_dim) out[col] = from_acc<T>(dq[n][2 * r] * float(a.scale));
      if (col + 1 < a.head_dim) out[col + 1] = from_acc<T>(dq[n][2 * r + 1] * float(a.scale));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

template <typename T, int kHead>
void launch_backward(const AttentionBackwardArgs<T>& a, const BackwardPlan& plan, cudaStream_t stream) {
  // dQ first: with 16-bit data it writes the delta the dK/dV kernel reads
  if (a.seq_q > 0) {
    auto kernel = attention_dq_kernel<T, kHead>;
    constexpr int dq_bytes = dq_smem_bytes<T, kHead>();
    prepare_shared(kernel, dq_bytes);
    kernel<<<dim3(unsigned(plan.row_blocks), unsigned(a.batch * a.heads_k)), kThreads, dq_bytes, stream>>>(a, plan);
    check(cudaGetLastError(), "dq launch");
  }
  const dim3 dkdv_grid(unsigned((a.seq_k + kBlockRows - 1) / kBlockRows), unsigned(a.batch * a.heads_k));
  constexpr int dkdv_bytes = dkdv_smem_bytes<T, kHead>();
  if (a.seq_k > 0) {
    auto kernel = attention_dkdv_kernel<T, kHead, 0>;
    prepare_shared(kernel, dkdv_bytes);
    kernel<<<dkdv_grid, kThreads, dkdv_bytes, stream>>>(a, plan);
    check(cudaGetLastError(), "dk/dv launch");
    if constexpr (kHead > Tiles<T, kHead>::kCols) {
      auto second_half = attention_dkdv_kernel<T, kHead, 1>;
      prepare_shared(second_half, dkdv_bytes);
      second_half<<<dkdv_grid, kThreads, dkdv_bytes, stream>>>(a, plan);
      check(cudaGetLastError(), "dk/dv launch (second half of the columns)");
    }
  }
}

template <typename T>
void run_backward(const AttentionBackwardArgs<T>& a, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (a.batch * a.heads_k == 0) return;
  if (a.heads_k * a.batch > 65535) throw std::runtime_error("attention (CUDA): B * Hk must stay below 65536");
  if constexpr (std::is_same_v<T, float>) {  // 16-bit data: the dQ kernel computes delta
    const int64_t rows = a.batch * a.heads_q * a.seq_q;
    if (rows > 0) {
      attention_delta_kernel<T><<<unsigned((rows * 32 + 255) / 256), 256, 0, stream>>>(a);
      check(cudaGetLastError(), "delta launch");
    }
  }
  BackwardPlan plan{};
  plan.group = a.heads_q / a.heads_k;
  plan.stacked = plan.group * a.seq_q;
  plan.row_blocks = (plan.stacked + kBlockRows - 1) / kBlockRows;
  const int bytes = int(sizeof(T)), vec = 16 / bytes;
  plan.q_vectors = vector_rows(a.q, a.q_stride_s, a.head_dim, bytes) && a.q_stride_h % vec == 0 &&
                   a.q_stride_b % vec == 0;
  plan.k_vectors = vector_rows(a.k, a.k_stride_s, a.head_dim, bytes) && a.k_stride_h % vec == 0 &&
                   a.k_stride_b % vec == 0;
  plan.v_vectors = vector_rows(a.v, a.v_stride_s, a.head_dim_v, bytes) && a.v_stride_h % vec == 0 &&
                   a.v_stride_b % vec == 0;
  plan.dout_vectors = vector_rows(a.dout, a.head_dim_v, a.head_dim_v, bytes);
  switch (head_width(a.head_dim, a.head_dim_v)) {
    case 64: launch_backward<T, 64>(a, plan, stream); break;
    case 128: launch_backward<T, 128>(a, plan, stream); break;
    case 256:
      if constexpr (!std::is_same_v<T, float>) {
        launch_backward<T, 256>(a, plan, stream);
        break;
      }
      [[fallthrough]];
    default: throw std::runtime_error(std::string("attention (CUDA): head dims above ") + (std::is_same_v<T, float> ? "128 in float32" : "256"));
  }
}

}  // namespace attention_detail

template <typename T>
void attention_backward(const AttentionBackwardArgs<T>& args, void* stream) {
  if constexpr (std::is_same_v<T, double>) {
    throw std::runtime_error("attention (CUDA): float64 is not supported; use the cpu or reference backend");
  } else {
    attention_detail::run_backward(args, stream);
  }
}

#define INSTANTIATE(T) template void attention_backward<T>(const AttentionBackwardArgs<T>&, void*);
INSTANTIATE(float)
INSTANTIATE(double)
INSTANTIATE(half)
INSTANTIATE(bfloat16)
#undef INSTANTIATE

}  // namespace engine::cuda
