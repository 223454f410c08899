// CPU wise_ffn and routing_distance. The products go through ATen's GEMM (one
// for the main memory, one for all side memories together); the routing pass
// below computes every memory's per-token distance, reduces it per sequence,
// picks a memory and overwrites only the rows of sequences routed to a side.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "../memory_products.h"

namespace wise_ext {
namespace {

template <typename scalar_t, typename acc_t>
void route_sequences(const WiseFfnPlan& p, const scalar_t* y0, const scalar_t* ys, int64_t ys_stride_m,
                     int64_t ys_stride_n, const bool* mask, const float* thresholds, acc_t* scores,
                     int64_t* choice, scalar_t* out) {
  const int64_t N = p.batch * p.tokens, M = p.memories, O = p.out_features;
  std::vector<acc_t> dist(static_cast<size_t>(N * M));
  at::parallel_for(0, N * M, std::max<int64_t>(1, 32768 / O), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / M, m = i % M;
      dist[i] = std::sqrt(wise::squared_distance<acc_t>(y0 + n * O, ys + m * ys_stride_m + n * ys_stride_n, O, p.act));
    }
  });
  for (int64_t b = 0; b < p.batch; ++b) {
    int64_t count = 0;
    for (int64_t t = 0; t < p.tokens; ++t) count += mask == nullptr || mask[b * p.tokens + t];
    const bool use_max = p.reduce == Reduce::Max || (p.reduce == Reduce::Auto && count > 100);
    int64_t best = -1, latest = -1;
    acc_t best_score = acc_t(0);
    for (int64_t m = 0; m < M; ++m) {
      acc_t acc = acc_t(0);
      for (int64_t t = 0; t < p.tokens; ++t) {
        if (mask != nullptr && !mask[b * p.tokens + t]) continue;
        const acc_t d = dist[(b * p.tokens + t) * M + m];
        acc = use_max ? std::max(acc, d) : acc + d;
      }
      const acc_t score = (use_max || count == 0) ? acc : acc / static_cast<acc_t>(count);
      scores[b * M + m] = score;
      if (best < 0 || score > best_score) {
        best = m;
        best_score = score;
      }
      if (score > static_cast<acc_t>(thresholds[m])) latest = m;
    }
    if (p.select == Select::Latest) {
      choice[b] = latest;
    } else {
      choice[b] = best_score > static_cast<acc_t>(thresholds[best]) ? best : -1;
    }
  }
  at::parallel_for(0, p.batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (choice[b] < 0) continue;
      for (int64_t t = 0; t < p.tokens; ++t) {
        const int64_t n = b * p.tokens + t;
        std::copy_n(ys + choice[b] * ys_stride_m + n * ys_stride_n, O, out + n * O);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> wise_ffn_cpu(const at::Tensor& a, const at::Tensor& w_main,
                                                            const at::Tensor& w_sides,
                                                            const std::optional<at::Tensor>& bias,
                                                            const at::Tensor& thresholds,
                                                            const std::optional<at::Tensor>& token_mask,
                                                            c10::string_view reduce, c10::string_view act,
                                                            bool transpose, c10::string_view select) {
  WiseFfnPlan p = check_wise_ffn(a, w_main, w_sides, bias, thresholds, token_mask, reduce, act, transpose, select,
                                 at::kCPU);
  MemoryProducts y = memory_products(a, w_main, w_sides, bias, transpose);
  at::Tensor mask = token_mask.has_value() ? token_mask->to(at::kBool).contiguous() : at::Tensor();
  at::Tensor thr = thresholds.to(at::kFloat).contiguous();
  at::Tensor scores = at::empty({p.batch, p.memories}, a.options().dtype(accumulate_type(a.scalar_type())));
  at::Tensor choice = at::empty({p.batch}, a.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "wise_ffn_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    route_sequences<scalar_t, acc_t>(p, y.main.const_data_ptr<scalar_t>(), y.sides.const_data_ptr<scalar_t>(),
                                     y.sides_stride_m, y.sides_stride_n,
                                     mask.defined() ? mask.const_data_ptr<bool>() : nullptr,
                                     thr.const_data_ptr<float>(), scores.mutable_data_ptr<acc_t>(),
                                     choice.mutable_data_ptr<int64_t>(), y.main.mutable_data_ptr<scalar_t>());
  });
  return {y.main.view({p.batch, p.tokens, p.out_features}), scores, choice};
}

at::Tensor routing_distance_cpu(const at::Tensor& y_main, const at::Tensor& y_side, c10::string_view act_name) {
  const wise::Act act = check_routing_distance(y_main, y_side, act_name, at::kCPU);
  at::Tensor ym = y_main.contiguous(), ys = y_side.contiguous();
  const int64_t H = ym.size(-1), rows = ym.numel() / H;
  at::Tensor d = at::empty(ym.sizes().slice(0, ym.dim() - 1), ym.options().dtype(accumulate_type(ym.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ym.scalar_type(), "routing_distance_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pm = ym.const_data_ptr<scalar_t>();
    const scalar_t* ps = ys.const_data_ptr<scalar_t>();
    acc_t* pd = d.mutable_data_ptr<acc_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / H), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) pd[r] = std::sqrt(wise::squared_distance<acc_t>(pm + r * H, ps + r * H, H, act));
    });
  });
  return d;
}

