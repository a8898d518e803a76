// The device code shared by the CUDA attention units (forward_attention.cu, backward_attention.cu):
// tile shapes and shared-memory sizes, the two products in their three implementations, tile
// loading, the per-row score / dropout helpers, and the host helpers of both launches. Math and
// argument structs in csrc/common/attention.h, dropout stream in csrc/common/philox.h.
//
// Work layout (the CPU kernels use the same): query rows of one (batch, kv head) are "stacked",
// row s = query i = s / G of head (kv head) * G + s % G, so one 64-row block holds every head of a
// GQA group and shares its k/v tiles. A block is 4 warps; warp w owns rows [16 w, 16 w + 16) of the
// block, and every per-element quantity (scores, probabilities, output) lives in registers in the
// accumulator layout of mma.m16n8k16: for the 8-column tile n of a warp's 16 x N block, lane
// (g = lane / 4, t = lane % 4) holds rows g and g + 8, columns 8 n + 2 t and 8 n + 2 t + 1.
// Three implementations of the two products (scores A B^T and accumulation P B) share everything
// else:
//   fp16 / bf16, sm_80+:  warp-level tensor cores (mma.sync m16n8k16, operands from shared memory
//                         by ldmatrix; the probabilities go from the accumulators straight into A
//                         fragments);
//   fp16 / bf16, sm_90a:  warpgroup tensor cores (wgmma m64nNk16: the 4 warps are one warpgroup;
//                         A from registers as above, B from shared memory tiles stored in the
//                         no-swizzle K-major core-matrix layout and addressed by descriptors). The
//                         accumulator layout of wgmma is the mma.sync one, warp w owning rows
//                         16 w..16 w + 15, so the rest of the kernels is unchanged;
//   fp32:                 plain FMAs over shared memory (tensor cores would round to tf32).
// Head dims D, Dv <= kHead in {64, 128, 256}: tiles are zero-padded to kHead columns.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/attention.h"
#include "common/philox.h"
#include "cuda/convert.cuh"
#include "cuda/mma.cuh"

namespace engine::cuda::attention_detail {

constexpr int kWarps = 4;               // warps per block of the tile kernels
constexpr int kThreads = 32 * kWarps;   // 128
constexpr int kBlockRows = 16 * kWarps; // query rows (forward, dQ) or keys (dK/dV) per block

// ---------------------------------------------------------------------------------------------
// Tile shapes. kKeys: keys per step of the forward / dQ loops; kRowsB: query rows per step of the
// dK/dV loop; kStride: shared-memory row stride in elements (rows padded by 16 bytes so that the
// 8 rows an ldmatrix (or an FMA loop) reads at once fall in different banks).

template <typename T, int kHead>
struct Tiles {
  static constexpr bool kTensorCores = !std::is_same_v<T, float>;
  static constexpr int kPad = 16 / int(sizeof(T));
  static constexpr int kStride = kHead + kPad;
  static constexpr int kKeys = kTensorCores ? (kHead <= 128 ? 64 : 32) : 32;
  static constexpr int kRowsB = 32;
  // dK and dV accumulate in registers, 2 x kCols / 2 per thread: up to 128 columns at once; a
  // 256-wide head runs the dK/dV kernel once per 128-column half (recomputing S and dP).
  static constexpr int kCols = kHead < 128 ? kHead : 128;
  static constexpr int kPStride = kKeys + 4;     // fp32 probabilities staged per warp (FMA path)
  static constexpr int kPStrideB = kRowsB + 4;
};

// Whether the compiled device code uses warpgroup MMA for T (see ATTENTION_WGMMA).
template <typename T>
constexpr bool kUseWgmma = ATTENTION_WGMMA && !std::is_same_v<T, float>;

// Shared memory of each kernel, in bytes (dynamic: chosen with the kernel): the larger of the
// mma.sync / FMA layout (padded row-major tiles) and the wgmma layout (row-major A tiles plus
// core-matrix B tiles), since the host does not know which one the device code uses.
template <typename T, int kHead>
constexpr int forward_smem_bytes() {
  using C = Tiles<T, kHead>;
  // q [64, kStride]; then k, v [kKeys, kStride] (or k, v^T as core tiles of kKeys x kHead)
  int bytes = (kBlockRows + 2 * C::kKeys) * C::kStride * int(sizeof(T));
  if (!C::kTensorCores) bytes += kWarps * 16 * C::kPStride * 4;          // per-warp probabilities
  return bytes;
}

template <typename T, int kHead>
constexpr int dkdv_smem_bytes() {
  using C = Tiles<T, kHead>;
  // k, v [64, kStride]; then q, dout [kRowsB, kStride] (or q, dout, q^T, dout^T core tiles)
  const int rows_tiles = 2 * C::kRowsB * C::kStride > 4 * C::kRowsB * kHead ? 2 * C::kRowsB * C::kStride
                                                                             : 4 * C::kRowsB * kHead;
  int bytes = (2 * kBlockRows * C::kStride + rows_tiles) * int(sizeof(T));
  bytes += 2 * C::kRowsB * 4;                                                 // lse, delta
  if (!C::kTensorCores) bytes += kWarps * 16 * C::kPStrideB * 4;              // per-warp P / dS
  return bytes;
}

template <typename T, int kHead>
constexpr int dq_smem_bytes() {
  using C = Tiles<T, kHead>;
  // q, dout [64, kStride]; then k, v [kKeys, kStride] (or k, v, k^T core tiles)
  const int key_tiles = 2 * C::kKeys * C::kStride > 3 * C::kKeys * kHead ? 2 * C::kKeys * C::kStride
                                                                          : 3 * C::kKeys * kHead;
  int bytes = (2 * kBlockRows * C::kStride + key_tiles) * int(sizeof(T));
  if (!C::kTensorCores) bytes += kWarps * 16 * C::kPStride * 4;
  return bytes;
}

// ---------------------------------------------------------------------------------------------
// Small device helpers

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

__host__ __device__ __forceinline__ int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }

