// CUDA softmax attention, flash-style: forward, decode (split keys + merge) and backward (math
// and argument structs in csrc/common/attention.h, dropout stream in csrc/common/philox.h).
//
// Memory traffic (B batch, Hq/Hk heads, G = Hq / Hk, Sq/Sk lengths, D/Dv head dims):
//   forward   reads q once and k, v once per 64-row block of stacked query rows of their kv head
//             (ceil(G * Sq / 64) passes, mostly from L2), writes out and lse once (split keys:
//             plus [splits, rows, Dv + 2] fp32 partials written and read back once);
//   backward  reads dout, out once (delta); the dK/dV kernel reads q, dout, lse, delta once per
//             64-key block and writes dk, dv once; the dQ kernel reads k, v once per 64-row block
//             and writes dq once. No atomics: every output element has one writer.
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
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/attention.h"
#include "common/philox.h"
#include "cuda/attention.h"
#include "cuda/convert.cuh"

// Warpgroup MMA is compiled for sm_90a only (wgmma exists there and not in plain sm_90 PTX); any
// other target (sm_80, a plain sm_90 build) uses mma.sync. Host code sizes shared memory for
// both layouts.
#if !defined(ATTENTION_WGMMA)
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ATTENTION_WGMMA 1
#else
#define ATTENTION_WGMMA 0
#endif
#endif

namespace engine::cuda {
namespace attention_detail {

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

// The wgmma B-operand layout ("core matrices", K-major, no swizzle): an [N, K] tile (N output
// columns, K the reduced dim) as 8 x 8 blocks of 128 contiguous bytes (8 n-rows of 8 k-elements),
// the N / 8 blocks of one k-group adjacent (stride dimension byte offset 128) and the k-groups
// 16 N bytes apart (leading dimension byte offset). Element offset of (n, k):
__host__ __device__ constexpr int core_offset(int n, int k, int N) {
  return (k / 8) * N * 8 + (n / 8) * 64 + (n % 8) * 8 + k % 8;
}

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

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Two floats as the packed 16-bit pair of an mma operand register (lo = lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  if constexpr (std::is_same_v<T, half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// D (+)= A B for one m16n8k16 tile: A 16 x 16 (4 registers), B 16 x 8 (2 registers), D fp32.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the tensor-core kernels are launched on sm_80+ only
#endif
}

// Four 8 x 8 matrices of 16-bit elements from shared memory; lane l gives the address of row
// l % 8 of matrix l / 8. `trans` delivers each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}

// Warpgroup MMA (sm_90a): D [64, N] (+)= A [64, 16] B [16, N], A from registers (warp w of the
// warpgroup supplies rows 16 w..16 w + 15 in the mma.sync A-fragment layout), B from shared memory
// through a descriptor, D in registers (warp w: rows 16 w.., the mma.sync accumulator layout per
// 8-column tile). The wrappers below are written out for N = 32, 64, 128, 256.
template <typename T, int N>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc);

#if ATTENTION_WGMMA
#define ATTN_D4(c) "+f"(d[c][0]), "+f"(d[c][1]), "+f"(d[c][2]), "+f"(d[c][3])
template <>
__device__ __forceinline__ void wgmma_m64k16<half, 32>(float (&d)[4][4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
      "{%16, %17, %18, %19}, %20, accumulate, 1, 1, 0;\n}\n"
      : ATTN_D4(0), ATTN_D4(1), ATTN_D4(2), ATTN_D4(3)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(1));
}

template <>
__device__ __forceinline__ void wgmma_m64k16<bfloat16, 32>(float (&d)[4][4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
      "{%16, %17, %18, %19}, %20, accumulate, 1, 1, 0;\n}\n"
      : ATTN_D4(0), ATTN_D4(1), ATTN_D4(2), ATTN_D4(3)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(1));
}

template <>
__device__ __forceinline__ void wgmma_m64k16<half, 64>(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, accumulate, 1, 1, 0;\n}\n"
      : ATTN_D4(0), ATTN_D4(1), ATTN_D4(2), ATTN_D4(3), ATTN_D4(4), ATTN_D4(5), ATTN_D4(6), ATTN_D4(7)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(1));
}

template <>
__device__ __forceinline__ void wgmma_m64k16<bfloat16, 64>(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, accumulate, 1, 1, 0;\n}\n"
      : ATTN_D4(0), ATTN_D4(1), ATTN_D4(2), ATTN_D4(3), ATTN_D4(4), ATTN_D4(5), ATTN_D4(6), ATTN_D4(7)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(1));
}

template <>
__device__ __forceinline__ void wgmma_m64k16<half, 128>(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, accumulate, 1, 1, 0;\n}\n"
      : ATTN_D4(0), ATTN_D4(1), ATTN_D4(2), ATTN_D4(3), ATTN_D4(4), ATTN_D4(5), ATTN_D4(6), ATTN_D4(7), ATTN_D4(8), ATTN_D4(9), ATTN_D4(10), ATTN_D4(11), ATTN_D4(12), ATTN_D4(13), ATTN_D4(14), ATTN_D4(15)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(1));
}

