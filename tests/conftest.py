"""Test-wide settings."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tiny test models are far faster on one thread than on two contended ones (CI has 2 cores, and the
# server tests run tritonserver beside the test process).
torch.set_num_threads(1)