// d = ||act(ys) - act(ym)||: the gradient is grad * diff / d times act' on each
// side, and zero where d = 0 (the subgradient that leaves equal memories alone).
std::tuple<at::Tensor, at::Tensor> routing_distance_backward_cpu(const at::Tensor& grad, const at::Tensor& y_main,
                                                                 const at::Tensor& y_side,
                                                                 const at::Tensor& distance,
                                                                 c10::string_view act_name) {
  const wise::Act act = check_routing_distance_backward(grad, y_main, y_side, distance, act_name, at::kCPU);
  at::Tensor ym = y_main.contiguous(), ys = y_side.contiguous();
  const int64_t H = ym.size(-1), rows = ym.numel() / H;
  at::Tensor acc_type_grad = grad.to(accumulate_type(ym.scalar_type())).contiguous();
  at::Tensor acc_type_d = distance.to(accumulate_type(ym.scalar_type())).contiguous();
  at::Tensor gm = at::empty_like(ym), gs = at::empty_like(ys);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ym.scalar_type(), "routing_distance_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pm = ym.const_data_ptr<scalar_t>();
    const scalar_t* ps = ys.const_data_ptr<scalar_t>();
    const acc_t* pg = acc_type_grad.const_data_ptr<acc_t>();
    const acc_t* pd = acc_type_d.const_data_ptr<acc_t>();
    scalar_t* om = gm.mutable_data_ptr<scalar_t>();
    scalar_t* os = gs.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / H), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t scale = pd[r] > acc_t(0) ? pg[r] / pd[r] : acc_t(0);
        for (int64_t j = r * H; j < (r + 1) * H; ++j) {
          const acc_t xm = static_cast<acc_t>(pm[j]), xs = static_cast<acc_t>(ps[j]);
          const acc_t g = scale * (wise::act_forward(xs, act) - wise::act_forward(xm, act));
          os[j] = static_cast<scalar_t>(g * wise::act_derivative(xs, act));
          om[j] = static_cast<scalar_t>(-g * wise::act_derivative(xm, act));
        }
      }
    });
  });
  return {gm, gs};
}

}  // namespace

TORCH_LIBRARY_IMPL(wise_ext, CPU, m) {
  m.impl("wise_ffn", &wise_ffn_cpu);
  m.impl("routing_distance", &routing_distance_cpu);
  m.impl("routing_distance_backward", &routing_distance_backward_cpu);
}

}  // namespace wise_ext
