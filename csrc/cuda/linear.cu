// CUDA epilogues of the linear layer and the GeLU kernels (math in csrc/common/activations.h,
// dropout stream in csrc/common/philox.h). The products x @ W^T, g @ W and g^T @ x are cuBLAS
// calls made by the bindings; these kernels are elementwise passes around them.
// Memory traffic per [M, N] element: forward epilogue reads product (+ bias, residual) and
// writes out (+ pre, when pre is not the product itself, and the debug keep mask); backward
// prologue reads grad_out (+ pre) and writes g, plus [partials, N] bias-gradient partial sums
// read back by a small reduction kernel; GeLU reads x (+ grad_y) and writes y (dx).
// Loads and stores are 16 bytes per thread (kVec elements) when every row start is 16-byte
// aligned, else one element per thread.
#include <cuda_runtime.h>

#include "common/activations.h"
#include "common/philox.h"
#include "cuda/convert.cuh"
#include "cuda/linear.h"

namespace engine::cuda {

constexpr int kThreads = 256;           // threads per block of every kernel here
constexpr int kMaxGridRows = 65535;     // gridDim.y limit
constexpr int64_t kRowsPerPartial = 16;  // backward: rows one block sums into a bias partial
constexpr int64_t kMaxPartials = 4096;

// kVec elements of T moved as one 16-byte (or smaller) access.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, kVec>*>(p);
}

template <typename T, int kVec>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, kVec>& pack) {
  *reinterpret_cast<Pack<T, kVec>*>(p) = pack;
}

// Forward epilogue. Thread (blockIdx.x, threadIdx.x) owns output columns [j0, j0 + kVec) (gated:
// also the up columns cols + j0 ...) and walks the rows blockIdx.y, blockIdx.y + gridDim.y, ...;
// its bias values stay in registers.
template <typename T, Activation kAct, bool kGated, bool kDropout, bool kResidual, int kVec>
__global__ void __launch_bounds__(kThreads) linear_epilogue_kernel(LinearEpilogueArgs<T> args) {
  using A = acc_t<T>;
  const int64_t j0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kVec;
  if (j0 >= args.cols) return;
  const int64_t up0 = args.cols + j0;                       // gated: the up projection's columns
  const int64_t pre_stride = kGated ? 2 * args.cols : args.cols;
  A bias[kVec], up_bias[kVec];  // kVec > 1 only when cols % kVec == 0: every element of the pack is in range
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    bias[e] = args.bias ? to_acc(args.bias[j0 + e]) : A(0);
    up_bias[e] = kGated && args.bias ? to_acc(args.bias[up0 + e]) : A(0);
  }
  const bool write_pre = args.pre != nullptr && (args.bias != nullptr || args.pre != args.product);
  const float p = static_cast<float>(args.dropout_p);  // the stream compares in fp32 (common/philox.h)
  const A scale = kDropout ? A(1.0 / (1.0 - args.dropout_p)) : A(1);
  const PhiloxKey key = philox_key(args.seed);

  for (int64_t r = blockIdx.y; r < args.rows; r += gridDim.y) {
    const Pack<T, kVec> product = load_pack<T, kVec>(args.product + r * args.product_stride + j0);
    Pack<T, kVec> up_product;
    if (kGated) up_product = load_pack<T, kVec>(args.product + r * args.product_stride + up0);
    Pack<T, kVec> residual;
    if (kResidual) residual = load_pack<T, kVec>(args.residual + r * args.residual_stride + j0);
    // Dropout decisions first, one element at a time (a rolled loop: 8 unrolled Philox streams
    // next to 8 unrolled activations spill registers on sm90), as bit e of `kept`.
    uint32_t kept = 0;
    if constexpr (kDropout) {
#pragma unroll 1
      for (int e = 0; e < kVec; ++e)
        kept |= uint32_t(dropout_keep(key, p, static_cast<uint32_t>(j0 + e), static_cast<uint32_t>(r), 0u)) << e;
    }
    Pack<T, kVec> pre, up_pre, out;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const A v = to_acc(product.v[e]) + bias[e];
      pre.v[e] = from_acc<T>(v);
      A y = activate<kAct, A>(v);
      if constexpr (kGated) {
        const A u = to_acc(up_product.v[e]) + up_bias[e];
        up_pre.v[e] = from_acc<T>(u);
        y *= u;
      }
      // times 0, not 0: NaN and inf propagate as in the reference
      if constexpr (kDropout) y *= (kept >> e) & 1u ? scale : A(0);
      if constexpr (kResidual) y += to_acc(residual.v[e]);
      out.v[e] = from_acc<T>(y);
    }
    const int64_t offset = r * args.cols + j0;
    store_pack<T, kVec>(args.out + offset, out);
    if (write_pre) {
      store_pack<T, kVec>(args.pre + r * pre_stride + j0, pre);
      if (kGated) store_pack<T, kVec>(args.pre + r * pre_stride + up0, up_pre);
    }
    if (kDropout && args.keep) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) args.keep[offset + e] = (kept >> e) & 1u;
    }
  }
}

