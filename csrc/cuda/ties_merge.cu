// CUDA ties_merge. Thresholds: radix select over the float bits of |delta| in
// three digit passes (11, 11, 10 bits). Each pass histograms all K tensors in
// shared memory while reading base once per chunk of tensors, writes one
// partial histogram per block, and a narrowing kernel (one block per tensor)
// sums them and advances that tensor's RadixState on the device: no host
// synchronisation, no sort, no K x numel temporaries. Tensors resolved early
// (a whole bucket, or a bucket of exact zeros) skip the later passes. Then one
// fused pass reads base and the K tensors once with 16-byte loads and writes
// the merged output.
#include <algorithm>

#include "dtype.cuh"
#include "kernels.h"

namespace wise_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBins = 2048;
constexpr int kChunk = 4;        // tensors histogrammed together: 4 x 8 KiB of shared memory
constexpr int kRegisterK = 8;    // up to this many tensors, the merge keeps deltas in registers
constexpr int kDigitBits[3] = {11, 11, 10};

template <typename T>
struct Vec {
  static constexpr int N = 16 / sizeof(T);
};

// Loads N consecutive elements starting at i as floats: one 16-byte load when
// aligned and in bounds, else element by element with zeros past the end.
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* p, int64_t i, int64_t n, bool aligned, float (&out)[N]) {
  if (aligned && i + N <= n) {
    union {
      uint4 raw;
      T v[N];
    } u;
    u.raw = *reinterpret_cast<const uint4*>(p + i);
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = wise::to_float(u.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = i + e < n ? wise::to_float(p[i + e]) : 0.0f;
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_floats(T* p, int64_t i, int64_t n, bool aligned, const float (&v)[N]) {
  if (aligned && i + N <= n) {
    union {
      uint4 raw;
      T v[N];
    } u;
#pragma unroll
    for (int e = 0; e < N; ++e) u.v[e] = wise::from_float<T>(v[e]);
    *reinterpret_cast<uint4*>(p + i) = u.raw;
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (i + e < n) p[i + e] = wise::from_float<T>(v[e]);
  }
}

__global__ void init_states_kernel(wise::RadixState* states, int K, int64_t n_keep, int64_t numel) {
  for (int k = threadIdx.x; k < K; k += blockDim.x) states[k] = wise::radix_start(n_keep, numel);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(const T* base, const T* const* tensors, int K, int64_t numel, bool aligned,
                     const wise::RadixState* states, int shift, int bits, uint32_t* partial, uint32_t* zeros) {
  constexpr int N = Vec<T>::N;
  __shared__ uint32_t hist[kChunk * kMaxBins];
  __shared__ wise::RadixState st[kChunk];
  __shared__ uint32_t zero_count[kChunk];
  const int k0 = blockIdx.y * kChunk;
  const int kc = min(kChunk, K - k0);
  const int bins = 1 << bits;
  if (threadIdx.x < kc) {
    st[threadIdx.x] = states[k0 + threadIdx.x];
    zero_count[threadIdx.x] = 0;
  }
  for (int b = threadIdx.x; b < kChunk * kMaxBins; b += blockDim.x) hist[b] = 0;
  __syncthreads();
  bool pending = false;
  for (int c = 0; c < kc; ++c) pending |= !st[c].resolved;
  if (!pending) return;  // uniform across the block

  uint32_t zc[kChunk] = {0, 0, 0, 0};
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * N;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * N; i < numel; i += stride) {
    float b[N];
    load_floats<T, N>(base, i, numel, aligned, b);
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      if (c >= kc || st[c].resolved) continue;
      float t[N];
      load_floats<T, N>(tensors[k0 + c], i, numel, aligned, t);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        if (i + e >= numel) break;
        const uint32_t key = wise::abs_key(wise::sub_rn(t[e], b[e]));
        if (!wise::radix_in_bucket(key, st[c], shift + bits)) continue;
        // Exact zeros (most entries of a sparse shard) are counted in registers
        // rather than by contended atomics on bin 0.
        if (key == 0)
          ++zc[c];
        else
          atomicAdd(&hist[c * kMaxBins + ((key >> shift) & (bins - 1))], 1u);
      }
    }
  }
#pragma unroll
  for (int c = 0; c < kChunk; ++c) {
    uint32_t z = zc[c];
    for (int off = 16; off > 0; off >>= 1) z += __shfl_down_sync(0xFFFFFFFFu, z, off);
    if ((threadIdx.x & 31) == 0 && z) atomicAdd(&zero_count[c], z);
  }
  __syncthreads();
  for (int c = 0; c < kc; ++c) {
    uint32_t* out = partial + (static_cast<size_t>(blockIdx.x) * K + k0 + c) * kMaxBins;
    for (int b = threadIdx.x; b < bins; b += blockDim.x) out[b] = hist[c * kMaxBins + b] + (b == 0 ? zero_count[c] : 0);
    if (threadIdx.x == 0) zeros[static_cast<size_t>(blockIdx.x) * K + k0 + c] = zero_count[c];
  }
}

// One block per tensor: sums the blocks' partial histograms of one digit and
// narrows the tensor's state with the same radix_narrow the CPU kernel runs.
__global__ void __launch_bounds__(1024)
    narrow_kernel(const uint32_t* partial, const uint32_t* zeros, int blocks, int K, wise::RadixState* states,
                  int shift, int bits, bool first) {
  __shared__ uint32_t hist[kMaxBins];
  __shared__ unsigned long long zero_total;
  const int k = blockIdx.x;
  if (states[k].resolved) return;
  const int bins = 1 << bits;
  if (threadIdx.x == 0) zero_total = 0;
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x) {
    uint32_t h = 0;
    for (int blk = 0; blk < blocks; ++blk) h += partial[(static_cast<size_t>(blk) * K + k) * kMaxBins + b];
    hist[b] = h;
  }
  unsigned long long z = 0;
  for (int blk = threadIdx.x; blk < blocks; blk += blockDim.x) z += zeros[static_cast<size_t>(blk) * K + k];
  atomicAdd(&zero_total, z);
  __syncthreads();
  if (threadIdx.x == 0) {
    wise::RadixState s = states[k];
    wise::radix_narrow(&s, hist, bins, shift, zero_total, first);
    states[k] = s;
  }
}

