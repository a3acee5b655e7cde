// CUDA vote aggregation, torch-free (raw pointers): one block per group (grid-stride over
// groups). Semantics: the table at the top of vote_core.cpp. Per group, a thread owns the
// samples i = threadIdx.x (mod blockDim.x); a sample is a class's representative when no
// earlier sample of the group has its hash, and then it counts its class. The majority is the
// max of key = (count << 32) | (0xFFFFFFFF - first index), i.e. largest count, ties to the
// earliest first occurrence. Cost O(n^2 / blockDim) per group of n samples (fine for vote
// groups of 8..1024); groups up to kTile samples are staged in shared memory. Limits: fewer
// than 2^32 samples per group.
#include "vote_kernels.cuh"

#include <cuda_runtime.h>

namespace tempo_vote {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 2048;  // int64 hashes staged in shared memory (16 KiB)

struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};

// Reduces v over the block and returns the result to every thread. smem: 33 entries.
template <typename T, typename Op>
__device__ T block_all_reduce(T v, T identity, Op op, T* smem) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_warps = (blockDim.x + 31) >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < num_warps ? smem[lane] : identity;
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, o));
    if (lane == 0) smem[32] = v;
  }
  __syncthreads();
  v = smem[32];
  __syncthreads();  // smem may be reused after this
  return v;
}

__global__ void __launch_bounds__(kThreads)
    vote_aggregate_kernel(const int64_t* __restrict__ hashes, const int64_t* __restrict__ offsets,
                          int64_t groups, const int64_t* __restrict__ truth,
                          int64_t* __restrict__ majority, int64_t* __restrict__ majority_count,
                          float* __restrict__ agreement, int64_t* __restrict__ distinct,
                          float* __restrict__ entropy, int64_t* __restrict__ correct,
                          bool* __restrict__ majority_correct) {
  __shared__ int64_t tile[kTile];
  __shared__ unsigned long long red_u[33];
  __shared__ long long red_l[33];
  __shared__ double red_d[33];

  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {
    const int64_t b = offsets[g];
    const int64_t len = offsets[g + 1] - b;
    const bool staged = len <= kTile;
    if (staged)
      for (int64_t i = threadIdx.x; i < len; i += blockDim.x) tile[i] = hashes[b + i];
    __syncthreads();
    const int64_t* h = staged ? tile : hashes + b;
    const int64_t t = truth ? truth[g] : 0;

    long long parsed = 0, ncorrect = 0;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
      const int64_t x = h[i];
      parsed += x != 0;
      ncorrect += x != 0 && x == t;
    }
    parsed = block_all_reduce(parsed, 0LL, SumOp{}, red_l);
    ncorrect = block_all_reduce(ncorrect, 0LL, SumOp{}, red_l);

    const double m = static_cast<double>(parsed);
    unsigned long long key = 0;
    long long nd = 0;
    double ent = 0.0;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
      const int64_t x = h[i];
      if (x == 0) continue;
      bool first = true;
      for (int64_t j = 0; j < i; ++j)
        if (h[j] == x) {
          first = false;
          break;
        }
      if (!first) continue;
      long long c = 1;
      for (int64_t j = i + 1; j < len; ++j) c += h[j] == x;
      ++nd;
      const double cd = static_cast<double>(c);
      ent += __dmul_rn(cd / m, log(m / cd));
      const unsigned long long k = (static_cast<unsigned long long>(c) << 32) |
                                   (0xFFFFFFFFull - static_cast<unsigned long long>(i));
      key = k > key ? k : key;
    }
    key = block_all_reduce(key, 0ull, MaxOp{}, red_u);
    nd = block_all_reduce(nd, 0LL, SumOp{}, red_l);
    ent = block_all_reduce(ent, 0.0, SumOp{}, red_d);

    const int64_t maj = key ? h[0xFFFFFFFFull - (key & 0xFFFFFFFFull)] : 0;
    if (threadIdx.x == 0) {
      majority[g] = maj;
      majority_count[g] = static_cast<int64_t>(key >> 32);
      distinct[g] = nd;
      entropy[g] = static_cast<float>(ent);
      if (truth) {
        correct[g] = ncorrect;
        majority_correct[g] = maj != 0 && maj == t;
      }
    }
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x)
      agreement[b + i] = (maj != 0 && h[i] == maj) ? 1.0f : 0.0f;
    __syncthreads();  // the tile is rewritten by the next group
  }
}

}  // namespace

cudaError_t aggregate_cuda_launch(const int64_t* hashes, const int64_t* offsets, int64_t groups,
                                  const int64_t* truth, int64_t* majority,
                                  int64_t* majority_count, float* agreement, int64_t* distinct,
                                  float* entropy, int64_t* correct, bool* majority_correct,
                                  cudaStream_t stream) {
  if (groups <= 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(groups < (1 << 20) ? groups : (1 << 20));
  vote_aggregate_kernel<<<grid, kThreads, 0, stream>>>(hashes, offsets, groups, truth, majority,
                                                       majority_count, agreement, distinct,
                                                       entropy, correct, majority_correct);
  return cudaGetLastError();
}

}  // namespace tempo_vote
