// CPU cross-entropy row step (math in csrc/common/cross_entropy.h). Per row of V logits: one pass
// for the maximum and the sum, one that turns the row into exp(x - max) (in place for fp32/fp64
// rows; 16-bit rows are first converted into a thread-local fp32 buffer of V * 4 bytes, in L2)
// and sums it, one that writes d. The row stays in cache between the passes.
#include "cpu/cross_entropy.h"

#include <omp.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "common/float_math.h"
#include "cpu/convert.h"

namespace engine::cpu {

template <typename A>
static A row_max(const A* x, int64_t n) {
  A top = x[0];
#pragma omp simd reduction(max : top)
  for (int64_t j = 0; j < n; ++j) top = x[j] > top ? x[j] : top;
  return top;
}

template <typename A>
static A row_sum(const A* x, int64_t n) {
  A total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) total += x[j];
  return total;
}

// x[j] <- exp(x[j] - top); returns the sum of the new values.
template <typename A>
static A exp_in_place(A* x, A top, int64_t n) {
  A total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    x[j] = math::exp_of<A>(x[j] - top);
    total += x[j];
  }
  return total;
}

template <typename T>
void cross_entropy_rows(const CrossEntropyRowsArgs<T>& args, int num_threads) {
  using A = acc_t<T>;
  constexpr bool kInPlace = std::is_same_v<T, A>;
  const int64_t n = args.vocab;
  const A smoothing = args.label_smoothing;
  const A offset = smoothing / A(n);
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<A> buffer(kInPlace ? 0 : n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < args.rows; ++r) {
      T* row = args.logits + r * n;
      const int64_t target = args.targets[r];
      if (target == args.ignore_index) {
        for (int64_t j = 0; j < n; ++j) row[j] = from_acc<T>(A(0));
        args.loss[r] = 0;
        continue;
      }
      A* x;
      if constexpr (kInPlace) {
        x = row;
      } else {
        x = buffer.data();
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) x[j] = to_acc(row[j]);
      }
      const A top = row_max(x, n);
      const A logit_sum = row_sum(x, n);
      const A target_logit = x[target];
      const A sum_exp = exp_in_place(x, top, n);
      const A lse = top + std::log(sum_exp);
      args.loss[r] = cross_entropy_row_loss<A>(lse, target_logit, logit_sum, A(n), smoothing);
      const A target_exp = x[target];
      const A inverse = A(1) / sum_exp;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) row[j] = from_acc<T>(x[j] * inverse - offset);
      row[target] = from_acc<T>(target_exp * inverse - offset - (A(1) - smoothing));
    }
  }
}

#define INSTANTIATE(T) template void cross_entropy_rows<T>(const CrossEntropyRowsArgs<T>&, int);
INSTANTIATE(float)
INSTANTIATE(double)
INSTANTIATE(half)
INSTANTIATE(bfloat16)
#undef INSTANTIATE

}  // namespace engine::cpu
