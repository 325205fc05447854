"""Triton kernel for the two top-k passes of the product-key search (docs/method.md §1).

The half-key scores ``s1 = q1 K1ᵀ`` and ``s2 = q2 K2ᵀ`` stay cuBLAS matrix products, fp32
out whatever the inputs (bf16/fp16 inputs accumulate in fp32 on tensor cores); one
program then takes ``ROWS`` (token, head) rows of both, keeps the top-k of each half,
forms the ``k × k`` candidate sums and keeps their top-k — all in registers, where the
PyTorch path runs three ``torch.topk`` launches and writes the candidates out in between.
The reference is :func:`memlayers.ops.product_keys._product_key_topk_torch`.

Top-k uses Triton's bitonic ``tl.topk`` on keys that carry each value's index:
- fp32 scores (what the op produces): ``(order-preserving int32 of the value) << 32 |
  index`` in an int64 key;
- bf16/fp16 scores (``topk_launch`` called directly, e.g. by the benchmark): the fp32 bits
  of a half-precision value end in 16 (13) zero bits, so the index goes there and the key
  is still an exact fp32 number (``NARROW`` keys, about half the time of int64 keys).
Either way the ranking is exact; only ties may resolve differently from ``torch.topk``.
Candidate sums are rounded to the score dtype before ranking, as the PyTorch path does.

Backward: the score gradient scatters onto the chosen half keys (dense ``[.., n_keys]`` in
fp32, as autograd of the PyTorch path does), is rounded to the inputs' dtype and flows
through two matrix products per half at that dtype (bf16 inputs: bf16 products with fp32
accumulation, as for any bf16 layer's backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memlayers.ops.triton_interpreter import patch_triton_interpreter

patch_triton_interpreter()

TOPK_ROWS = 1
TOPK_WARPS = 8  # fp32 scores (int64 keys): 3.41 vs 3.77 ms at 4 warps, H100, paper shape
# Lowest finite bf16 (its fp32 bits end in 16 zero bits): padding that never wins and
# stays a number when an index is packed into it.
_PAD = tl.constexpr(-3.3895313892515355e38)


@triton.jit
def _pack(v, idx, NARROW: tl.constexpr):
    """A sortable key holding value ``v`` (fp32) and a small non-negative ``idx``."""
    if NARROW:
        key = (v.to(tl.int32, bitcast=True) | idx).to(tl.float32, bitcast=True)
    else:
        b = v.to(tl.int32, bitcast=True)
        ordered = b ^ ((b >> 31) & 0x7FFFFFFF)  # int32 order == float order
        key = (ordered.to(tl.int64) << 32) | idx.to(tl.int64)
    return key


@triton.jit
def _unpack(key, LOW_BITS: tl.constexpr, NARROW: tl.constexpr):
    """``(value fp32, idx int32)`` of a key made by :func:`_pack`."""
    if NARROW:
        bits = key.to(tl.int32, bitcast=True)
        idx = bits & ((1 << LOW_BITS) - 1)
        value = (bits & ~((1 << LOW_BITS) - 1)).to(tl.float32, bitcast=True)
    else:
        ordered = (key >> 32).to(tl.int32)
        value = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        idx = (key & 0xFFFFFFFF).to(tl.int32)
    return value, idx


@triton.jit
def _pk_topk_kernel(
    s1_ptr,  # [H, T, NK] scores of the first half keys (row r = t·H + h; R = T·H)
    s2_ptr,  # [H, T, NK] scores of the second half keys
    scores_ptr,  # [R, k] out, descending
    index_ptr,  # [R, k] int64 out: i1 * NK + i2
    i1_ptr,  # [R, k] int32 out: first half key of each pick (for the backward)
    i2_ptr,  # [R, k] int32 out
    R,
    H,
    T,
    NK,
    k,
    NKP: tl.constexpr,  # next power of two of NK
    KP: tl.constexpr,  # next power of two of k
    ROWS: tl.constexpr,
    LOW_BITS: tl.constexpr,
    NARROW: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    rmask = rows < R
    cols = tl.arange(0, NKP)  # [NKP]
    m2 = rmask[:, None] & (cols < NK)[None, :]
    # Scores come head-major out of the batched matmul: row (t, h) sits at h·T + t.
    offs = ((rows % H) * T + rows // H)[:, None] * NK + cols[None, :]  # [ROWS, NKP]
    # Padding is set in fp32: in fp16 the pad value would be -inf, and -inf with an index
    # packed into its low bits is a NaN.
    s1 = tl.where(m2, tl.load(s1_ptr + offs, mask=m2, other=0.0).to(tl.float32), _PAD)
    s2 = tl.where(m2, tl.load(s2_ptr + offs, mask=m2, other=0.0).to(tl.float32), _PAD)
    cols2 = tl.broadcast_to(cols[None, :], [ROWS, NKP])
    # Top-KP of each half, descending (a superset of the top-k when k < KP: still exact).
    v1, i1 = _unpack(tl.topk(_pack(s1, cols2, NARROW), KP), LOW_BITS, NARROW)  # [ROWS, KP]
    v2, i2 = _unpack(tl.topk(_pack(s2, cols2, NARROW), KP), LOW_BITS, NARROW)
    # Candidates: every pair's sum, rounded like the PyTorch path's sum in the score dtype.
    cand = v1[:, :, None] + v2[:, None, :]  # [ROWS, KP, KP]
    cand = tl.maximum(cand.to(scores_ptr.dtype.element_ty).to(tl.float32), _PAD)
    cand = tl.reshape(cand, [ROWS, KP * KP])
    pair = tl.broadcast_to(tl.arange(0, KP * KP)[None, :], [ROWS, KP * KP])  # a * KP + b
    best, c = _unpack(tl.topk(_pack(cand, pair, NARROW), KP), LOW_BITS, NARROW)  # [ROWS, KP]
    j1 = tl.gather(i1, c // KP, axis=1)  # [ROWS, KP] first half key of each pick
    j2 = tl.gather(i2, c % KP, axis=1)
    kcols = tl.arange(0, KP)
    out = rows[:, None] * k + kcols[None, :]  # [ROWS, KP]
    omask = rmask[:, None] & (kcols < k)[None, :]
    tl.store(scores_ptr + out, best.to(scores_ptr.dtype.element_ty), mask=omask)
    tl.store(index_ptr + out, j1.to(tl.int64) * NK + j2, mask=omask)
    tl.store(i1_ptr + out, j1, mask=omask)
    tl.store(i2_ptr + out, j2, mask=omask)


def _low_bits(dtype: torch.dtype) -> int:
    """Zero low bits of a value of ``dtype`` written as fp32 (0: none, use wide keys)."""
    return {torch.bfloat16: 16, torch.float16: 13}.get(dtype, 0)


def topk_launch(
    s1: torch.Tensor,
    s2: torch.Tensor,
    k: int,
    rows: int = TOPK_ROWS,
    num_warps: int = TOPK_WARPS,
    narrow: bool | None = None,
):
    """``(scores, index, i1, i2)``, ``[T·H, k]`` each (row t·H + h), of the exact product
    top-k of ``[H, T, NK]`` half scores (a 2-D ``[R, NK]`` is one head)."""
    if s1.dim() == 2:
        s1, s2 = s1.unsqueeze(0), s2.unsqueeze(0)
    heads, tokens, nk = s1.shape
    r = heads * tokens
    nkp, kp = triton.next_power_of_2(nk), triton.next_power_of_2(k)
    if kp == 1:
        rows = max(rows, 2)  # tl.topk cannot reshape a [1, 1] result (seen on an H100)
    low = _low_bits(s1.dtype)
    if narrow is None:
        narrow = low > 0 and max(nkp, kp * kp) <= 1 << low
    scores = s1.new_empty(r, k)
    index = torch.empty(r, k, dtype=torch.int64, device=s1.device)
    i1 = torch.empty(r, k, dtype=torch.int32, device=s1.device)
    i2 = torch.empty_like(i1)
    if r == 0:
        return scores, index, i1, i2
    _pk_topk_kernel[(triton.cdiv(r, rows),)](
        s1, s2, scores, index, i1, i2, r, heads, tokens, nk, k,
        NKP=nkp, KP=kp, ROWS=rows, LOW_BITS=max(low, 1), NARROW=narrow,
        num_warps=num_warps,
    )  # fmt: skip
    return scores, index, i1, i2


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores are fp32 at least (product_keys.py: bf16 would quantise the choice)."""
    return torch.promote_types(dtype, torch.float32)


