"""Test-wide settings."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU, Triton kernels (window_kernel, llm_kernels) run in Triton's CPU interpreter. Set before anything
# imports triton: triton.language's own jit helpers (tl.sum) are built for the interpreter only if it is on then.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tiny test models are far faster on one thread than on two contended ones (CI has 2 cores, and the
# server tests run tritonserver beside the test process).
torch.set_num_threads(1)
