"""Triton kernel for the two top-k passes of the product-key search (docs/method.md §1).

The half-key scores ``s1 = q1 K1ᵀ`` and ``s2 = q2 K2ᵀ`` stay cuBLAS matrix products, fp32
out whatever the inputs (bf16/fp16 inputs accumulate in fp32 on tensor cores). A launch
per half keeps each (token, head) row's top-k of that half (ranking only the keys above a
per-row bound, :func:`_half_topk`; a small scratch carries a row's kept keys between the
program's own threads) and writes them to ``[R, 2, KP]``; a third forms the candidate sums
of the pairs that can win (:func:`candidate_pairs`) and keeps their top-k. The PyTorch
path runs three ``torch.topk`` launches over every key and every pair instead. (One
program doing both halves and the candidates was 1.05 ms at the paper shape on an H200,
these three launches 0.69 ms: benchmarks/NOTES.md session 7.)
The reference is :func:`memlayers.ops.product_keys._product_key_topk_torch`.

Top-k uses Triton's bitonic ``tl.topk`` on keys that carry each value's index:
- fp32 scores (what the op produces): ``(order-preserving int32 of the value) << 32 |
  index`` in an int64 key;
- bf16/fp16 half scores (the op's ``rank_bf16`` option, or ``topk_launch`` called
  directly): the fp32 bits of a half-precision value end in 16 (13) zero bits, so the
  index goes there and the key is still an exact fp32 number (``NARROW`` keys, half the
  bytes of int64 keys, in the filter's scratch too).
Either way the ranking of the given scores is exact; only ties may resolve differently
from ``torch.topk`` (NaN ranks first, as there), and a ``-inf`` sum comes back as the
lowest fp32 number. Candidate sums are rounded to the returned scores' dtype before
ranking, as the PyTorch path does (with ``rank_bf16``: bf16 half scores, fp32 sums).

Backward: one kernel sums each half key's score gradient over the picks that used it (in
fp32, as autograd of the PyTorch path does; in a fixed order, so it is deterministic),
rounds it to the inputs' dtype and writes it head-major, where two matrix products per half
at that dtype take it (bf16 inputs: bf16 products with fp32 accumulation, as for any bf16
layer's backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memlayers.ops.embedding_bag_triton import sm_count
from memlayers.ops.triton_interpreter import patch_triton_interpreter

patch_triton_interpreter()

TOPK_ROWS = 1
# The per-half launch (paper shape, fp32 scores, H200, 2026-12-01, all three launches):
# 0.69 ms at 1 warp, 0.78 at 2, 0.90 at 4; one program doing both halves and the
# candidates was 1.05 ms at its best (2 warps), ranking every key 4.07.
TOPK_WARPS = 1
# Few rows (decoding: heads x batch rows, fewer than the SMs): a program's latency is the
# step's, and more warps share its work (topk_launch's rule).
TOPK_FEW_WARPS = 4
# Both halves in one launch (their programs side by side) while their two scratches take
# at most this many bytes; above it (training batches: 268 MB at 32k tokens x 4 heads),
# one launch per half, sharing one scratch.
TOPK_BOTH_HALVES_BYTES = 64 << 20
TOPK_CAP = 128  # keys per row the filter keeps for ranking (57 on average at 1024 / 32)
# The candidate stage alone (paper shape, H200, 2026-12-01): 0.098 ms at 1 warp, 0.115 at
# 2, 0.137 at 4.
CANDIDATE_WARPS = 1
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
def _half_topk(
    s1_ptr, s2_ptr, scratch_ptr, rows, rmask, half, H, T, NK,
    NKP: tl.constexpr, KP: tl.constexpr, ROWS: tl.constexpr, LOW_BITS: tl.constexpr,
    NARROW: tl.constexpr, FILTER: tl.constexpr, GROUPS: tl.constexpr, PER: tl.constexpr,
    CAP: tl.constexpr,
):  # fmt: skip
    """``(values, columns)`` ``[ROWS, KP]``, descending, of the top-KP of ``ROWS`` rows of
    ``[H, T, NK]`` half scores: half ``half``'s, ``s1`` or ``s2`` (both pointers are passed
    and the other half's loads masked off, so one launch can run both halves).

    FILTER: each of GROUPS interleaved column groups (column ``j·GROUPS + g``) gives its
    PER-th largest distinct value; the least of them, ``lo``, has ``GROUPS·PER >= KP``
    values at or above it, so every top-KP value is ``>= lo``. Those (about 57 of 1,024 at
    the paper shape) are compacted through ``scratch`` (``CAP`` keys per row) and only they
    are ranked. A row with more than CAP of them (ties, NaN) ranks all its keys instead.
    Either way the ranking is by the same ``(value, column)`` keys: the same result."""
    # Scores come head-major out of the batched matmul: row (t, h) sits at h·T + t.
    base = (rows % H) * T + rows // H  # [ROWS]
    g = tl.arange(0, GROUPS)
    j = tl.arange(0, NKP // GROUPS)
    cols = j[None, None, :] * GROUPS + g[None, :, None]  # [1, GROUPS, NKP // GROUPS]
    m3 = rmask[:, None, None] & (cols < NK)
    # Padding is set in fp32: in fp16 the pad value would be -inf, and -inf with an index
    # packed into its low bits is a NaN.
    at = base[:, None, None] * NK + cols
    first = (rows * 0 + half == 0)[:, None, None]  # [ROWS, 1, 1]: a tensor, as masks need
    s = tl.where(first, tl.load(s1_ptr + at, mask=m3 & first, other=0.0),
                 tl.load(s2_ptr + at, mask=m3 & ~first, other=0.0)).to(tl.float32)  # fmt: skip
    s = tl.where(m3, s, _PAD)
    if NARROW:
        # -inf with an index in its low bits would be a NaN: it ranks as the lowest
        # finite bf16 instead (and is returned as that).
        s = tl.where(s < _PAD, _PAD, s)
    cols3 = tl.broadcast_to(cols, [ROWS, GROUPS, NKP // GROUPS])
    keys = tl.reshape(_pack(s, cols3, NARROW), [ROWS, NKP])
    if FILTER:
        # Each group's PER-th largest distinct value: PER max-reductions, each dropping
        # the values equal to the last (3x faster than a bitonic tl.topk of PER, H200).
        # Ties only lower the bound (more keys kept). NaN is never a bound (it is -inf
        # here) but always kept: its key ranks it as the full ranking does.
        t = tl.where(s == s, s, float("-inf"))
        m = tl.max(t, axis=2)  # [ROWS, GROUPS]
        for _ in tl.static_range(PER - 1):
            t = tl.where(t >= m[:, :, None], float("-inf"), t)
            m = tl.max(t, axis=2)
        lo = tl.min(m, axis=1)  # [ROWS]
        keep = tl.reshape(((s >= lo[:, None, None]) | (s != s)) & m3, [ROWS, NKP])
        count = tl.sum(keep.to(tl.int32), axis=1)  # [ROWS]; >= KP unless NaN
        full = tl.max(tl.where(rmask, count, 0)) > CAP
        full = full | (tl.min(tl.where(rmask, count, KP)) < KP)
        if NARROW:
            # NaN keys are floats here, which a bitonic sort orders by position: a row
            # with one ranks all its keys, as without the filter (same result).
            nan = tl.sum(tl.reshape((s != s) & m3, [ROWS, NKP]).to(tl.int32), axis=1)
            full = full | (tl.max(tl.where(rmask, nan, 0)) > 0)
        if full:
            top = tl.topk(keys, KP)
        else:
            pos = tl.cumsum(keep.to(tl.int32), axis=1) - 1  # [ROWS, NKP] slot of each kept key
            tl.store(scratch_ptr + rows[:, None] * CAP + pos, keys, mask=keep)
            tl.debug_barrier()  # the slots written by other threads of this program
            c = tl.arange(0, CAP)
            cmask = rmask[:, None] & (c[None, :] < count[:, None])
            few = tl.load(scratch_ptr + rows[:, None] * CAP + c[None, :], mask=cmask, other=0)
            pad = _pack(tl.full([ROWS, CAP], _PAD, tl.float32), c[None, :] * 0, NARROW)
            few = tl.where(cmask, few, pad)
            top = tl.topk(few, KP)
    else:
        top = tl.topk(keys, KP)
    return _unpack(top, LOW_BITS, NARROW)


@triton.jit
def _half_kernel(
    s1_ptr,  # [H, T, NK] scores of the first half's keys (row r = t·H + h; R = T·H)
    s2_ptr,  # [H, T, NK] the second half's
    scratch_ptr,  # [R, CAP] keys (int64; fp32 if NARROW) per half launched together (FILTER)
    top_ptr,  # [R, 2, KP] fp32 out: the top-KP values of each half, descending
    topi_ptr,  # [R, 2, KP] int32 out: their key indices
    half0,  # the first half this launch fills: program_id(1) more (a grid of 1 or 2)
    R,
    H,
    T,
    NK,
    NKP: tl.constexpr,  # next power of two of NK
    KP: tl.constexpr,  # next power of two of k
    ROWS: tl.constexpr,
    LOW_BITS: tl.constexpr,
    NARROW: tl.constexpr,
    FILTER: tl.constexpr,
    GROUPS: tl.constexpr,
    PER: tl.constexpr,
    CAP: tl.constexpr,
):
    """Top-KP of one half's keys for ``ROWS`` rows (a superset of the top-k when k < KP:
    still exact)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    rmask = rows < R
    half = half0 + tl.program_id(1)
    scratch = scratch_ptr + tl.program_id(1).to(tl.int64) * R * CAP
    v, i = _half_topk(s1_ptr, s2_ptr, scratch, rows, rmask, half, H, T, NK, NKP, KP, ROWS,
                      LOW_BITS, NARROW, FILTER, GROUPS, PER, CAP)  # fmt: skip
    out = rows[:, None] * (2 * KP) + half * KP + tl.arange(0, KP)[None, :]
    tl.store(top_ptr + out, v, mask=rmask[:, None])
    tl.store(topi_ptr + out, i, mask=rmask[:, None])


