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

// key_threshold and keep_none come from the tensor's RadixState; rand_word is
// the Philox word of (seed, k, index), used only by the random methods.
WISE_HD float sparsify_delta(float delta, const SparsifyParams& p, uint32_t key_threshold, bool keep_none,
                             uint32_t rand_word) {
  switch (p.method) {
    case Sparsify::Magnitude:
      return (!keep_none && abs_key(delta) >= key_threshold) ? delta : 0.0f;
    case Sparsify::Random:
      return bernoulli(rand_word, p.density) ? delta : 0.0f;
    case Sparsify::RescaledRandom:
      return bernoulli(rand_word, p.density) ? mul_rn(delta, p.inv_density) : 0.0f;
    default:
      return delta;
  }
}

// get(k) returns the k-th sparsified delta. A delta agrees with the elected
// sign only when it is non-zero and of that sign (a trimmed entry never
// counts); with Consensus::None every delta takes part. A zero divisor is 1.
// KMax > 0 promises K <= KMax, so GPU loops unroll and deltas stay in registers.
template <int KMax = 0, typename Get>
WISE_HD float disjoint_merge(int K, const float* weights, Consensus consensus, bool normalize, Get get) {
  constexpr int kLimit = KMax > 0 ? KMax : 0x7FFFFFFF;
  float elect = 0.0f;
  if (consensus == Consensus::Sum) {
WISE_UNROLL
    for (int k = 0; k < kLimit && k < K; ++k) elect = add_rn(elect, mul_rn(weights[k], get(k)));
  } else if (consensus == Consensus::Count) {
WISE_UNROLL
    for (int k = 0; k < kLimit && k < K; ++k) {
      float d = get(k);
      elect = add_rn(elect, static_cast<float>((d > 0.0f) - (d < 0.0f)));
    }
  }
  const bool positive = elect >= 0.0f;
  float num = 0.0f, den = 0.0f;
WISE_UNROLL
  for (int k = 0; k < kLimit && k < K; ++k) {
    float d = get(k);
    bool agree = consensus == Consensus::None || (positive ? d > 0.0f : d < 0.0f);
    if (agree) {
      num = add_rn(num, mul_rn(weights[k], d));
      den = add_rn(den, weights[k]);
    }
  }
  if (!normalize) return num;
  return div_rn(num, den == 0.0f ? 1.0f : den);
}

}  // namespace wise
