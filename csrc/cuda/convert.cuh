// Conversions between the storage types (common/dtypes.h) and the accumulator type on the GPU,
// and the block-wide reductions the row kernels share.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/dtypes.h"

namespace engine::cuda {

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(half v) { return __half2float(__ushort_as_half(v.bits)); }
__device__ __forceinline__ float to_acc(bfloat16 v) { return bf16_bits_to_float(v.bits); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ half from_acc<half>(float v) { return half{__half_as_ushort(__float2half_rn(v))}; }
template <>
__device__ __forceinline__ bfloat16 from_acc<bfloat16>(float v) { return bfloat16{float_to_bf16_bits(v)}; }

// Sum of `value` over the thread block (blockDim.x a multiple of 32, at most 1024), returned to
// every thread. `scratch` is __shared__ storage for 32 values; the trailing barrier lets the
// caller reuse it immediately.
template <typename A>
__device__ A block_sum(A value, A* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  value = lane < warps ? scratch[lane] : A(0);
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  __syncthreads();
  return value;
}

// The maximum of `value` over the block, on every thread (as block_sum).
template <typename A>
__device__ A block_max(A value, A* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) value = fmax(value, __shfl_xor_sync(0xffffffffu, value, offset));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  value = lane < warps ? scratch[lane] : A(-INFINITY);
  for (int offset = 16; offset > 0; offset >>= 1) value = fmax(value, __shfl_xor_sync(0xffffffffu, value, offset));
  __syncthreads();
  return value;
}

}  // namespace engine::cuda
