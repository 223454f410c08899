#include "checks.h"

#include <cmath>
#include <sstream>

namespace wise_ext {
namespace {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

bool is_half_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_float_tensor(const at::Tensor& t, const char* op, const std::string& name, bool allow_double) {
  TORCH_CHECK_TYPE(is_half_float(t.scalar_type()) || (allow_double && t.scalar_type() == at::kDouble), op, ": ",
                   name, " must be float32, bfloat16 or float16", allow_double ? " (or float64)" : "", ", got ",
                   t.scalar_type());
}

void check_device(const at::Tensor& t, const char* op, const std::string& name, c10::DeviceType device,
                  const at::Tensor& first) {
  TORCH_CHECK_VALUE(t.device().type() == device, op, ": ", name, " is on ", t.device(), ", but this call runs on ",
                    c10::DeviceTypeName(device, /*lower_case=*/true), ": move every input to one device");
  TORCH_CHECK_VALUE(t.device() == first.device(), op, ": ", name, " is on ", t.device(), ", expected ",
                    first.device(), " like the other inputs");
}

void check_same(const at::Tensor& t, const at::Tensor& ref, const char* op, const std::string& name,
                const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", shape_str(t.sizes()),
                    ", expected ", ref_name, "'s ", shape_str(ref.sizes()));
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                   ", expected ", ref_name, "'s ", ref.scalar_type());
}

void check_finite(double v, const char* op, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v), op, ": ", name, " must be finite, got ", v);
}

}  // namespace

at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

wise::Act parse_act(c10::string_view name, const char* op) {
  static const char* names[] = {"none", "relu", "gelu", "gelu_tanh", "silu"};
  for (int i = 0; i < 5; ++i)
    if (name == names[i]) return static_cast<wise::Act>(i);
  TORCH_CHECK_VALUE(false, op, ": act must be one of none, relu, gelu, gelu_tanh, silu, got '", std::string(name),
                    "'");
}

TiesMergePlan check_ties_merge(const at::Tensor& base, at::TensorList tensors, at::ArrayRef<double> weights,
                               double density, c10::string_view sparsify, c10::string_view consensus,
                               bool normalize, int64_t seed, c10::DeviceType device) {
  const char* op = "ties_merge";
  check_float_tensor(base, op, "base", false);
  check_device(base, op, "base", device, base);
  TORCH_CHECK_VALUE(base.numel() > 0, op, ": base is empty");
  // Radix histograms count in 32 bits.
  TORCH_CHECK_VALUE(base.numel() < (int64_t(1) << 32), op, ": base has ", base.numel(),
                    " elements; at most 2^32 - 1 are supported");
  TORCH_CHECK_VALUE(!tensors.empty(), op, ": tensors is empty, expected at least one tensor to merge");
  for (size_t k = 0; k < tensors.size(); ++k) {
    std::string name = "tensors[" + std::to_string(k) + "]";
    check_same(tensors[k], base, op, name, "base");
    check_device(tensors[k], op, name, device, base);
  }
  TORCH_CHECK_VALUE(weights.size() == tensors.size(), op, ": weights has ", weights.size(),
                    " entries, expected one per tensor (", tensors.size(), ")");
  TORCH_CHECK_VALUE(tensors.size() < (1u << 31), op, ": too many tensors");
  TiesMergePlan plan;
  for (size_t k = 0; k < weights.size(); ++k) {
    TORCH_CHECK_VALUE(std::isfinite(weights[k]), op, ": weights[", k, "] must be finite, got ", weights[k]);
    plan.weights.push_back(static_cast<float>(weights[k]));
  }
  TORCH_CHECK_VALUE(density > 0.0 && density <= 1.0, op, ": density must be in (0, 1], got ", density);
  if (sparsify == "magnitude") {
    plan.sparsify.method = wise::Sparsify::Magnitude;
  } else if (sparsify == "random") {
    plan.sparsify.method = wise::Sparsify::Random;
  } else if (sparsify == "rescaled_random") {
    plan.sparsify.method = wise::Sparsify::RescaledRandom;
  } else if (sparsify == "none") {
    plan.sparsify.method = wise::Sparsify::None;
  } else {
    TORCH_CHECK_VALUE(false, op, ": sparsify must be one of magnitude, random, rescaled_random, none, got '",
                      std::string(sparsify), "'");
  }
  if (consensus == "sum") {
    plan.consensus = wise::Consensus::Sum;
  } else if (consensus == "count") {
    plan.consensus = wise::Consensus::Count;
  } else if (consensus == "none") {
    plan.consensus = wise::Consensus::None;
  } else {
    TORCH_CHECK_VALUE(false, op, ": consensus must be one of sum, count, none, got '", std::string(consensus), "'");
  }
  plan.sparsify.density = static_cast<float>(density);
  plan.sparsify.inv_density = static_cast<float>(1.0 / density);
  plan.sparsify.seed = static_cast<uint64_t>(seed);
  plan.normalize = normalize;
  plan.n_keep = static_cast<int64_t>(density * static_cast<double>(base.numel()));
  return plan;
}

