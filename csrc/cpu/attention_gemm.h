// The register-blocked matrix product of every CPU attention tile (csrc/cpu/attention_gemm.cpp),
// internal to the attention units.
#pragma once

#include <cstdint>

namespace engine::cpu::attention_detail {

// The matrix product of every tile:
//   C[m, n] = beta_m C[m, n] + sum_k A[m * a_ms + k * a_ks] B[k * ldb + n]
// for m < M, n < N, k < K; beta_m = 0 (zero), 1 (accumulate) or row_scale[m] (rescale).

enum class Init { zero, accumulate, rescale };

// A is float or double (instantiated in attention_gemm.cpp). a and b may be transposed views
// through the strides; row_scale is read only for Init::rescale.
template <typename A>
void gemm(int64_t M, int64_t N, int64_t K, const A* a, int64_t a_ms, int64_t a_ks, const A* b, int64_t ldb,
          A* c, int64_t ldc, Init init, const A* row_scale = nullptr);

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// fp32 tiles run on a register-blocked micro-kernel (16 lanes with AVX-512, 8 with AVX2).
#define ENGINE_ATTENTION_MICRO_KERNEL 1
// The fp32 micro-kernel's chunk (backward's delta sums in the same chunks). The sum over k runs
// in chunks of kChunk terms, each in a fresh register chain that is then added to C (kept in L1):
// sums with cancellation (scores, dP) then carry the rounding of ~kChunk + K / kChunk sequential
// additions instead of K. 64 keeps head dims up to 64 in one chain, as torch's SDPA sums them
// (MKL), and chunks the longer ones (D = 128, 256). 16-term chunks halved the error at K = 64 but
// cost the forward ~10%: 4x12x512x64 fp32 on 1 thread went from 0.78-0.94x torch to 1.01-1.08x
// (min of 15 interleaved samples, three runs each). Keeping several interleaved chains in
// registers instead halves the block, and then the loads of B and the broadcasts of A, not the
// FMAs, set the pace: ~2x slower.
constexpr int64_t kChunk = 64;
#endif

}  // namespace engine::cpu::attention_detail
