// Launch functions of the wise_ext CUDA kernels. This header and the .cu files
// need only the CUDA toolkit (no torch headers), so CI compiles them with nvcc
// on machines whose torch has no CUDA; csrc/cuda/register.cpp is the ATen glue.
// Every function returns the launch's cudaError_t for the caller to check.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "wise/act.h"
#include "wise/merge.h"
#include "wise/radix.h"
#include "wise/sgd.h"

namespace wise_cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

// ---- ties_merge ----
struct TiesMergeArgs {
  DType dtype;
  const void* base;
  const void* const* tensors;   // device array of K pointers
  bool tensors_aligned;         // every tensors[k] is 16-byte aligned (checked on the host)
  const float* weights;         // device array of K weights
  int K;
  int64_t numel;
  int64_t n_keep;
  wise::SparsifyParams sparsify;
  wise::Consensus consensus;
  bool normalize;
  void* out;
};
// Bytes of device scratch the call needs (radix states and partial histograms).
size_t ties_merge_workspace_bytes(int K, int sm_count);
cudaError_t ties_merge(const TiesMergeArgs& args, void* workspace, int sm_count, cudaStream_t stream);

// ---- wise_ffn routing and routing_distance ----
// dist[n * M + m] = || act(ys[m*sm + n*sn + :O]) - act(y0[n*O + :O]) ||; acc is float, or double for F64.
cudaError_t token_distances(DType dtype, const void* y0, const void* ys, int64_t N, int64_t M, int64_t O,
                            int64_t stride_m, int64_t stride_n, wise::Act act, void* dist, cudaStream_t stream);
// Per sequence: scores from the token distances (mean / max / auto over unmasked
// tokens) and the choice, all on the device. mask may be null. select 0: the
// highest score over its threshold; 1: the newest memory over its threshold.
cudaError_t route_sequences(const float* dist, const bool* mask, int64_t B, int64_t T, int64_t M, int reduce,
                            int select, const float* thresholds, float* scores, int64_t* choice,
                            cudaStream_t stream);
// out[n] = ys[choice[b(n)], n] for sequences routed to a side memory; other rows keep the main output.
cudaError_t gather_routed(DType dtype, const void* ys, int64_t stride_m, int64_t stride_n, const int64_t* choice,
                          int64_t B, int64_t T, int64_t O, void* out, cudaStream_t stream);
cudaError_t routing_distance_backward(DType dtype, const void* grad, const void* distance, const void* y_main,
                                      const void* y_side, int64_t rows, int64_t H, wise::Act act, void* grad_main,
                                      void* grad_side, cudaStream_t stream);

// ---- sharded SGD ----
cudaError_t sharded_sgd_step(DType dtype, void* w, const void* grad, const void* w0, int64_t n,
                             const wise::SgdParams& params, cudaStream_t stream);
cudaError_t shard_mask(bool* mask, int64_t n, uint64_t seed, float ratio, cudaStream_t stream);

}  // namespace wise_cuda
