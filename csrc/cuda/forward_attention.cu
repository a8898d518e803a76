// CUDA softmax attention, flash-style: the forward (plain, and decode against a KV cache: split
// keys + merge), its launch and the entry points of cuda/attention.h for it. The shared device
// code (layout, products, tile loading) is in attention_kernels.cuh, the tensor-core wrappers in
// mma.cuh.
//
// Memory traffic (B batch, Hq/Hk heads, G = Hq / Hk, Sq/Sk lengths, D/Dv head dims): reads q once
// and k, v once per 64-row block of stacked query rows of their kv head (ceil(G * Sq / 64) passes,
// mostly from L2), writes out and lse once (split keys: plus [splits, rows, Dv + 2] fp32 partials
// written and read back once).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/attention.h"
#include "cuda/attention_kernels.cuh"

namespace engine::cuda {
namespace attention_detail {

// ---------------------------------------------------------------------------------------------
// Forward (and decode): grid (row blocks, B * Hk, splits); block = 4 warps, 64 stacked rows.

struct ForwardPlan {
  int64_t group, stacked, row_blocks, splits;
  int64_t keys_per_step;  // the kernel's kKeys (split ranges are whole steps)
  float* o_parts;         // [slots, splits, 64, Dv] unnormalized outputs (splits > 1), else nullptr
  float* m_parts;         // [slots, splits, 64] running maxima
  float* l_parts;         // [slots, splits, 64] running sums
  bool q_vectors, k_vectors, v_vectors;  // 16-byte loads allowed (see vector_rows)
};

template <typename T, int kHead>
__global__ void __launch_bounds__(kThreads, 1) attention_forward_kernel(const AttentionForwardArgs<T> a,
                                                                     const ForwardPlan plan) {
  using C = Tiles<T, kHead>;
  using Math = MathFor<T, kHead>;
  constexpr int kKeys = C::kKeys, kStride = C::kStride;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  constexpr bool kCore = kUseWgmma<T>;
  T* q_s = reinterpret_cast<T*>(shared_bytes);  // [64, kStride]: the block's query rows (A operand)
  T* k_s = q_s + kBlockRows * kStride;          // keys of this step: [kKeys, kStride], or wgmma:
                                                //   core tile n = key, k = head dim [kKeys x kHead]
  T* v_s = k_s + kKeys * kStride;               // values of this step: [kKeys, kStride], or wgmma:
                                                //   core tile n = head dim, k = key [kHead x kKeys]
  float* p_s = reinterpret_cast<float*>(v_s + kKeys * kStride);  // fp32 path: [4 warps, 16, kPStride]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t block = blockIdx.x, bh = blockIdx.y, split = blockIdx.z;
  const int64_t b = bh / a.heads_k, kvh = bh % a.heads_k;
  const int64_t s0 = block * kBlockRows;
  const int64_t key_length = attention_key_length(a.seqlens, b, a.seq_k);
  const int64_t offset = attention_causal_offset(a.seqlens, key_length, a.seq_q);

  // This split's keys, whole steps of kKeys; then only the keys some row of the block may see
  // (rows are i-major, so the block's last row has the largest limit).
  const int64_t steps = (key_length + kKeys - 1) / kKeys;
  const int64_t steps_per_split = (steps + plan.splits - 1) / plan.splits;
  const int64_t key_begin = min64(key_length, split * steps_per_split * kKeys);
  int64_t key_end = min64(key_length, (split + 1) * steps_per_split * kKeys);
  const int64_t last_row = min64(plan.stacked, s0 + kBlockRows) - 1;
  key_end = min64(key_end, attention_key_limit(last_row / plan.group, a.causal, offset, key_length));

  LaneRow rows[2];
  rows[0] = lane_row(a, b, kvh, s0 + warp * 16 + g, plan.stacked, plan.group, key_length, offset);
  rows[1] = lane_row(a, b, kvh, s0 + warp * 16 + g + 8, plan.stacked, plan.group, key_length, offset);

  load_tile<T, kHead, kStride>(q_s, kBlockRows, int(a.head_dim), plan.q_vectors, [&](int r) -> const T* {
    const int64_t s = s0 + r;
    if (s >= plan.stacked) return nullptr;
    const int64_t i = s / plan.group, h = kvh * plan.group + s % plan.group;
    return a.q + b * a.q_stride_b + h * a.q_stride_h + i * a.q_stride_s;
  });

  float o[kHead / 8][4];
#pragma unroll
  for (int n = 0; n < kHead / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {neg_inf(), neg_inf()};
  float l[2] = {0.0f, 0.0f};  // this lane's share of each row's sum (its columns only)
  const PhiloxKey key = philox_key(a.seed);
  const float p_drop = static_cast<float>(a.dropout_p);
  const float inv_keep = static_cast<float>(1.0 / (1.0 - a.dropout_p));
  const T* k_head = a.k + b * a.k_stride_b + kvh * a.k_stride_h;
  const T* v_head = a.v + b * a.v_stride_b + kvh * a.v_stride_h;

  for (int64_t j0 = key_begin; j0 < key_end; j0 += kKeys) {
    const int valid = int(min64(kKeys, key_end - j0));
    __syncthreads();  // every warp is done with the previous k, v tiles
    auto key_row = [&](int r) -> const T* { return r < valid ? k_head + (j0 + r) * a.k_stride_s : nullptr; };
    auto value_row = [&](int r) -> const T* { return r < valid ? v_head + (j0 + r) * a.v_stride_s : nullptr; };
    if constexpr (kCore) {
      for_each_chunk<T, kHead>(kKeys, int(a.head_dim), plan.k_vectors, key_row,
                               [&](int r, int c, const Chunk<T>& x) { store_core(k_s, kKeys, r, c, x); });
      for_each_chunk<T, kHead>(kKeys, int(a.head_dim_v), plan.v_vectors, value_row,
                               [&](int r, int c, const Chunk<T>& x) { store_core_transposed(v_s, kHead, r, c, x); });
      async_proxy_fence();
    } else {
      load_tile<T, kHead, kStride>(k_s, kKeys, int(a.head_dim), plan.k_vectors, key_row);
      load_tile<T, kHead, kStride>(v_s, kKeys, int(a.head_dim_v), plan.v_vectors, value_row);
    }
    __syncthreads();  // tiles (and, on the first step, the q tile) are complete

    float s[kKeys / 8][4];
    Math::template scores<kKeys, kHead>(s, q_s + warp * 16 * kStride, BOperand<T>{k_s, k_s, kKeys}, lane, nullptr);
    scale_and_mask<kKeys>(s, a, rows, j0, key_end, t);

    // Online softmax per row: new max, rescale factor, probabilities in place, partial sums.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float block_max = neg_inf();
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) block_max = fmaxf(block_max, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      const float m_new = fmaxf(m[r], group_max(block_max));
      const float safe = attention_safe_max(m_new);
      const float alpha = exp_of<T>(m[r] - safe);
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) {
        s[n][2 * r] = exp_of<T>(s[n][2 * r] - safe);
        s[n][2 * r + 1] = exp_of<T>(s[n][2 * r + 1] - safe);
        sum += s[n][2 * r] + s[n][2 * r + 1];
      }
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
#pragma unroll
      for (int n = 0; n < kHead / 8; ++n) {
        o[n][2 * r] *= alpha;
        o[n][2 * r + 1] *= alpha;
      }
    }
    if (a.dropout_p > 0) apply_dropout<kKeys>(s, rows, j0, t, key, p_drop, inv_keep);
    Math::template accumulate<kKeys, kHead>(o, s, BOperand<T>{v_s, v_s, kHead}, lane, p_s + warp * 16 * C::kPStride);
  }

