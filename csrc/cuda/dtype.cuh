// Maps the launch interface's DType onto CUDA element types.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.h"

namespace wise_cuda {

}  // namespace wise_cuda

namespace wise {
template <>
__host__ __device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__host__ __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__host__ __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
}  // namespace wise

namespace wise_cuda {

// Calls fn with a value of the element type that dtype names.
template <typename Fn>
cudaError_t dispatch_float(DType dtype, Fn fn) {
  switch (dtype) {
    case DType::F32:
      return fn(float{});
    case DType::F16:
      return fn(__half{});
    case DType::BF16:
      return fn(__nv_bfloat16{});
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename Fn>
cudaError_t dispatch_float_or_double(DType dtype, Fn fn) {
  if (dtype == DType::F64) return fn(double{});
  return dispatch_float(dtype, fn);
}

inline unsigned int blocks_for(int64_t work, int threads, int64_t cap = 65535LL * 32) {
  int64_t b = (work + threads - 1) / threads;
  if (b < 1) b = 1;
  return static_cast<unsigned int>(b < cap ? b : cap);
}

}  // namespace wise_cuda

namespace wise_cuda {

// Reads an element in the accumulation type: fp32 for fp32/fp16/bf16, fp64 for fp64.
template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T x) {
  return static_cast<Acc>(wise::to_float(x));
}
template <>
__device__ __forceinline__ double to_acc<double, double>(double x) {
  return x;
}

template <typename T>
__device__ __forceinline__ T from_acc(double x) {
  return static_cast<T>(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(double x) {
  return wise::from_float<__half>(static_cast<float>(x));
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(double x) {
  return wise::from_float<__nv_bfloat16>(static_cast<float>(x));
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, off);
  return v;
}

}  // namespace wise_cuda