// e^x; fp16/bf16 results use the hardware exp2 (a few ulp, far below their rounding), fp32
// results the accurate expf.
template <typename T>
__device__ __forceinline__ float exp_of(float x) {
  if constexpr (std::is_same_v<T, float>)
    return expf(x);
  else
    return exp2f(x * float(kAttentionLog2e));
}

template <typename T>
__device__ __forceinline__ T zero_value() {
  if constexpr (std::is_same_v<T, float>)
    return 0.0f;
  else
    return T{0};
}

// ---------------------------------------------------------------------------------------------
// The products. Results stay in the accumulator layout (see the file comment); A is read from a
// row-major shared-memory tile of row stride kStride (this warp's 16 rows); B is a BOperand:
//
// scores:     S [16, kN]  = A [16, kK] . B [kN, kK]^T   (q k^T, dout v^T, k q^T, v dout^T)
// accumulate: C [16, kN] += P [16, kK] . B [kK, kN]     (P: accumulator-layout registers;
//                                                        P v, P^T dout, dS^T q, dS k)

template <typename T>
struct BOperand {
  const T* plain;  // row-major tile, row stride kStride: rows = B's rows (scores: kN, accumulate: kK)
  const T* core;   // wgmma: the core-matrix tile with B's output columns as n (scores: B's rows,
                   // accumulate: B's columns) and its reduced index as k
  int core_n;      // the n extent of that tile (its leading dimension byte offset is 16 core_n)
};

template <typename T, int kStride>
struct TensorCoreMath {
  template <int kN, int kK>
  __device__ __forceinline__ static void scores(float (&s)[kN / 8][4], const T* a_s, BOperand<T> b, int lane,
                                                float* /*p_s: unused*/) {
    static_assert(kN % 16 == 0 && kK % 16 == 0, "tiles of 16");
#pragma unroll
    for (int n = 0; n < kN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
    const int id = lane / 8;  // which of the four 8 x 8 matrices this lane addresses
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk) {
      uint32_t a[4];  // rows 0-7 / 8-15 x columns 0-7 / 8-15 of this 16 x 16 slice of A
      ldmatrix_x4(a, a_s + (lane % 16) * kStride + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int n = 0; n < kN / 8; n += 2) {
        uint32_t bf[4];  // B rows (= output columns) of tiles n, n + 1 x the 16 columns of kk
        ldmatrix_x4(bf, b.plain + ((n + id / 2) * 8 + lane % 8) * kStride + kk * 16 + (id % 2) * 8);
        mma_16816<T>(s[n], a, bf[0], bf[1]);
        mma_16816<T>(s[n + 1], a, bf[2], bf[3]);
      }
    }
  }

