// Torch-free CUDA vote aggregation (raw device pointers). Same semantics as
// tempo_vote::aggregate in vote_core.cpp (see the table there), except that the entropy is
// summed in a different order (equal to the CPU value up to float rounding).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace tempo_vote {

// Launches one block per group on `stream`. All pointers are device pointers; truth,
// correct and majority_correct may be null (then no truth statistics are written). offsets
// has groups + 1 entries, starts at 0, is non-decreasing and ends at n (not checked here).
cudaError_t aggregate_cuda_launch(const int64_t* hashes, const int64_t* offsets, int64_t groups,
                                  const int64_t* truth, int64_t* majority,
                                  int64_t* majority_count, float* agreement, int64_t* distinct,
                                  float* entropy, int64_t* correct, bool* majority_correct,
                                  cudaStream_t stream);

}  // namespace tempo_vote
