"""Triton kernels for the weighted embedding bag, forward and backward (PAPER.md §2).

``out[b] = Σ_k weights[b, k] · values[indices[b, k]]``. The reference is
:class:`memlayers.ops.embedding_bag._TorchEmbeddingBag`; tests compare the two.

Forward: one program per (bag, column tile); the bag's rows stream in ``[BLOCK_K, BLOCK_D]``
tiles with fp32 accumulation. It reads each looked-up row once, as a copy does.

Backward (chosen by measurement, benchmarks/NOTES.md): the flattened indices are sorted
(stable, so the result is bitwise deterministic) and one program per distinct row walks
the (bag, slot) entries that read it. It reads ``values[row]`` once and, per entry,
``grad_out[bag]`` (16k bags × D fit in L2), accumulating the row's value gradient
``Σ w · grad_out[bag]`` and writing each entry's score gradient
``grad_out[bag] · values[row]`` in the same pass. No atomics: a row has one writer.
Measured against fp32 atomics into a dense buffer (5× slower), per-bag score gradients
plus a separate value-gradient kernel, and a chunked segmented scan over the sorted
entries (1.5× slower at its best); all in benchmarks/bench_embedding_bag.py.

The value gradient comes back row-sparse (``rows [U]``, ``grad_rows [U, D]``: untouched
rows cost nothing) or dense ``[N, D]`` (untouched rows zero-filled, then the same kernel
writes each touched row at its place).

The ops are registered with ``torch.library`` (``memlayers::embedding_bag_fwd`` and the
two backward ops) so ``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memlayers.ops.triton_interpreter import patch_triton_interpreter

patch_triton_interpreter()

# Launch parameters, picked by the sweep in benchmarks/bench_embedding_bag.py on an H100
# (benchmarks/NOTES.md). Forward: rows per inner step and columns per program.
FWD_BLOCK_K = 8
FWD_BLOCK_D = 512
FWD_WARPS = 4
# Backward: a row's entries per step (1: no wasted lanes at ~2.3 lookups per row), and
# columns per step with the warps per program. Measured on an H100 (benchmarks/NOTES.md,
# 2026-11-25): the whole row in one step with 4 warps is fastest at D = 1000 and 1024;
# 512-column steps with 2 warps are 25% faster at D = 512 and 8% at D = 2048.
BWD_BLOCK_S = 1
BWD_BLOCK_D = 1024
BWD_WARPS = 4
BWD_NARROW = (512, 2)  # (BLOCK_D, warps) unless next_power_of_2(D) == BWD_BLOCK_D


@triton.jit
def _fwd_kernel(
    values_ptr,  # [N, D]
    indices_ptr,  # [B, K] int64
    weights_ptr,  # [B, K]
    out_ptr,  # [B, D]
    K,
    n_dtiles,
    D: tl.constexpr,  # a constant: row offsets idx * D then carry its alignment
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    bag = pid // n_dtiles
    cols = (pid % n_dtiles) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    dmask = cols < D
    # A 2-D accumulator, summed over K once at the end: a per-step tl.sum over K crosses
    # warps (shared memory + a barrier every step) and left the loads waiting (3.3× slower
    # at D = 1024 on an H100, benchmarks/NOTES.md).
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    # The next step's indices are loaded before this step's rows: one memory round trip
    # per step on the critical path instead of two.
    ks = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    idx_next = tl.load(indices_ptr + bag * K + ks, mask=ks < K, other=0)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        kmask = ks < K
        idx = idx_next  # int64
        idx_next = tl.load(indices_ptr + bag * K + BLOCK_K + ks, mask=ks + BLOCK_K < K, other=0)
        w = tl.load(weights_ptr + bag * K + ks, mask=kmask, other=0.0).to(tl.float32)
        # idx is int64, so idx * D is too: tables past 2**31 elements are addressed right.
        ptrs = values_ptr + idx[:, None] * D + cols[None, :]  # [BLOCK_K, BLOCK_D]
        rows = tl.load(ptrs, mask=kmask[:, None] & dmask[None, :], other=0.0)
        acc += rows.to(tl.float32) * w[:, None]
    out = tl.sum(acc, axis=0)  # [BLOCK_D]
    tl.store(out_ptr + bag * D + cols, out.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _bwd_kernel(
    grad_out_ptr,  # [B, D]
    values_ptr,  # [N, D]
    weights_ptr,  # [B * K]
    perm_ptr,  # [B * K] int64: flat positions b * K + k, grouped by table row
    seg_ptr,  # [U + 1] int64: distinct row u owns perm[seg[u] : seg[u + 1]]
    rows_ptr,  # [U] int64: table row of distinct row u
    grad_values_ptr,  # [U, D] (sparse) or [N, D] (dense)
    grad_weights_ptr,  # [B * K] fp32
    K,
    D: tl.constexpr,  # a constant: row offsets row * D then carry its alignment
    DENSE_OUT: tl.constexpr,  # write row u's gradient at its table row, not at u
    WRITE_DV: tl.constexpr,
    WRITE_DW: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + u)
    start = tl.load(seg_ptr + u)
    end = tl.load(seg_ptr + u + 1)
    if DENSE_OUT:
        out_row = row
    else:
        out_row = u
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)  # [BLOCK_D]
        dmask = cols < D
        acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)  # summed over S at the end
        if WRITE_DW:
            v = tl.load(values_ptr + row * D + cols, mask=dmask, other=0.0).to(tl.float32)
        for s0 in range(start, end, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
            smask = ss < end
            j = tl.load(perm_ptr + ss, mask=smask, other=0)  # flat (bag, slot)
            m2 = smask[:, None] & dmask[None, :]
            g = tl.load(grad_out_ptr + (j // K)[:, None] * D + cols[None, :], mask=m2, other=0.0)
            g = g.to(tl.float32)  # [BLOCK_S, BLOCK_D]
            if WRITE_DV:
                w = tl.load(weights_ptr + j, mask=smask, other=0.0).to(tl.float32)
                acc += g * w[:, None]
            if WRITE_DW:
                part = tl.sum(g * v[None, :], axis=1)  # [BLOCK_S]
                # This program is the only writer of these entries: no race.
                prev = tl.load(grad_weights_ptr + j, mask=smask & (d0 > 0), other=0.0)
                tl.store(grad_weights_ptr + j, prev + part, mask=smask)
        if WRITE_DV:
            out = tl.sum(acc, axis=0).to(grad_values_ptr.dtype.element_ty)  # [BLOCK_D]
            tl.store(grad_values_ptr + out_row * D + cols, out, mask=dmask)


def _fwd_launch(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    block_k: int = FWD_BLOCK_K,
    block_d: int = FWD_BLOCK_D,
    num_warps: int = FWD_WARPS,
) -> torch.Tensor:
    """Forward on contiguous inputs: ``[B, D]`` in ``values.dtype``."""
    b, k = indices.shape
    d = values.shape[1]
    if b == 0 or k == 0 or d == 0:
        return values.new_zeros(b, d)
    out = values.new_empty(b, d)
    block_d = min(block_d, triton.next_power_of_2(d))
    block_k = min(block_k, triton.next_power_of_2(k))
    n_dtiles = triton.cdiv(d, block_d)
    _fwd_kernel[(b * n_dtiles,)](
        values, indices, weights, out, k, n_dtiles,
        D=d, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return out


def sort_by_row(indices: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sorted_rows, perm)`` of the flattened indices; stable, so deterministic.

    Rows are sorted as int32 when the table has fewer than 2**31 rows (always, in
    practice): a radix sort of 32-bit keys makes half the passes of a 64-bit one.
    """
    flat = indices.reshape(-1)
    keys = flat.to(torch.int32) if n_rows < 2**31 else flat
    sorted_rows, perm = torch.sort(keys, stable=True)
    return sorted_rows, perm


