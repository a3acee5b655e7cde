// Argument checks shared by the CPU (vote_ops.cpp) and CUDA (vote_cuda.cu) implementations
// of tempo_vote::aggregate. Only shapes, dtypes and devices: the CPU implementation also
// checks the offset values; the CUDA one trusts them (checking would synchronise).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace tempo_vote {

inline void check_aggregate_args(const at::Tensor& hashes, const at::Tensor& offsets,
                                 const std::optional<at::Tensor>& truth) {
  TORCH_CHECK(hashes.dim() == 1 && hashes.scalar_type() == at::kLong,
              "tempo_vote::aggregate: hashes must be a 1-D int64 tensor, got ",
              hashes.scalar_type(), " of shape ", hashes.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong && offsets.numel() >= 1,
              "tempo_vote::aggregate: offsets must be a 1-D int64 tensor with G+1 >= 1 entries, got ",
              offsets.scalar_type(), " of shape ", offsets.sizes());
  TORCH_CHECK(offsets.device() == hashes.device(),
              "tempo_vote::aggregate: hashes and offsets must be on the same device");
  if (truth.has_value()) {
    TORCH_CHECK(truth->dim() == 1 && truth->scalar_type() == at::kLong &&
                    truth->numel() == offsets.numel() - 1,
                "tempo_vote::aggregate: truth must be a 1-D int64 tensor of G = ",
                offsets.numel() - 1, " entries, got ", truth->scalar_type(), " of shape ",
                truth->sizes());
    TORCH_CHECK(truth->device() == hashes.device(),
                "tempo_vote::aggregate: truth must be on the device of hashes");
  }
}

}  // namespace tempo_vote
