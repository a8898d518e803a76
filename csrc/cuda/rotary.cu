// CUDA rotary position embedding (math in csrc/common/rotary.h). One thread block per token
// (b, s); its threads take the token's (q heads + k heads) x (head_dim - half) work items in
// turn: per head, half pairs to rotate, then head_dim - 2 * half features to copy. Each feature
// is read and written once; the token's cos and sin rows are re-read from L1 by every head.
#include <cuda_runtime.h>

#include "common/rotary.h"
#include "cuda/convert.cuh"
#include "cuda/rotary.h"

namespace engine::cuda {

constexpr int kThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kThreads) rotary_kernel(RotaryArgs<T> args) {
  using A = acc_t<T>;
  const int64_t token = blockIdx.x;
  const int64_t b = token / args.seq, s = token % args.seq;
  const int64_t position = s + (args.offsets ? args.offsets[b] : 0);
  const T* cos_row = args.cos + position * args.half;
  const T* sin_row = args.sin + position * args.half;
  const int items = int(args.head_dim - args.half);  // per head; the bindings keep heads * items < 2^31
  const int q_heads = int(args.q.heads), heads = q_heads + (args.k.in ? int(args.k.heads) : 0);
  for (int w = threadIdx.x; w < heads * items; w += kThreads) {
    const int head = w / items, i = w % items;
    // Fields chosen one by one rather than through a reference to args.q or args.k, which would
    // take the kernel parameter's address and copy it to local memory.
    const bool in_q = head < q_heads;
    const int64_t h = in_q ? head : head - q_heads;
    const int64_t tensor_heads = in_q ? args.q.heads : args.k.heads;
    const T* x = (in_q ? args.q.in : args.k.in) + b * (in_q ? args.q.stride_b : args.k.stride_b) +
                 h * (in_q ? args.q.stride_h : args.k.stride_h) + s * (in_q ? args.q.stride_s : args.k.stride_s);
    T* y = (in_q ? args.q.out : args.k.out) + ((b * tensor_heads + h) * args.seq + s) * args.head_dim;
    if (i < args.half) {
      const int64_t first = rotary_first(i, args.half, args.interleaved);
      const int64_t second = rotary_second(i, args.half, args.interleaved);
      const A c = to_acc(cos_row[i]);
      const A sn = args.conjugate ? -to_acc(sin_row[i]) : to_acc(sin_row[i]);
      const A x1 = to_acc(x[first]), x2 = to_acc(x[second]);
      y[first] = from_acc<T>(x1 * c - x2 * sn);
      y[second] = from_acc<T>(x2 * c + x1 * sn);
    } else {
      const int64_t j = i + args.half;  // items half .. head_dim - half - 1 copy features 2 * half ..
      y[j] = x[j];
    }
  }
}

template <typename T>
void rotary(const RotaryArgs<T>& args, void* stream) {
  const int64_t tokens = args.batch * args.seq;
  if (tokens == 0) return;
  rotary_kernel<T><<<tokens, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
}

#define INSTANTIATE(T) template void rotary<T>(const RotaryArgs<T>&, void*);
INSTANTIATE(float)
INSTANTIATE(double)
INSTANTIATE(half)
INSTANTIATE(bfloat16)
#undef INSTANTIATE

}  // namespace engine::cuda