  template <int kK, int kN>
  __device__ __forceinline__ static void accumulate(float (&c)[kN / 8][4], const float (&p)[kK / 8][4],
                                                    BOperand<T> b, int lane, float* /*p_s: unused*/) {
    static_assert(kN % 16 == 0 && kK % 16 == 0, "tiles of 16");
    const int id = lane / 8;
#pragma unroll
    for (int kc = 0; kc < kK / 16; ++kc) {
      // the accumulator layout of two adjacent 8-column tiles is the A layout of one 16-wide slice
      const uint32_t a[4] = {pack_pair<T>(p[2 * kc][0], p[2 * kc][1]), pack_pair<T>(p[2 * kc][2], p[2 * kc][3]),
                             pack_pair<T>(p[2 * kc + 1][0], p[2 * kc + 1][1]),
                             pack_pair<T>(p[2 * kc + 1][2], p[2 * kc + 1][3])};
#pragma unroll
      for (int n = 0; n < kN / 8; n += 2) {
        uint32_t bf[4];  // B rows kc * 16 + 0-7 / 8-15 x columns of tiles n, n + 1, transposed
        ldmatrix_x4_trans(bf, b.plain + (kc * 16 + (id % 2) * 8 + lane % 8) * kStride + (n + id / 2) * 8);
        mma_16816<T>(c[n], a, bf[0], bf[1]);
        mma_16816<T>(c[n + 1], a, bf[2], bf[3]);
      }
    }
  }
};

#if ATTENTION_WGMMA
// sm_90a: the block's 4 warps run each product as one warpgroup MMA per 16-wide k slice. Every
// wgmma is waited for before its A registers are rewritten (the compiler does not know the MMA
// is asynchronous, so nothing it owns may be in flight across instructions it schedules).
template <typename T, int kStride>
struct WgmmaMath {
  template <int kN, int kK>
  __device__ __forceinline__ static void scores(float (&s)[kN / 8][4], const T* a_s, BOperand<T> b, int lane,
                                                float* /*p_s: unused*/) {
    static_assert(kN % 16 == 0 && kK % 16 == 0, "tiles of 16");
#pragma unroll
    for (int n = 0; n < kN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, a_s + (lane % 16) * kStride + kk * 16 + (lane / 16) * 8);
      wgmma_fence();
      wgmma_m64k16<T, kN>(s, a, core_descriptor(b.core, b.core_n, kk * 16));
      wgmma_commit_and_wait();
    }
  }

  template <int kK, int kN>
  __device__ __forceinline__ static void accumulate(float (&c)[kN / 8][4], const float (&p)[kK / 8][4],
                                                    BOperand<T> b, int /*lane*/, float* /*p_s: unused*/) {
    static_assert(kN % 16 == 0 && kK % 16 == 0, "tiles of 16");
#pragma unroll
    for (int kc = 0; kc < kK / 16; ++kc) {
      const uint32_t a[4] = {pack_pair<T>(p[2 * kc][0], p[2 * kc][1]), pack_pair<T>(p[2 * kc][2], p[2 * kc][3]),
                             pack_pair<T>(p[2 * kc + 1][0], p[2 * kc + 1][1]),
                             pack_pair<T>(p[2 * kc + 1][2], p[2 * kc + 1][3])};
      wgmma_fence();
      wgmma_m64k16<T, kN>(c, a, core_descriptor(b.core, b.core_n, kc * 16));
      wgmma_commit_and_wait();
    }
  }
};
#endif

