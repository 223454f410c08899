// The GEMM half of wise_ffn, shared by the CPU and CUDA kernels: the main
// memory's product and all side memories' products, each one ATen GEMM.
#pragma once
#include <ATen/ATen.h>

namespace wise_ext {

struct MemoryProducts {
  at::Tensor main;         // (tokens, out), contiguous
  at::Tensor sides;        // the M side products; element (m, n, j) at m*stride_m + n*stride_n + j
  int64_t sides_stride_m;
  int64_t sides_stride_n;
};

MemoryProducts memory_products(const at::Tensor& a, const at::Tensor& w_main, const at::Tensor& w_sides,
                               const std::optional<at::Tensor>& bias, bool transpose);

}  // namespace wise_ext
