// Macros and small arithmetic helpers shared by the C++ and CUDA kernels.
// Everything under csrc/include/wise compiles as plain C++ and as CUDA, so the
// CPU kernels exercise the very code the GPU kernels run.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define WISE_HD __host__ __device__ __forceinline__
#else
#define WISE_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define WISE_UNROLL _Pragma("unroll")
#else
#define WISE_UNROLL
#endif

namespace wise {

// Element conversions; csrc/cuda/dtype.cuh specialises them for CUDA's half
// types, whose implicit conversions torch's build switches off.
template <typename T>
WISE_HD float to_float(T x) {
  return static_cast<float>(x);
}
template <typename T>
WISE_HD T from_float(float x) {
  return static_cast<T>(x);
}

// The sign election must give the same answer on every device. nvcc would fuse
// a*b+c into an FMA, which turns an exact cancellation into a tiny residue of
// either sign; the _rn intrinsics forbid that contraction.
WISE_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
WISE_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
WISE_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
WISE_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

}  // namespace wise
