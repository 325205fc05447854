"""Triton kernels of the row-wise Adam(W) and SGD steps (launchers and references live
in :mod:`memlayers.ops.row_adam`). One program per (touched row, column tile): a pure
stream over ``param``, ``exp_avg``, ``exp_avg_sq`` and ``grad`` rows, fp32 arithmetic.
"""

from __future__ import annotations

import triton
import triton.language as tl

from memlayers.ops.triton_interpreter import patch_triton_interpreter

patch_triton_interpreter()


@triton.jit
def _row_tile(rows_ptr, grad_ptr, D, n_dtiles, DENSE: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's table row, column tile, its mask and the fp32 gradient there."""
    pid = tl.program_id(0).to(tl.int64)
    u = pid // n_dtiles
    cols = (pid % n_dtiles) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask = cols < D
    if DENSE:
        row = u
    else:
        row = tl.load(rows_ptr + u)
    g = tl.load(grad_ptr + u * D + cols, mask=mask, other=0.0).to(tl.float32)
    return row, cols, mask, g


@triton.jit
def row_adam_kernel(
    param_ptr,  # [N, D] any float dtype, updated in place
    rows_ptr,  # [U] int64 table rows (unused when DENSE: row = program's row)
    grad_ptr,  # [U, D] gradient rows
    exp_avg_ptr,  # [N, D] fp32
    exp_avg_sq_ptr,  # [N, D] fp32
    D,
    n_dtiles,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    decay,  # 1 - lr * weight_decay
    sqrt_bc2,
    eps,
    neg_step_size,  # -lr / bc1
    DENSE: tl.constexpr,
    DECAY: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row, cols, mask, g = _row_tile(rows_ptr, grad_ptr, D, n_dtiles, DENSE, BLOCK_D)
    offs = row * D + cols  # int64: tables past 2**31 elements
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
    p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # Same order as the reference: m, v, decoupled decay, p += -lr/bc1 · m / (√v/√bc2 + ε).
    m = m * beta1 + one_minus_beta1 * g
    v = v * beta2 + one_minus_beta2 * g * g
    if DECAY:
        p = p * decay
    denom = tl.div_rn(tl.sqrt_rn(v), sqrt_bc2) + eps
    p = p + neg_step_size * tl.div_rn(m, denom)
    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
    tl.store(param_ptr + offs, p.to(param_ptr.dtype.element_ty), mask=mask)


@triton.jit
def row_sgd_kernel(
    param_ptr,  # [N, D] updated in place
    rows_ptr,  # [U] int64 (unused when DENSE)
    grad_ptr,  # [U, D]
    D,
    n_dtiles,
    lr,
    DENSE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row, cols, mask, g = _row_tile(rows_ptr, grad_ptr, D, n_dtiles, DENSE, BLOCK_D)
    p = tl.load(param_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    p = p - lr * g
    tl.store(param_ptr + row * D + cols, p.to(param_ptr.dtype.element_ty), mask=mask)
