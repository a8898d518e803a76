// The CPU linear layer with fused epilogue (declared in cpu/linear_blas.h): the matrix products on
// the BLAS torch uses, the epilogues of cpu/linear.cpp around them.
//
// The output is cut into tiles (kTileRows x kTileCols); each OpenMP thread takes a tile,
// computes its product with one single-threaded BLAS call (at::mm_out inside the parallel
// region; ATen and MKL run single-threaded when nested), then runs the epilogue on the tile
// while it is still in cache. Backward: each thread takes a block of rows, computes g on it
// (prologue) and right away dx for those rows = g_rows @ W; dW = g^T @ x is then one
// multithreaded product over the whole g, and the bias gradient comes from per-thread partial
// column sums. Without activation and dropout g is grad_out: dx and dW are plain products.
// fp16 products run in fp32 (fp32 copies of x and W: torch's fp16 CPU GEMM is ~4x slower than its
// fp32 GEMM on AVX-512 machines without fp16 FMA). bf16 products run on torch's bf16 GEMM (oneDNN),
// which also adds the bias (so that pre is rounded once, as in torch's own bf16 F.linear), where
// the CPU has bf16 dot products (avx512_bf16 or AMX on x86, the BF16 extension on Arm: 2x the fp32
// GEMM's speed on Zen 4); elsewhere (from kWidenedBf16Rows rows up) they too run in fp32 on fp32
// copies, the bias added in fp32 and pre rounded once: on a 2-core AVX2 VM torch's bf16 GEMM
// (emulated) is ~8x slower than its fp32 GEMM (x [4096, 768] @ W [3072, 768]^T: 1040 against
// 135 ms). fp32 accumulation either way.
#include "cpu/linear_blas.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

#include "cpu/linear.h"

