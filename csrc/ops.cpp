// Every wise_ext operator schema, in one place. Kernels register per device in
// csrc/cpu/*.cpp and csrc/cuda/register.cpp; fake (meta) kernels and autograd
// are registered from Python in wise_ext/ops.py.
#include <torch/library.h>
#include <ATen/ATen.h>

#ifdef WISE_EXT_PYTHON_MODULE
#include <Python.h>
// Importing wise_ext._C runs the static registrations below; the module itself
// carries no Python functions (everything is reached through torch.ops).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
#endif

TORCH_LIBRARY(wise_ext, m) {
  m.def(
      "ties_merge(Tensor base, Tensor[] tensors, float[] weights, float density, str sparsify=\"magnitude\", "
      "str consensus=\"sum\", bool normalize=True, int seed=0) -> Tensor");
  m.def(
      "wise_ffn(Tensor a, Tensor w_main, Tensor w_sides, Tensor? bias, Tensor thresholds, Tensor? token_mask, "
      "str reduce=\"mean\", str act=\"none\", bool transpose=False, str select=\"score\") -> (Tensor out, Tensor scores, Tensor choice)");
  m.def("routing_distance(Tensor y_main, Tensor y_side, str act=\"none\") -> Tensor");
  m.def(
      "routing_distance_backward(Tensor grad, Tensor y_main, Tensor y_side, Tensor distance, str act) "
      "-> (Tensor grad_main, Tensor grad_side)");
  m.def(
      "sharded_sgd_step_(Tensor(a!) w, Tensor grad, Tensor w0, float lr, float weight_decay, float mask_ratio, "
      "int seed, float norm_constraint) -> ()");
  m.def("shard_mask_(Tensor(a!) mask, float mask_ratio, int seed) -> ()");
  m.def("shard_mask(int[] shape, float mask_ratio, int seed, Device? device=None) -> Tensor");
}

// shard_mask only allocates on the requested device and lets the per-device
// shard_mask_ kernel fill it, so one factory serves every backend.
static at::Tensor shard_mask_factory(at::IntArrayRef shape, double mask_ratio, int64_t seed,
                                     std::optional<at::Device> device) {
  at::Tensor mask = at::empty(shape, at::TensorOptions().dtype(at::kBool).device(device.value_or(at::kCPU)));
  static auto fill = c10::Dispatcher::singleton().findSchemaOrThrow("wise_ext::shard_mask_", "").typed<void(
      at::Tensor&, double, int64_t)>();
  fill.call(mask, mask_ratio, seed);
  return mask;
}

TORCH_LIBRARY_IMPL(wise_ext, CompositeExplicitAutograd, m) {
  m.impl("shard_mask", &shard_mask_factory);
}