WiseFfnPlan check_wise_ffn(const at::Tensor& a, const at::Tensor& w_main, const at::Tensor& w_sides,
                           const std::optional<at::Tensor>& bias, const at::Tensor& thresholds,
                           const std::optional<at::Tensor>& token_mask, c10::string_view reduce,
                           c10::string_view act, bool transpose, c10::string_view select,
                           c10::DeviceType device) {
  const char* op = "wise_ffn";
  check_float_tensor(a, op, "a", false);
  check_device(a, op, "a", device, a);
  TORCH_CHECK_VALUE(a.dim() == 3, op, ": a must be (batch, tokens, in_features), got shape ", shape_str(a.sizes()));
  TORCH_CHECK_VALUE(a.numel() > 0, op, ": a is empty (shape ", shape_str(a.sizes()), ")");
  WiseFfnPlan p;
  p.batch = a.size(0);
  p.tokens = a.size(1);
  p.in_features = a.size(2);
  TORCH_CHECK_VALUE(w_main.dim() == 2, op, ": w_main must be 2-D, got shape ", shape_str(w_main.sizes()));
  TORCH_CHECK_TYPE(w_main.scalar_type() == a.scalar_type(), op, ": w_main has dtype ", w_main.scalar_type(),
                   ", expected a's ", a.scalar_type());
  check_device(w_main, op, "w_main", device, a);
  const int64_t in_dim = transpose ? 0 : 1;
  TORCH_CHECK_VALUE(w_main.size(in_dim) == p.in_features, op, ": w_main has shape ", shape_str(w_main.sizes()),
                    ", which does not take a's ", p.in_features, " input features",
                    transpose ? " (transpose=True: (in_features, out_features))" : " ((out_features, in_features))");
  p.out_features = w_main.size(1 - in_dim);
  TORCH_CHECK_VALUE(p.out_features > 0, op, ": w_main is empty");
  TORCH_CHECK_VALUE(w_sides.dim() == 3 && w_sides.size(0) >= 1, op,
                    ": w_sides must be (memories, ...) stacking at least one side memory, got shape ",
                    shape_str(w_sides.sizes()));
  TORCH_CHECK_VALUE(w_sides.sizes().slice(1) == w_main.sizes(), op, ": w_sides has shape ",
                    shape_str(w_sides.sizes()), ", expected (memories, ", w_main.size(0), ", ", w_main.size(1),
                    ") like w_main");
  TORCH_CHECK_TYPE(w_sides.scalar_type() == a.scalar_type(), op, ": w_sides has dtype ", w_sides.scalar_type(),
                   ", expected a's ", a.scalar_type());
  check_device(w_sides, op, "w_sides", device, a);
  p.memories = w_sides.size(0);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == p.out_features, op, ": bias has shape ",
                      shape_str(bias->sizes()), ", expected (", p.out_features, ",)");
    TORCH_CHECK_TYPE(bias->scalar_type() == a.scalar_type(), op, ": bias has dtype ", bias->scalar_type(),
                     ", expected a's ", a.scalar_type());
    check_device(*bias, op, "bias", device, a);
  }
  TORCH_CHECK_VALUE(thresholds.dim() == 1 && thresholds.size(0) == p.memories, op, ": thresholds has shape ",
                    shape_str(thresholds.sizes()), ", expected (", p.memories, ",), one per side memory");
  TORCH_CHECK_TYPE(at::isFloatingType(thresholds.scalar_type()), op, ": thresholds must be floating point, got ",
                   thresholds.scalar_type());
  check_device(thresholds, op, "thresholds", device, a);
  if (token_mask.has_value()) {
    TORCH_CHECK_VALUE(token_mask->dim() == 2 && token_mask->size(0) == p.batch && token_mask->size(1) == p.tokens,
                      op, ": token_mask has shape ", shape_str(token_mask->sizes()), ", expected (", p.batch, ", ",
                      p.tokens, ") like a's (batch, tokens)");
    TORCH_CHECK_TYPE(token_mask->scalar_type() == at::kBool || at::isIntegralType(token_mask->scalar_type(), false),
                     op, ": token_mask must be bool or integer (an attention mask), got ",
                     token_mask->scalar_type());
    check_device(*token_mask, op, "token_mask", device, a);
  }
  if (reduce == "mean") {
    p.reduce = Reduce::Mean;
  } else if (reduce == "max") {
    p.reduce = Reduce::Max;
  } else if (reduce == "auto") {
    p.reduce = Reduce::Auto;
  } else {
    TORCH_CHECK_VALUE(false, op, ": reduce must be one of mean, max, auto, got '", std::string(reduce), "'");
  }
  if (select == "score") {
    p.select = Select::Score;
  } else if (select == "latest") {
    p.select = Select::Latest;
  } else {
    TORCH_CHECK_VALUE(false, op, ": select must be score or latest, got '", std::string(select), "'");
  }
  p.act = parse_act(act, op);
  return p;
}

