// Argument checks and output buffers shared by the CPU (vote_ops.cpp) and CUDA (vote_cuda.cu)
// implementations of tempo_vote::aggregate. The checks cover only shapes, dtypes and devices:
// the CPU implementation also checks the offset values; the CUDA one trusts them (checking
// would synchronise).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>

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

// The seven outputs of aggregate, in schema order.
using AggregateStats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor>;

// Contiguous truth and the (uninitialised) outputs of one aggregate call on the device of the
// contiguous hashes `h`; without truth, `correct` and `majority_correct` are empty and their
// pointers (like truth_ptr) are null.
struct AggregateBuffers {
  AggregateBuffers(const at::Tensor& h, int64_t groups, const std::optional<at::Tensor>& truth)
      : with_truth(truth.has_value()),
        majority(at::empty({groups}, h.options())),
        majority_count(at::empty({groups}, h.options())),
        agreement(at::empty({h.numel()}, h.options().dtype(at::kFloat))),
        distinct(at::empty({groups}, h.options())),
        entropy(at::empty({groups}, h.options().dtype(at::kFloat))),
        correct(at::empty({with_truth ? groups : 0}, h.options())),
        majority_correct(at::empty({with_truth ? groups : 0}, h.options().dtype(at::kBool))) {
    if (with_truth) t = truth->contiguous();
  }

  const int64_t* truth_ptr() const { return with_truth ? t.data_ptr<int64_t>() : nullptr; }
  int64_t* correct_ptr() const { return with_truth ? correct.data_ptr<int64_t>() : nullptr; }
  bool* majority_correct_ptr() const {
    return with_truth ? majority_correct.data_ptr<bool>() : nullptr;
  }
  AggregateStats outputs() const {
    return {majority, majority_count, agreement, distinct, entropy, correct, majority_correct};
  }

  bool with_truth;
  at::Tensor majority, majority_count, agreement, distinct, entropy, correct, majority_correct;
  at::Tensor t;
};

}  // namespace tempo_vote
