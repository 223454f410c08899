// CPU ties_merge: exact per-tensor magnitude thresholds by radix select over
// the float bits (one or two histogram passes that read base and the K tensors
// together), then one fused pass that writes the merged tensor. Work proceeds
// in blocks small enough to stay in cache, so nothing of size K x numel exists,
// and each step is a simple loop over a block that the compiler vectorises.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"

namespace wise_ext {
namespace {

constexpr int64_t kBlock = 2048;  // elements per block; a multiple of 4 for the Philox words

template <typename scalar_t>
struct Inputs {
  const scalar_t* base;
  std::vector<const scalar_t*> tensors;
  int64_t numel;
};

template <typename scalar_t>
void load_block(const scalar_t* src, int64_t len, float* dst) {
  for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<float>(src[i]);
}

// Fills states[k] with each tensor's magnitude threshold key: passes of 16-bit
// digits, each only over the tensors the earlier passes did not resolve.
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
    at::parallel_for(0, nblocks, 8, [&](int64_t b0, int64_t b1) {
      const int t = at::get_thread_num();
      std::vector<float> base_buf(kBlock);
      std::vector<uint32_t> keys(kBlock);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t start = blk * kBlock, len = std::min(kBlock, in.numel - start);
        load_block(in.base + start, len, base_buf.data());
        for (int k : pending) {
          const scalar_t* src = in.tensors[k] + start;
          const wise::RadixState state = states[k];  // a local copy: the key stores below cannot alias it
          // Keys of this tensor's block that fall in its bucket; exact zeros are only counted, since
          // a sparse shard has mostly zeros and incrementing one bin for each would serialise the loop.
          int64_t n = 0, z = 0;
          for (int64_t i = 0; i < len; ++i) {
            const uint32_t key = wise::abs_key(static_cast<float>(src[i]) - base_buf[i]);
            const bool in_bucket = wise::radix_in_bucket(key, state, shift + kBits);
            z += in_bucket & (key == 0);
            keys[n] = key;
            n += in_bucket & (key != 0);
          }
          uint32_t* h = hist.data() + t * hist_size + static_cast<size_t>(k) * kBins;
          for (int64_t i = 0; i < n; ++i) ++h[(keys[i] >> shift) & (kBins - 1)];
          h[0] += static_cast<uint32_t>(z);
          zeros[static_cast<size_t>(t) * K + k] += z;
        }
      }
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
  const float* w = plan.weights.data();
  const wise::Consensus consensus = plan.consensus;
  const wise::SparsifyParams sp = plan.sparsify;
  const bool random = sp.method == wise::Sparsify::Random || sp.method == wise::Sparsify::RescaledRandom;
  at::parallel_for(0, nblocks, 4, [&](int64_t b0, int64_t b1) {
    std::vector<float> base_buf(kBlock), delta(kBlock), elect(kBlock), num(kBlock), den(kBlock);
    std::vector<float> kept(static_cast<size_t>(K) * kBlock);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t start = blk * kBlock, len = std::min(kBlock, in.numel - start);
      load_block(in.base + start, len, base_buf.data());
      for (int k = 0; k < K; ++k) {
        float* d = kept.data() + static_cast<size_t>(k) * kBlock;
        const scalar_t* src = in.tensors[k] + start;
        for (int64_t i = 0; i < len; ++i) delta[i] = static_cast<float>(src[i]) - base_buf[i];
        if (random) {
          for (int64_t q = 0; q < len; q += 4) {
            const wise::Philox4 r = wise::philox_block(sp.seed, static_cast<uint32_t>(k),
                                                       static_cast<uint64_t>((start + q) >> 2));
            for (int64_t e = 0; e < 4 && q + e < len; ++e)
              d[q + e] = wise::sparsify_delta(delta[q + e], sp, 0u, false, r.v[e]);
          }
        } else if (sp.method == wise::Sparsify::None) {
          std::copy_n(delta.data(), len, d);
        } else if (states[k].keep_none) {
          std::fill_n(d, len, 0.0f);
        } else {
          const uint32_t key = states[k].key;
          for (int64_t i = 0; i < len; ++i) d[i] = wise::trim_magnitude(delta[i], key);
        }
      }
      std::fill_n(elect.data(), len, 0.0f);
      if (consensus != wise::Consensus::None) {
        for (int k = 0; k < K; ++k) {
          const float* d = kept.data() + static_cast<size_t>(k) * kBlock;
          for (int64_t i = 0; i < len; ++i) elect[i] = wise::elect_step(elect[i], w[k], d[i], consensus);
        }
      }
      std::fill_n(num.data(), len, 0.0f);
      std::fill_n(den.data(), len, 0.0f);
      for (int k = 0; k < K; ++k) {
        const float* __restrict d = kept.data() + static_cast<size_t>(k) * kBlock;
        const float* __restrict e = elect.data();
        float* __restrict nu = num.data();
        float* __restrict de = den.data();
        for (int64_t i = 0; i < len; ++i) {
          const bool agree = wise::agrees(d[i], e[i], consensus);
          nu[i] = wise::mean_num_step(nu[i], w[k], d[i], agree);
          de[i] = wise::mean_den_step(de[i], w[k], agree);
        }
      }
      for (int64_t i = 0; i < len; ++i)
        out[start + i] = static_cast<scalar_t>(base_buf[i] + wise::mean_finish(num[i], den[i], plan.normalize));
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
