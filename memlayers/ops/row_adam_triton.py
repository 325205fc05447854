"""Triton kernels of the row-wise Adam(W) and SGD steps and their launchers (references,
checks and dispatchers live in :mod:`memlayers.ops.row_adam`). One program per (touched
row, column tile): a pure stream over ``param``, ``exp_avg``, ``exp_avg_sq`` and ``grad``
rows, fp32 arithmetic (95-99% of copy bandwidth on an H100, benchmarks/NOTES.md). bf16
moments are read as fp32 and stored stochastically rounded, and so is a bf16 parameter,
with bits of its own seed (:mod:`memlayers.ops.row_adam`), unless the Adam step has an fp32
master copy: then the parameter is read from and written to the master, and stored
rounded to nearest.

The row-wise second moment needs the mean of ``g²`` over the whole row before any column
is updated, so its kernel runs one program per touched row, looping over column tiles
twice: once to reduce ``g²``, once to update ``m`` and ``p`` (the second read of the
gradient row should come from L2 for rows of a few KB; not yet measured).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from memlayers.ops.row_adam import check_adam_args, check_rows, param_round_seed, round_seed
from memlayers.ops.triton_interpreter import patch_triton_interpreter

patch_triton_interpreter()

# The element-wise Adam step's tiles (row_adam_kernel). 256 columns × 2 warps, measured
# on one H200 (benchmarks/results/row_adam_h200_20261203c.md): at D = 768 the tiles of
# 1024 left a quarter of their lanes masked, and the fp32-master step with bf16 moments
# took 4.01 ms (82% of copy bandwidth) against 3.39 (97%); fp32 moments 4.76 against
# 3.73; at D = 1024 within 1% either way.
ADAM_BLOCK_D = 256
ADAM_WARPS = 2
# The row-wise second moment's program walks a whole row (two passes), and SGD: the
# tiles of before (not re-timed).
ROW_BLOCK_D = 1024
ROW_WARPS = 4


@triton.jit
def _grad(grad_ptr, at, mask, scale_ptr, SCALE: tl.constexpr):
    """The gradient at ``at`` in fp32, times the number at ``scale_ptr`` when SCALE (a
    clip's rescale, applied here rather than by a pass of its own over the gradient)."""
    g = tl.load(grad_ptr + at, mask=mask, other=0.0).to(tl.float32)
    if SCALE:
        g = g * tl.load(scale_ptr)
    return g


@triton.jit
def _row_tile(
    rows_ptr, grad_ptr, scale_ptr, D, n_dtiles, DENSE: tl.constexpr, BLOCK_D: tl.constexpr,
    SCALE: tl.constexpr,
):  # fmt: skip
    """This program's table row, column tile, its mask and the fp32 gradient there."""
    pid = tl.program_id(0).to(tl.int64)
    u = pid // n_dtiles
    cols = (pid % n_dtiles) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask = cols < D
    if DENSE:
        row = u
    else:
        row = tl.load(rows_ptr + u)
    g = _grad(grad_ptr, u * D + cols, mask, scale_ptr, SCALE)
    return row, cols, mask, g


@triton.jit
def _hash32(x):
    """:func:`memlayers.ops.row_adam._hash32` on uint32 lanes: multiplies wrap mod 2**32
    as the reference's masks do (int64 lanes cost 64-bit multiplies: 22% slower than the
    fp32-moment step at D = 768, H200, 2026-12-01)."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _noise(offs, first, seed):
    """:func:`memlayers.ops.row_adam.rounding_noise` of a tile's element offsets ``offs``
    (consecutive from ``first``): the high part's hash once per tile, for the (at most
    two) 2**32 blocks a tile spans, then one hash per element."""
    s = seed.to(tl.uint32)  # the 32 bits of the seed (it arrives as int32: _seed_arg)
    hi0 = (first >> 32).to(tl.uint32)
    hi1 = ((first >> 32) + 1).to(tl.uint32)  # (hi0 + 1 would leave uint32 in the interpreter)
    h = tl.where((offs >> 32).to(tl.uint32) == hi0, _hash32(hi0 ^ s), _hash32(hi1 ^ s))
    return _hash32(offs.to(tl.uint32) ^ h)


@triton.jit
def _stored(x, noise, BF16: tl.constexpr):
    """``x`` (fp32) as a moment or parameter is stored: itself, or stochastically rounded
    to bf16 with the low 16 bits of ``noise``
    (:func:`memlayers.ops.row_adam.stochastic_round_bf16`, the same bits)."""
    if BF16:
        bits = (x.to(tl.uint32, bitcast=True) + (noise & 0xFFFF)) & tl.full(
            [], 0xFFFF0000, tl.uint32
        )
        # NaN stays NaN: the noise would carry the GPU's NaN (0x7FFFFFFF) into -0.0.
        x = tl.where(x != x, x.to(tl.bfloat16), bits.to(tl.float32, bitcast=True).to(tl.bfloat16))
    return x


# What ``master_ptr`` holds (the kernels' MASTER): none, the fp32 master copy, or the int16
# remainders of a split master (the parameter its bf16 high half: row_adam.split_master).
NO_MASTER, FP32_MASTER, SPLIT_MASTER = 0, 1, 2


@triton.jit
def _load_param(param_ptr, master_ptr, offs, mask, MASTER: tl.constexpr):
    """The parameter at ``offs`` in fp32: from the fp32 master copy when there is one, or
    joined from the bf16 parameter and its int16 remainder (row_adam.join_master)."""
    if MASTER == 1:
        p = tl.load(master_ptr + offs, mask=mask, other=0.0)
    elif MASTER == 2:
        hi = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.uint16, bitcast=True)
        hi = hi.to(tl.uint32)
        rem = tl.load(master_ptr + offs, mask=mask, other=0).to(tl.int32)
        # A pair no split makes (±0 with a negative remainder, ±inf with a positive one:
        # a table written by someone else) keeps hi alone, as join_master does.
        mag = hi & 0x7FFF
        off = ((mag == 0x7F80) & (rem > 0)) | ((mag == 0) & (rem < 0))
        rem = tl.where(off, 0, rem)
        bits = (hi << 16) + rem.to(tl.uint32, bitcast=True)  # wraps mod 2**32
        p = bits.to(tl.float32, bitcast=True)
    else:
        p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return p


@triton.jit
def _store_param(
    param_ptr, master_ptr, offs, mask, p, first, param_seed, BF16_P: tl.constexpr,
    MASTER: tl.constexpr,
):  # fmt: skip
    """Store the new parameter ``p`` (fp32) at ``offs`` (consecutive from ``first``): in
    the master copy exactly and the parameter rounded to nearest when there is a master;
    split into the bf16 parameter and its int16 remainder (row_adam.split_master, the same
    bits); else stochastically rounded with the bits of ``param_seed`` when bf16, else cast."""
    if MASTER == 2:
        bits = p.to(tl.uint32, bitcast=True)
        low = (bits & 0xFFFF).to(tl.int32)
        rem = (low ^ 0x8000) - 0x8000  # [-2**15, 2**15): round up from half a step on
        hi = (bits - rem.to(tl.uint32, bitcast=True)) >> 16
        # NaN: a quiet NaN of its sign, remainder 0 (as the reference).
        nan = p != p
        hi = tl.where(nan, (hi & 0x8000) | 0x7FC0, hi)
        rem = tl.where(nan, 0, rem)
        tl.store(master_ptr + offs, rem.to(tl.int16), mask=mask)
        tl.store(param_ptr + offs, hi.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        if MASTER == 1:
            tl.store(master_ptr + offs, p, mask=mask)
        elif BF16_P:
            p = _stored(p, _noise(offs, first, param_seed), True)
        tl.store(param_ptr + offs, p.to(param_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "param_seed"])
def row_adam_kernel(
    param_ptr,  # [N, D] any float dtype, updated in place
    rows_ptr,  # [U] int64 table rows (unused when DENSE: row = program's row)
    grad_ptr,  # [U, D] gradient rows
    exp_avg_ptr,  # [N, D] fp32 or bf16
    exp_avg_sq_ptr,  # [N, D] fp32 or bf16
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
    seed,  # stochastic rounding seed of this step (bf16 moments)
    param_seed,  # the same for a bf16 param: another stream (row_adam.param_round_seed)
    master_ptr,  # [N, D] fp32 master copy, or int16 remainders (unused when MASTER is 0)
    scale_ptr,  # [1] fp32 the gradient is multiplied by (unused unless SCALE)
    DENSE: tl.constexpr,
    DECAY: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BF16_M: tl.constexpr,  # exp_avg is bf16
    BF16_V: tl.constexpr,  # exp_avg_sq is bf16
    BF16_P: tl.constexpr,  # param is bf16: stored stochastically rounded (without MASTER)
    MASTER: tl.constexpr,  # NO_MASTER | FP32_MASTER (param rounded to nearest) | SPLIT_MASTER
    SCALE: tl.constexpr,
):
    row, cols, mask, g = _row_tile(rows_ptr, grad_ptr, scale_ptr, D, n_dtiles, DENSE, BLOCK_D,
                                   SCALE)  # fmt: skip
    offs = row * D + cols  # int64: tables past 2**31 elements
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = _load_param(param_ptr, master_ptr, offs, mask, MASTER)
    # Same order as the reference: m, v, decoupled decay, p += -lr/bc1 · m / (√v/√bc2 + ε).
    m = m * beta1 + one_minus_beta1 * g
    v = v * beta2 + one_minus_beta2 * g * g
    if DECAY:
        p = p * decay
    denom = tl.div_rn(tl.sqrt_rn(v), sqrt_bc2) + eps
    p = p + neg_step_size * tl.div_rn(m, denom)
    first = row * D + (tl.program_id(0).to(tl.int64) % n_dtiles) * BLOCK_D  # the tile's first
    if BF16_M | BF16_V:
        noise = _noise(offs, first, seed)
    else:
        noise = offs  # unused
    tl.store(exp_avg_ptr + offs, _stored(m, noise, BF16_M), mask=mask)
    tl.store(exp_avg_sq_ptr + offs, _stored(v, noise >> 16, BF16_V), mask=mask)
    _store_param(param_ptr, master_ptr, offs, mask, p, first, param_seed, BF16_P, MASTER)


# D too: Triton makes an int argument equal to 1 a constexpr, whose plain int has no .to()
# (a one-column table failed to compile).
@triton.jit(do_not_specialize=["seed", "param_seed", "D"])
def row_adam_rowwise_kernel(
    param_ptr,  # [N, D] any float dtype, updated in place
    rows_ptr,  # [U] int64 table rows (unused when DENSE: row = program's row)
    grad_ptr,  # [U, D] gradient rows
    exp_avg_ptr,  # [N, D] fp32 or bf16
    exp_avg_sq_ptr,  # [N] fp32: one second moment per row
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
    seed,  # stochastic rounding seed of this step (bf16 exp_avg)
    param_seed,  # the same for a bf16 param: another stream (row_adam.param_round_seed)
    master_ptr,  # [N, D] fp32 master copy, or int16 remainders (unused when MASTER is 0)
    scale_ptr,  # [1] fp32 the gradient is multiplied by (unused unless SCALE)
    DENSE: tl.constexpr,
    DECAY: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BF16_M: tl.constexpr,
    BF16_V: tl.constexpr,
    BF16_P: tl.constexpr,
    MASTER: tl.constexpr,
    SCALE: tl.constexpr,
):
    tl.static_assert(not BF16_V, "the row-wise second moment is fp32")
    u = tl.program_id(0).to(tl.int64)
    if DENSE:
        row = u
    else:
        row = tl.load(rows_ptr + u)
    # Pass 1: sum of g² over the row's columns (fp32), then one division: the mean.
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t in range(0, n_dtiles):
        cols = t * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
        g = _grad(grad_ptr, u * D + cols, cols < D, scale_ptr, SCALE)
        acc += g * g
    g2 = tl.div_rn(tl.sum(acc, axis=0), D.to(tl.float32))
    v = tl.load(exp_avg_sq_ptr + row)
    v = v * beta2 + one_minus_beta2 * g2
    tl.store(exp_avg_sq_ptr + row, v)
    denom = tl.div_rn(tl.sqrt_rn(v), sqrt_bc2) + eps
    # Pass 2: m and p, in the order of the element-wise kernel.
    for t in range(0, n_dtiles):
        cols = t * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
        mask = cols < D
        g = _grad(grad_ptr, u * D + cols, mask, scale_ptr, SCALE)
        offs = row * D + cols  # int64: tables past 2**31 elements
        m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = _load_param(param_ptr, master_ptr, offs, mask, MASTER)
        m = m * beta1 + one_minus_beta1 * g
        if DECAY:
            p = p * decay
        p = p + neg_step_size * tl.div_rn(m, denom)
        if BF16_M:
            noise = _noise(offs, row * D + t * BLOCK_D, seed)
        else:
            noise = offs  # unused
        tl.store(exp_avg_ptr + offs, _stored(m, noise, BF16_M), mask=mask)
        _store_param(
            param_ptr, master_ptr, offs, mask, p, row * D + t * BLOCK_D, param_seed, BF16_P,
            MASTER,
        )  # fmt: skip


@triton.jit(do_not_specialize=["param_seed"])
def row_sgd_kernel(
    param_ptr,  # [N, D] updated in place
    rows_ptr,  # [U] int64 (unused when DENSE)
    grad_ptr,  # [U, D]
    D,
    n_dtiles,
    lr,
    param_seed,  # stochastic rounding seed of a bf16 param (row_adam.param_round_seed)
    scale_ptr,  # [1] fp32 the gradient is multiplied by (unused unless SCALE)
    DENSE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BF16_P: tl.constexpr,
    SCALE: tl.constexpr,
):
    row, cols, mask, g = _row_tile(rows_ptr, grad_ptr, scale_ptr, D, n_dtiles, DENSE, BLOCK_D,
                                   SCALE)  # fmt: skip
    offs = row * D + cols  # int64
    p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = p - lr * g
    first = row * D + (tl.program_id(0).to(tl.int64) % n_dtiles) * BLOCK_D  # the tile's first
    _store_param(param_ptr, param_ptr, offs, mask, p, first, param_seed, BF16_P, 0)


def _launch_shape(u: int, d: int, block_d: int) -> tuple[int, int]:
    block_d = min(block_d, triton.next_power_of_2(d))
    return block_d, triton.cdiv(d, block_d)


def _seed_arg(seed: int) -> int:
    """A 32-bit seed as the int32 of the same bits. Triton types an int argument by its
    value (int32 below 2**31, int64 above) and, unless told not to, specializes on its
    divisibility by 16: seeds that change every step then built up to 16 variants of the
    Adam kernels (two seeds; 4 of SGD's), one at a time as their combinations first
    occurred, each a 0.1-0.5 s stall of the step (134m-memory+ at steps 2, 6, 11-13, 25,
    29 of every run, H200, 2026-12-02). As int32 and in ``do_not_specialize``, one
    variant serves every step."""
    return seed - (1 << 32) if seed >= 1 << 31 else seed


def _master_kind(master: torch.Tensor | None) -> int:
    """The kernels' MASTER for a step's ``master`` argument."""
    if master is None:
        return NO_MASTER
    return SPLIT_MASTER if master.dtype == torch.int16 else FP32_MASTER


def row_adam_step_triton(
    param, rows, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay,
    rowwise_v: bool = False, master: torch.Tensor | None = None,
    block_d: int | None = None, num_warps: int | None = None,
    grad_scale: torch.Tensor | None = None, check_range: bool = True,
) -> None:  # fmt: skip
    """Triton version of :func:`memlayers.ops.row_adam.row_adam_step_torch` (same
    arguments). ``rowwise_v``: one program per row (:func:`row_adam_rowwise_kernel`).
    ``block_d``, ``num_warps`` None: :data:`ADAM_BLOCK_D`, :data:`ADAM_WARPS` (row-wise:
    :data:`ROW_BLOCK_D`, :data:`ROW_WARPS`)."""
    check_adam_args(param, rows, grad, exp_avg, exp_avg_sq, rowwise_v, master, grad_scale,
                    check_range, step)  # fmt: skip
    n, d = param.shape
    u = n if rows is None else rows.shape[0]
    if u == 0 or d == 0:
        return
    if block_d is None:
        block_d = ROW_BLOCK_D if rowwise_v else ADAM_BLOCK_D
    if num_warps is None:
        num_warps = ROW_WARPS if rowwise_v else ADAM_WARPS
    block_d, n_dtiles = _launch_shape(u, d, block_d)
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    kernel, grid = (row_adam_rowwise_kernel, u) if rowwise_v else (row_adam_kernel, u * n_dtiles)
    kernel[(grid,)](
        param, rows if rows is not None else grad, grad, exp_avg, exp_avg_sq, d, n_dtiles,
        beta1, 1 - beta1, beta2, 1 - beta2, 1 - lr * weight_decay, math.sqrt(bc2), eps,
        -lr / bc1, _seed_arg(round_seed(step)), _seed_arg(param_round_seed(step)),
        param if master is None else master, grad if grad_scale is None else grad_scale,
        DENSE=rows is None, DECAY=weight_decay != 0, BLOCK_D=block_d,
        BF16_M=exp_avg.dtype == torch.bfloat16, BF16_V=exp_avg_sq.dtype == torch.bfloat16,
        BF16_P=param.dtype == torch.bfloat16, MASTER=_master_kind(master),
        SCALE=grad_scale is not None, num_warps=num_warps,
    )  # fmt: skip


def row_sgd_step_triton(
    param, rows, grad, step, lr, block_d: int = ROW_BLOCK_D, num_warps: int = ROW_WARPS,
    grad_scale: torch.Tensor | None = None, check_range: bool = True,
) -> None:  # fmt: skip
    """Triton version of :func:`memlayers.ops.row_adam.row_sgd_step_torch` (same
    arguments)."""
    check_rows(param, rows, grad, grad_scale=grad_scale, check_range=check_range)
    n, d = param.shape
    u = n if rows is None else rows.shape[0]
    if u == 0 or d == 0:
        return
    block_d, n_dtiles = _launch_shape(u, d, block_d)
    row_sgd_kernel[(u * n_dtiles,)](
        param, rows if rows is not None else grad, grad, d, n_dtiles, lr,
        _seed_arg(param_round_seed(step)), grad if grad_scale is None else grad_scale,
        DENSE=rows is None, BLOCK_D=block_d, BF16_P=param.dtype == torch.bfloat16,
        SCALE=grad_scale is not None, num_warps=num_warps,
    )  # fmt: skip
