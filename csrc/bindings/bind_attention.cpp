// Torch glue for softmax attention: checks what engine/ops/attention.py promises, allocates the
// outputs, lays out the mask and calls the CPU or CUDA kernel. The contract (shapes, masks,
// causality, GQA, dropout counters, lse, decode) is the docstring of engine/ops/attention.py.
#include "bindings/common.h"
#include "common/attention.h"
#include "cpu/attention.h"
#ifdef ENGINE_WITH_CUDA
#include "cuda/attention.h"
#endif

namespace engine::bindings {

namespace {

void check_heads_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "attention: ", name, " must be 4-D [B, H, S, D], got ", t.dim(), "-D");
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, "attention: ", name, " must have unit stride in its last dim");
}

// The mask as the kernels read it: a [B, Hq, Sq, Sk] view with stride 0 on broadcast dims, bool
// (1-byte) or in the accumulator dtype. A float mask of another dtype is converted on its stored
// elements only: broadcast dims are narrowed to one element first, so a [B, 1, 1, Sk] padding
// mask costs B * Sk conversions and is never expanded in memory.
struct MaskView {
  at::Tensor tensor;  // keeps the (possibly converted) storage alive
  AttentionMaskKind kind = AttentionMaskKind::none;
  int64_t stride[4] = {0, 0, 0, 0};
};

MaskView prepare_mask(const c10::optional<at::Tensor>& mask, at::IntArrayRef shape, at::ScalarType data_dtype) {
  MaskView view;
  if (!mask.has_value() || !mask->defined()) return view;
  at::Tensor m = *mask;
  TORCH_CHECK(m.dim() == 4, "attention: mask must be a 4-D [B, Hq, Sq, Sk] view, got ", m.dim(), "-D");
  TORCH_CHECK(m.sizes() == shape, "attention: mask has shape ", m.sizes(), ", expected ", shape);
  if (m.scalar_type() == at::kBool) {
    view.kind = AttentionMaskKind::boolean;
  } else {
    TORCH_CHECK(at::isFloatingType(m.scalar_type()), "attention: mask must be bool or floating point, got ",
                m.scalar_type());
    view.kind = AttentionMaskKind::additive;
    const at::ScalarType acc = accumulator_dtype(data_dtype);
    if (m.scalar_type() != acc) {
      at::Tensor compact = m;
      for (int64_t d = 0; d < 4; ++d)
        if (compact.stride(d) == 0 && compact.size(d) > 1) compact = compact.narrow(d, 0, 1);
      m = compact.to(acc).expand(shape);
    }
  }
  view.tensor = m;
  for (int64_t d = 0; d < 4; ++d) view.stride[d] = m.size(d) == 1 ? 0 : m.stride(d);
  return view;
}

template <typename Args>
void set_mask(Args& args, const MaskView& mask) {
  args.mask = mask.tensor.defined() ? mask.tensor.data_ptr() : nullptr;
  args.mask_kind = mask.kind;
  args.mask_stride_b = mask.stride[0];
  args.mask_stride_h = mask.stride[1];
  args.mask_stride_q = mask.stride[2];
  args.mask_stride_k = mask.stride[3];
}

template <typename T, typename Args>
void set_inputs(Args& args, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  args.q = static_cast<const T*>(q.data_ptr());
  args.q_stride_b = q.stride(0);
  args.q_stride_h = q.stride(1);
  args.q_stride_s = q.stride(2);
  args.k = static_cast<const T*>(k.data_ptr());
  args.k_stride_b = k.stride(0);
  args.k_stride_h = k.stride(1);
  args.k_stride_s = k.stride(2);
  args.v = static_cast<const T*>(v.data_ptr());
  args.v_stride_b = v.stride(0);
  args.v_stride_h = v.stride(1);
  args.v_stride_s = v.stride(2);
  args.batch = q.size(0);
  args.heads_q = q.size(1);
  args.heads_k = k.size(1);
  args.seq_q = q.size(2);
  args.seq_k = k.size(2);
  args.head_dim = q.size(3);
  args.head_dim_v = v.size(3);
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_heads_tensor(q, "q");
  check_heads_tensor(k, "k");
  check_heads_tensor(v, "v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "attention: q, k, v must share a dtype");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "attention: q, k, v must share a device");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "attention: batch sizes differ");
  TORCH_CHECK(k.size(3) == q.size(3), "attention: q and k head dims differ");
  TORCH_CHECK(v.size(1) == k.size(1) && v.size(2) == k.size(2), "attention: k and v heads or lengths differ");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "attention: query heads must be a multiple of kv heads");
  TORCH_CHECK(k.size(2) < (int64_t(1) << 31) && q.size(2) < (int64_t(1) << 31),
              "attention: sequence lengths must stay below 2^31 (dropout counters are 32-bit)");
}

}  // namespace