  // Finish: whole-row sums, then the output (or this split's partial result).
  const int64_t Dv = a.head_dim_v;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l_row = group_sum(l[r]);
    const LaneRow& row = rows[r];
    if (row.index < 0) continue;
    if (plan.splits > 1) {
      const int64_t slot = (bh * plan.row_blocks + block) * plan.splits + split;
      const int64_t local = warp * 16 + g + 8 * r;
      float* o_part = plan.o_parts + (slot * kBlockRows + local) * Dv;
#pragma unroll
      for (int n = 0; n < kHead / 8; ++n) {
        const int64_t col = 8 * n + 2 * t;
        if (col < Dv) o_part[col] = o[n][2 * r];
        if (col + 1 < Dv) o_part[col + 1] = o[n][2 * r + 1];
      }
      if (t == 0) {
        plan.m_parts[slot * kBlockRows + local] = m[r];
        plan.l_parts[slot * kBlockRows + local] = l_row;
      }
    } else {
      T* out = a.out + row.index * Dv;
#pragma unroll
      for (int n = 0; n < kHead / 8; ++n) {
        const int64_t col = 8 * n + 2 * t;
        if (col < Dv) out[col] = from_acc<T>(attention_normalize(o[n][2 * r], l_row));
        if (col + 1 < Dv) out[col + 1] = from_acc<T>(attention_normalize(o[n][2 * r + 1], l_row));
      }
      if (t == 0) a.lse[row.index] = attention_lse(m[r], l_row);
    }
  }
}