// fp32: the same products with FMAs. Lane (g, t) reads rows g, g + 8 of A and rows 8 n + 2 t,
// 8 n + 2 t + 1 of B; the four lanes of a group read the same A words (broadcast), and with the
// padded stride the B rows of the four t values fall in distinct banks. `accumulate` stages P
// through the warp's [16, kK + 4] slice of shared memory (p_s), since each lane needs whole rows.
template <int kStride>
struct FmaMath {
  template <int kN, int kK>
  __device__ __forceinline__ static void scores(float (&s)[kN / 8][4], const float* a_s, BOperand<float> b,
                                                int lane, float* /*p_s: unused*/) {
    const int g = lane / 4, t = lane % 4;
    const float* b_s = b.plain;
#pragma unroll
    for (int n = 0; n < kN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
    const float* a0 = a_s + g * kStride;
    const float* a1 = a_s + (g + 8) * kStride;
#pragma unroll 4
    for (int k = 0; k < kK; ++k) {
      const float x0 = a0[k], x1 = a1[k];
#pragma unroll
      for (int n = 0; n < kN / 8; ++n) {
        const float y0 = b_s[(8 * n + 2 * t) * kStride + k];
        const float y1 = b_s[(8 * n + 2 * t + 1) * kStride + k];
        s[n][0] = fmaf(x0, y0, s[n][0]);
        s[n][1] = fmaf(x0, y1, s[n][1]);
        s[n][2] = fmaf(x1, y0, s[n][2]);
        s[n][3] = fmaf(x1, y1, s[n][3]);
      }
    }
  }

  template <int kK, int kN>
  __device__ __forceinline__ static void accumulate(float (&c)[kN / 8][4], const float (&p)[kK / 8][4],
                                                    BOperand<float> b, int lane, float* p_s) {
    constexpr int kP = kK + 4;  // row stride of the staged probabilities
    const int g = lane / 4, t = lane % 4;
    __syncwarp();  // the previous call's reads of p_s are done
#pragma unroll
    for (int n = 0; n < kK / 8; ++n) {
      p_s[g * kP + 8 * n + 2 * t] = p[n][0];
      p_s[g * kP + 8 * n + 2 * t + 1] = p[n][1];
      p_s[(g + 8) * kP + 8 * n + 2 * t] = p[n][2];
      p_s[(g + 8) * kP + 8 * n + 2 * t + 1] = p[n][3];
    }
    __syncwarp();
#pragma unroll 4
    for (int k = 0; k < kK; ++k) {
      const float x0 = p_s[g * kP + k], x1 = p_s[(g + 8) * kP + k];
      const float* b_row = b.plain + k * kStride + 2 * t;
#pragma unroll
      for (int n = 0; n < kN / 8; ++n) {
        const float2 y = *reinterpret_cast<const float2*>(b_row + 8 * n);
        c[n][0] = fmaf(x0, y.x, c[n][0]);
        c[n][1] = fmaf(x0, y.y, c[n][1]);
        c[n][2] = fmaf(x1, y.x, c[n][2]);
        c[n][3] = fmaf(x1, y.y, c[n][3]);
      }
    }
  }
};

#if ATTENTION_WGMMA
template <typename T, int kHead>
using TensorMath = WgmmaMath<T, Tiles<T, kHead>::kStride>;
#else
template <typename T, int kHead>
using TensorMath = TensorCoreMath<T, Tiles<T, kHead>::kStride>;
#endif

template <typename T, int kHead>
using MathFor = std::conditional_t<Tiles<T, kHead>::kTensorCores, TensorMath<T, kHead>,
                                   FmaMath<Tiles<T, kHead>::kStride>>;

// ---------------------------------------------------------------------------------------------
// Loading tiles. for_each_chunk reads `rows` rows of kHead columns (row r from row_ptr(r), nullptr
// for a padding row of zeros; columns >= cols are zeros) in 16-byte chunks, with 16-byte loads
// when `vectors` (every row start 16-byte aligned, cols a multiple of the chunk), and hands each
// chunk (row r, first column c) to one of the stores below.

template <typename T>
union Chunk {
  uint4 bits;
  T v[16 / sizeof(T)];
};

template <typename T, int kHead, typename RowPtr, typename Store>
__device__ __forceinline__ void for_each_chunk(int rows, int cols, bool vectors, RowPtr row_ptr, Store store) {
  constexpr int kVec = 16 / int(sizeof(T));
  constexpr int kChunks = kHead / kVec;  // chunks per tile row
  for (int index = threadIdx.x; index < rows * kChunks; index += kThreads) {
    const int r = index / kChunks;
    const int c = (index % kChunks) * kVec;
    const T* src = row_ptr(r);
    Chunk<T> chunk;
    if (src != nullptr && vectors && c + kVec <= cols) {
      chunk.bits = *reinterpret_cast<const uint4*>(src + c);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) chunk.v[e] = (src != nullptr && c + e < cols) ? src[c + e] : zero_value<T>();
    }
    store(r, c, chunk);
  }
}