// Backward prologue: g = grad_out * keep / (1 - p) * act'(pre) (gated: the gate's and the up
// columns of g, as in the header). Block row blockIdx.y handles rows blockIdx.y,
// blockIdx.y + gridDim.y, ... and writes its column sums of g to row blockIdx.y of
// bias_grad_partial (each column of that row belongs to one thread: no atomics).
template <typename T, Activation kAct, bool kGated, bool kDropout, int kVec>
__global__ void __launch_bounds__(kThreads) linear_backward_kernel(LinearBackwardArgs<T> args) {
  using A = acc_t<T>;
  const int64_t j0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kVec;
  if (j0 >= args.cols) return;
  const int64_t up0 = args.cols + j0;                       // gated: the up projection's columns
  const int64_t g_stride = kGated ? 2 * args.cols : args.cols;
  const float p = static_cast<float>(args.dropout_p);  // the stream compares in fp32 (common/philox.h)
  const A scale = kDropout ? A(1.0 / (1.0 - args.dropout_p)) : A(1);
  const PhiloxKey key = philox_key(args.seed);
  A sums[kVec], up_sums[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) sums[e] = up_sums[e] = A(0);

  for (int64_t r = blockIdx.y; r < args.rows; r += gridDim.y) {
    const Pack<T, kVec> grad = load_pack<T, kVec>(args.grad_out + r * args.grad_stride + j0);
    Pack<T, kVec> pre, up_pre;
    if (kAct != Activation::kNone) pre = load_pack<T, kVec>(args.pre + r * args.pre_stride + j0);
    if (kGated) up_pre = load_pack<T, kVec>(args.pre + r * args.pre_stride + up0);
    uint32_t kept = 0;  // bit e: element e kept by dropout (computed as in the forward kernel)
    if constexpr (kDropout) {
#pragma unroll 1
      for (int e = 0; e < kVec; ++e)
        kept |= uint32_t(dropout_keep(key, p, static_cast<uint32_t>(j0 + e), static_cast<uint32_t>(r), 0u)) << e;
    }
    Pack<T, kVec> g, up_g;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      A v = to_acc(grad.v[e]);
      if constexpr (kDropout) v *= (kept >> e) & 1u ? scale : A(0);
      if constexpr (kGated) {
        const A gate = to_acc(pre.v[e]);
        const A up_grad = v * activate<kAct, A>(gate);
        v *= to_acc(up_pre.v[e]) * activation_grad<kAct, A>(gate);
        up_sums[e] += up_grad;
        up_g.v[e] = from_acc<T>(up_grad);
      } else if constexpr (kAct != Activation::kNone) {
        v *= activation_grad<kAct, A>(to_acc(pre.v[e]));
      }
      sums[e] += v;
      g.v[e] = from_acc<T>(v);
    }
    store_pack<T, kVec>(args.g + r * g_stride + j0, g);
    if (kGated) store_pack<T, kVec>(args.g + r * g_stride + up0, up_g);
  }
  if (args.bias_grad_partial) {
    A* partial = args.bias_grad_partial + int64_t(blockIdx.y) * g_stride;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      partial[j0 + e] = sums[e];
      if (kGated) partial[up0 + e] = up_sums[e];
    }
  }
}

// bias_grad[j] = sum over the partial rows of column j; the sum runs in double (the partials
// are few, the loads coalesced across the warp) and is rounded once.
template <typename T>
__global__ void __launch_bounds__(kThreads) bias_grad_reduce_kernel(const acc_t<T>* partial, int64_t partials,
                                                                   int64_t cols, T* bias_grad) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= cols) return;
  double total = 0;
  for (int64_t b = 0; b < partials; ++b) total += static_cast<double>(partial[b * cols + j]);
  bias_grad[j] = from_acc<T>(static_cast<acc_t<T>>(total));
}