@triton.jit
def _candidates_kernel(
    top_ptr,  # [R, 2, KP] fp32: the top-KP values of each half, descending
    topi_ptr,  # [R, 2, KP] int32: their key indices
    pair_ptr,  # [NPAIR] int32: a·KP + b of the candidate pairs that can reach the top-k
    scores_ptr,  # [R, k] out, descending
    index_ptr,  # [R, k] int64 out: i1 * NK + i2
    i1_ptr,  # [R, k] int32 out: first half key of each pick (for the backward)
    i2_ptr,  # [R, k] int32 out
    R,
    NK,
    k,
    n_pairs,
    KP: tl.constexpr,
    NPAIR: tl.constexpr,  # next power of two of n_pairs
    ROWS: tl.constexpr,
    LOW_BITS: tl.constexpr,
    NARROW: tl.constexpr,
):
    """The top-k pair sums of ``ROWS`` rows. With both halves sorted, pair (a, b) has
    (a+1)(b+1) - 1 pairs at least as good, so only pairs with (a+1)(b+1) <= k can be
    picked (119 of the 1,024 at k = 32). Listed by a·KP + b ascending, the key's tie order
    among them is that of all k×k pairs. Sums are rounded like the PyTorch path's sum in
    the score dtype."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    rmask = rows < R
    row_top = rows[:, None] * (2 * KP)  # [ROWS, 1]
    p = tl.arange(0, NPAIR)
    pmask = p < n_pairs
    pair = tl.load(pair_ptr + p, mask=pmask, other=0)
    cmask = rmask[:, None] & pmask[None, :]
    cand = tl.load(top_ptr + row_top + (pair // KP)[None, :], mask=cmask, other=0.0)
    cand += tl.load(top_ptr + row_top + KP + (pair % KP)[None, :], mask=cmask, other=0.0)
    cand = cand.to(scores_ptr.dtype.element_ty).to(tl.float32)
    # Clamp -inf to the padding (a -inf sum comes back as the lowest fp32 number), but
    # keep NaN, which maximum() would replace: it ranks first, as in torch.topk.
    cand = tl.where(cand != cand, cand, tl.maximum(cand, _PAD))
    cand = tl.where(pmask[None, :], cand, _PAD)
    pair = tl.broadcast_to(pair[None, :], [ROWS, NPAIR])
    best, c = _unpack(tl.topk(_pack(cand, pair, NARROW), KP), LOW_BITS, NARROW)  # [ROWS, KP]
    kcols = tl.arange(0, KP)
    omask = rmask[:, None] & (kcols < k)[None, :]
    j1 = tl.load(topi_ptr + row_top + c // KP, mask=omask, other=0)  # [ROWS, KP]
    j2 = tl.load(topi_ptr + row_top + KP + c % KP, mask=omask, other=0)
    out = rows[:, None] * k + kcols[None, :]  # [ROWS, KP]
    tl.store(scores_ptr + out, best.to(scores_ptr.dtype.element_ty), mask=omask)
    tl.store(index_ptr + out, j1.to(tl.int64) * NK + j2, mask=omask)
    tl.store(i1_ptr + out, j1, mask=omask)
    tl.store(i2_ptr + out, j2, mask=omask)


def _low_bits(dtype: torch.dtype) -> int:
    """Zero low bits of a value of ``dtype`` written as fp32 (0: none, use wide keys)."""
    return {torch.bfloat16: 16, torch.float16: 13}.get(dtype, 0)


_PAIRS: dict = {}


def candidate_pairs(k: int, device: torch.device) -> torch.Tensor:
    """``a·KP + b`` (int32, ascending) of every pair with ``(a+1)(b+1) <= k``: the only
    candidates of two descending top-k lists that can be among the k best sums."""
    key = (k, device)
    if key not in _PAIRS:
        kp = triton.next_power_of_2(k)
        pairs = [a * kp + b for a in range(k) for b in range(k) if (a + 1) * (b + 1) <= k]
        _PAIRS[key] = torch.tensor(pairs, dtype=torch.int32, device=device)
    return _PAIRS[key]


def topk_launch(
    s1: torch.Tensor,
    s2: torch.Tensor,
    k: int,
    rows: int = TOPK_ROWS,
    num_warps: int | None = None,
    narrow: bool | None = None,
    filter_keys: bool = True,
    cap: int = TOPK_CAP,
    both_halves: bool | None = None,
    half_top: bool = False,
    out_dtype: torch.dtype | None = None,
):
    """``(scores, index, i1, i2)``, ``[T·H, k]`` each (row t·H + h), of the exact product
    top-k of ``[H, T, NK]`` half scores (:func:`_half_scores`; a 2-D ``[R, NK]`` is one
    head). ``half_top``: a fifth, ``[T·H, 2, k]`` int32, each half's own top-k keys
    (descending), from which the candidates were formed.

    ``filter_keys``: rank only the keys above each row's group bound (:func:`_half_topk`);
    off, every key of a row is ranked (the result is the same). ``num_warps`` None: the
    rule (:data:`TOPK_FEW_WARPS` for fewer rows than SMs, else :data:`TOPK_WARPS`);
    ``both_halves`` None: one launch for both halves while their scratch is at most
    :data:`TOPK_BOTH_HALVES_BYTES`. No launch parameter changes the result.
    ``out_dtype``: the returned scores' dtype (None: the half scores'); wider than the
    half scores (bf16 halves, fp32 sums), the candidate sums are not rounded."""
    if s1.dim() == 2:
        s1, s2 = s1.unsqueeze(0), s2.unsqueeze(0)
    s1, s2 = s1.contiguous(), s2.contiguous()
    heads, tokens, nk = s1.shape
    r = heads * tokens
    device = s1.device
    scores = s1.new_empty(r, k, dtype=out_dtype or s1.dtype)
    index = torch.empty(r, k, dtype=torch.int64, device=device)
    i1 = torch.empty(r, k, dtype=torch.int32, device=device)
    i2 = torch.empty_like(i1)
    if r == 0:
        empty = torch.empty(0, 2, k, dtype=torch.int32, device=device)
        return (scores, index, i1, i2) + ((empty,) if half_top else ())
    top, topi, launch = _half_tops(s1, s2, k, rows, num_warps, narrow, filter_keys, cap,
                                   both_halves)  # fmt: skip
    pairs = candidate_pairs(k, device)
    # Narrow candidate keys need sums rounded to the half scores' dtype; wider scores
    # (bf16 halves, fp32 sums) are ranked by int64 keys.
    launch = dict(launch, NARROW=launch["NARROW"] and scores.dtype == s1.dtype)
    _candidates_kernel[(triton.cdiv(r, launch["ROWS"]),)](
        top, topi, pairs, scores, index, i1, i2, r, nk, k, len(pairs),
        NPAIR=triton.next_power_of_2(len(pairs)), num_warps=CANDIDATE_WARPS, **launch,
    )  # fmt: skip
    if half_top:
        return scores, index, i1, i2, topi[:, :, :k].contiguous()
    return scores, index, i1, i2


def _half_tops(s1, s2, k, rows, num_warps, narrow, filter_keys, cap, both_halves):
    """``(top, topi, launch)``: each half's top-KP values ``[R, 2, KP]`` fp32, descending,
    and their key indices (int32) for the ``R = H·T`` rows of contiguous ``[H, T, NK]``
    half scores (R > 0), by :func:`_half_kernel` (arguments as :func:`topk_launch`'s);
    ``launch``: the constants the candidate kernel shares (KP, ROWS, LOW_BITS, NARROW)."""
    heads, tokens, nk = s1.shape
    r = heads * tokens
    nkp, kp = triton.next_power_of_2(nk), triton.next_power_of_2(k)
    if kp == 1:
        rows = max(rows, 2)  # tl.topk cannot reshape a [1, 1] result (seen on an H100)
    if num_warps is None:
        # Few rows: more warps, but at least 256 keys a warp (a short row gains nothing).
        few = min(TOPK_FEW_WARPS, max(1, triton.next_power_of_2(nk) // 256))
        num_warps = few if r < sm_count(s1.device) else TOPK_WARPS
    if rows > 1:
        # Several rows per program at 1 warp hang the filtered half kernel on an H200
        # (Triton 3.6: the GPU suite's test_filter_ranks_the_same_keys, any k); 2 and 4
        # warps finish every case (benchmarks/NOTES.md, session 8).
        num_warps = max(num_warps, 2)
    low = _low_bits(s1.dtype)
    if narrow is None:
        narrow = low > 0 and max(nkp, kp * kp) <= 1 << low
    # The filter pays off when a row is much longer than the keys it keeps (cap); its
    # groups each give their per-th best, groups · per >= kp. 8 groups, all cap slots
    # ranked: at the paper shape (H200, 2026-12-03) 0.731 ms against 0.861 with 4 groups,
    # 1.054 with 2, and 0.741-0.760 ranking cap/2 slots when a program's rows all fit them
    # (benchmarks/NOTES.md, session 22).
    cap = max(cap, 2 * kp)
    filter_keys = filter_keys and nkp >= 2 * cap
    groups = min(8, kp)
    per = kp // groups
    device = s1.device
    if both_halves is None:
        both_halves = not filter_keys or 2 * r * cap * 8 <= TOPK_BOTH_HALVES_BYTES
    halves = 2 if both_halves else 1  # per launch, a scratch each (one launch per half: shared)
    key_dtype = torch.float32 if narrow else torch.int64  # the packed keys' (_pack)
    scratch = torch.empty((r * cap if filter_keys else 1) * halves, dtype=key_dtype, device=device)
    top = torch.empty(r, 2, kp, dtype=torch.float32, device=device)
    topi = torch.empty(r, 2, kp, dtype=torch.int32, device=device)
    launch = dict(KP=kp, ROWS=rows, LOW_BITS=max(low, 1), NARROW=narrow)
    for half in range(0, 2, halves):
        _half_kernel[(triton.cdiv(r, rows), halves)](
            s1, s2, scratch, top, topi, half, r, heads, tokens, nk, NKP=nkp,
            FILTER=filter_keys, GROUPS=groups, PER=per, CAP=cap, num_warps=num_warps,
            **launch,
        )  # fmt: skip
    return top, topi, launch


@torch.library.custom_op("memlayers::half_kth", mutates_args=())
def half_kth(s1: torch.Tensor, s2: torch.Tensor, k: int) -> torch.Tensor:
    """``[T·H, 2]`` fp32 (row t·H + h): the k-th largest score of each row of each half of
    ``[H, T, NK]`` half scores, by the search's own per-half top-k launches (the value
    ``torch.topk(s, k).values[..., -1]`` gives, ties included: a row's top-KP holds the
    values themselves). For the balance loss (:func:`memlayers.router.balance_loss`),
    where ``torch.topk`` over every half key took 1.1 ms at 4,096 tokens × 4 heads on an
    H200 (benchmarks/results/profile_134m_h200_20261203.md)."""
    heads, tokens, nk = s1.shape
    if not 1 <= k <= nk:
        raise ValueError(f"half_kth: k must be in [1, {nk}], got k={k}")
    if heads * tokens == 0:
        return s1.new_empty(0, 2, dtype=torch.float32)
    s1, s2 = s1.contiguous(), s2.contiguous()
    top, _, _ = _half_tops(s1, s2, k, TOPK_ROWS, None, None, True, TOPK_CAP, None)
    return top[:, :, k - 1].contiguous()


@half_kth.register_fake
def _(s1, s2, k):
    return s1.new_empty(s1.shape[0] * s1.shape[1], 2, dtype=torch.float32)


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores are fp32 at least (product_keys.py: bf16 would quantise the choice)."""
    return torch.promote_types(dtype, torch.float32)