struct MergeParams {
  int K;
  int64_t numel;
  bool aligned;
  wise::SparsifyParams sparsify;
  wise::Consensus consensus;
  bool normalize;
};

__device__ __forceinline__ bool uses_random(const wise::SparsifyParams& p) {
  return p.method == wise::Sparsify::Random || p.method == wise::Sparsify::RescaledRandom;
}

// Up to kRegisterK tensors: each thread owns N consecutive elements, loads each
// input once with 16-byte loads and keeps the sparsified deltas in registers.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    merge_registers_kernel(const T* base, const T* const* tensors, const float* weights,
                           const wise::RadixState* states, MergeParams p, T* out) {
  constexpr int N = Vec<T>::N;
  float w[kRegisterK];
  const T* tp[kRegisterK];
  uint32_t thr[kRegisterK];
  bool none[kRegisterK];
#pragma unroll
  for (int k = 0; k < kRegisterK; ++k) {
    const bool live = k < p.K;
    w[k] = live ? weights[k] : 0.0f;
    tp[k] = live ? tensors[k] : nullptr;
    thr[k] = live ? states[k].key : 0u;
    none[k] = live ? states[k].keep_none != 0 : true;
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * N;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * N; i < p.numel; i += stride) {
    float b[N];
    load_floats<T, N>(base, i, p.numel, p.aligned, b);
    float kept[kRegisterK][N];
#pragma unroll
    for (int k = 0; k < kRegisterK; ++k) {
      if (k >= p.K) break;
      float t[N];
      load_floats<T, N>(tp[k], i, p.numel, p.aligned, t);
      wise::Philox4 words{{0u, 0u, 0u, 0u}};
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const int64_t idx = i + e;
        if ((e & 3) == 0 && uses_random(p.sparsify))
          words = wise::philox_block(p.sparsify.seed, static_cast<uint32_t>(k), static_cast<uint64_t>(idx >> 2));
        kept[k][e] = wise::sparsify_delta(wise::sub_rn(t[e], b[e]), p.sparsify, thr[k], none[k], words.v[e & 3]);
      }
    }
    float merged[N];
#pragma unroll
    for (int e = 0; e < N; ++e)
      merged[e] = wise::add_rn(b[e], wise::disjoint_merge<kRegisterK>(p.K, w, p.consensus, p.normalize,
                                                                        [&](int k) { return kept[k][e]; }));
    store_floats<T, N>(out, i, p.numel, p.aligned, merged);
  }
}

