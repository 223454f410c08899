// ATen glue for the CUDA kernels: argument checks (shared with the CPU
// kernels), the device guard and current stream, scratch from the caching
// allocator, and TORCH_LIBRARY_IMPL(wise_ext, CUDA). Built only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../memory_products.h"
#include "kernels.h"

#include <cstring>

namespace wise_ext {
namespace {

wise_cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return wise_cuda::DType::F32;
    case at::kHalf:
      return wise_cuda::DType::F16;
    case at::kBFloat16:
      return wise_cuda::DType::BF16;
    case at::kDouble:
      return wise_cuda::DType::F64;
    default:
      TORCH_CHECK_TYPE(false, "wise_ext: unsupported dtype ", t.scalar_type());
  }
}

at::Tensor ties_merge_cuda(const at::Tensor& base, at::TensorList tensors, at::ArrayRef<double> weights,
                           double density, c10::string_view sparsify, c10::string_view consensus, bool normalize,
                           int64_t seed) {
  TiesMergePlan plan =
      check_ties_merge(base, tensors, weights, density, sparsify, consensus, normalize, seed, at::kCUDA);
  const c10::cuda::CUDAGuard guard(base.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor base_c = base.contiguous();
  std::vector<at::Tensor> tensors_c;
  for (const auto& t : tensors) tensors_c.push_back(t.contiguous());
  const int K = static_cast<int>(tensors_c.size());

  // Pointers and weights travel in one pinned buffer; the copy is asynchronous.
  at::Tensor host = at::empty({2 * K}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.mutable_data_ptr<int64_t>();
  bool aligned = true;
  for (int k = 0; k < K; ++k) {
    const void* p = tensors_c[k].const_data_ptr();
    aligned &= reinterpret_cast<uintptr_t>(p) % 16 == 0;
    h[k] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p));
  }
  std::memcpy(h + K, plan.weights.data(), sizeof(float) * K);
  const at::Tensor dev = host.to(base.device(), /*non_blocking=*/true);

  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, base.device().index()));
  at::Tensor workspace = at::empty({static_cast<int64_t>(wise_cuda::ties_merge_workspace_bytes(K, sms))},
                                   base.options().dtype(at::kByte));
  at::Tensor out = at::empty_like(base_c, at::MemoryFormat::Contiguous);
  wise_cuda::TiesMergeArgs args;
  args.dtype = dtype_of(base_c);
  args.base = base_c.const_data_ptr();
  args.tensors = reinterpret_cast<const void* const*>(dev.const_data_ptr<int64_t>());
  args.tensors_aligned = aligned;
  args.weights = reinterpret_cast<const float*>(dev.const_data_ptr<int64_t>() + K);
  args.K = K;
  args.numel = base_c.numel();
  args.n_keep = plan.n_keep;
  args.sparsify = plan.sparsify;
  args.consensus = plan.consensus;
  args.normalize = plan.normalize;
  args.out = out.mutable_data_ptr();
  C10_CUDA_CHECK(wise_cuda::ties_merge(args, workspace.mutable_data_ptr(), sms, stream));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> wise_ffn_cuda(const at::Tensor& a, const at::Tensor& w_main,
                                                             const at::Tensor& w_sides,
                                                             const std::optional<at::Tensor>& bias,
                                                             const at::Tensor& thresholds,
                                                             const std::optional<at::Tensor>& token_mask,
                                                             c10::string_view reduce, c10::string_view act,
                                                             bool transpose, c10::string_view select) {
  WiseFfnPlan p = check_wise_ffn(a, w_main, w_sides, bias, thresholds, token_mask, reduce, act, transpose, select,
                                 at::kCUDA);
  const c10::cuda::CUDAGuard guard(a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MemoryProducts y = memory_products(a, w_main, w_sides, bias, transpose);
  const int64_t N = p.batch * p.tokens;
  at::Tensor dist = at::empty({N, p.memories}, a.options().dtype(at::kFloat));
  C10_CUDA_CHECK(wise_cuda::token_distances(dtype_of(a), y.main.const_data_ptr(), y.sides.const_data_ptr(), N,
                                            p.memories, p.out_features, y.sides_stride_m, y.sides_stride_n, p.act,
                                            dist.mutable_data_ptr(), stream));
  const at::Tensor mask = token_mask.has_value() ? token_mask->to(at::kBool).contiguous() : at::Tensor();
  const at::Tensor thr = thresholds.to(at::kFloat).contiguous();
  at::Tensor scores = at::empty({p.batch, p.memories}, a.options().dtype(at::kFloat));
  at::Tensor choice = at::empty({p.batch}, a.options().dtype(at::kLong));
  C10_CUDA_CHECK(wise_cuda::route_sequences(dist.const_data_ptr<float>(),
                                            mask.defined() ? mask.const_data_ptr<bool>() : nullptr, p.batch,
                                            p.tokens, p.memories, static_cast<int>(p.reduce),
                                            static_cast<int>(p.select), thr.const_data_ptr<float>(),
                                            scores.mutable_data_ptr<float>(), choice.mutable_data_ptr<int64_t>(),
                                            stream));
  C10_CUDA_CHECK(wise_cuda::gather_routed(dtype_of(a), y.sides.const_data_ptr(), y.sides_stride_m, y.sides_stride_n,
                                          choice.const_data_ptr<int64_t>(), p.batch, p.tokens, p.out_features,
                                          y.main.mutable_data_ptr(), stream));
  return {y.main.view({p.batch, p.tokens, p.out_features}), scores, choice};
}

at::Tensor routing_distance_cuda(const at::Tensor& y_main, const at::Tensor& y_side, c10::string_view act_name) {
  const wise::Act act = check_routing_distance(y_main, y_side, act_name, at::kCUDA);
  const c10::cuda::CUDAGuard guard(y_main.device());
  const at::Tensor ym = y_main.contiguous(), ys = y_side.contiguous();
  const int64_t H = ym.size(-1), rows = ym.numel() / H;
  at::Tensor d = at::empty(ym.sizes().slice(0, ym.dim() - 1), ym.options().dtype(accumulate_type(ym.scalar_type())));
  C10_CUDA_CHECK(wise_cuda::token_distances(dtype_of(ym), ym.const_data_ptr(), ys.const_data_ptr(), rows, 1, H, 0, H,
                                            act, d.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return d;
}

std::tuple<at::Tensor, at::Tensor> routing_distance_backward_cuda(const at::Tensor& grad, const at::Tensor& y_main,
                                                                  const at::Tensor& y_side,
                                                                  const at::Tensor& distance,
                                                                  c10::string_view act_name) {
  const wise::Act act = check_routing_distance_backward(grad, y_main, y_side, distance, act_name, at::kCUDA);
  const c10::cuda::CUDAGuard guard(y_main.device());
  const at::Tensor ym = y_main.contiguous(), ys = y_side.contiguous();
  const auto acc = accumulate_type(ym.scalar_type());
  const at::Tensor g = grad.to(acc).contiguous(), d = distance.to(acc).contiguous();
  const int64_t H = ym.size(-1), rows = ym.numel() / H;
  at::Tensor gm = at::empty_like(ym), gs = at::empty_like(ys);
  C10_CUDA_CHECK(wise_cuda::routing_distance_backward(dtype_of(ym), g.const_data_ptr(), d.const_data_ptr(),
                                                      ym.const_data_ptr(), ys.const_data_ptr(), rows, H, act,
                                                      gm.mutable_data_ptr(), gs.mutable_data_ptr(),
                                                      c10::cuda::getCurrentCUDAStream()));
  return {gm, gs};
}

void sharded_sgd_step_cuda(at::Tensor& w, const at::Tensor& grad, const at::Tensor& w0, double lr,
                           double weight_decay, double mask_ratio, int64_t seed, double norm_constraint) {
  check_sharded_sgd_step(w, grad, w0, lr, weight_decay, mask_ratio, norm_constraint, at::kCUDA);
  const c10::cuda::CUDAGuard guard(w.device());
  at::Tensor wc = w.contiguous();
  const at::Tensor gc = grad.contiguous(), w0c = w0.contiguous();
  C10_CUDA_CHECK(wise_cuda::sharded_sgd_step(dtype_of(wc), wc.mutable_data_ptr(), gc.const_data_ptr(),
                                             w0c.const_data_ptr(), wc.numel(),
                                             wise::make_sgd_params(lr, weight_decay, mask_ratio, seed, norm_constraint),
                                             c10::cuda::getCurrentCUDAStream()));
  if (!wc.is_same(w)) w.copy_(wc);
}

void shard_mask_cuda(at::Tensor& mask, double mask_ratio, int64_t seed) {
  check_shard_mask(mask, mask_ratio, at::kCUDA);
  const c10::cuda::CUDAGuard guard(mask.device());
  C10_CUDA_CHECK(wise_cuda::shard_mask(mask.mutable_data_ptr<bool>(), mask.numel(), static_cast<uint64_t>(seed),
                                       static_cast<float>(mask_ratio), c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(wise_ext, CUDA, m) {
  m.impl("ties_merge", &ties_merge_cuda);
  m.impl("wise_ffn", &wise_ffn_cuda);
  m.impl("routing_distance", &routing_distance_cuda);
  m.impl("routing_distance_backward", &routing_distance_backward_cuda);
  m.impl("sharded_sgd_step_", &sharded_sgd_step_cuda);
  m.impl("shard_mask_", &shard_mask_cuda);
}

}  // namespace wise_ext
