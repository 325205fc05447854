"""Keep ``TRITON_INTERPRET=1`` (how CI runs the Triton kernels on a CPU) working.

Triton 3.6's interpreter turns a scalar into a one-element 1-D array and reads a loop bound
(``range(0, K, BLOCK)`` with a run-time ``K``) back with ``int(array)``, which NumPy 2.4
made an error ("only 0-dimensional arrays can be converted to Python scalars"). This
module re-points that one conversion at the array's single element. It changes nothing
when the interpreter is off or NumPy still accepts the conversion.
"""

from __future__ import annotations

import os

import numpy as np


def _numpy_rejects_1d_int() -> bool:
    try:
        int(np.array([1]))
    except TypeError:
        return True
    return False


def patch_triton_interpreter() -> None:
    """Make the interpreter's tensor ``__index__`` read a one-element array's element."""
    if os.environ.get("TRITON_INTERPRET") != "1" or not _numpy_rejects_1d_int():
        return
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor
    if getattr(original, "_memlayers_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._memlayers_patched = True
    interp._patch_lang_tensor = patched