template <typename T, Activation kAct, int kVec>
__global__ void __launch_bounds__(kThreads) gelu_forward_kernel(const T* x, T* y, int64_t count) {
  using A = acc_t<T>;
  const int64_t stride = int64_t(gridDim.x) * kThreads * kVec;
  for (int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kVec; i < count; i += stride) {
    if (i + kVec <= count) {
      const Pack<T, kVec> in = load_pack<T, kVec>(x + i);
      Pack<T, kVec> out;
#pragma unroll
      for (int e = 0; e < kVec; ++e) out.v[e] = from_acc<T>(activate<kAct, A>(to_acc(in.v[e])));
      store_pack<T, kVec>(y + i, out);
    } else {
      for (int64_t k = i; k < count; ++k) y[k] = from_acc<T>(activate<kAct, A>(to_acc(x[k])));
    }
  }
}

template <typename T, Activation kAct, int kVec>
__global__ void __launch_bounds__(kThreads) gelu_backward_kernel(const T* grad_y, const T* x, T* dx, int64_t count) {
  using A = acc_t<T>;
  const int64_t stride = int64_t(gridDim.x) * kThreads * kVec;
  for (int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kVec; i < count; i += stride) {
    if (i + kVec <= count) {
      const Pack<T, kVec> in = load_pack<T, kVec>(x + i);
      const Pack<T, kVec> grad = load_pack<T, kVec>(grad_y + i);
      Pack<T, kVec> out;
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        out.v[e] = from_acc<T>(to_acc(grad.v[e]) * activation_grad<kAct, A>(to_acc(in.v[e])));
      store_pack<T, kVec>(dx + i, out);
    } else {
      for (int64_t k = i; k < count; ++k)
        dx[k] = from_acc<T>(to_acc(grad_y[k]) * activation_grad<kAct, A>(to_acc(x[k])));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers

namespace {

// Elements per 16-byte access.
template <typename T>
constexpr int vector_width() {
  return 16 / int(sizeof(T));
}

bool aligned(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int kVec>
dim3 row_grid(int64_t rows, int64_t cols, int64_t grid_rows) {
  const int64_t col_blocks = (cols + int64_t(kThreads) * kVec - 1) / (int64_t(kThreads) * kVec);
  return dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(grid_rows));
}

template <typename T, int kVec>
void launch_epilogue(const LinearEpilogueArgs<T>& args, cudaStream_t stream) {
  const dim3 grid = row_grid<T, kVec>(args.rows, args.cols, args.rows < kMaxGridRows ? args.rows : kMaxGridRows);
  const bool dropout = args.dropout_p > 0.0;
  const bool residual = args.residual != nullptr;
  auto launch = [&](auto gated) {
    constexpr bool kGated = decltype(gated)::value;
    with_activation(args.activation, [&](auto act) {
      constexpr Activation kAct = decltype(act)::value;
      if (dropout && residual)
        linear_epilogue_kernel<T, kAct, kGated, true, true, kVec><<<grid, kThreads, 0, stream>>>(args);
      else if (dropout)
        linear_epilogue_kernel<T, kAct, kGated, true, false, kVec><<<grid, kThreads, 0, stream>>>(args);
      else if (residual)
        linear_epilogue_kernel<T, kAct, kGated, false, true, kVec><<<grid, kThreads, 0, stream>>>(args);
      else
        linear_epilogue_kernel<T, kAct, kGated, false, false, kVec><<<grid, kThreads, 0, stream>>>(args);
    });
  };
  if (args.gated) launch(std::true_type{});
  else launch(std::false_type{});
}

template <typename T, int kVec>
void launch_backward(const LinearBackwardArgs<T>& args, cudaStream_t stream) {
  const dim3 grid = row_grid<T, kVec>(args.rows, args.cols, args.partials);
  auto launch = [&](auto gated) {
    constexpr bool kGated = decltype(gated)::value;
    with_activation(args.activation, [&](auto act) {
      constexpr Activation kAct = decltype(act)::value;
      if (args.dropout_p > 0.0) linear_backward_kernel<T, kAct, kGated, true, kVec><<<grid, kThreads, 0, stream>>>(args);
      else linear_backward_kernel<T, kAct, kGated, false, kVec><<<grid, kThreads, 0, stream>>>(args);
    });
  };
  if (args.gated) launch(std::true_type{});
  else launch(std::false_type{});
}

// Blocks of an elementwise grid-stride kernel: enough to fill any GPU several times over.
unsigned elementwise_blocks(int64_t count, int vec) {
  const int64_t needed = (count + int64_t(kThreads) * vec - 1) / (int64_t(kThreads) * vec);
  return static_cast<unsigned>(needed < 65536 ? (needed > 0 ? needed : 1) : 65536);
}

}  // namespace

int64_t linear_bias_grad_partials(int64_t rows) {
  const int64_t partials = (rows + kRowsPerPartial - 1) / kRowsPerPartial;
  return partials < 1 ? 1 : (partials > kMaxPartials ? kMaxPartials : partials);
}

template <typename T>
void linear_forward_epilogue(const LinearEpilogueArgs<T>& args, void* stream) {
  if (args.rows == 0 || args.cols == 0) return;
  constexpr int kVec = vector_width<T>();
  const bool vectorized = args.cols % kVec == 0 && args.product_stride % kVec == 0 &&
                          (args.residual == nullptr || args.residual_stride % kVec == 0) && aligned(args.product) &&
                          aligned(args.bias) && aligned(args.residual) && aligned(args.pre) && aligned(args.out);
  auto launch_stream = static_cast<cudaStream_t>(stream);
  if (vectorized) launch_epilogue<T, kVec>(args, launch_stream);
  else launch_epilogue<T, 1>(args, launch_stream);
}

template <typename T>
void linear_backward_prologue(const LinearBackwardArgs<T>& args, void* stream) {
  if (args.rows == 0 || args.cols == 0) return;
  constexpr int kVec = vector_width<T>();
  const bool vectorized = args.cols % kVec == 0 && args.grad_stride % kVec == 0 &&
                          (args.pre == nullptr || args.pre_stride % kVec == 0) && aligned(args.grad_out) &&
                          aligned(args.pre) && aligned(args.g);
  auto launch_stream = static_cast<cudaStream_t>(stream);
  if (vectorized) launch_backward<T, kVec>(args, launch_stream);
  else launch_backward<T, 1>(args, launch_stream);
  if (args.bias_grad && args.bias_grad_partial) {
    const int64_t g_cols = args.gated ? 2 * args.cols : args.cols;
    const unsigned blocks = static_cast<unsigned>((g_cols + kThreads - 1) / kThreads);
    bias_grad_reduce_kernel<T><<<blocks, kThreads, 0, launch_stream>>>(args.bias_grad_partial, args.partials,
                                                                      g_cols, args.bias_grad);
  }
}

template <typename T>
void gelu_forward(const T* x, T* y, int64_t count, bool tanh, void* stream) {
  if (count == 0) return;
  constexpr int kVec = vector_width<T>();
  auto launch_stream = static_cast<cudaStream_t>(stream);
  const bool vectorized = aligned(x) && aligned(y);
  with_activation(tanh ? Activation::kGeluTanh : Activation::kGelu, [&](auto act) {
    constexpr Activation kAct = decltype(act)::value;
    if (vectorized)
      gelu_forward_kernel<T, kAct, kVec><<<elementwise_blocks(count, kVec), kThreads, 0, launch_stream>>>(x, y, count);
    else
      gelu_forward_kernel<T, kAct, 1><<<elementwise_blocks(count, 1), kThreads, 0, launch_stream>>>(x, y, count);
  });
}

template <typename T>
void gelu_backward(const T* grad_y, const T* x, T* dx, int64_t count, bool tanh, void* stream) {
  if (count == 0) return;
  constexpr int kVec = vector_width<T>();
  auto launch_stream = static_cast<cudaStream_t>(stream);
  const bool vectorized = aligned(grad_y) && aligned(x) && aligned(dx);
  with_activation(tanh ? Activation::kGeluTanh : Activation::kGelu, [&](auto act) {
    constexpr Activation kAct = decltype(act)::value;
    if (vectorized)
      gelu_backward_kernel<T, kAct, kVec>
          <<<elementwise_blocks(count, kVec), kThreads, 0, launch_stream>>>(grad_y, x, dx, count);
    else
      gelu_backward_kernel<T, kAct, 1><<<elementwise_blocks(count, 1), kThreads, 0, launch_stream>>>(grad_y, x, dx, count);
  });
}

#define INSTANTIATE(T)                                                                           \
  template void linear_forward_epilogue<T>(const LinearEpilogueArgs<T>&, void*);                 \
  template void linear_backward_prologue<T>(const LinearBackwardArgs<T>&, void*);                \
  template void gelu_forward<T>(const T*, T*, int64_t, bool, void*);                             \
  template void gelu_backward<T>(const T*, const T*, T*, int64_t, bool, void*);
INSTANTIATE(float)
INSTANTIATE(double)
INSTANTIATE(half)
INSTANTIATE(bfloat16)
#undef INSTANTIATE

}  // namespace engine::cuda
