// CUDA routing kernels of wise_ffn and routing_distance. The products come
// from cuBLAS (through ATen, in register.cpp); these kernels take them from
// there: per-token distances of every memory in one pass, the per-sequence
// reduction and choice on the device, and a copy of the chosen rows. Nothing
// synchronises with the host, so the whole layer can be captured in a graph.
#include <cfloat>
#include <type_traits>

#include "dtype.cuh"
#include "kernels.h"

namespace wise_cuda {
namespace {

constexpr int kThreads = 256;

// One warp per (token, memory) pair.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    token_distance_kernel(const T* y0, const T* ys, int64_t N, int64_t M, int64_t O, int64_t stride_m,
                          int64_t stride_n, wise::Act act, Acc* dist) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < N * M; r += warps) {
    const int64_t n = r / M, m = r % M;
    const T* main_row = y0 + n * O;
    const T* side_row = ys + m * stride_m + n * stride_n;
    Acc ss = Acc(0);
    for (int64_t j = lane; j < O; j += 32) {
      const Acc diff = wise::act_forward(to_acc<Acc>(side_row[j]), act) - wise::act_forward(to_acc<Acc>(main_row[j]), act);
      ss += diff * diff;
    }
    ss = warp_sum(ss);
    if (lane == 0) dist[r] = sqrt(ss);
  }
}

// One block per sequence: the score of each memory over the unmasked tokens
// (mean, max, or auto: max past 100 tokens, EasyEdit's rule), then the choice.
__global__ void __launch_bounds__(kThreads)
    route_kernel(const float* dist, const bool* mask, int64_t T, int64_t M, int reduce, int select,
                 const float* thresholds, float* scores, int64_t* choice) {
  __shared__ float red_sum[kThreads / 32], red_max[kThreads / 32];
  __shared__ int red_count[kThreads / 32];
  const int64_t b = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  int best = -1, latest = -1;
  float best_score = 0.0f;
  for (int64_t m = 0; m < M; ++m) {
    float s = 0.0f, mx = 0.0f;
    int count = 0;
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
      if (mask != nullptr && !mask[b * T + t]) continue;
      const float d = dist[(b * T + t) * M + m];
      s += d;
      mx = fmaxf(mx, d);
      ++count;
    }
    s = warp_sum(s);
    count = warp_sum(count);
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_down_sync(0xFFFFFFFFu, mx, off));
    if (lane == 0) {
      red_sum[warp] = s;
      red_max[warp] = mx;
      red_count[warp] = count;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.0f, top = 0.0f;
      int n = 0;
      for (int w = 0; w < kThreads / 32; ++w) {
        total += red_sum[w];
        top = fmaxf(top, red_max[w]);
        n += red_count[w];
      }
      const bool use_max = reduce == 1 || (reduce == 2 && n > 100);
      const float score = use_max ? top : (n > 0 ? total / static_cast<float>(n) : 0.0f);
      scores[b * M + m] = score;
      if (best < 0 || score > best_score) {
        best = static_cast<int>(m);
        best_score = score;
      }
      if (score > thresholds[m]) latest = static_cast<int>(m);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) choice[b] = select == 1 ? latest : (best_score > thresholds[best] ? best : -1);
}

// One block per token row; rows of sequences left on the main memory are not touched.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const T* ys, int64_t stride_m, int64_t stride_n, const int64_t* choice, int64_t N, int64_t T_,
                  int64_t O, T* out) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const int64_t c = choice[n / T_];
    if (c < 0) continue;
    const T* src = ys + c * stride_m + n * stride_n;
    for (int64_t j = threadIdx.x; j < O; j += blockDim.x) out[n * O + j] = src[j];
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    distance_backward_kernel(const Acc* grad, const Acc* distance, const T* ym, const T* ys, int64_t rows, int64_t H,
                             wise::Act act, T* gm, T* gs) {
  const int64_t total = rows * H;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t r = i / H;
    const Acc d = distance[r];
    const Acc scale = d > Acc(0) ? grad[r] / d : Acc(0);
    const Acc xm = to_acc<Acc>(ym[i]), xs = to_acc<Acc>(ys[i]);
    const Acc g = scale * (wise::act_forward(xs, act) - wise::act_forward(xm, act));
    gs[i] = from_acc<T>(g * wise::act_derivative(xs, act));
    gm[i] = from_acc<T>(-g * wise::act_derivative(xm, act));
  }
}

}  // namespace

cudaError_t token_distances(DType dtype, const void* y0, const void* ys, int64_t N, int64_t M, int64_t O,
                            int64_t stride_m, int64_t stride_n, wise::Act act, void* dist, cudaStream_t stream) {
  return dispatch_float_or_double(dtype, [&](auto zero) -> cudaError_t {
    using T = decltype(zero);
    using Acc = typename std::conditional<std::is_same<T, double>::value, double, float>::type;
    token_distance_kernel<T, Acc><<<blocks_for(N * M * 32, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(y0), static_cast<const T*>(ys), N, M, O, stride_m, stride_n, act, static_cast<Acc*>(dist));
    return cudaGetLastError();
  });
}

cudaError_t route_sequences(const float* dist, const bool* mask, int64_t B, int64_t T, int64_t M, int reduce,
                            int select, const float* thresholds, float* scores, int64_t* choice,
                            cudaStream_t stream) {
  if (B > 2147483647LL) return cudaErrorInvalidValue;
  route_kernel<<<static_cast<unsigned int>(B), kThreads, 0, stream>>>(dist, mask, T, M, reduce, select, thresholds,
                                                                      scores, choice);
  return cudaGetLastError();
}

cudaError_t gather_routed(DType dtype, const void* ys, int64_t stride_m, int64_t stride_n, const int64_t* choice,
                          int64_t B, int64_t T, int64_t O, void* out, cudaStream_t stream) {
  return dispatch_float(dtype, [&](auto zero) -> cudaError_t {
    using Elem = decltype(zero);
    const int64_t N = B * T;
    gather_kernel<Elem><<<blocks_for(N, 1), kThreads, 0, stream>>>(static_cast<const Elem*>(ys), stride_m, stride_n,
                                                                   choice, N, T, O, static_cast<Elem*>(out));
    return cudaGetLastError();
  });
}

cudaError_t routing_distance_backward(DType dtype, const void* grad, const void* distance, const void* y_main,
                                      const void* y_side, int64_t rows, int64_t H, wise::Act act, void* grad_main,
                                      void* grad_side, cudaStream_t stream) {
  return dispatch_float_or_double(dtype, [&](auto zero) -> cudaError_t {
    using T = decltype(zero);
    using Acc = typename std::conditional<std::is_same<T, double>::value, double, float>::type;
    distance_backward_kernel<T, Acc><<<blocks_for(rows * H, kThreads), kThreads, 0, stream>>>(
        static_cast<const Acc*>(grad), static_cast<const Acc*>(distance), static_cast<const T*>(y_main),
        static_cast<const T*>(y_side), rows, H, act, static_cast<T*>(grad_main), static_cast<T*>(grad_side));
    return cudaGetLastError();
  });
}

}  // namespace wise_cuda