# Few rows (decoding): both halves' scores in one Triton launch, a program per (head,
# half, block of SCORES_FEW_BLOCK_N keys), in place of a cuBLAS product per half (7.8 us
# a layer at batch 1 for 1.5 MB of keys on an H200: two launches' latency). Its fp32 sums
# run in another order than cuBLAS's, so scores may differ in the last bits from the
# training-time path (and a near-tie may then pick another key). On by default since it
# was timed (benchmarks/results/decode_layer_h200_20261203.md, one H200): 5.0 against
# 7.7 us for the two products, the compiled layer 42.3 against 44.8 us at batch 1;
# bf16/fp16 inputs on CUDA only. False gives the cuBLAS products at every size.
SCORES_FEW = True
SCORES_FEW_BLOCK_N = 128
SCORES_FEW_BLOCK_K = 64


@triton.jit
def _few_scores_kernel(
    q_ptr,  # [T, H, 2 * HALF] queries
    k_ptr,  # [H, 2, NK, HALF] keys
    s1_ptr,  # [H, T, NK] fp32 out: the first half's scores
    s2_ptr,  # [H, T, NK] fp32 out
    T,
    H,
    NK,
    HALF,
    BLOCK_T: tl.constexpr,  # next power of two of T, at least 16 (tl.dot's least M)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (head · 2 + half, key block): ``q_half [T, HALF] @ keys_half[block]ᵀ`` in
    fp32, for every token at once."""
    hh = tl.program_id(0)
    h = hh // 2
    half = hh % 2
    t = tl.arange(0, BLOCK_T)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tmask, nmask = t < T, n < NK
    q_row = q_ptr + t[:, None] * (H * 2 * HALF) + h * (2 * HALF) + half * HALF  # [BLOCK_T, 1]
    k_row = k_ptr + (hh * NK + n[None, :]).to(tl.int64) * HALF  # [1, BLOCK_N]
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, HALF, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < HALF
        a = tl.load(q_row + kk[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(k_row + kk[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    out = (h * T + t[:, None]).to(tl.int64) * NK + n[None, :]  # [BLOCK_T, BLOCK_N]
    m = tmask[:, None] & nmask[None, :]
    # where(flag, m, False), not m & flag: the interpreter rejects a vector & scalar mask
    tl.store(s1_ptr + out, acc, mask=tl.where(half == 0, m, False))
    tl.store(s2_ptr + out, acc, mask=tl.where(half == 1, m, False))


def few_scores(q: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s1, s2)`` as :func:`_half_scores` gives them, ``[H, T, NK]`` fp32 each, by one
    launch of :func:`_few_scores_kernel` (q and keys of one half-precision dtype)."""
    heads, _, nk, half = keys.shape
    q3 = q.reshape(-1, heads, 2 * half).contiguous()  # [T, H, k_dim]
    tokens = q3.shape[0]
    s1, s2 = (q.new_empty(heads, tokens, nk, dtype=torch.float32) for _ in range(2))
    if tokens and nk:
        grid = (2 * heads, triton.cdiv(nk, SCORES_FEW_BLOCK_N))
        _few_scores_kernel[grid](
            q3, keys.contiguous(), s1, s2, tokens, heads, nk, half,
            BLOCK_T=max(16, triton.next_power_of_2(tokens)), BLOCK_N=SCORES_FEW_BLOCK_N,
            BLOCK_K=SCORES_FEW_BLOCK_K, num_warps=4,
        )  # fmt: skip
    return s1, s2


def _half_scores(q: torch.Tensor, keys: torch.Tensor, rank_bf16: bool = False):
    """``(s1, s2)``: ``[H, T, NK]`` scores of each half (T = all leading dims of q) in
    :func:`score_dtype`. bf16/fp16 inputs on CUDA multiply at their own precision with
    fp32 accumulation and output (``bmm(..., out_dtype)``): the same numbers as fp32
    inputs up to summation order, at tensor-core speed; elsewhere the inputs are widened.
    (One matmul batched over (head, half) would save a launch, but its other batch count
    can give cuBLAS another kernel: fp32 scores then differ in their last bits from the
    PyTorch path's per-half products, and the exact-equality tests fail on an H200.)
    With :data:`SCORES_FEW` on (the default), searches of fewer (token, head) rows than
    SMs (decoding) take :func:`few_scores` instead. ``rank_bf16``: the scores rounded to
    bf16 (bf16 inputs on CUDA: the product's own bf16 output, half the bytes written)."""
    heads, _, _, half = keys.shape
    q3 = q.reshape(-1, heads, 2 * half)  # [T, H, k_dim]
    out = score_dtype(q.dtype)
    fast = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
    if fast and SCORES_FEW and q3.shape[0] * heads < sm_count(q.device):
        s1, s2 = few_scores(q, keys)
        return (s1.bfloat16(), s2.bfloat16()) if rank_bf16 else (s1, s2)
    bf16_out = rank_bf16 and fast and q.dtype == torch.bfloat16
    scores = []
    for i in range(2):
        a = q3[..., i * half : (i + 1) * half].transpose(0, 1)  # [H, T, half]
        b = keys[:, i].transpose(1, 2)  # [H, half, NK]
        if bf16_out:
            s = torch.bmm(a, b)  # fp32 accumulation, rounded to bf16 once
        else:
            s = torch.bmm(a, b, out) if fast else torch.bmm(a.to(out), b.to(out))
        scores.append(s.bfloat16() if rank_bf16 else s)
    return scores[0], scores[1]


@torch.library.custom_op("memlayers::product_key_topk", mutates_args=())
def product_key_topk_op(
    q: torch.Tensor, keys: torch.Tensor, k: int, rank_bf16: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scores, indices, i1, i2, half_top)``: ``[..., H, k]`` each but ``half_top``,
    ``[..., H, 2, k]`` int32 (each half's top-k keys); q and keys of one dtype.
    ``rank_bf16``: the half scores rounded to bf16 before ranking (narrow keys), their
    sums in :func:`score_dtype` (the ``precision="bf16"`` option of the search)."""
    s1, s2 = _half_scores(q, keys, rank_bf16)
    sd = score_dtype(q.dtype)
    scores, index, i1, i2, top = topk_launch(s1, s2, k, half_top=True, out_dtype=sd)
    shape = (*q.shape[:-1], k)
    out = scores.view(shape), index.view(shape), i1.view(shape), i2.view(shape)
    return *out, top.view(*q.shape[:-1], 2, k)


@product_key_topk_op.register_fake
def _(q, keys, k, rank_bf16=False):
    shape = (*q.shape[:-1], k)
    i1, i2 = (torch.empty(shape, dtype=torch.int32, device=q.device) for _ in range(2))
    scores = q.new_empty(shape, dtype=score_dtype(q.dtype))
    top = torch.empty(*q.shape[:-1], 2, k, dtype=torch.int32, device=q.device)
    return scores, torch.empty(shape, dtype=torch.int64, device=q.device), i1, i2, top


def _setup_context(ctx, inputs, output):
    q, keys = inputs[0], inputs[1]
    _, _, i1, i2, _ = output
    ctx.save_for_backward(q, keys, i1, i2)


@triton.jit
def _dense_score_grad_kernel(
    ds_ptr,  # [R, k] gradient of the returned scores (row r = t·H + h)
    i1_ptr,  # [R, k] int32 first half key of each pick
    i2_ptr,  # [R, k] int32
    out_ptr,  # [2, H, T, NK] out: each half key's gradient, head-major, in q's dtype
    R,
    H,
    T,
    NK,
    k,
    NKP: tl.constexpr,
    KP: tl.constexpr,
):
    """One (token, head) row: the gradient of every half key's score, written once in the
    layout the backward's matrix products read (no fp32 zeros, scatter, cast and
    transpose passes). A half key may serve several picks: each pick's slot gets the sum,
    in fp32 and in pick order, over the picks sharing its key (so all of them store the
    same number), after the row is zeroed."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, KP)
    jmask = j < k
    ds = tl.load(ds_ptr + row * k + j, mask=jmask, other=0.0).to(tl.float32)
    cols = tl.arange(0, NKP)
    base = ((row % H) * T + row // H) * NK
    zero = tl.zeros([NKP], dtype=out_ptr.dtype.element_ty)
    half_stride = R.to(tl.int64) * NK  # R·NK passes 2**31 at 131k tokens × 4 heads × 4096
    for half in tl.static_range(2):
        dst = out_ptr + half * half_stride + base
        tl.store(dst + cols, zero, mask=cols < NK)
    i1 = tl.load(i1_ptr + row * k + j, mask=jmask, other=-1)
    i2 = tl.load(i2_ptr + row * k + j, mask=jmask, other=-2)
    tot1 = tl.sum(tl.where(i1[:, None] == i1[None, :], ds[None, :], 0.0), axis=1)  # [KP]
    tot2 = tl.sum(tl.where(i2[:, None] == i2[None, :], ds[None, :], 0.0), axis=1)
    tl.debug_barrier()  # the zeros of other threads land before the picks' sums
    tl.store(out_ptr + base + i1, tot1.to(out_ptr.dtype.element_ty), mask=jmask)
    tl.store(out_ptr + half_stride + base + i2, tot2.to(out_ptr.dtype.element_ty), mask=jmask)


@torch.library.custom_op("memlayers::product_key_score_grad", mutates_args=())
def dense_score_grad(
    d_scores: torch.Tensor, i1: torch.Tensor, i2: torch.Tensor, like: torch.Tensor, nk: int
) -> torch.Tensor:
    """``[2, H, T, nk]`` in ``like``'s dtype (``like``: q ``[T, H, k_dim]``): the gradient
    of every half key's score from the picks' ``d_scores [T, H, k]``."""
    tokens, heads = like.shape[0], like.shape[1]
    r, k = tokens * heads, i1.shape[-1]
    ds = like.new_empty(2, heads, tokens, nk)
    if r:
        _dense_score_grad_kernel[(r,)](
            d_scores.contiguous(), i1.contiguous(), i2.contiguous(), ds, r, heads, tokens, nk,
            k, NKP=triton.next_power_of_2(nk), KP=triton.next_power_of_2(k), num_warps=4,
        )  # fmt: skip
    return ds


@dense_score_grad.register_fake
def _(d_scores, i1, i2, like, nk):
    return like.new_empty(2, like.shape[1], like.shape[0], nk)


def _backward(ctx, d_scores, _d_index, _d_i1, _d_i2, _d_top):
    q, keys, i1, i2 = ctx.saved_tensors
    heads, _, nk, half = keys.shape
    q3 = q.reshape(-1, heads, 2 * half)  # [T, H, k_dim]
    tokens = q3.shape[0]
    # Each half key's score gradient, [2, H, T, NK] at q's dtype (summed in fp32).
    ds = dense_score_grad(d_scores, i1, i2, q3, nk)
    qh = q3.view(tokens, heads, 2, half).permute(2, 1, 0, 3)  # [2, H, T, half]
    dq = torch.stack([torch.bmm(ds[i], keys[:, i]) for i in range(2)], dim=2)  # [H, T, 2, half]
    dq = dq.permute(1, 0, 2, 3).reshape(q.shape)
    dk = torch.stack([torch.bmm(ds[i].transpose(1, 2), qh[i]) for i in range(2)], dim=1)
    return dq, dk, None, None


torch.library.register_autograd(
    "memlayers::product_key_topk", _backward, setup_context=_setup_context
)


def product_key_topk_triton(
    query: torch.Tensor, keys: torch.Tensor, k: int, half_top: bool = False,
    rank_bf16: bool = False,
):  # fmt: skip
    """Triton path of :func:`memlayers.ops.product_keys.product_key_topk` (inputs checked):
    q and keys in their common dtype, scores in :func:`score_dtype` of it; fp16, bf16 or
    fp32 (the kernels rank fp32 scores: float64 is refused, not silently narrowed)."""
    dtype = torch.promote_types(query.dtype, keys.dtype)
    if dtype == torch.float64:
        raise ValueError(
            f"the Triton product-key search takes fp16, bf16 or fp32 inputs, got query "
            f"{query.dtype} and keys {keys.dtype}"
        )
    q, kk = query.to(dtype), keys.to(dtype)
    scores, index, _, _, top = product_key_topk_op(q, kk, k, rank_bf16)
    return (scores, index, top) if half_top else (scores, index)
