// CUDA cross-entropy row step (math in csrc/common/cross_entropy.h): one thread block per row.
// The first pass reads the row once, each thread keeping a running maximum, the sum of
// exp(x - maximum) (rescaled when the maximum grows, as online softmax does) and the sum of x over
// its strided slice; the block combines them; the second pass re-reads the row (from L2) and
// writes d over it. Memory traffic per row of V elements: 2 reads and 1 write of V * sizeof(T).
#include <cuda_runtime.h>

#include <cfloat>

#include "common/cross_entropy.h"
#include "common/float_math.h"
#include "cuda/convert.cuh"
#include "cuda/cross_entropy.h"

namespace engine::cuda {

constexpr int kThreads = 512;  // threads per row block

template <typename T>
__global__ void __launch_bounds__(kThreads) cross_entropy_rows_kernel(CrossEntropyRowsArgs<T> args) {
  using A = acc_t<T>;
  __shared__ A scratch[32];
  const int64_t r = blockIdx.x;
  const int n = int(args.vocab);  // the bindings keep vocab < 2^31
  T* row = args.logits + r * args.vocab;
  const int64_t target = args.targets[r];
  if (target == args.ignore_index) {
    for (int j = threadIdx.x; j < n; j += kThreads) row[j] = from_acc<T>(A(0));
    if (threadIdx.x == 0) args.loss[r] = A(0);
    return;
  }
  // Start below every finite logit, not at -inf: a -inf logit then adds exp(-inf) = 0, not NaN.
  constexpr A kLowest = sizeof(A) == 4 ? A(-FLT_MAX) : A(-DBL_MAX);
  A top = kLowest, sum_exp = 0, logit_sum = 0;
  for (int j = threadIdx.x; j < n; j += kThreads) {
    const A x = to_acc(row[j]);
    logit_sum += x;
    if (x > top) {
      sum_exp = sum_exp * math::exp_of<A>(top - x) + A(1);
      top = x;
    } else {
      sum_exp += math::exp_of<A>(x - top);
    }
  }
  const A target_logit = to_acc(row[target]);  // read before any thread overwrites the row
  const A row_top = block_max(top, scratch);
  const A lse = row_top + log(block_sum(sum_exp * math::exp_of<A>(top - row_top), scratch));
  logit_sum = block_sum(logit_sum, scratch);
  const A smoothing = args.label_smoothing;
  if (threadIdx.x == 0) args.loss[r] = cross_entropy_row_loss<A>(lse, target_logit, logit_sum, A(n), smoothing);
  const A offset = smoothing / A(n);
  for (int j = threadIdx.x; j < n; j += kThreads) {
    const A d = math::exp_of<A>(to_acc(row[j]) - lse) - offset;
    row[j] = from_acc<T>(j == target ? d - (A(1) - smoothing) : d);
  }
}

template <typename T>
void cross_entropy_rows(const CrossEntropyRowsArgs<T>& args, void* stream) {
  if (args.rows == 0) return;
  cross_entropy_rows_kernel<T><<<args.rows, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
}

#define INSTANTIATE(T) template void cross_entropy_rows<T>(const CrossEntropyRowsArgs<T>&, void*);
INSTANTIATE(float)
INSTANTIATE(double)
INSTANTIATE(half)
INSTANTIATE(bfloat16)
#undef INSTANTIATE

}  // namespace engine::cuda
