// CUDA sharded_sgd_step_ and shard_mask: one thread per four elements, the
// same Philox block and the same update function as the CPU kernel, so both
// devices move the same entries by the same amounts.
#include "dtype.cuh"
#include "kernels.h"

namespace wise_cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(T* w, const T* g, const T* w0, int64_t n, wise::SgdParams p) {
  const int64_t quads = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < quads; q += stride)
    wise::sgd_update_quad(w, g, w0, q, n, p);
}

__global__ void __launch_bounds__(kThreads) mask_kernel(bool* mask, int64_t n, uint64_t seed, float ratio) {
  const int64_t quads = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < quads; q += stride)
    wise::shard_mask_quad(mask, q, n, seed, ratio);
}

}  // namespace

cudaError_t sharded_sgd_step(DType dtype, void* w, const void* grad, const void* w0, int64_t n,
                             const wise::SgdParams& params, cudaStream_t stream) {
  return dispatch_float(dtype, [&](auto zero) -> cudaError_t {
    using T = decltype(zero);
    sgd_kernel<T><<<blocks_for((n + 3) / 4, kThreads), kThreads, 0, stream>>>(
        static_cast<T*>(w), static_cast<const T*>(grad), static_cast<const T*>(w0), n, params);
    return cudaGetLastError();
  });
}

cudaError_t shard_mask(bool* mask, int64_t n, uint64_t seed, float ratio, cudaStream_t stream) {
  mask_kernel<<<blocks_for((n + 3) / 4, kThreads), kThreads, 0, stream>>>(mask, n, seed, ratio);
  return cudaGetLastError();
}

}  // namespace wise_cuda
