"""Keep ``TRITON_INTERPRET=1`` (how CI runs the Triton kernels on a CPU) working.

- Triton 3.6's interpreter turns a scalar into a one-element 1-D array and reads a loop
  bound (``range(0, K, BLOCK)`` with a run-time ``K``) back with ``int(array)``, which
  NumPy 2.4 made an error ("only 0-dimensional arrays can be converted to Python
  scalars"): that one conversion is re-pointed at the array's single element.
- The interpreter (3.9 seen) stores bf16 values as their uint16 bits and ``tl.dot``
  multiplies those bits as integers: bf16 operands are widened to fp32 first (exact), as
  the GPU's tensor cores multiply them.

Each patch changes nothing when the interpreter is off, or when the interpreter lacks
what it patches.
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
    """Apply the module's patches to the interpreter, once, when it is on."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton.runtime.interpreter as interp

    if _numpy_rejects_1d_int():
        _patch_index(interp)
    _patch_bf16_dot(interp)


def _patch_index(interp) -> None:
    """Make the interpreter's tensor ``__index__`` read a one-element array's element."""
    original = interp._patch_lang_tensor
    if getattr(original, "_memlayers_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._memlayers_patched = True
    interp._patch_lang_tensor = patched


def _patch_bf16_dot(interp) -> None:
    """``tl.dot`` of bf16 operands: multiply their values, not their stored bits."""
    builder = getattr(interp, "InterpreterBuilder", None)
    original = getattr(builder, "create_dot", None)
    convert, handle = getattr(interp, "_convert_float", None), getattr(interp, "TensorHandle", None)
    if original is None or convert is None or handle is None:
        return
    if getattr(original, "_memlayers_patched", False):
        return
    import triton.language as tl

    def widened(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        return handle(convert(x.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, widened(a), widened(b), d, *args, **kwargs)

    create_dot._memlayers_patched = True
    builder.create_dot = create_dot
