// Types and helpers shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
// Nothing here includes torch: the CUDA files must compile with nvcc alone.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE inline
#endif

namespace engine {

// 16-bit storage types of every kernel, CPU and CUDA alike: the same layout as torch's at::Half
// and at::BFloat16, so the bindings reinterpret data pointers. Arithmetic never happens in them:
// each backend converts to its accumulator type (cpu/convert.h, cuda/convert.cuh).
struct half {
  uint16_t bits;
};
struct bfloat16 {
  uint16_t bits;
};

// The type every kernel accumulates in: fp32 for fp16/bf16/fp32 data, fp64 for fp64 data.
template <typename T>
struct Accumulator {
  using type = float;
};
template <>
struct Accumulator<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Accumulator<T>::type;

// Reinterpret a float's bits (device code: the register move intrinsics; a union or memcpy would
// go through local memory there).
HOST_DEVICE uint32_t float_as_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return bits;
#endif
}

HOST_DEVICE float bits_as_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
#endif
}

// bfloat16 <-> float on the bit patterns: a bfloat16 is the top half of a float.
// Rounding is to nearest, ties to even, as torch does; NaN stays a (quiet) NaN.
HOST_DEVICE float bf16_bits_to_float(uint16_t bits) { return bits_as_float(static_cast<uint32_t>(bits) << 16); }

HOST_DEVICE uint16_t float_to_bf16_bits(float value) {
  const uint32_t bits = float_as_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  const uint32_t rounding_bias = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding_bias) >> 16);
}

}  // namespace engine
