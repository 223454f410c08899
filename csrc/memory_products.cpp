#include "memory_products.h"

namespace wise_ext {

// addmm with the bias is what nn.Linear and GPT-2's Conv1D run, so a sequence
// routed to the main memory gets exactly the unedited layer's output.
MemoryProducts memory_products(const at::Tensor& a, const at::Tensor& w_main, const at::Tensor& w_sides,
                               const std::optional<at::Tensor>& bias, bool transpose) {
  const int64_t N = a.size(0) * a.size(1), H = a.size(2), M = w_sides.size(0);
  const at::Tensor a2 = a.reshape({N, H});
  const at::Tensor wm = transpose ? w_main : w_main.t();
  MemoryProducts y;
  y.main = bias.has_value() ? at::addmm(*bias, a2, wm) : at::mm(a2, wm);
  const int64_t O = y.main.size(1);
  if (!transpose) {
    // (M, O, H) viewed as one (M*O, H) weight: a single GEMM for every side memory.
    const at::Tensor wf = w_sides.reshape({M * O, H}).t();
    y.sides = bias.has_value() ? at::addmm(bias->repeat({M}), a2, wf) : at::mm(a2, wf);
    y.sides_stride_m = O;
    y.sides_stride_n = M * O;
  } else {
    const at::Tensor a3 = a2.unsqueeze(0).expand({M, N, H});
    y.sides = (bias.has_value() ? at::baddbmm(bias->view({1, 1, O}), a3, w_sides) : at::bmm(a3, w_sides)).contiguous();
    y.sides_stride_m = N * O;
    y.sides_stride_n = O;
  }
  return y;
}

}  // namespace wise_ext
