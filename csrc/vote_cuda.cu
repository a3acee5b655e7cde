// Thin torch wrapper registering the CUDA implementation of tempo_vote::aggregate (the kernel
// itself is torch-free, in vote_kernels.cu). Compiled only into CUDA builds of the extension
// (setup.py defines TEMPO_WITH_CUDA when torch has CUDA).
#ifdef TEMPO_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "vote_checks.h"
#include "vote_kernels.cuh"

namespace tempo_vote {
namespace {

using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor>;

Stats aggregate_cuda(const at::Tensor& hashes, const at::Tensor& offsets,
                     const std::optional<at::Tensor>& truth) {
  check_aggregate_args(hashes, offsets, truth);
  TORCH_CHECK(hashes.is_cuda(), "tempo_vote::aggregate (CUDA): hashes must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(hashes.device());
  const at::Tensor h = hashes.contiguous();
  const at::Tensor off = offsets.contiguous();
  const int64_t n = h.numel();
  const int64_t groups = off.numel() - 1;
  const auto opts = h.options();
  at::Tensor majority = at::empty({groups}, opts);
  at::Tensor majority_count = at::empty({groups}, opts);
  at::Tensor agreement = at::empty({n}, opts.dtype(at::kFloat));
  at::Tensor distinct = at::empty({groups}, opts);
  at::Tensor entropy = at::empty({groups}, opts.dtype(at::kFloat));
  at::Tensor correct = at::empty({truth ? groups : 0}, opts);
  at::Tensor majority_correct = at::empty({truth ? groups : 0}, opts.dtype(at::kBool));
  at::Tensor t;
  if (truth) t = truth->contiguous();
  C10_CUDA_CHECK(aggregate_cuda_launch(
      h.data_ptr<int64_t>(), off.data_ptr<int64_t>(), groups,
      truth ? t.data_ptr<int64_t>() : nullptr, majority.data_ptr<int64_t>(),
      majority_count.data_ptr<int64_t>(), agreement.data_ptr<float>(),
      distinct.data_ptr<int64_t>(), entropy.data_ptr<float>(),
      truth ? correct.data_ptr<int64_t>() : nullptr,
      truth ? majority_correct.data_ptr<bool>() : nullptr,
      c10::cuda::getCurrentCUDAStream().stream()));
  return {majority, majority_count, agreement, distinct, entropy, correct, majority_correct};
}

}  // namespace

TORCH_LIBRARY_IMPL(tempo_vote, CUDA, m) { m.impl("aggregate", &aggregate_cuda); }

}  // namespace tempo_vote

#endif  // TEMPO_WITH_CUDA
