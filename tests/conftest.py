"""Test setup: Triton kernels run in the interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here, before any
test imports memlayers' Triton modules. On a CUDA machine the real kernels run.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Import Triton now, with the variable set: its own @jit helpers (tl.zeros, tl.topk)
    # are decorated at import, and a test that unsets the variable (a monkeypatch) must
    # not be the first to import it, or kernels later run half-interpreted.
    import triton  # noqa: F401