namespace engine::cpu {

// New CPU outputs of at least this size are advised to use transparent huge pages.
constexpr int64_t kHugePageAdviceBytes = int64_t(4) << 20;

// at::empty, plus (CPU, Linux) MADV_HUGEPAGE on large outputs. A fresh [4096, 3072] fp32 output
// takes ~12k page faults on first touch (about 10 ms on this 2-core VM, a tenth of the matmul
// that fills it); with huge pages it takes ~24. The advice only changes how the kernel backs the
// pages: the tensor is an ordinary torch allocation, freed as usual.
at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor tensor = at::empty(shape, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (tensor.is_cpu() && int64_t(tensor.nbytes()) >= kHugePageAdviceBytes) {
    const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    const uintptr_t start = reinterpret_cast<uintptr_t>(tensor.data_ptr());
    const uintptr_t begin = (start + page - 1) & ~(page - 1);
    const uintptr_t end = (start + tensor.nbytes()) & ~(page - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice: errors are harmless
  }
#endif
  return tensor;
}

int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

namespace {

template <typename T>
T* tile_pointer(const at::Tensor& t, int64_t row, int64_t col) {
  return static_cast<T*>(t.data_ptr()) + row * row_stride(t) + col;
}

// Tile of the output one thread computes at a time. A 512 x 512 fp32 tile is 1 MB: the GEMM
// writes it and the epilogue reads it back from L2/L3 instead of memory; per BLAS call, packing
// the x rows and W columns costs (512 + 512) * K loads against 512 * 512 * K multiply-adds.
// Measured on this VM for x [4096, 768], W [3072, 768], gelu, time / torch.mm time (interleaved):
//                                          quiet (load ~1)   loaded (load ~8, 3 runs)
//   512 x 512 tiles                          0.97              0.95-0.975
//   256 x 768 tiles                          0.95              0.96-1.0
//   256 x 1024 tiles                         0.94              0.95-1.23
//   one multithreaded at::mm + epilogue      0.95              0.99-1.02
//   1024-row blocks, threaded mm each        0.97              1.17-1.30
// Within 3% of each other on a quiet machine; 512 x 512 holds up best when other processes
// compete for the cores (the work queue moves tiles to whichever thread runs).
constexpr int64_t kTileRows = 512;
constexpr int64_t kTileCols = 512;
// Problems below this many multiply-adds run on one thread (a parallel region costs ~10 us).
constexpr int64_t kParallelMacs = int64_t(1) << 20;

struct Tiles {
  int64_t rows;       // tile height
  int64_t cols;       // tile width
  int64_t row_count;  // tiles down
  int64_t col_count;  // tiles across
  int threads;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tiles of at most kTileRows x kTileCols, of even sizes (513 rows are 3 x 171, not 2 x 256 + 1: a
// 1-row product runs as a matrix-vector product, which both runs slower and sums less accurately).
Tiles plan_tiles(int64_t m, int64_t n, int64_t k, int threads) {
  Tiles tiles{};
  tiles.threads = m * n * std::max<int64_t>(k, 1) < kParallelMacs ? 1 : std::max(threads, 1);
  tiles.row_count = ceil_div(std::max<int64_t>(m, 1), kTileRows);
  tiles.col_count = ceil_div(std::max<int64_t>(n, 1), kTileCols);
  // Few rows (decoding, small batches): cut the columns finer so that every thread has work,
  // down to 64-column tiles. (One thread keeps whole tiles: each tile costs a BLAS call.)
  while (tiles.threads > 1 && tiles.row_count * tiles.col_count < 2 * tiles.threads &&
         ceil_div(n, tiles.col_count * 2) >= 64)
    tiles.col_count *= 2;
  tiles.rows = ceil_div(std::max<int64_t>(m, 1), tiles.row_count);
  tiles.cols = ceil_div(std::max<int64_t>(n, 1), tiles.col_count);
  tiles.row_count = ceil_div(std::max<int64_t>(m, 1), tiles.rows);
  tiles.col_count = ceil_div(std::max<int64_t>(n, 1), tiles.cols);
  return tiles;
}

// Runs body(thread) in an OpenMP parallel region; an exception thrown on any thread (a failed
// at::mm_out, say) is rethrown on the caller's thread instead of terminating the process.
// The bodies call ATen ops, which read thread-local state: each worker takes the caller's (as
// at::parallel_for does). Without it a worker runs outside the caller's torch.inference_mode()
// and refuses to write into its inference tensors ("Inplace update to inference tensor outside
// InferenceMode").
// One thread runs body(0) right here: no region to open and no state to hand over, which is
// most of the fixed cost of a tiny call (x [32, 64] @ W [256, 64]^T + bias, one thread: 52 -> 33 us
// per call; torch's addmm takes 27 us).
template <typename Body>
void parallel_region(int threads, Body&& body) {
  if (threads <= 1) {
    body(0);
    return;
  }
  std::exception_ptr error;
  const at::ThreadLocalState caller_state;
#pragma omp parallel num_threads(threads)
  {
    try {
      at::ThreadLocalStateGuard state_guard(caller_state);
      body(omp_get_thread_num());
    } catch (...) {
#pragma omp critical(engine_linear_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

// Hands out [0, count) to the threads of a parallel_region one index at a time (a shared
// counter): on a shared machine a descheduled thread then delays only its current tile, not a
// fixed share of them.
class WorkQueue {
 public:
  explicit WorkQueue(int64_t count) : count_(count) {}
  template <typename Body>
  void run(Body&& body) {
    for (int64_t i = next_.fetch_add(1); i < count_; i = next_.fetch_add(1)) body(i);
  }

 private:
  const int64_t count_;
  std::atomic<int64_t> next_{0};
};

// Whether bf16 products run on torch's bf16 GEMM (the CPU has bf16 dot products) rather than in
// fp32, decided once per process from the CPU's features. ENGINE_CPU_BF16_PRODUCTS=native or fp32
// overrides it (the tests run both paths on any machine).
bool native_bf16_products() {
  static const bool native = [] {
    if (const char* forced = std::getenv("ENGINE_CPU_BF16_PRODUCTS")) {
      TORCH_CHECK_VALUE(std::strcmp(forced, "native") == 0 || std::strcmp(forced, "fp32") == 0,
                        "ENGINE_CPU_BF16_PRODUCTS must be 'native' or 'fp32', got '", forced, "'");
      return std::strcmp(forced, "native") == 0;
    }
#if defined(__x86_64__) || defined(__i386__)
    // CPUID leaf 7: subleaf 1 EAX bit 5 is AVX512_BF16, subleaf 0 EDX bit 22 is AMX-BF16. Read
    // directly: __builtin_cpu_supports("avx512bf16") / ("amx-bf16") do not compile with older
    // GCCs, and a compile error would cost the whole CPU extension on such a machine.
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool amx_bf16 = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && ((edx >> 22) & 1u);
    const bool avx512_bf16 = __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && ((eax >> 5) & 1u);
    return amx_bf16 || avx512_bf16;
#elif defined(__aarch64__) && defined(__linux__) && defined(HWCAP2_BF16)
    return (getauxval(AT_HWCAP2) & HWCAP2_BF16) != 0;
#else
    return false;
#endif
  }();
  return native;
}

// t as an operand of an out= op, which refuses inputs that require grad: detached only when it
// requires grad (detach() is an ATen op, ~0.5 us through the dispatcher).
at::Tensor without_grad(const at::Tensor& t) { return t.requires_grad() ? t.detach() : t; }

// bf16 products with fewer rows than this stay on torch's bf16 GEMM even without native bf16
// products: there the fp32 copy of W costs more than the product. x [M, 768] @ W [3072, 768]^T +
// bias, gelu, 2 threads, AVX2, fp32 against bf16 products: M = 1: 0.62-0.77 against 0.36-0.39 ms;
// M = 2: 0.9 against 0.6-0.7; M = 4: 0.93-1.5 against 1.2-1.4; M = 8: 1.36-1.55 against 2.1-2.4.
constexpr int64_t kWidenedBf16Rows = 8;

// Calls fn(P{}) with P the type the products of storage type T run in, for x with `rows` rows:
// fp32 for fp16, and for bf16 without native bf16 products (see the file comment); else T.
template <typename T, typename Fn>
void with_product_type(int64_t rows, Fn&& fn) {
  if constexpr (std::is_same_v<T, half>) {
    fn(float{});
  } else if constexpr (std::is_same_v<T, bfloat16>) {
    if (native_bf16_products() || rows < kWidenedBf16Rows) fn(bfloat16{});
    else fn(float{});
  } else {
    fn(T{});
  }
}

}  // namespace

template <typename T>
void linear_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, Activation activation,
                    bool gated, double dropout_p, uint64_t seed, const at::Tensor& residual, const at::Tensor& out,
                    const at::Tensor& pre, const at::Tensor& keep) {
  with_product_type<T>(x.size(0), [&](auto product_type) {
    using A = acc_t<T>;
    using P = decltype(product_type);
    constexpr bool widened = !std::is_same_v<P, T>;  // products in fp32 on fp32 copies of x and W
    const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
    const int64_t width = gated ? n / 2 : n;  // output columns; gated: the up rows of W start at `width`
    // Tiles of the output; a gated tile multiplies x by the gate rows and the up rows of its columns.
    const Tiles tiles = plan_tiles(m, width, k, at::get_num_threads());
    // Operands of the GEMMs (detached: out= ops refuse inputs that require grad, and the caller's
    // grad mode, which the workers take, may be on).
    const at::Tensor x_gemm = widened ? x.detach().to(at::kFloat) : without_grad(x);
    const at::Tensor w_gemm = widened ? weight.detach().to(at::kFloat) : without_grad(weight);
    const at::Tensor bias_gemm = bias.defined() ? without_grad(bias) : bias;
    // Where each tile's product goes: widened -> a per-thread fp32 tile buffer; else straight into
    // pre (the epilogue adds the bias in place) or, without activation, into out.
    const at::Tensor& destination = activation != Activation::kNone ? pre : out;
    const bool bias_in_gemm = std::is_same_v<P, bfloat16> && bias.defined();
    // (widened always: its product is in the fp32 tile buffer and the epilogue converts it into out)
    const bool needs_epilogue = widened || activation != Activation::kNone || (bias.defined() && !bias_in_gemm) ||
                                dropout_p > 0 || residual.defined();
    const T* bias_data = bias.defined() && !bias_in_gemm ? static_cast<const T*>(bias.data_ptr()) : nullptr;

    // One tile (every small call) takes the operands whole, without narrow() views: each ATen op
    // costs ~0.5-1 us through the dispatcher, several per tile. (Gated calls take W in halves.)
    const bool whole = tiles.row_count * tiles.col_count == 1 && !gated;
    // product = x_rows @ W[first : first + count]^T (+ those bias entries when the GEMM adds them)
    auto multiply = [&](at::Tensor product, const at::Tensor& x_rows, int64_t first, int64_t count) {
      const at::Tensor w_rows_t = (whole ? w_gemm : w_gemm.narrow(0, first, count)).t();
      if (bias_in_gemm)
        at::addmm_out(product, whole ? bias_gemm : bias_gemm.narrow(0, first, count), x_rows, w_rows_t);
      else
        at::mm_out(product, x_rows, w_rows_t);
    };
    WorkQueue queue(tiles.row_count * tiles.col_count);
    parallel_region(tiles.threads, [&](int) {
      std::vector<A> scratch(kTileScratch * tiles.cols);
      // widened: [rows, cols] products (gated: [rows, 2 * cols], the gate's columns then the up ones)
      const int64_t buffer_cols = gated ? 2 * tiles.cols : tiles.cols;
      at::Tensor product_buffer = widened ? at::empty({tiles.rows, buffer_cols}, x_gemm.options()) : at::Tensor();
      queue.run([&](int64_t index) {
        const int64_t r0 = (index / tiles.col_count) * tiles.rows, c0 = (index % tiles.col_count) * tiles.cols;
        const int64_t rows = std::min(tiles.rows, m - r0), cols = std::min(tiles.cols, width - c0);
        const at::Tensor x_rows = whole ? x_gemm : x_gemm.narrow(0, r0, rows);
        LinearForwardTile<T, P> tile{};
        if constexpr (widened) {
          const at::Tensor tile_buffer = product_buffer.narrow(0, 0, rows);
          const float* buffer_data = static_cast<const float*>(product_buffer.data_ptr());
          multiply(tile_buffer.narrow(1, 0, cols), x_rows, c0, cols);
          tile.product = buffer_data;
          tile.product_stride = buffer_cols;
          if (gated) {
            multiply(tile_buffer.narrow(1, tiles.cols, cols), x_rows, width + c0, cols);
            tile.up_product = buffer_data + tiles.cols;
          }
        } else {
          multiply(whole ? destination : destination.narrow(0, r0, rows).narrow(1, c0, cols), x_rows, c0, cols);
          tile.product = tile_pointer<T>(destination, r0, c0);
          tile.product_stride = n;
          if (gated) {
            multiply(destination.narrow(0, r0, rows).narrow(1, width + c0, cols), x_rows, width + c0, cols);
            tile.up_product = tile_pointer<T>(destination, r0, width + c0);
          }
        }
        if (!needs_epilogue) return;
        tile.bias = bias_data ? bias_data + c0 : nullptr;
        tile.residual = residual.defined() ? tile_pointer<T>(residual, r0, c0) : nullptr;
        tile.residual_stride = residual.defined() ? row_stride(residual) : 0;
        tile.pre = activation != Activation::kNone ? tile_pointer<T>(pre, r0, c0) : nullptr;
        tile.pre_stride = n;
        tile.out = tile_pointer<T>(out, r0, c0);
        tile.out_stride = width;
        tile.keep = keep.numel() > 0 ? tile_pointer<bool>(keep, r0, c0) : nullptr;
        tile.keep_stride = width;
        tile.gated = gated;
        if (gated) {
          tile.up_bias = bias_data ? bias_data + width + c0 : nullptr;
          tile.up_pre = tile_pointer<T>(pre, r0, width + c0);
        }
        tile.rows = rows;
        tile.cols = cols;
        tile.row0 = r0;
        tile.col0 = c0;
        tile.activation = activation;
        tile.dropout_p = dropout_p;
        tile.seed = seed;
        linear_forward_tile(tile, scratch.data());
      });
    });
  });
}

template <typename T>
void linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& pre, Activation activation, bool gated, double dropout_p, uint64_t seed,
                         bool need_weight_grad, bool need_bias_grad, at::Tensor& dx, at::Tensor& dweight,
                         at::Tensor& dbias) {
  with_product_type<T>(x.size(0), [&](auto product_type) {
    using G = decltype(product_type);
    constexpr bool widened = !std::is_same_v<G, T>;  // products in fp32 on fp32 copies of x and W
    const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
    const at::ScalarType gemm_type = widened ? at::kFloat : x.scalar_type();
    const at::Tensor x_gemm = widened ? x.detach().to(at::kFloat) : x.detach();
    const at::Tensor w_gemm = widened ? weight.detach().to(at::kFloat) : weight.detach();
    const at::Tensor grad = grad_out.detach();
    const bool identity = activation == Activation::kNone && dropout_p == 0;  // g = grad_out
    const int threads = m * n * std::max<int64_t>(k, 1) < kParallelMacs ? 1 : std::max(at::get_num_threads(), 1);
    // dx in the GEMM type (widened: an fp32 buffer, converted at the end).
    at::Tensor dx_gemm = widened ? at::empty({m, k}, x_gemm.options()) : dx;
    at::Tensor bias_partials = need_bias_grad ? at::zeros({threads, n}, x.options().dtype(at::kDouble)) : at::Tensor();
    at::Tensor g;

    if (identity) {
      g = widened ? grad.to(at::kFloat) : grad;
      at::mm_out(dx_gemm, g, w_gemm);
      if (need_bias_grad) {
        // Columns split over the threads: each owns its slice of the sums.
        const int64_t per_thread = (n + threads - 1) / threads;
        parallel_region(threads, [&](int thread) {
          const int64_t c0 = std::min(n, thread * per_thread), cols = std::min(per_thread, n - c0);
          if (cols > 0)
            column_sums(tile_pointer<T>(grad, 0, c0), row_stride(grad), m, cols,
                             static_cast<double*>(bias_partials.data_ptr()) + c0);
        });
      }
    } else {
      // g for all rows when dW needs it afterwards, else one row block per thread.
      const Tiles tiles = plan_tiles(m, n, k, threads);
      const int64_t block_rows = tiles.rows;
      g = need_weight_grad ? new_output({m, n}, x.options().dtype(gemm_type)) : at::Tensor();
      WorkQueue queue(tiles.row_count);
      parallel_region(threads, [&](int thread) {
        std::vector<acc_t<T>> scratch(kTileScratch * n);
        at::Tensor block = need_weight_grad ? at::Tensor() : at::empty({block_rows, n}, x.options().dtype(gemm_type));
        double* bias_grad = need_bias_grad ? static_cast<double*>(bias_partials.data_ptr()) + thread * n : nullptr;
        queue.run([&](int64_t index) {
          const int64_t r0 = index * block_rows, rows = std::min(block_rows, m - r0);
          at::Tensor g_rows = need_weight_grad ? g.narrow(0, r0, rows) : block.narrow(0, 0, rows);
          LinearBackwardTile<T, G> tile{};
          tile.grad_out = tile_pointer<T>(grad, r0, 0);
          tile.grad_stride = row_stride(grad);
          tile.pre = activation != Activation::kNone ? tile_pointer<T>(pre, r0, 0) : nullptr;
          tile.pre_stride = activation != Activation::kNone ? row_stride(pre) : 0;
          tile.g = static_cast<G*>(g_rows.data_ptr());
          tile.g_stride = n;
          tile.bias_grad = bias_grad;
          tile.rows = rows;
          tile.cols = gated ? n / 2 : n;
          tile.row0 = r0;
          tile.col0 = 0;
          tile.activation = activation;
          tile.gated = gated;
          tile.dropout_p = dropout_p;
          tile.seed = seed;
          linear_backward_tile(tile, scratch.data());
          // dx for these rows while g_rows is in cache (FFN forward+backward: 10% faster than
          // materializing all of g first and then one multithreaded g @ W).
          at::Tensor dx_rows = dx_gemm.narrow(0, r0, rows);
          at::mm_out(dx_rows, g_rows, w_gemm);
        });
      });
    }
    if (need_weight_grad) {
      // One multithreaded product over the whole g (MKL's own threading). Measured on the FFN
      // forward+backward (x [4096, 768], d_ff 3072, quiet machine): 2% faster than blocks of dW
      // rows spread over the threads with one single-threaded product each (which was ahead only
      // while other processes competed for the cores).
      at::Tensor dw = at::mm(g.t(), x_gemm);
      dweight = dw.scalar_type() == weight.scalar_type() ? dw : dw.to(weight.scalar_type());
    }
    if (need_bias_grad) dbias = bias_partials.sum(0).to(weight.scalar_type());
    if (widened) dx.copy_(dx_gemm);
  });
}

#define INSTANTIATE(T)                                                                                        \
  template void linear_forward<T>(const at::Tensor&, const at::Tensor&, const at::Tensor&, Activation, bool,     \
                                  double, uint64_t, const at::Tensor&, const at::Tensor&, const at::Tensor&,             \
                                  const at::Tensor&);                                                            \
  template void linear_backward<T>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,   \
                                   Activation, bool, double, uint64_t, bool, bool, at::Tensor&, at::Tensor&,     \
                                   at::Tensor&);
INSTANTIATE(float)
INSTANTIATE(double)
INSTANTIATE(half)
INSTANTIATE(bfloat16)
#undef INSTANTIATE

}  // namespace engine::cpu
