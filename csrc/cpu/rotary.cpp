// CPU rotary position embedding (math in csrc/common/rotary.h). Per token, the angles' cos and
// sin are converted once into a thread-local buffer, then every head of q and k is rotated from
// them; each feature is read and written once.
#include "cpu/rotary.h"

#include <omp.h>

#include <vector>

#include "cpu/convert.h"
#include "cpu/parallel.h"

namespace engine::cpu {

// One head's row: x [head_dim] -> y [head_dim]. kInterleaved is a template argument so that the
// half-split loop, on contiguous halves, vectorizes.
template <typename T, bool kInterleaved>
static void rotate_row(const T* x, T* y, const acc_t<T>* c, const acc_t<T>* s, int64_t half, int64_t head_dim) {
  using A = acc_t<T>;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const int64_t first = rotary_first(i, half, kInterleaved), second = rotary_second(i, half, kInterleaved);
    const A x1 = to_acc(x[first]), x2 = to_acc(x[second]);
    y[first] = from_acc<T>(x1 * c[i] - x2 * s[i]);
    y[second] = from_acc<T>(x2 * c[i] + x1 * s[i]);
  }
  for (int64_t j = 2 * half; j < head_dim; ++j) y[j] = x[j];
}

// Every head of tensor t at token (b, s).
template <typename T, bool kInterleaved>
static void rotate_heads(const RotaryArgs<T>& args, const RotaryTensor<T>& t, int64_t b, int64_t s,
                         const acc_t<T>* c, const acc_t<T>* sn) {
  for (int64_t h = 0; h < t.heads; ++h) {
    const T* x = t.in + b * t.stride_b + h * t.stride_h + s * t.stride_s;
    T* y = t.out + ((b * t.heads + h) * args.seq + s) * args.head_dim;
    rotate_row<T, kInterleaved>(x, y, c, sn, args.half, args.head_dim);
  }
}

template <typename T, bool kInterleaved>
static void rotate_tokens(const RotaryArgs<T>& args, int num_threads) {
  using A = acc_t<T>;
  const int64_t tokens = args.batch * args.seq;
  const auto body = [&]() {
    std::vector<A> angles(2 * args.half);  // this thread's cos and sin of one position
    A* c = angles.data();
    A* sn = c + args.half;
#pragma omp for schedule(static)
    for (int64_t token = 0; token < tokens; ++token) {
      const int64_t b = token / args.seq, s = token % args.seq;
      const int64_t position = s + (args.offsets ? args.offsets[b] : 0);
      const T* cos_row = args.cos + position * args.half;
      const T* sin_row = args.sin + position * args.half;
      for (int64_t i = 0; i < args.half; ++i) {
        c[i] = to_acc(cos_row[i]);
        sn[i] = args.conjugate ? -to_acc(sin_row[i]) : to_acc(sin_row[i]);
      }
      rotate_heads<T, kInterleaved>(args, args.q, b, s, c, sn);
      if (args.k.in) rotate_heads<T, kInterleaved>(args, args.k, b, s, c, sn);
    }
  };
  parallel_rows(num_threads, body);
}

template <typename T>
void rotary(const RotaryArgs<T>& args, int num_threads) {
  if (args.interleaved)
    rotate_tokens<T, true>(args, num_threads);
  else
    rotate_tokens<T, false>(args, num_threads);
}

#define INSTANTIATE(T) template void rotary<T>(const RotaryArgs<T>&, int);
INSTANTIATE(float)
INSTANTIATE(double)
INSTANTIATE(half)
INSTANTIATE(bfloat16)
#undef INSTANTIATE

}  // namespace engine::cpu