// A padded row-major tile (row stride kStride): element (r, c) at r * kStride + c.
template <typename T, int kStride>
__device__ __forceinline__ void store_plain(T* tile, int r, int c, const Chunk<T>& chunk) {
  *reinterpret_cast<uint4*>(tile + r * kStride + c) = chunk.bits;
}

template <typename T, int kHead, int kStride, typename RowPtr>
__device__ __forceinline__ void load_tile(T* dst, int rows, int cols, bool vectors, RowPtr row_ptr) {
  for_each_chunk<T, kHead>(rows, cols, vectors, row_ptr,
                           [&](int r, int c, const Chunk<T>& chunk) { store_plain<T, kStride>(dst, r, c, chunk); });
}

// A core-matrix tile with the rows as n (N of them) and the columns as k: one 16-byte row of a
// core matrix per chunk.
template <typename T>
__device__ __forceinline__ void store_core(T* tile, int N, int r, int c, const Chunk<T>& chunk) {
  *reinterpret_cast<uint4*>(tile + core_offset(r, c, N)) = chunk.bits;
}

// A core-matrix tile with the columns as n (N of them) and the rows as k (the transpose).
template <typename T>
__device__ __forceinline__ void store_core_transposed(T* tile, int N, int r, int c, const Chunk<T>& chunk) {
#pragma unroll
  for (int e = 0; e < int(16 / sizeof(T)); ++e) tile[core_offset(c + e, r, N)] = chunk.v[e];
}

__host__ __device__ inline bool vector_rows(const void* base, int64_t row_stride, int64_t cols, int elem_bytes) {
  const int vec = 16 / elem_bytes;
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && row_stride % vec == 0 && cols % vec == 0;
}

// ---------------------------------------------------------------------------------------------
// Rows of the forward / dQ kernels. A lane holds two rows of its warp's 16 (g and g + 8).

struct LaneRow {
  int64_t index;        // (b * Hq + h) * Sq + i: the row of out, lse, dq; -1 for a padding row
  int64_t mask_offset;  // b * msb + h * msh + i * msq
  int64_t limit;        // keys [0, limit) pass causality and the key length (0 for padding)
  uint32_t pos;         // i (dropout counter c1)
  uint32_t plane;       // b * Hq + h (dropout counter c2)
};

template <typename Args>
__device__ __forceinline__ LaneRow lane_row(const Args& a, int64_t b, int64_t kvh, int64_t s, int64_t stacked,
                                            int64_t group, int64_t key_length, int64_t offset) {
  LaneRow row;
  if (s >= stacked) {
    row.index = -1;
    row.mask_offset = 0;
    row.limit = 0;
    row.pos = 0;
    row.plane = 0;
    return row;
  }
  const int64_t i = s / group, h = kvh * group + s % group;
  row.index = (b * a.heads_q + h) * a.seq_q + i;
  row.mask_offset = b * a.mask_stride_b + h * a.mask_stride_h + i * a.mask_stride_q;
  row.limit = attention_key_limit(i, a.causal, offset, key_length);
  row.pos = static_cast<uint32_t>(i);
  row.plane = static_cast<uint32_t>(b * a.heads_q + h);
  return row;
}

