"""Test setup: Triton kernels run in the interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here, before any
test imports memlayers' Triton modules. On a CUDA machine the real kernels run.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
