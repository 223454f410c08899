// The per-entry arithmetic of the Ties family: sparsify one delta, then elect a
// sign and take the disjoint mean over K deltas. The CPU and CUDA kernels call
// these same functions, in the same order of fp32 operations as the reference.
#pragma once
#include "common.h"
#include "philox.h"
#include "radix.h"

namespace wise {

enum class Sparsify : int { Magnitude = 0, Random = 1, RescaledRandom = 2, None = 3 };
enum class Consensus : int { Sum = 0, Count = 1, None = 2 };

struct SparsifyParams {
  Sparsify method;
  float density;        // keep probability for the random methods
  float inv_density;    // DARE rescale, fp32(1 / density)
  uint64_t seed;
};

// Magnitude trim: keep the entries whose |delta| key reaches the threshold key.
WISE_HD float trim_magnitude(float delta, uint32_t key_threshold) {
  return abs_key(delta) >= key_threshold ? delta : 0.0f;
}

// key_threshold and keep_none come from the tensor's RadixState; rand_word is
// the Philox word of (seed, k, index), used only by the random methods.
WISE_HD float sparsify_delta(float delta, const SparsifyParams& p, uint32_t key_threshold, bool keep_none,
                             uint32_t rand_word) {
  switch (p.method) {
    case Sparsify::Magnitude:
      return keep_none ? 0.0f : trim_magnitude(delta, key_threshold);
    case Sparsify::Random:
      return bernoulli(rand_word, p.density) ? delta : 0.0f;
    case Sparsify::RescaledRandom:
      return bernoulli(rand_word, p.density) ? mul_rn(delta, p.inv_density) : 0.0f;
    default:
      return delta;
  }
}

// The election and the disjoint mean, one entry and one delta at a time. A
// delta agrees with the elected sign only when it is non-zero and of that sign
// (a trimmed entry never counts); with Consensus::None every delta takes part.
// GPU threads compose these per entry (disjoint_merge below); the CPU kernel
// runs each as a loop over a block of entries, in the same order of fp32 ops.
WISE_HD float elect_step(float elect, float weight, float delta, Consensus consensus) {
  const float sign = (delta > 0.0f ? 1.0f : 0.0f) - (delta < 0.0f ? 1.0f : 0.0f);
  return add_rn(elect, consensus == Consensus::Sum ? mul_rn(weight, delta) : sign);
}

WISE_HD bool agrees(float delta, float elect, Consensus consensus) {
  const bool positive = elect >= 0.0f;
  return (consensus == Consensus::None) | (positive & (delta > 0.0f)) | (!positive & (delta < 0.0f));
}

// Adding a selected zero rather than skipping the addition keeps the loops free
// of data-dependent branches; x + 0 is x (up to the sign of a zero).
WISE_HD float mean_num_step(float num, float weight, float delta, bool agree) {
  return add_rn(num, agree ? mul_rn(weight, delta) : 0.0f);
}
WISE_HD float mean_den_step(float den, float weight, bool agree) {
  return add_rn(den, agree ? weight : 0.0f);
}

// A zero divisor counts as 1.
WISE_HD float mean_finish(float num, float den, bool normalize) {
  return normalize ? div_rn(num, den == 0.0f ? 1.0f : den) : num;
}

// get(k) returns the k-th sparsified delta. KMax > 0 promises K <= KMax, so GPU
// loops unroll and the deltas stay in registers.
template <int KMax = 0, typename Get>
WISE_HD float disjoint_merge(int K, const float* weights, Consensus consensus, bool normalize, Get get) {
  constexpr int kLimit = KMax > 0 ? KMax : 0x7FFFFFFF;
  float elect = 0.0f;
  if (consensus != Consensus::None) {
    WISE_UNROLL
    for (int k = 0; k < kLimit && k < K; ++k) elect = elect_step(elect, weights[k], get(k), consensus);
  }
  float num = 0.0f, den = 0.0f;
  WISE_UNROLL
  for (int k = 0; k < kLimit && k < K; ++k) {
    const float d = get(k);
    const bool agree = agrees(d, elect, consensus);
    num = mean_num_step(num, weights[k], d, agree);
    den = mean_den_step(den, weights[k], agree);
  }
  return mean_finish(num, den, normalize);
}

}  // namespace wise
