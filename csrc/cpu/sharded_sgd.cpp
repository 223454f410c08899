// CPU sharded_sgd_step_ and shard_mask_. The shard's Bernoulli mask is redrawn
// from (seed, element index) by Philox on every step instead of being stored.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "wise/sgd.h"

namespace wise_ext {
namespace {

constexpr int64_t kGrain = 1 << 14;  // a multiple of 4: every chunk starts on a Philox block

void sharded_sgd_step_cpu(at::Tensor& w, const at::Tensor& grad, const at::Tensor& w0, double lr,
                          double weight_decay, double mask_ratio, int64_t seed, double norm_constraint) {
  check_sharded_sgd_step(w, grad, w0, lr, weight_decay, mask_ratio, norm_constraint, at::kCPU);
  at::Tensor wc = w.contiguous();
  at::Tensor gc = grad.contiguous(), w0c = w0.contiguous();
  const wise::SgdParams p = wise::make_sgd_params(lr, weight_decay, mask_ratio, seed, norm_constraint);
  const int64_t n = wc.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "sharded_sgd_step_cpu", [&] {
    scalar_t* pw = wc.mutable_data_ptr<scalar_t>();
    const scalar_t* pg = gc.const_data_ptr<scalar_t>();
    const scalar_t* p0 = w0c.const_data_ptr<scalar_t>();
    at::parallel_for(0, (n + 3) / 4, kGrain / 4, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) wise::sgd_update_quad(pw, pg, p0, q, n, p);
    });
  });
  if (!wc.is_same(w)) w.copy_(wc);
}

void shard_mask_cpu(at::Tensor& mask, double mask_ratio, int64_t seed) {
  check_shard_mask(mask, mask_ratio, at::kCPU);
  bool* pm = mask.mutable_data_ptr<bool>();
  const int64_t n = mask.numel();
  const float p = static_cast<float>(mask_ratio);
  at::parallel_for(0, (n + 3) / 4, kGrain / 4, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) wise::shard_mask_quad(pm, q, n, static_cast<uint64_t>(seed), p);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(wise_ext, CPU, m) {
  m.impl("sharded_sgd_step_", &sharded_sgd_step_cpu);
  m.impl("shard_mask_", &shard_mask_cpu);
}

}  // namespace wise_ext