template <>
__device__ __forceinline__ void wgmma_m64k16<bfloat16, 128>(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, accumulate, 1, 1, 0;\n}\n"
      : ATTN_D4(0), ATTN_D4(1), ATTN_D4(2), ATTN_D4(3), ATTN_D4(4), ATTN_D4(5), ATTN_D4(6), ATTN_D4(7), ATTN_D4(8), ATTN_D4(9), ATTN_D4(10), ATTN_D4(11), ATTN_D4(12), ATTN_D4(13), ATTN_D4(14), ATTN_D4(15)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(1));
}

template <>
__device__ __forceinline__ void wgmma_m64k16<half, 256>(float (&d)[32][4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "{%128, %129, %130, %131}, %132, accumulate, 1, 1, 0;\n}\n"
      : ATTN_D4(0), ATTN_D4(1), ATTN_D4(2), ATTN_D4(3), ATTN_D4(4), ATTN_D4(5), ATTN_D4(6), ATTN_D4(7), ATTN_D4(8), ATTN_D4(9), ATTN_D4(10), ATTN_D4(11), ATTN_D4(12), ATTN_D4(13), ATTN_D4(14), ATTN_D4(15), ATTN_D4(16), ATTN_D4(17), ATTN_D4(18), ATTN_D4(19), ATTN_D4(20), ATTN_D4(21), ATTN_D4(22), ATTN_D4(23), ATTN_D4(24), ATTN_D4(25), ATTN_D4(26), ATTN_D4(27), ATTN_D4(28), ATTN_D4(29), ATTN_D4(30), ATTN_D4(31)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(1));
}

template <>
__device__ __forceinline__ void wgmma_m64k16<bfloat16, 256>(float (&d)[32][4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "{%128, %129, %130, %131}, %132, accumulate, 1, 1, 0;\n}\n"
      : ATTN_D4(0), ATTN_D4(1), ATTN_D4(2), ATTN_D4(3), ATTN_D4(4), ATTN_D4(5), ATTN_D4(6), ATTN_D4(7), ATTN_D4(8), ATTN_D4(9), ATTN_D4(10), ATTN_D4(11), ATTN_D4(12), ATTN_D4(13), ATTN_D4(14), ATTN_D4(15), ATTN_D4(16), ATTN_D4(17), ATTN_D4(18), ATTN_D4(19), ATTN_D4(20), ATTN_D4(21), ATTN_D4(22), ATTN_D4(23), ATTN_D4(24), ATTN_D4(25), ATTN_D4(26), ATTN_D4(27), ATTN_D4(28), ATTN_D4(29), ATTN_D4(30), ATTN_D4(31)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(1));
}
#undef ATTN_D4

// Orders earlier register writes (accumulators, A fragments) before the next wgmma.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

// Closes the issued wgmmas into a group and waits for it (and every earlier group) to finish.
__device__ __forceinline__ void wgmma_commit_and_wait() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
#endif