// Merges the splits of every row: one warp per row, lanes over the Dv columns.
template <typename T>
__global__ void __launch_bounds__(256) attention_merge_kernel(const AttentionForwardArgs<T> a, const ForwardPlan plan) {
  const int64_t warp_global = (int64_t(blockIdx.x) * 256 + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  const int64_t slots = a.batch * a.heads_k * plan.row_blocks;
  if (warp_global >= slots * kBlockRows) return;
  const int64_t slot = warp_global / kBlockRows, local = warp_global % kBlockRows;
  const int64_t bh = slot / plan.row_blocks, block = slot % plan.row_blocks;
  const int64_t b = bh / a.heads_k, kvh = bh % a.heads_k;
  const int64_t s = block * kBlockRows + local;
  if (s >= plan.stacked) return;
  const int64_t i = s / plan.group, h = kvh * plan.group + s % plan.group;
  const int64_t row_index = (b * a.heads_q + h) * a.seq_q + i;
  float m_total = neg_inf();
  for (int64_t p = 0; p < plan.splits; ++p)
    m_total = fmaxf(m_total, plan.m_parts[(slot * plan.splits + p) * kBlockRows + local]);
  float l_total = 0.0f;
  for (int64_t p = 0; p < plan.splits; ++p) {
    const int64_t part = (slot * plan.splits + p) * kBlockRows + local;
    l_total += attention_merge_weight(plan.m_parts[part], m_total) * plan.l_parts[part];
  }
  const int64_t Dv = a.head_dim_v;
  for (int64_t col = lane; col < Dv; col += 32) {
    float o = 0.0f;
    for (int64_t p = 0; p < plan.splits; ++p) {
      const int64_t part = (slot * plan.splits + p) * kBlockRows + local;
      const float weight = attention_merge_weight(plan.m_parts[part], m_total);
      if (weight != 0.0f) o += weight * plan.o_parts[part * Dv + col];
    }
    a.out[row_index * Dv + col] = from_acc<T>(attention_normalize(o, l_total));
  }
  if (lane == 0) a.lse[row_index] = attention_lse(m_total, l_total);
}

// The debug keep mask [B, Hq, Sq, Sk] of the whole problem (every element, masked or not).
template <typename T>
__global__ void __launch_bounds__(256) attention_dropout_mask_kernel(const AttentionForwardArgs<T> a) {
  const int64_t index = int64_t(blockIdx.x) * 256 + threadIdx.x;
  const int64_t total = a.batch * a.heads_q * a.seq_q * a.seq_k;
  if (index >= total) return;
  const int64_t j = index % a.seq_k, row = index / a.seq_k;
  const int64_t i = row % a.seq_q, plane = row / a.seq_q;
  a.dropout_mask[index] = dropout_keep(philox_key(a.seed), static_cast<float>(a.dropout_p), static_cast<uint32_t>(j),
                                       static_cast<uint32_t>(i), static_cast<uint32_t>(plane));
}

// ---------------------------------------------------------------------------------------------
// Host side

inline int device_sms() {
  int device = 0, sms = 1;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "multiprocessor count");
  return sms;
}

template <typename T>
int keys_per_step(int head) {
  return head == 64 ? Tiles<T, 64>::kKeys : head == 128 ? Tiles<T, 128>::kKeys : Tiles<T, 256>::kKeys;
}

// Splits of the keys (flash-decoding): when the row blocks cannot fill the device twice over,
// each block's keys are split into ranges of whole steps (at least two steps each).
template <typename T>
int64_t forward_splits(const AttentionForwardArgs<T>& a, int64_t row_blocks) {
  const int head = head_width(a.head_dim, a.head_dim_v);
  if (head == 0) return 1;
  const int64_t base = a.batch * a.heads_k * row_blocks;
  const int64_t steps = (a.seq_k + keys_per_step<T>(head) - 1) / keys_per_step<T>(head);
  const int64_t target = 2 * int64_t(device_sms());
  if (base >= target || steps < 4) return 1;
  const int64_t splits = (target + base - 1) / base;
  return splits < steps / 2 ? splits : steps / 2;
}

