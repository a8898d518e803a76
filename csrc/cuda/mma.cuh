// Tensor-core instruction wrappers of the CUDA attention kernels (forward_attention.cu,
// backward_attention.cu): mma.sync m16n8k16 and ldmatrix (sm_80+), and warpgroup MMA (wgmma,
// sm_90a) with its shared-memory descriptors and fences. The accumulator layout they share is
// described in attention_kernels.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

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

// The wgmma B-operand layout ("core matrices", K-major, no swizzle): an [N, K] tile (N output
// columns, K the reduced dim) as 8 x 8 blocks of 128 contiguous bytes (8 n-rows of 8 k-elements),
// the N / 8 blocks of one k-group adjacent (stride dimension byte offset 128) and the k-groups
// 16 N bytes apart (leading dimension byte offset). Element offset of (n, k):
__host__ __device__ constexpr int core_offset(int n, int k, int N) {
  return (k / 8) * N * 8 + (n / 8) * 64 + (n % 8) * 8 + k % 8;
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

}  // namespace engine::cuda