def row_segments(indices: torch.Tensor, n_rows: int):
    """``(rows [U] int64, seg [U + 1] int64, perm [B·K] int64)``: the distinct rows read,
    ascending, and the flat (bag, slot) positions of each, ``perm[seg[u] : seg[u + 1]]``."""
    sorted_rows, perm = sort_by_row(indices, n_rows)
    rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    seg = counts.new_zeros(counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=seg[1:])
    return rows.long(), seg, perm


def bwd_launch(d: int) -> tuple[int, int]:
    """The backward's default ``(BLOCK_D, num_warps)`` for rows of ``d`` columns."""
    if triton.next_power_of_2(d) == BWD_BLOCK_D:
        return BWD_BLOCK_D, BWD_WARPS
    return BWD_NARROW


def _bwd_launch(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    segments: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    grad_values: torch.Tensor | None,
    dense_out: bool,
    write_dw: bool,
    block_s: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Run the backward kernel over the distinct rows: fills ``grad_values`` (row u's
    gradient at row u, or at its table row when ``dense_out``) and returns the score
    gradient ``[B, K]`` fp32 (empty when not asked for). Launch parameters default to
    :func:`bwd_launch`."""
    rows, seg, perm = segments
    d = values.shape[1]
    default_d, default_warps = bwd_launch(d)
    block_s, block_d = block_s or BWD_BLOCK_S, block_d or default_d
    num_warps = num_warps or default_warps
    dw = torch.empty(indices.shape if write_dw else (0,), dtype=torch.float32,
                     device=values.device)  # fmt: skip
    if rows.numel() == 0 or d == 0 or (grad_values is None and not write_dw):
        return dw.zero_()
    _bwd_kernel[(rows.numel(),)](
        grad_out, values, weights, perm, seg, rows,
        values if grad_values is None else grad_values, dw, indices.shape[1],
        D=d, DENSE_OUT=dense_out, WRITE_DV=grad_values is not None, WRITE_DW=write_dw,
        BLOCK_S=block_s, BLOCK_D=min(block_d, triton.next_power_of_2(d)), num_warps=num_warps,
    )  # fmt: skip
    return dw


def _bwd_dense(grad_out, values, indices, weights, need_values, need_weights, **launch):
    """Dense value gradient ``[N, D]`` (zeros on untouched rows) and score gradient."""
    n = values.shape[0]
    segments = row_segments(indices, n)
    gv = None
    if need_values:
        gv = values.new_empty(values.shape)
        # Rows no lookup touched get zeros; the kernel writes every touched row once.
        untouched = torch.ones(n, dtype=torch.bool, device=values.device)
        untouched[segments[0]] = False
        gv.index_fill_(0, untouched.nonzero().squeeze(1), 0)
    dw = _bwd_launch(grad_out, values, indices, weights, segments, gv, True, need_weights,
                     **launch)  # fmt: skip
    return (gv if need_values else values.new_empty(0)), dw


def _bwd_sparse(grad_out, values, indices, weights, need_weights, **launch):
    """Row-sparse value gradient ``(rows [U], grad_rows [U, D])`` and score gradient."""
    segments = row_segments(indices, values.shape[0])
    grad_rows = values.new_empty(segments[0].numel(), values.shape[1])
    dw = _bwd_launch(grad_out, values, indices, weights, segments, grad_rows, False,
                     need_weights, **launch)  # fmt: skip
    return segments[0], grad_rows, dw


# ---------------------------------------------------------------------------------------
# torch.library registration: opaque ops that torch.compile traces as single nodes.


@torch.library.custom_op("memlayers::embedding_bag_fwd", mutates_args=())
def embedding_bag_fwd(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, sparse_grad: bool
) -> torch.Tensor:
    """``[B, D]`` weighted sum; ``sparse_grad`` only selects the backward's value grad."""
    return _fwd_launch(values.contiguous(), indices.contiguous(), weights.contiguous())


@embedding_bag_fwd.register_fake
def _(values, indices, weights, sparse_grad):
    return values.new_empty(indices.shape[0], values.shape[1])


@torch.library.custom_op("memlayers::embedding_bag_bwd", mutates_args=())
def embedding_bag_bwd(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    need_values: bool,
    need_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_values [N, D] or [0], grad_weights [B, K] or [0])``."""
    gv, dw = _bwd_dense(
        grad_out.contiguous(), values.contiguous(), indices.contiguous(),
        weights.contiguous(), need_values, need_weights,
    )  # fmt: skip
    return gv, dw.to(weights.dtype)


@embedding_bag_bwd.register_fake
def _(grad_out, values, indices, weights, need_values, need_weights):
    gv = values.new_empty(values.shape) if need_values else values.new_empty(0)
    dw = weights.new_empty(weights.shape) if need_weights else weights.new_empty(0)
    return gv, dw


@torch.library.custom_op("memlayers::embedding_bag_bwd_sparse", mutates_args=())
def embedding_bag_bwd_sparse(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    need_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows [U] int64 ascending, grad_rows [U, D], grad_weights [B, K] or [0])``."""
    rows, grad_rows, dw = _bwd_sparse(
        grad_out.contiguous(), values.contiguous(), indices.contiguous(),
        weights.contiguous(), need_weights,
    )  # fmt: skip
    return rows, grad_rows, dw.to(weights.dtype)


@embedding_bag_bwd_sparse.register_fake
def _(grad_out, values, indices, weights, need_weights):
    u = torch.library.get_ctx().new_dynamic_size()  # distinct rows: known after the sort
    dw = weights.new_empty(weights.shape) if need_weights else weights.new_empty(0)
    return indices.new_empty(u), values.new_empty(u, values.shape[1]), dw


def _setup_context(ctx, inputs, output):
    values, indices, weights, sparse_grad = inputs
    ctx.save_for_backward(values, indices, weights)
    ctx.sparse_grad = sparse_grad


def _backward(ctx, grad_out):
    values, indices, weights = ctx.saved_tensors
    need_values, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    grad_values = grad_weights = None
    if ctx.sparse_grad and need_values:
        rows, grad_rows, dw = embedding_bag_bwd_sparse(
            grad_out, values, indices, weights, need_weights
        )
        # Rows come out of a sort and are distinct: the COO tensor is coalesced as built.
        grad_values = torch.sparse_coo_tensor(
            rows.unsqueeze(0), grad_rows, values.shape, is_coalesced=True, check_invariants=False
        )
    elif need_values or need_weights:
        gv, dw = embedding_bag_bwd(grad_out, values, indices, weights, need_values, need_weights)
        grad_values = gv if need_values else None
    if need_weights:
        grad_weights = dw
    return grad_values, None, grad_weights, None


torch.library.register_autograd(
    "memlayers::embedding_bag_fwd", _backward, setup_context=_setup_context
)


def embedding_bag_triton(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    sparse_grad: bool = False,
) -> torch.Tensor:
    """The Triton path (inputs checked by :func:`memlayers.ops.embedding_bag`)."""
    return embedding_bag_fwd(values, indices, weights, sparse_grad)
