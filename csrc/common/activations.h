// Activation functions of the linear kernels and their derivatives, shared by the CPU
// (csrc/cpu/linear.cpp) and CUDA (csrc/cuda/linear.cu) kernels. The math matches
// engine/reference.py (activate, activation_grad):
//   gelu       y = x * Phi(x),                 y' = Phi(x) + x * phi(x)
//              Phi the standard normal CDF, phi(x) = exp(-x^2 / 2) / sqrt(2 pi) its density
//   gelu_tanh  y = x / 2 * (1 + tanh(u)),      u = c (x + a x^3), c = sqrt(2 / pi), a = 0.044715
//              written as y = x * s with s = sigmoid(2u) = 1 / (1 + exp(-2u)) (the same number:
//              1 + tanh(u) = 2 sigmoid(2u)), which has no cancellation for negative x, and
//              y' = s + 2 x s (1 - s) c (1 + 3 a x^2) with 1 - s = exp(-2u) s
//   relu       y = max(x, 0) (NaN stays NaN),  y' = 1 if x > 0 else 0
//   silu       y = x * s, s = sigmoid(x),      y' = s (1 + x (1 - s)), with s and 1 - s both
//              from e = exp(-|x|) (no overflow, and 1 - s without cancellation for x > 0)
//   none       y = x,                          y' = 1
//
// Where the primitives come from:
//   device code      CUDA's normcdff/normcdf and expf/exp (accurate to a few ulp)
//   host double      std::erfc and std::exp (correctly rounded or nearly)
//   host float       the polynomial approximations below and exp_f32 (common/float_math.h),
//                    written without branches or calls so that `#pragma omp simd` loops vectorize
//                    them (libm's erff/expf would not vectorize without -ffast-math). Max errors
//                    against float64 math, measured on 1.7e7 random float32 inputs in [-20, 20]
//                    plus a 1e-5-step sweep of [-14, 14]: exp 1.0 ulp; (on 5e6 such inputs plus the
//                    sweep) gelu 6.5 ulp and gelu' 6.8 ulp of its larger term (Phi or x phi; it
//                    crosses 0 at x = -0.75), relative, lower tail included;
//                    gelu_tanh and its derivative within 5.2e-7 / 2.2e-7 absolute; relative
//                    errors grow as |2u| * 2^-24 in the lower tail (the rounding of u in fp32;
//                    torch's fp32 form 0.5 x (1 + tanh(u)) loses everything there to cancellation).
#pragma once

#include <cmath>
#include <type_traits>

#include "common/dtypes.h"
#include "common/float_math.h"

