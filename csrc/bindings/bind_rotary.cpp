// Torch glue for rotary position embedding: allocate outputs, call the CPU or CUDA kernel.
// Called by engine/ops/rotary.py after engine/functional.py validated the inputs.
#include "bindings/common.h"
#include "cpu/rotary.h"
#ifdef ENGINE_WITH_CUDA
#include "cuda/rotary.h"
#endif

namespace engine::bindings {

static void check_heads(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 4 && (t.stride(3) == 1 || t.size(3) == 1), "rotary: ", name,
              " must be [B, H, S, D] with unit stride in D");
  TORCH_CHECK(t.size(0) == q.size(0) && t.size(2) == q.size(2) && t.size(3) == q.size(3), "rotary: ", name,
              " must match q's B, S and D");
  TORCH_CHECK(t.size(1) * t.size(3) < (int64_t(1) << 30), "rotary: ", name, " has too many heads * D");
}

template <typename T>
static RotaryTensor<T> rotary_tensor(const at::Tensor& in, at::Tensor& out) {
  return RotaryTensor<T>{static_cast<const T*>(in.data_ptr()), in.stride(0), in.stride(1), in.stride(2),
                         mutable_data<T>(out), in.size(1)};
}

// q [B, Hq, S, D], k [B, Hk, S, D] (optional); cos, sin [P, half] contiguous; offsets int64 [B]
// (optional). Returns (q_out, k_out): contiguous, k_out empty without k. conjugate: rotate by the
// opposite angles (the backward).
std::vector<at::Tensor> rotary(const at::Tensor& q, const c10::optional<at::Tensor>& k, const at::Tensor& cos,
                               const at::Tensor& sin, const c10::optional<at::Tensor>& offsets, bool interleaved,
                               bool conjugate) {
  check_heads(q, "q", q);
  const at::Tensor key = k.has_value() ? *k : at::Tensor();
  if (key.defined()) check_heads(key, "k", q);
  TORCH_CHECK(cos.dim() == 2 && cos.is_contiguous() && sin.is_contiguous() && sin.sizes() == cos.sizes(),
              "rotary: cos and sin must be contiguous [P, half]");
  TORCH_CHECK(2 * cos.size(1) <= q.size(3), "rotary: the rotary dim exceeds the head dim");
  const at::Tensor starts = offsets.has_value() ? *offsets : at::Tensor();
  TORCH_CHECK(!starts.defined() || (starts.scalar_type() == at::kLong && starts.is_contiguous()),
              "rotary: offsets must be contiguous int64");
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = key.defined() ? at::empty(key.sizes(), key.options()) : at::empty({0}, q.options());

  dispatch_float_types(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    RotaryArgs<T> args{};
    args.q = rotary_tensor<T>(q, q_out);
    if (key.defined()) args.k = rotary_tensor<T>(key, k_out);
    args.cos = static_cast<const T*>(cos.data_ptr());
    args.sin = static_cast<const T*>(sin.data_ptr());
    args.offsets = starts.defined() ? starts.data_ptr<int64_t>() : nullptr;
    args.batch = q.size(0);
    args.seq = q.size(2);
    args.head_dim = q.size(3);
    args.half = cos.size(1);
    args.interleaved = interleaved;
    args.conjugate = conjugate;
    if (args.batch * args.seq == 0) return;
#ifdef ENGINE_WITH_CUDA
    if (q.is_cuda()) return cuda::rotary(args, current_stream());
#endif
    TORCH_CHECK(q.is_cpu(), "rotary: this build runs CPU tensors only");
    cpu::rotary(args, cpu_threads(q_out.numel() + k_out.numel()));
  });
  return {q_out, k_out};
}

void bind_rotary(pybind11::module& m) {
  m.def("rotary", &rotary, "rotary position embedding of q (and k) -> (q_out, k_out)");
}

}  // namespace engine::bindings