// Makes this thread's generic-proxy writes to shared memory visible to the async proxy (wgmma
// operand reads); the __syncthreads that follows makes every thread's visible.
__device__ __forceinline__ void async_proxy_fence() {
#if ATTENTION_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Descriptor of the core-matrix tile `tile` (N output columns) from reduced index k0 on.
__device__ __forceinline__ uint64_t core_descriptor(const void* tile, int N, int k0) {
  const uint32_t start = smem_address(tile) + uint32_t(k0 / 8) * uint32_t(N) * 16u;
  const uint32_t leading = uint32_t(N) * 16u;  // bytes between k-groups
  const uint32_t stride = 128u;                // bytes between n-groups
  return uint64_t((start & 0x3FFFFu) >> 4) | (uint64_t((leading & 0x3FFFFu) >> 4) << 16) |
         (uint64_t((stride & 0x3FFFFu) >> 4) << 32);
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

// The scores of a lane's tile elements, scaled and masked: element (n, e) of the accumulator
// layout is row rows[e / 2], key j0 + 8 n + 2 t + (e & 1); keys at or past `key_end` or the row's
// limit are -inf, and the mask is added (-inf where a bool mask is false).
template <int kN, typename Args>
__device__ __forceinline__ void scale_and_mask(float (&s)[kN / 8][4], const Args& a, const LaneRow (&rows)[2],
                                               int64_t j0, int64_t key_end, int t) {
#pragma unroll
  for (int n = 0; n < kN / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const LaneRow& row = rows[e / 2];
      const int64_t j = j0 + 8 * n + 2 * t + (e & 1);
      float x = s[n][e] * float(a.scale);
      if (j >= key_end || j >= row.limit) {
        x = neg_inf();
      } else if (a.mask_kind != AttentionMaskKind::none) {
        x += attention_mask_bias<float>(a.mask, a.mask_kind, row.mask_offset + j * a.mask_stride_k);
      }
      s[n][e] = x;
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
// Backward

struct BackwardPlan {
  int64_t group, stacked, row_blocks;
  bool q_vectors, k_vectors, v_vectors, dout_vectors;
};

// delta = rowsum(dout * out) in fp32: one warp per row.
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
          float x = p[n][e] * float(a.scale);
          if (rr >= rows_valid || j >= a.seq_k || j >= attention_key_limit(i, a.causal, 0, a.seq_k)) {
            x = neg_inf();
          } else if (a.mask_kind != AttentionMaskKind::none) {
            x += attention_mask_bias<float>(a.mask, a.mask_kind,
                                            b * a.mask_stride_b + h * a.mask_stride_h + i * a.mask_stride_q +
                                                j * a.mask_stride_k);
          }
          p[n][e] = exp_of<T>(x - lse_s[rr]);
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
// dS = P (dP Z - delta), dQ += dS k over every key block the rows see.
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
  float lse[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float value = rows[r].index >= 0 ? a.lse[rows[r].index] : neg_inf();
    lse[r] = value == neg_inf() ? -neg_inf() : value;  // +inf: probabilities e^(s - lse) = 0
    delta[r] = rows[r].index >= 0 ? a.delta[rows[r].index] : 0.0f;
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

  float dq[kHead / 8][4];
#pragma unroll
  for (int n = 0; n < kHead / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;
  const PhiloxKey key = philox_key(a.seed);
  const float p_drop = static_cast<float>(a.dropout_p);
  const float inv_keep = static_cast<float>(1.0 / (1.0 - a.dropout_p));
  const T* k_head = a.k + b * a.k_stride_b + kvh * a.k_stride_h;
  const T* v_head = a.v + b * a.v_stride_b + kvh * a.v_stride_h;
  const int64_t last_row = min64(plan.stacked, s0 + kBlockRows) - 1;
  const int64_t key_end = attention_key_limit(last_row / plan.group, a.causal, 0, a.seq_k);

  for (int64_t j0 = 0; j0 < key_end; j0 += kKeys) {
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

    float s[kKeys / 8][4], dp[kKeys / 8][4];
    Math::template scores<kKeys, kHead>(s, q_s + warp * 16 * kStride, BOperand<T>{k_s, k_s, kKeys}, lane, nullptr);
    scale_and_mask<kKeys>(s, a, rows, j0, key_end, t);
    Math::template scores<kKeys, kHead>(dp, do_s + warp * 16 * kStride, BOperand<T>{v_s, v_s, kKeys}, lane,
                                        nullptr);
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2;
        const float prob = exp_of<T>(s[n][e] - lse[r]);
        float z = 1.0f;
        if (a.dropout_p > 0) {
          const uint32_t j = static_cast<uint32_t>(j0 + 8 * n + 2 * t + (e & 1));
          z = dropout_keep(key, p_drop, j, rows[r].pos, rows[r].plane) ? inv_keep : 0.0f;
        }
        dp[n][e] = prob * (dp[n][e] * z - delta[r]);  // dS
      }
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

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string("attention (CUDA): ") + what + ": " +
                                                      cudaGetErrorString(status));
}

inline int device_sms() {
  int device = 0, sms = 1;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "multiprocessor count");
  return sms;
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

template <typename T, int kHead>
void launch_backward(const AttentionBackwardArgs<T>& a, const BackwardPlan& plan, cudaStream_t stream) {
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
  if (a.seq_q > 0) {
    auto kernel = attention_dq_kernel<T, kHead>;
    constexpr int dq_bytes = dq_smem_bytes<T, kHead>();
    prepare_shared(kernel, dq_bytes);
    kernel<<<dim3(unsigned(plan.row_blocks), unsigned(a.batch * a.heads_k)), kThreads, dq_bytes, stream>>>(a, plan);
    check(cudaGetLastError(), "dq launch");
  }
}

template <typename T>
void run_backward(const AttentionBackwardArgs<T>& a, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (a.batch * a.heads_k == 0) return;
  if (a.heads_k * a.batch > 65535) throw std::runtime_error("attention (CUDA): B * Hk must stay below 65536");
  const int64_t rows = a.batch * a.heads_q * a.seq_q;
  if (rows > 0) {
    attention_delta_kernel<T><<<unsigned((rows * 32 + 255) / 256), 256, 0, stream>>>(a);
    check(cudaGetLastError(), "delta launch");
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

template <typename T>
void attention_decode(const AttentionForwardArgs<T>& args, void* workspace, void* stream) {
  attention_forward(args, workspace, stream);
}

template <typename T>
void attention_backward(const AttentionBackwardArgs<T>& args, void* stream) {
  if constexpr (std::is_same_v<T, double>) {
    throw std::runtime_error("attention (CUDA): float64 is not supported; use the cpu or reference backend");
  } else {
    attention_detail::run_backward(args, stream);
  }
}

#define INSTANTIATE(T)                                                                           \
  template int64_t attention_forward_workspace_bytes<T>(const AttentionForwardArgs<T>&);          \
  template void attention_forward<T>(const AttentionForwardArgs<T>&, void*, void*);               \
  template void attention_decode<T>(const AttentionForwardArgs<T>&, void*, void*);                \
  template void attention_backward<T>(const AttentionBackwardArgs<T>&, void*);
INSTANTIATE(float)
INSTANTIATE(double)
INSTANTIATE(half)
INSTANTIATE(bfloat16)
#undef INSTANTIATE

}  // namespace engine::cuda
