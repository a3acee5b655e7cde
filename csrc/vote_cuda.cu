// Thin torch wrapper registering the CUDA implementation of tempo_vote::aggregate (the kernel
// itself is torch-free, in vote_kernels.cu). Compiled only into CUDA builds of the extension
// (setup.py defines TEMPO_WITH_CUDA when torch has CUDA).
#ifdef TEMPO_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "vote_checks.h"
#include "vote_kernels.cuh"

namespace tempo_vote {
namespace {

AggregateStats aggregate_cuda(const at::Tensor& hashes, const at::Tensor& offsets,
                              const std::optional<at::Tensor>& truth) {
  check_aggregate_args(hashes, offsets, truth);
  TORCH_CHECK(hashes.is_cuda(), "tempo_vote::aggregate (CUDA): hashes must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(hashes.device());
  const at::Tensor h = hashes.contiguous();
  const at::Tensor off = offsets.contiguous();
  const int64_t groups = off.numel() - 1;
  const AggregateBuffers b(h, groups, truth);
  C10_CUDA_CHECK(aggregate_cuda_launch(
      h.data_ptr<int64_t>(), off.data_ptr<int64_t>(), groups, b.truth_ptr(),
      b.majority.data_ptr<int64_t>(), b.majority_count.data_ptr<int64_t>(),
      b.agreement.data_ptr<float>(), b.distinct.data_ptr<int64_t>(), b.entropy.data_ptr<float>(),
      b.correct_ptr(), b.majority_correct_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  return b.outputs();
}

}  // namespace

TORCH_LIBRARY_IMPL(tempo_vote, CUDA, m) { m.impl("aggregate", &aggregate_cuda); }

}  // namespace tempo_vote

#endif  // TEMPO_WITH_CUDA
