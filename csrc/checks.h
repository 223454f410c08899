// Argument checks and option parsing shared by the CPU and CUDA kernels, so
// both devices reject the same inputs with the same messages. Every message
// starts with the op's name and names the offending argument.
#pragma once
#include <ATen/ATen.h>
#include <string>
#include <vector>

#include "wise/act.h"
#include "wise/merge.h"

namespace wise_ext {

enum class Reduce : int { Mean = 0, Max = 1, Auto = 2 };
// Which side memory answers a sequence: the highest score (the paper's), or the
// newest one over its threshold (the newest open shard holds the earlier ones'
// changes; with replay, each frozen memory was trained to stay under the older
// memories' edits).
enum class Select : int { Score = 0, Latest = 1 };

wise::Act parse_act(c10::string_view name, const char* op);

struct TiesMergePlan {
  wise::SparsifyParams sparsify;
  wise::Consensus consensus;
  bool normalize;
  int64_t n_keep;             // int(density * numel): how many magnitudes survive the trim
  std::vector<float> weights;
};
TiesMergePlan check_ties_merge(const at::Tensor& base, at::TensorList tensors, at::ArrayRef<double> weights,
                               double density, c10::string_view sparsify, c10::string_view consensus,
                               bool normalize, int64_t seed, c10::DeviceType device);

struct WiseFfnPlan {
  int64_t batch, tokens, in_features, out_features, memories;
  Reduce reduce;
  Select select;
  wise::Act act;
};
WiseFfnPlan check_wise_ffn(const at::Tensor& a, const at::Tensor& w_main, const at::Tensor& w_sides,
                           const std::optional<at::Tensor>& bias, const at::Tensor& thresholds,
                           const std::optional<at::Tensor>& token_mask, c10::string_view reduce,
                           c10::string_view act, bool transpose, c10::string_view select,
                           c10::DeviceType device);

wise::Act check_routing_distance(const at::Tensor& y_main, const at::Tensor& y_side, c10::string_view act,
                                 c10::DeviceType device);
wise::Act check_routing_distance_backward(const at::Tensor& grad, const at::Tensor& y_main,
                                          const at::Tensor& y_side, const at::Tensor& distance,
                                          c10::string_view act, c10::DeviceType device);

void check_sharded_sgd_step(const at::Tensor& w, const at::Tensor& grad, const at::Tensor& w0, double lr,
                            double weight_decay, double mask_ratio, double norm_constraint,
                            c10::DeviceType device);
void check_shard_mask(const at::Tensor& mask, double mask_ratio, c10::DeviceType device);

// Routing scores and distances are fp32, or fp64 for fp64 inputs.
at::ScalarType accumulate_type(at::ScalarType t);

}  // namespace wise_ext