// q [B, Hq, Sq, D], k [B, Hk, Sk, D], v [B, Hk, Sk, Dv]; mask None or a [B, Hq, Sq, Sk] view.
// Returns (out [B, Hq, Sq, Dv] in q's dtype, lse [B, Hq, Sq] in the accumulator dtype, keep mask
// bool [B, Hq, Sq, Sk] when return_dropout_mask and dropout_p > 0, else an empty bool tensor).
std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const c10::optional<at::Tensor>& mask, bool causal, double scale,
                                          double dropout_p, int64_t seed, bool return_dropout_mask) {
  check_qkv(q, k, v);
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "attention: dropout_p must be in [0, 1)");
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), Sk = k.size(2), Dv = v.size(3);
  const MaskView mask_view = prepare_mask(mask, {B, Hq, Sq, Sk}, q.scalar_type());
  at::Tensor out = at::empty({B, Hq, Sq, Dv}, q.options());
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(accumulator_dtype(q.scalar_type())));
  const bool want_mask = return_dropout_mask && dropout_p > 0;
  at::Tensor keep = at::empty(want_mask ? at::IntArrayRef{B, Hq, Sq, Sk} : at::IntArrayRef{0},
                              q.options().dtype(at::kBool));

  dispatch_float_types(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    AttentionForwardArgs<T> args{};
    set_inputs<T>(args, q, k, v);
    set_mask(args, mask_view);
    args.seqlens = nullptr;
    args.out = mutable_data<T>(out);
    args.lse = mutable_data<A>(lse);
    args.dropout_mask = want_mask ? static_cast<uint8_t*>(keep.data_ptr()) : nullptr;
    args.scale = static_cast<A>(scale);
    args.causal = causal;
    args.dropout_p = dropout_p;
    args.seed = static_cast<uint64_t>(seed);
    if (out.numel() == 0 && lse.numel() == 0) return;
#ifdef ENGINE_WITH_CUDA
    if (q.is_cuda()) {
      at::Tensor workspace = at::empty({cuda::attention_forward_workspace_bytes(args)}, q.options().dtype(at::kByte));
      return cuda::attention_forward(args, workspace.data_ptr(), current_stream());
    }
#endif
    TORCH_CHECK(q.is_cpu(), "attention: this build runs CPU tensors only");
    cpu::attention_forward(args, cpu_threads(q.numel() + k.numel() + v.numel()));
  });
  return {out, lse, keep};
}

