// CPU ties_merge: exact per-tensor magnitude thresholds by radix select over
// the float bits (one or two histogram passes that read base and the K tensors
// together), then one fused pass that writes the merged tensor. Work proceeds
// in blocks small enough to stay in cache, so nothing of size K x numel exists.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"

namespace wise_ext {
namespace {

constexpr int64_t kBlock = 1024;  // elements per block; a multiple of 4 for the Philox words

template <typename scalar_t>
struct Inputs {
  const scalar_t* base;
  std::vector<const scalar_t*> tensors;
  int64_t numel;
};

// Calls fn(k, i, delta) for every tensor k and element i of blocks [b0, b1),
// with base converted once per block.
template <typename scalar_t, typename Fn>
void for_each_delta(const Inputs<scalar_t>& in, int64_t b0, int64_t b1, const std::vector<int>& which, Fn fn) {
  float base_buf[kBlock];
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t start = blk * kBlock;
    const int64_t len = std::min(kBlock, in.numel - start);
    for (int64_t i = 0; i < len; ++i) base_buf[i] = static_cast<float>(in.base[start + i]);
    for (int k : which) {
      const scalar_t* t = in.tensors[k] + start;
      for (int64_t i = 0; i < len; ++i) fn(k, start + i, static_cast<float>(t[i]) - base_buf[i]);
    }
  }
}

// Fills states[k] with each tensor's magnitude threshold key: two passes of
// 16-bit digits, the second only for tensors the first did not resolve.
template <typename scalar_t>
void magnitude_thresholds(const Inputs<scalar_t>& in, int64_t n_keep, std::vector<wise::RadixState>& states) {
  constexpr int kBits = 16, kBins = 1 << kBits;
  const int K = static_cast<int>(in.tensors.size());
  std::vector<int> pending;
  for (int k = 0; k < K; ++k) {
    states[k] = wise::radix_start(n_keep, in.numel);
    if (!states[k].resolved) pending.push_back(k);
  }
  const int64_t nblocks = (in.numel + kBlock - 1) / kBlock;
  const int threads = at::get_num_threads();
  const size_t hist_size = static_cast<size_t>(K) * kBins;
  std::vector<uint32_t> hist(static_cast<size_t>(threads) * hist_size);
  std::vector<uint64_t> zeros(static_cast<size_t>(threads) * K);
  for (int shift = 32 - kBits; shift >= 0 && !pending.empty(); shift -= kBits) {
    std::fill(hist.begin(), hist.end(), 0u);
    std::fill(zeros.begin(), zeros.end(), 0u);
    at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
      const int t = at::get_thread_num();
      uint32_t* h = hist.data() + t * hist_size;
      uint64_t* z = zeros.data() + static_cast<size_t>(t) * K;
      for_each_delta(in, b0, b1, pending, [&](int k, int64_t, float d) {
        const uint32_t key = wise::abs_key(d);
        if (!wise::radix_in_bucket(key, states[k], shift + kBits)) return;
        ++h[static_cast<size_t>(k) * kBins + ((key >> shift) & (kBins - 1))];
        z[k] += key == 0;
      });
    });
    std::vector<int> still;
    std::vector<uint64_t> total(kBins);
    for (int k : pending) {
      std::fill(total.begin(), total.end(), 0u);
      uint64_t z = 0;
      for (int t = 0; t < threads; ++t) {
        const uint32_t* h = hist.data() + t * hist_size + static_cast<size_t>(k) * kBins;
        for (int b = 0; b < kBins; ++b) total[b] += h[b];
        z += zeros[static_cast<size_t>(t) * K + k];
      }
      wise::radix_narrow(&states[k], total.data(), kBins, shift, z, shift == 32 - kBits);
      if (!states[k].resolved) still.push_back(k);
    }
    pending.swap(still);
  }
}

template <typename scalar_t>
void merge_pass(const Inputs<scalar_t>& in, const TiesMergePlan& plan, const std::vector<wise::RadixState>& states,
                scalar_t* out) {
  const int K = static_cast<int>(in.tensors.size());
  const int64_t nblocks = (in.numel + kBlock - 1) / kBlock;
  at::parallel_for(0, nblocks, 4, [&](int64_t b0, int64_t b1) {
    std::vector<float> kept(static_cast<size_t>(K) * kBlock);
    std::vector<float> base_buf(kBlock);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t start = blk * kBlock;
      const int64_t len = std::min(kBlock, in.numel - start);
      for (int64_t i = 0; i < len; ++i) base_buf[i] = static_cast<float>(in.base[start + i]);
      for (int k = 0; k < K; ++k) {
        const scalar_t* t = in.tensors[k] + start;
        float* dst = kept.data() + static_cast<size_t>(k) * kBlock;
        wise::Philox4 words{{0, 0, 0, 0}};
        for (int64_t i = 0; i < len; ++i) {
          const int64_t idx = start + i;
          if ((idx & 3) == 0 && plan.sparsify.method != wise::Sparsify::Magnitude &&
              plan.sparsify.method != wise::Sparsify::None)
            words = wise::philox_block(plan.sparsify.seed, static_cast<uint32_t>(k), static_cast<uint64_t>(idx >> 2));
          dst[i] = wise::sparsify_delta(static_cast<float>(t[i]) - base_buf[i], plan.sparsify, states[k].key,
                                        states[k].keep_none, words.v[idx & 3]);
        }
      }
      for (int64_t i = 0; i < len; ++i) {
        const float merged = wise::disjoint_merge(K, plan.weights.data(), plan.consensus, plan.normalize,
                                                  [&](int k) { return kept[static_cast<size_t>(k) * kBlock + i]; });
        out[start + i] = static_cast<scalar_t>(base_buf[i] + merged);
      }
    }
  });
}

at::Tensor ties_merge_cpu(const at::Tensor& base, at::TensorList tensors, at::ArrayRef<double> weights,
                          double density, c10::string_view sparsify, c10::string_view consensus, bool normalize,
                          int64_t seed) {
  TiesMergePlan plan =
      check_ties_merge(base, tensors, weights, density, sparsify, consensus, normalize, seed, at::kCPU);
  // Non-contiguous inputs are copied once; contiguous ones (the usual case) are read in place.
  at::Tensor base_c = base.contiguous();
  std::vector<at::Tensor> tensors_c;
  for (const auto& t : tensors) tensors_c.push_back(t.contiguous());
  at::Tensor out = at::empty_like(base_c, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "ties_merge_cpu", [&] {
    Inputs<scalar_t> in{base_c.const_data_ptr<scalar_t>(), {}, base_c.numel()};
    for (const auto& t : tensors_c) in.tensors.push_back(t.const_data_ptr<scalar_t>());
    std::vector<wise::RadixState> states(tensors_c.size(), wise::RadixState{});
    if (plan.sparsify.method == wise::Sparsify::Magnitude) magnitude_thresholds(in, plan.n_keep, states);
    merge_pass(in, plan, states, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(wise_ext, CPU, m) {
  m.impl("ties_merge", &ties_merge_cpu);
}

}  // namespace wise_ext
