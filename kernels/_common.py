"""Backend selection shared by the ops in this package.

Every op has three implementations: a float64-capable *reference* (plain, materialised
PyTorch, the ground truth of the tests), a *torch* path (memory-aware PyTorch, what runs on
CPU) and a *triton* path (what runs on CUDA). Each op has ONE public dispatch function; it
picks the implementation here, from the device of its inputs and its ``backend`` argument:

- ``auto`` (the default): CUDA tensors -> ``triton`` (when triton is importable), else ``torch``;
- ``triton``: force Triton, also on CPU tensors (needs ``TRITON_INTERPRET=1``; the tests
  use this to run the kernels in Triton's interpreter);
- ``torch``: force the PyTorch path; ``reference``: force the reference.
"""
from __future__ import annotations

import os

import torch

try:  # triton is an optional dependency (the `triton` extra)
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch", "reference")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def backend_for(t: torch.Tensor, backend: str = "auto") -> str:
    """The implementation to run for inputs living where `t` lives ("triton"|"torch"|"reference")."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
    if backend in ("reference", "torch"):
        return backend
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' but triton is not importable")
        if not t.is_cuda and not interpreting():
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton interpreter)")
        return "triton"
    return "triton" if (t.is_cuda and HAS_TRITON) else "torch"


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (accumulation dtype of every op)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