def _half_scores(q: torch.Tensor, keys: torch.Tensor):
    """``(s1, s2)``: ``[H, T, NK]`` scores of each half (T = all leading dims of q) in
    :func:`score_dtype`. bf16/fp16 inputs on CUDA multiply at their own precision with
    fp32 accumulation and output (``bmm(..., out_dtype)``): the same numbers as fp32
    inputs up to summation order, at tensor-core speed; elsewhere the inputs are widened."""
    heads, _, _, half = keys.shape
    q3 = q.reshape(-1, heads, 2 * half)  # [T, H, k_dim]
    out = score_dtype(q.dtype)
    fast = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
    scores = []
    for i in range(2):
        a = q3[..., i * half : (i + 1) * half].transpose(0, 1)  # [H, T, half]
        b = keys[:, i].transpose(1, 2)  # [H, half, NK]
        scores.append(torch.bmm(a, b, out) if fast else torch.bmm(a.to(out), b.to(out)))
    return scores[0], scores[1]


@torch.library.custom_op("memlayers::product_key_topk", mutates_args=())
def product_key_topk_op(
    q: torch.Tensor, keys: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scores, indices, i1, i2)``: ``[..., H, k]`` each; q and keys of one dtype."""
    s1, s2 = _half_scores(q, keys)
    scores, index, i1, i2 = topk_launch(s1, s2, k)
    shape = (*q.shape[:-1], k)
    return scores.view(shape), index.view(shape), i1.view(shape), i2.view(shape)


@product_key_topk_op.register_fake
def _(q, keys, k):
    shape = (*q.shape[:-1], k)
    i1, i2 = (torch.empty(shape, dtype=torch.int32, device=q.device) for _ in range(2))
    scores = q.new_empty(shape, dtype=score_dtype(q.dtype))
    return scores, torch.empty(shape, dtype=torch.int64, device=q.device), i1, i2


def _setup_context(ctx, inputs, output):
    q, keys, k = inputs
    _, _, i1, i2 = output
    ctx.save_for_backward(q, keys, i1, i2)


def _backward(ctx, d_scores, _d_index, _d_i1, _d_i2):
    q, keys, i1, i2 = ctx.saved_tensors
    nk, half = keys.shape[2], keys.shape[3]
    ds = d_scores.float()
    # Each pick's gradient lands on its two half keys; one half key may serve many picks.
    ds1 = ds.new_zeros(*ds.shape[:-1], nk).scatter_add_(-1, i1.long(), ds).to(q.dtype)
    ds2 = ds.new_zeros(*ds.shape[:-1], nk).scatter_add_(-1, i2.long(), ds).to(q.dtype)
    dq = torch.cat(
        [
            torch.einsum("...hn,hnd->...hd", ds1, keys[:, 0]),
            torch.einsum("...hn,hnd->...hd", ds2, keys[:, 1]),
        ],
        dim=-1,
    )
    q1 = q[..., :half].reshape(-1, q.shape[-2], half)  # [T, H, half]
    dk = torch.stack(
        [
            torch.einsum("thn,thd->hnd", ds1.reshape(-1, *ds1.shape[-2:]), q1),
            torch.einsum(
                "thn,thd->hnd",
                ds2.reshape(-1, *ds2.shape[-2:]),
                q[..., half:].reshape(-1, q.shape[-2], half),
            ),
        ],
        dim=1,
    )
    return dq, dk, None


torch.library.register_autograd(
    "memlayers::product_key_topk", _backward, setup_context=_setup_context
)


def product_key_topk_triton(
    query: torch.Tensor, keys: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path of :func:`memlayers.ops.product_keys.product_key_topk` (inputs checked):
    q and keys in their common dtype, scores in :func:`score_dtype` of it."""
    dtype = torch.promote_types(query.dtype, keys.dtype)
    scores, index, _, _ = product_key_topk_op(query.to(dtype), keys.to(dtype), k)
    return scores, index
