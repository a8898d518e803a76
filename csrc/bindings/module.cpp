// The Python module of the C++ extension: each csrc/bindings/bind_<op>.cpp defines bind_<op>.
#include <torch/extension.h>

namespace engine::bindings {
void bind_layer_norm(pybind11::module& m);
void bind_attention(pybind11::module& m);
void bind_linear(pybind11::module& m);
void bind_rotary(pybind11::module& m);
void bind_cross_entropy(pybind11::module& m);
}  // namespace engine::bindings

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "engine C++ kernels (csrc/)";
  engine::bindings::bind_layer_norm(m);
  engine::bindings::bind_attention(m);
  engine::bindings::bind_linear(m);
  engine::bindings::bind_rotary(m);
  engine::bindings::bind_cross_entropy(m);
}
