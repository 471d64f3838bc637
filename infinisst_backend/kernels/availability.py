"""Whether a kernel can run here, in one place.

* What is installed: :func:`triton_importable` (Triton is imported on first use: the package runs on CPU without
  it), :func:`installed` (found, not imported: FlashInfer's import is slow), :func:`import_flashinfer`.
* Whether Triton's CPU interpreter is on (:func:`interpreting`): the Triton kernels then run on CPU tensors too,
  which is how the tests check them without a GPU.
* Whether a Triton kernel takes tensors like ``x`` (:func:`triton_runs_on`: device and dtype, :func:`pow2_dim`:
  a dimension one ``tl.arange`` spans).
* Whether a kernel was turned off for the process after it failed to build or launch (:class:`KernelSwitch`).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from types import ModuleType

import torch
from torch import Tensor

# The dtypes the Triton kernels (window_kernel, llm_kernels) take.
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def installed(module: str) -> bool:
    """Whether ``module`` can be found (without importing it)."""
    return importlib.util.find_spec(module) is not None


@functools.cache
def triton_importable() -> bool:
    """Whether Triton imports (imported here, once)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def import_flashinfer() -> ModuleType:
    """The ``flashinfer`` module, or a ``RuntimeError`` that says what the flashinfer backend needs."""
    try:
        import flashinfer
    except ImportError as e:  # a clear message instead of a bare ImportError deep in the engine
        raise RuntimeError(
            "attention_backend='flashinfer' needs the flashinfer-python package (0.2.14.post1) and a CUDA GPU "
            f"({type(e).__name__}: {e})"
        ) from e
    return flashinfer


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): the kernels then run on CPU tensors too (tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(x: Tensor) -> bool:
    """Whether a Triton kernel takes tensors like ``x``: a CUDA tensor (any tensor under Triton's interpreter) of
    one of :data:`TRITON_DTYPES`. Says nothing of whether Triton is installed (:func:`triton_importable`)."""
    return (x.is_cuda or interpreting()) and x.dtype in TRITON_DTYPES


def pow2_dim(n: int) -> bool:
    """Whether ``n`` is a power of two of at least 2: a dimension one ``tl.arange`` spans."""
    return n >= 2 and not n & (n - 1)


class KernelSwitch:
    """On until :meth:`disable`: a kernel that could not build or launch here (no compiler, no writable cache
    folder) is off for the rest of the process, with one warning, and its callers keep their reference path."""

    def __init__(self, what: str, logger: logging.Logger):
        self.what = what
        self.logger = logger
        self.reason: str | None = None  # why the kernel was turned off

    @property
    def on(self) -> bool:
        return self.reason is None

    def disable(self, reason: str) -> None:
        if self.reason is None:
            self.logger.warning("%s disabled, using the separate torch ops: %s", self.what, reason)
        self.reason = reason