// Lane element (n, e) of the accumulator layout is row rows[e / 2], key j0 + 8 n + 2 t + (e & 1).
// Its score scaled, with a float mask added; `hidden` when the key is at or past `key_end` or the
// row's limit, or a bool mask is false there. A hidden key is set to -inf (forward) or its
// probability to 0 (backward), never s + -inf: a NaN score there would stay NaN.
template <typename Args>
__device__ __forceinline__ float masked_score(float s, const Args& a, const LaneRow& row, int64_t j, int64_t key_end,
                                              bool& hidden) {
  hidden = j >= key_end || j >= row.limit;
  float x = s * float(a.scale);
  if (!hidden && a.mask_kind != AttentionMaskKind::none) {
    const float bias = attention_mask_bias<float>(a.mask, a.mask_kind, row.mask_offset + j * a.mask_stride_k);
    if (a.mask_kind == AttentionMaskKind::boolean)
      hidden = bias != 0.0f;
    else
      x += bias;
  }
  return x;
}

// The forward's scores of a lane's tile elements, scaled and masked (hidden keys -inf).
template <int kN, typename Args>
__device__ __forceinline__ void scale_and_mask(float (&s)[kN / 8][4], const Args& a, const LaneRow (&rows)[2],
                                               int64_t j0, int64_t key_end, int t) {
#pragma unroll
  for (int n = 0; n < kN / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      bool hidden;
      const float x = masked_score(s[n][e], a, rows[e / 2], j0 + 8 * n + 2 * t + (e & 1), key_end, hidden);
      s[n][e] = hidden ? neg_inf() : x;
    }
  }
}

// The backward's probabilities P = e^(s - lse) in place of a lane's scores: 0 at hidden keys
// whatever the scores and the lse hold (a row whose lse is NaN is NaN at its visible keys only, as
// torch's rows with NaN; lse is +inf for a row without a visible key).
template <typename T, int kN, typename Args>
__device__ __forceinline__ void probabilities(float (&s)[kN / 8][4], const Args& a, const LaneRow (&rows)[2],
                                              int64_t j0, int64_t key_end, int t, const float (&lse)[2]) {
#pragma unroll
  for (int n = 0; n < kN / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      bool hidden;
      const float x = masked_score(s[n][e], a, rows[e / 2], j0 + 8 * n + 2 * t + (e & 1), key_end, hidden);
      s[n][e] = hidden ? 0.0f : exp_of<T>(x - lse[e / 2]);
    }
  }
}

// Dropout on a lane's probabilities: kept ones times 1 / (1 - p), the others 0.
template <int kN>
__device__ __forceinline__ void apply_dropout(float (&p)[kN / 8][4], const LaneRow (&rows)[2], int64_t j0, int t,
                                              PhiloxKey key, float p_drop, float inv_keep) {
#pragma unroll
  for (int n = 0; n < kN / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const LaneRow& row = rows[e / 2];
      const uint32_t j = static_cast<uint32_t>(j0 + 8 * n + 2 * t + (e & 1));
      p[n][e] = dropout_keep(key, p_drop, j, row.pos, row.plane) ? p[n][e] * inv_keep : 0.0f;
    }
  }
}

// Max and sum over the four lanes (t = 0..3) that share a row.
__device__ __forceinline__ float group_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float group_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---------------------------------------------------------------------------------------------
// Host helpers of the launches

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string("attention (CUDA): ") + what + ": " +
                                                      cudaGetErrorString(status));
}

// Sets the kernel's dynamic shared memory (above the 48 KB default needs an opt-in), after
// checking the device has that much.
template <typename Kernel>
void prepare_shared(Kernel kernel, int bytes) {
  int device = 0, limit = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "shared memory limit");
  if (bytes > limit)
    throw std::runtime_error("attention (CUDA): this head dim needs " + std::to_string(bytes) +
                             " bytes of shared memory per block; the device allows " + std::to_string(limit));
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), "shared memory opt-in");
}

// The padded head width of the kernels that serve head dims D, Dv (0: too wide).
inline int head_width(int64_t D, int64_t Dv) {
  const int64_t widest = D > Dv ? D : Dv;
  return widest <= 64 ? 64 : widest <= 128 ? 128 : widest <= 256 ? 256 : 0;
}

}  // namespace engine::cuda::attention_detail
