// One masked, bounded SGD update per element, shared by the CPU and CUDA
// kernels. Elements go four at a time: one Philox call covers four of them.
#pragma once
#include "common.h"
#include "philox.h"

namespace wise {

struct SgdParams {
  float lr, weight_decay, mask_ratio, bound;
  uint64_t seed;
};

inline SgdParams make_sgd_params(double lr, double weight_decay, double mask_ratio, int64_t seed, double bound) {
  return SgdParams{static_cast<float>(lr), static_cast<float>(weight_decay), static_cast<float>(mask_ratio),
                   static_cast<float>(bound), static_cast<uint64_t>(seed)};
}

// Entries outside the shard's mask are left exactly as they are (not even
// clamped), so shards trained from different seeds stay disjoint.
template <typename T>
WISE_HD void sgd_update_quad(T* w, const T* g, const T* w0, int64_t quad, int64_t n, const SgdParams& p) {
  const Philox4 r = philox_block(p.seed, kShardStream, static_cast<uint64_t>(quad));
  for (int e = 0; e < 4; ++e) {
    const int64_t i = quad * 4 + e;
    if (i >= n || !bernoulli(r.v[e], p.mask_ratio)) continue;
    const float wi = to_float(w[i]);
    const float step = mul_rn(p.lr, add_rn(to_float(g[i]), mul_rn(p.weight_decay, wi)));
    float v = sub_rn(wi, step);
    const float origin = to_float(w0[i]);
    const float lo = sub_rn(origin, p.bound), hi = add_rn(origin, p.bound);
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    w[i] = from_float<T>(v);
  }
}

WISE_HD void shard_mask_quad(bool* mask, int64_t quad, int64_t n, uint64_t seed, float ratio) {
  const Philox4 r = philox_block(seed, kShardStream, static_cast<uint64_t>(quad));
  for (int e = 0; e < 4; ++e) {
    const int64_t i = quad * 4 + e;
    if (i < n) mask[i] = bernoulli(r.v[e], ratio);
  }
}

}  // namespace wise