// Any K: one element per thread, deltas recomputed from global memory (cached)
// each time the election and the mean ask for them.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    merge_generic_kernel(const T* base, const T* const* tensors, const float* weights,
                         const wise::RadixState* states, MergeParams p, T* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.numel; i += stride) {
    const float b = wise::to_float(base[i]);
    auto get = [&](int k) {
      const uint32_t word = uses_random(p.sparsify)
                                ? wise::philox_block(p.sparsify.seed, static_cast<uint32_t>(k),
                                                     static_cast<uint64_t>(i >> 2)).v[i & 3]
                                : 0u;
      return wise::sparsify_delta(wise::sub_rn(wise::to_float(tensors[k][i]), b), p.sparsify, states[k].key,
                                  states[k].keep_none != 0, word);
    };
    out[i] = wise::from_float<T>(wise::add_rn(b, wise::disjoint_merge(p.K, weights, p.consensus, p.normalize, get)));
  }
}

size_t align_up(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

int histogram_blocks(int sm_count) { return std::max(1, std::min(sm_count * 2, 1024)); }

}  // namespace

size_t ties_merge_workspace_bytes(int K, int sm_count) {
  const size_t blocks = static_cast<size_t>(histogram_blocks(sm_count));
  return align_up(sizeof(wise::RadixState) * K) + align_up(blocks * K * kMaxBins * sizeof(uint32_t)) +
         align_up(blocks * K * sizeof(uint32_t));
}

cudaError_t ties_merge(const TiesMergeArgs& a, void* workspace, int sm_count, cudaStream_t stream) {
  return dispatch_float(a.dtype, [&](auto zero) -> cudaError_t {
    using T = decltype(zero);
    const T* base = static_cast<const T*>(a.base);
    const T* const* tensors = reinterpret_cast<const T* const*>(a.tensors);
    T* out = static_cast<T*>(a.out);
    const int blocks = histogram_blocks(sm_count);
    char* ws = static_cast<char*>(workspace);
    auto* states = reinterpret_cast<wise::RadixState*>(ws);
    auto* partial = reinterpret_cast<uint32_t*>(ws + align_up(sizeof(wise::RadixState) * a.K));
    auto* zeros = reinterpret_cast<uint32_t*>(reinterpret_cast<char*>(partial) +
                                              align_up(static_cast<size_t>(blocks) * a.K * kMaxBins * sizeof(uint32_t)));
    const bool aligned = a.tensors_aligned && reinterpret_cast<uintptr_t>(base) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
    const bool magnitude = a.sparsify.method == wise::Sparsify::Magnitude;
    init_states_kernel<<<1, 256, 0, stream>>>(states, a.K, magnitude ? a.n_keep : a.numel, a.numel);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    if (magnitude) {
      int shift = 32;
      for (int pass = 0; pass < 3; ++pass) {
        const int bits = kDigitBits[pass];
        shift -= bits;
        dim3 grid(blocks, (a.K + kChunk - 1) / kChunk);
        histogram_kernel<T><<<grid, kThreads, 0, stream>>>(base, tensors, a.K, a.numel, aligned, states, shift, bits,
                                                           partial, zeros);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
        narrow_kernel<<<a.K, 1024, 0, stream>>>(partial, zeros, blocks, a.K, states, shift, bits, pass == 0);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
      }
    }
    MergeParams p{a.K, a.numel, aligned, a.sparsify, a.consensus, a.normalize};
    if (a.K <= kRegisterK) {
      const int64_t groups = (a.numel + Vec<T>::N - 1) / Vec<T>::N;
      merge_registers_kernel<T><<<blocks_for(groups, kThreads), kThreads, 0, stream>>>(base, tensors, a.weights,
                                                                                       states, p, out);
    } else {
      merge_generic_kernel<T><<<blocks_for(a.numel, kThreads), kThreads, 0, stream>>>(base, tensors, a.weights,
                                                                                      states, p, out);
    }
    return cudaGetLastError();
  });
}

}  // namespace wise_cuda
