"""Kernel tests: run the Triton kernels in the interpreter when there is no GPU."""

import os

import torch

# Triton reads this when a kernel is decorated, so it must be set before longcat_dist.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