wise::Act check_routing_distance(const at::Tensor& y_main, const at::Tensor& y_side, c10::string_view act,
                                 c10::DeviceType device) {
  const char* op = "routing_distance";
  check_float_tensor(y_main, op, "y_main", true);
  check_device(y_main, op, "y_main", device, y_main);
  check_same(y_side, y_main, op, "y_side", "y_main");
  check_device(y_side, op, "y_side", device, y_main);
  TORCH_CHECK_VALUE(y_main.dim() >= 1 && y_main.numel() > 0, op, ": y_main is empty (shape ",
                    shape_str(y_main.sizes()), ")");
  return parse_act(act, op);
}

wise::Act check_routing_distance_backward(const at::Tensor& grad, const at::Tensor& y_main,
                                          const at::Tensor& y_side, const at::Tensor& distance,
                                          c10::string_view act, c10::DeviceType device) {
  const char* op = "routing_distance_backward";
  wise::Act a = check_routing_distance(y_main, y_side, act, device);
  at::IntArrayRef rows = y_main.sizes().slice(0, y_main.dim() - 1);
  TORCH_CHECK_VALUE(grad.sizes() == rows && distance.sizes() == rows, op, ": grad and distance must have shape ",
                    shape_str(rows), ", got ", shape_str(grad.sizes()), " and ", shape_str(distance.sizes()));
  check_device(grad, op, "grad", device, y_main);
  check_device(distance, op, "distance", device, y_main);
  return a;
}

void check_sharded_sgd_step(const at::Tensor& w, const at::Tensor& grad, const at::Tensor& w0, double lr,
                            double weight_decay, double mask_ratio, double norm_constraint,
                            c10::DeviceType device) {
  const char* op = "sharded_sgd_step_";
  check_float_tensor(w, op, "w", false);
  check_device(w, op, "w", device, w);
  TORCH_CHECK_VALUE(w.numel() > 0, op, ": w is empty");
  check_same(grad, w, op, "grad", "w");
  check_device(grad, op, "grad", device, w);
  check_same(w0, w, op, "w0", "w");
  check_device(w0, op, "w0", device, w);
  check_finite(lr, op, "lr");
  check_finite(weight_decay, op, "weight_decay");
  TORCH_CHECK_VALUE(mask_ratio > 0.0 && mask_ratio <= 1.0, op, ": mask_ratio must be in (0, 1], got ", mask_ratio);
  TORCH_CHECK_VALUE(norm_constraint >= 0.0, op, ": norm_constraint must be >= 0 (inf for no bound), got ",
                    norm_constraint);
}

void check_shard_mask(const at::Tensor& mask, double mask_ratio, c10::DeviceType device) {
  const char* op = "shard_mask";
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ", mask.scalar_type());
  check_device(mask, op, "mask", device, mask);
  TORCH_CHECK_VALUE(mask.is_contiguous(), op, ": mask must be contiguous");
  TORCH_CHECK_VALUE(mask_ratio > 0.0 && mask_ratio <= 1.0, op, ": mask_ratio must be in (0, 1], got ", mask_ratio);
}

}  // namespace wise_ext