namespace engine {

// The activation of a linear layer's epilogue. The bindings map the strings of the Python API
// ("none", "gelu", "gelu_tanh", "relu", "silu") to these values; kernels take it as a template
// argument so that each loop is compiled (and vectorized) for one activation.
enum class Activation : int { kNone = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3, kSilu = 4 };

// Calls fn(std::integral_constant<Activation, a>{}) for the runtime activation a (host code:
// the kernel launchers pick the template instantiation with it).
template <typename Fn>
void with_activation(Activation activation, Fn&& fn) {
  switch (activation) {
    case Activation::kGelu: return fn(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh: return fn(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kRelu: return fn(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kSilu: return fn(std::integral_constant<Activation, Activation::kSilu>{});
    default: return fn(std::integral_constant<Activation, Activation::kNone>{});
  }
}

namespace activation_math {

constexpr double kSqrtHalf = 0.70710678118654752440;      // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;    // 1 / sqrt(2 pi)
constexpr double kTanhScale = 0.79788456080286535588;     // sqrt(2 / pi)
constexpr double kTanhCubic = 0.044715;

// Phi(x) and phi(x) for float on the host, from one branch-free form (the CPU loops vectorize
// it): with z = |x| / sqrt(2) and t = 1 / (1 + 0.35 z),
//   Phi(-|x|) = erfc(z) / 2 = exp(-z^2) t Q(t), Q of degree 9 (fitted for this file on z in
//               [0, 10], relative error 7e-9; beyond, exp(-z^2) is 0 in float),
//   Phi(|x|)  = 1 - Phi(-|x|),
// so the lower tail keeps its relative accuracy (no 1 - erf cancellation). exp(-z^2) =
// exp(-x^2 / 2) is computed from x^2 split exactly into x^2 = xx + xx_err (with FMA): without it
// the rounding of x^2 cost 66 ulp of relative accuracy at |x| = 11.5. It is phi's exponential too.
// The form before (an erf polynomial for z < 0.75 and an erfc one above, both evaluated on every
// element) was as accurate and took 75 AVX2 instructions per 8 elements against 55: GeLU
// forward, one thread, 1M fp32 elements on the 2-core AVX2 VM, 1.35 -> 1.09 ns per element
// (torch's F.gelu: 0.92-1.1).
struct NormalCdfPdf {
  float cdf;
  float pdf;
};

HOST_DEVICE NormalCdfPdf normal_cdf_pdf_f32(float x) {
  const float ax = fabsf(x);
  const float xx = ax * ax;
  // exact rounding error of xx (0 for huge |x|, where it would be inf - inf; exp is 0 there)
  const float xx_err = math::choose<float>(xx < 1e30f, math::fused_multiply_add(ax, ax, -xx), 0.0f);
  const float gauss = math::exp_f32(-0.5f * xx) * math::fused_multiply_add(-0.5f, xx_err, 1.0f);  // exp(-x^2 / 2)
  const float t = 1.0f / math::fused_multiply_add(0.35f * float(kSqrtHalf), ax, 1.0f);
  float q = 1.920086332e-02f;  // Q / 2: the halving folded into the coefficients
  q = math::fused_multiply_add(q, t, -7.946598530e-02f);
  q = math::fused_multiply_add(q, t, 9.073495120e-02f);
  q = math::fused_multiply_add(q, t, -1.385862473e-02f);
  q = math::fused_multiply_add(q, t, 4.351421818e-02f);
  q = math::fused_multiply_add(q, t, 7.301848382e-02f);
  q = math::fused_multiply_add(q, t, 7.559400052e-02f);
  q = math::fused_multiply_add(q, t, 9.395100921e-02f);
  q = math::fused_multiply_add(q, t, 9.856919944e-02f);
  q = math::fused_multiply_add(q, t, 9.874188900e-02f);
  const float lower = gauss * t * q;  // Phi(-|x|)
  return {math::choose<float>(x < 0.0f, lower, 1.0f - lower), gauss * float(kInvSqrt2Pi)};
}

// Phi(x) and phi(x) in A (float or double), from the best primitives of where it runs.
template <typename A>
HOST_DEVICE void normal_cdf_pdf(A x, A& cdf, A& pdf) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(A) == 4) {
    cdf = normcdff(x);
    pdf = expf(-0.5f * x * x) * float(kInvSqrt2Pi);
  } else {
    cdf = normcdf(x);
    pdf = exp(-0.5 * x * x) * kInvSqrt2Pi;
  }
#else
  if constexpr (sizeof(A) == 4) {
    const NormalCdfPdf both = normal_cdf_pdf_f32(x);
    cdf = both.cdf;
    pdf = both.pdf;
  } else {
    cdf = 0.5 * std::erfc(-x * kSqrtHalf);
    pdf = std::exp(-0.5 * x * x) * kInvSqrt2Pi;
  }
#endif
}

// For gelu_tanh: s = sigmoid(2u) and 1 - s = e s with e = exp(-2u), u from x clamped to
// [-20, 20]: beyond, s is 0 or 1 to every digit, and x^3 would overflow (then inf * 0 = NaN).
// e is capped (exp_f32 clamps at exp(88); the device/double exp is capped here) so that it stays
// finite; where it reaches the cap, s (below 1e-37) is set to its true value's rounding, 0, and
// 1 - s to 1. Without that, GeLU(-3e38) was -3e38 / 1e37 = -30.
template <typename A>
HOST_DEVICE A clamp_to_gelu_range(A x) {
  return math::choose<A>(x < A(-20), A(-20), math::choose<A>(x > A(20), A(20), x));  // NaN stays NaN
}

template <typename A>
HOST_DEVICE void tanh_gate(A x, A& s, A& one_minus_s) {
  const A xc = clamp_to_gelu_range(x);
  const A u2 = A(2 * kTanhScale) * (xc + A(kTanhCubic) * xc * xc * xc);  // 2u
  const A e = math::exp_of<A>(-u2);
  const A cap = sizeof(A) == 4 ? A(1e37) : A(1e300);
  const bool finite_gate = e < cap;  // false for NaN too: x itself then carries the NaN
  s = math::choose<A>(finite_gate, A(1) / (A(1) + e), A(0));
  one_minus_s = math::choose<A>(finite_gate, e * s, A(1));
}

// For silu: s = sigmoid(x) and 1 - s = sigmoid(-x), from e = exp(-|x|) in (0, 1]: one is
// 1 / (1 + e), the other e / (1 + e).
template <typename A>
HOST_DEVICE void sigmoid_pair(A x, A& s, A& one_minus_s) {
  const bool negative = x < A(0);
  const A e = math::exp_of<A>(math::choose<A>(negative, x, -x));
  const A larger = A(1) / (A(1) + e);
  const A smaller = e * larger;
  s = math::choose<A>(negative, smaller, larger);
  one_minus_s = math::choose<A>(negative, larger, smaller);
}

}  // namespace activation_math

// act(x) in the accumulator type A (float or double).
template <Activation kAct, typename A>
HOST_DEVICE A activate(A x) {
  if constexpr (kAct == Activation::kGelu) {
    A cdf, pdf;
    activation_math::normal_cdf_pdf(x, cdf, pdf);
    return x * cdf;
  } else if constexpr (kAct == Activation::kGeluTanh) {
    A s, one_minus_s;
    activation_math::tanh_gate(x, s, one_minus_s);
    return x * s;
  } else if constexpr (kAct == Activation::kRelu) {
    return math::choose<A>(x < A(0), A(0), x);  // NaN is not < 0: it propagates, as torch's relu
  } else if constexpr (kAct == Activation::kSilu) {
    A s, one_minus_s;
    activation_math::sigmoid_pair(x, s, one_minus_s);
    return x * s;
  } else {
    return x;
  }
}

// d act(x) / dx in A.
template <Activation kAct, typename A>
HOST_DEVICE A activation_grad(A x) {
  if constexpr (kAct == Activation::kGelu) {
    A cdf, pdf;
    activation_math::normal_cdf_pdf(x, cdf, pdf);
    return cdf + x * pdf;
  } else if constexpr (kAct == Activation::kGeluTanh) {
    A s, one_minus_s;
    activation_math::tanh_gate(x, s, one_minus_s);
    const A c = A(activation_math::kTanhScale);
    const A a3 = A(3 * activation_math::kTanhCubic);
    const A xc = activation_math::clamp_to_gelu_range(x);  // the second term is 0 past |x| = 20
    return s + A(2) * xc * s * one_minus_s * c * (A(1) + a3 * xc * xc);
  } else if constexpr (kAct == Activation::kRelu) {
    return math::choose<A>(x > A(0), A(1), A(0));
  } else if constexpr (kAct == Activation::kSilu) {
    A s, one_minus_s;
    activation_math::sigmoid_pair(x, s, one_minus_s);
    return s * (A(1) + x * one_minus_s);
  } else {
    return A(1);
  }
}

}  // namespace engine