template <typename T>
ForwardPlan forward_plan(const AttentionForwardArgs<T>& a, void* workspace) {
  ForwardPlan plan{};
  plan.group = a.heads_q / a.heads_k;
  plan.stacked = plan.group * a.seq_q;
  plan.row_blocks = (plan.stacked + kBlockRows - 1) / kBlockRows;
  plan.splits = forward_splits(a, plan.row_blocks);
  plan.keys_per_step = keys_per_step<T>(head_width(a.head_dim, a.head_dim_v));
  if (plan.splits > 1) {
    const int64_t parts = a.batch * a.heads_k * plan.row_blocks * plan.splits * kBlockRows;
    plan.o_parts = static_cast<float*>(workspace);
    plan.m_parts = plan.o_parts + parts * a.head_dim_v;
    plan.l_parts = plan.m_parts + parts;
  }
  const int bytes = int(sizeof(T));
  plan.q_vectors = vector_rows(a.q, a.q_stride_s, a.head_dim, bytes) && a.q_stride_h % (16 / bytes) == 0 &&
                   a.q_stride_b % (16 / bytes) == 0;
  plan.k_vectors = vector_rows(a.k, a.k_stride_s, a.head_dim, bytes) && a.k_stride_h % (16 / bytes) == 0 &&
                   a.k_stride_b % (16 / bytes) == 0;
  plan.v_vectors = vector_rows(a.v, a.v_stride_s, a.head_dim_v, bytes) && a.v_stride_h % (16 / bytes) == 0 &&
                   a.v_stride_b % (16 / bytes) == 0;
  return plan;
}

template <typename T, int kHead>
void launch_forward(const AttentionForwardArgs<T>& a, const ForwardPlan& plan, cudaStream_t stream) {
  auto kernel = attention_forward_kernel<T, kHead>;
  constexpr int bytes = forward_smem_bytes<T, kHead>();
  prepare_shared(kernel, bytes);
  const dim3 grid(unsigned(plan.row_blocks), unsigned(a.batch * a.heads_k), unsigned(plan.splits));
  kernel<<<grid, kThreads, bytes, stream>>>(a, plan);
  check(cudaGetLastError(), "forward launch");
}

template <typename T>
void run_forward(const AttentionForwardArgs<T>& a, void* workspace, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (a.dropout_mask != nullptr && a.dropout_p > 0) {
    const int64_t total = a.batch * a.heads_q * a.seq_q * a.seq_k;
    if (total > 0) {
      attention_dropout_mask_kernel<T><<<unsigned((total + 255) / 256), 256, 0, stream>>>(a);
      check(cudaGetLastError(), "dropout mask launch");
    }
  }
  if (a.batch * a.heads_q * a.seq_q == 0) return;
  if (a.heads_k * a.batch > 65535) throw std::runtime_error("attention (CUDA): B * Hk must stay below 65536");
  const ForwardPlan plan = forward_plan(a, workspace);
  switch (head_width(a.head_dim, a.head_dim_v)) {
    case 64: launch_forward<T, 64>(a, plan, stream); break;
    case 128: launch_forward<T, 128>(a, plan, stream); break;
    case 256:
      if constexpr (!std::is_same_v<T, float>) {
        launch_forward<T, 256>(a, plan, stream);
        break;
      }
      [[fallthrough]];
    default: throw std::runtime_error(std::string("attention (CUDA): head dims above ") + (std::is_same_v<T, float> ? "128 in float32" : "256"));
  }
  if (plan.splits > 1) {
    const int64_t warps = a.batch * a.heads_k * plan.row_blocks * kBlockRows;
    attention_merge_kernel<T><<<unsigned((warps * 32 + 255) / 256), 256, 0, stream>>>(a, plan);
    check(cudaGetLastError(), "merge launch");
  }
}

}  // namespace attention_detail

template <typename T>
int64_t attention_forward_workspace_bytes(const AttentionForwardArgs<T>& a) {
  using namespace attention_detail;
  if (a.batch * a.heads_q * a.seq_q == 0 || head_width(a.head_dim, a.head_dim_v) == 0) return 1;
  const int64_t group = a.heads_q / a.heads_k;
  const int64_t row_blocks = (group * a.seq_q + kBlockRows - 1) / kBlockRows;
  const int64_t splits = forward_splits(a, row_blocks);
  if (splits <= 1) return 1;
  const int64_t parts = a.batch * a.heads_k * row_blocks * splits * kBlockRows;
  return parts * (a.head_dim_v + 2) * int64_t(sizeof(float));
}

template <typename T>
void attention_forward(const AttentionForwardArgs<T>& args, void* workspace, void* stream) {
  if constexpr (std::is_same_v<T, double>) {
    throw std::runtime_error("attention (CUDA): float64 is not supported; use the cpu or reference backend");
  } else {
    attention_detail::run_forward(args, workspace, stream);
  }
}

#define INSTANTIATE(T)                                                                           \
  template int64_t attention_forward_workspace_bytes<T>(const AttentionForwardArgs<T>&);          \
  template void attention_forward<T>(const AttentionForwardArgs<T>&, void*, void*);
INSTANTIATE(float)
INSTANTIATE(double)
INSTANTIATE(half)
INSTANTIATE(bfloat16)
#undef INSTANTIATE

}  // namespace engine::cuda