// grad_out, out [B, Hq, Sq, Dv], lse [B, Hq, Sq] and the forward's inputs. Returns (dq, dk, dv),
// contiguous, in the inputs' dtype (dk, dv summed over each GQA group of query heads).
std::vector<at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                           const c10::optional<at::Tensor>& mask, bool causal, double scale,
                                           double dropout_p, int64_t seed) {
  check_qkv(q, k, v);
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "attention: dropout_p must be in [0, 1)");
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), Sk = k.size(2), Dv = v.size(3);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, Hq, Sq, Dv}) && out.sizes() == grad_out.sizes(),
              "attention: grad_out and out must be [B, Hq, Sq, Dv]");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, Hq, Sq}) && lse.scalar_type() == accumulator_dtype(q.scalar_type()),
              "attention: lse must be [B, Hq, Sq] in the accumulator dtype");
  const MaskView mask_view = prepare_mask(mask, {B, Hq, Sq, Sk}, q.scalar_type());
  const at::Tensor dout_c = grad_out.to(q.scalar_type()).contiguous();
  const at::Tensor out_c = out.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor delta = at::empty({B, Hq, Sq}, lse.options());

  dispatch_float_types(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    AttentionBackwardArgs<T> args{};
    set_inputs<T>(args, q, k, v);
    set_mask(args, mask_view);
    args.dout = static_cast<const T*>(dout_c.data_ptr());
    args.out = static_cast<const T*>(out_c.data_ptr());
    args.lse = static_cast<const A*>(lse_c.data_ptr());
    args.dq = mutable_data<T>(dq);
    args.dk = mutable_data<T>(dk);
    args.dv = mutable_data<T>(dv);
    args.delta = mutable_data<A>(delta);
    args.scale = static_cast<A>(scale);
    args.causal = causal;
    args.dropout_p = dropout_p;
    args.seed = static_cast<uint64_t>(seed);
    if (dq.numel() == 0 && dk.numel() == 0 && dv.numel() == 0) return;
#ifdef ENGINE_WITH_CUDA
    if (q.is_cuda()) return cuda::attention_backward(args, current_stream());
#endif
    TORCH_CHECK(q.is_cpu(), "attention: this build runs CPU tensors only");
    cpu::attention_backward(args, cpu_threads(q.numel() + k.numel() + v.numel()));
  });
  return {dq, dk, dv};
}

// q [B, Hq, Sq, D] (the new queries), k_cache [B, Hk, S_max, D], v_cache [B, Hk, S_max, Dv],
// cache_seqlens int32 [B] (valid lengths, clamped to S_max by the kernels), mask None or a
// [B, Hq, Sq, S_max] view. Returns (out [B, Hq, Sq, Dv], lse [B, Hq, Sq]).
std::vector<at::Tensor> attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                         const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& mask,
                                         double scale) {
  check_qkv(q, k_cache, v_cache);
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), S_max = k_cache.size(2), Dv = v_cache.size(3);
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, "attention: cache_seqlens must be [B]");
  TORCH_CHECK(cache_seqlens.device() == q.device(), "attention: cache_seqlens must be on q's device");
  const at::Tensor lengths = cache_seqlens.to(at::kInt).contiguous();
  const MaskView mask_view = prepare_mask(mask, {B, Hq, Sq, S_max}, q.scalar_type());
  at::Tensor out = at::empty({B, Hq, Sq, Dv}, q.options());
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(accumulator_dtype(q.scalar_type())));

  dispatch_float_types(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    AttentionForwardArgs<T> args{};
    set_inputs<T>(args, q, k_cache, v_cache);
    set_mask(args, mask_view);
    args.seqlens = static_cast<const int32_t*>(lengths.data_ptr());
    args.out = mutable_data<T>(out);
    args.lse = mutable_data<A>(lse);
    args.dropout_mask = nullptr;
    args.scale = static_cast<A>(scale);
    args.causal = true;
    args.dropout_p = 0.0;
    args.seed = 0;
    if (out.numel() == 0 && lse.numel() == 0) return;
#ifdef ENGINE_WITH_CUDA
    if (q.is_cuda()) {
      at::Tensor workspace = at::empty({cuda::attention_forward_workspace_bytes(args)}, q.options().dtype(at::kByte));
      return cuda::attention_forward(args, workspace.data_ptr(), current_stream());
    }
#endif
    TORCH_CHECK(q.is_cpu(), "attention: this build runs CPU tensors only");
    cpu::attention_forward(args, cpu_threads(q.numel() + k_cache.numel() + v_cache.numel()));
  });
  return {out, lse};
}

void bind_attention(pybind11::module& m) {
  m.def("attention_forward", &attention_forward,
        "softmax attention forward (q, k, v, mask, causal, scale, dropout_p, seed, return_dropout_mask) "
        "-> (out, lse, dropout_mask)");
  m.def("attention_backward", &attention_backward,
        "softmax attention backward (grad_out, q, k, v, out, lse, mask, causal, scale, dropout_p, seed) "
        "-> (dq, dk, dv)");
  m.def("attention_decode", &attention_decode,
        "attention against a KV cache (q, k_cache, v_cache, cache_seqlens, mask, scale) -> (out, lse)");
}

}  // namespace engine::bindings
