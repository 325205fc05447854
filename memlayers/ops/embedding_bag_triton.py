"""Triton kernels for the weighted embedding bag, forward and backward (PAPER.md §2).

``out[b] = Σ_k weights[b, k] · values[indices[b, k]]``. The reference is
:class:`memlayers.ops.embedding_bag._TorchEmbeddingBag`; tests compare the two.

Forward: one program per (bag, column tile); the bag's rows stream in ``[BLOCK_K, BLOCK_D]``
tiles with fp32 accumulation. It reads each looked-up row once, as a copy does.

Backward (chosen by measurement, benchmarks/NOTES.md): the flattened indices are sorted by
row (stable, so the result is bitwise deterministic); a prep pass lays out, per sorted
lookup, its bag with first/last-of-row flags and its weight, and a scan gives each
distinct row its ordinal. The walk then takes 16 distinct rows per program and one
512-column tile per grid column: it steps through the rows' lookups one at a time,
software-pipelined four deep (``tl.range(num_stages=4)``), accumulating the open row's
value gradient ``Σ w · grad_out[bag]`` (written once, at the row's last lookup) and each
lookup's score-gradient part ``grad_out[bag] · values[row]`` (the row read once, at its
first lookup). Tiles are launched tile-major, so only a ``[B, 512]`` slice of grad_out
is live at a time, which L2 keeps far better: the per-row kernel this replaced read
grad_out's full ``[B, D]`` at random and read 4.3 GB from HBM where 1.9 GB are needed;
the walk reads 3.3 GB (ncu, H100, paper shape) and keeps more loads in flight. No
atomics: a row has one writer, the tiles' score parts are summed in a fixed order.
Measured against fp32 atomics (5× slower), per-bag score gradients plus a value-gradient
kernel, a chunked segmented scan, and the per-row kernel; the alternatives are in
benchmarks/bench_embedding_bag.py.

The value gradient comes back row-sparse (``rows [U]``, ``grad_rows [U, D]``: untouched
rows cost nothing) or dense ``[N, D]`` (a kernel zero-fills the untouched rows, the walk
writes each touched row at its place). U, the number of distinct rows, reaches the host
by an async copy: nothing waits for the device before the walk is queued.

The ops are registered with ``torch.library`` (``memlayers::embedding_bag_fwd`` and the
two backward ops) so ``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

from typing import NamedTuple

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
# Backward (benchmarks/NOTES.md, H100, 2026-11-26): 512-column tiles walked by one warp,
# four lookups in flight, 16 distinct rows per program (1-2% faster than 64 at every D in
# three runs).
BWD_BLOCK_D = 512
BWD_WARPS = 1
BWD_STAGES = 4
BWD_ROWS_PER_PROGRAM = 16
_PREP_BLOCK = 1024


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
def _prep_kernel(
    srows_ptr,  # [E] table row of each lookup, ascending
    perm_ptr,  # [E] int64: flat (bag, slot) position of each sorted lookup
    weights_ptr,  # [B * K]
    packed_ptr,  # out [E] int64: bag | first-of-row << 62 | last-of-row << 61
    ws_ptr,  # out [E] fp32: the lookup's weight, in sorted order
    firsts_ptr,  # out [E] int32: 1 where a row's lookups start
    E,
    K,
    BLOCK: tl.constexpr,
):
    """One pass over the sorted lookups: everything the walk reads per entry, contiguous."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < E
    r = tl.load(srows_ptr + e, mask=m, other=0)
    r_prev = tl.load(srows_ptr + e - 1, mask=m & (e > 0), other=-1)
    r_next = tl.load(srows_ptr + e + 1, mask=e + 1 < E, other=-1)
    j = tl.load(perm_ptr + e, mask=m, other=0)
    first = (r != r_prev).to(tl.int64)
    last = (r != r_next).to(tl.int64)
    tl.store(packed_ptr + e, (j // K) | (first << 62) | (last << 61), mask=m)
    tl.store(ws_ptr + e, tl.load(weights_ptr + j, mask=m, other=0.0).to(tl.float32), mask=m)
    tl.store(firsts_ptr + e, first.to(tl.int32), mask=m)


@triton.jit
def _starts_kernel(
    srows_ptr,  # [E]
    firsts_ptr,  # [E] int32
    ordinal_ptr,  # [E] int32: inclusive count of row starts (row ordinal + 1)
    seg_ptr,  # out [bound + 1] int64, filled with E: first lookup of each distinct row
    rows_ptr,  # out [bound] int64: the distinct rows, ascending, in rows[:U]
    touched_ptr,  # out [N] int8 (dense only): 1 on rows some lookup read
    E,
    N,
    bound,  # min(E, N): the size of rows (U <= bound when every index is in [0, N))
    DENSE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < E
    starts = m & (tl.load(firsts_ptr + e, mask=m, other=0) != 0)
    u = tl.load(ordinal_ptr + e, mask=starts, other=1).to(tl.int64) - 1
    r = tl.load(srows_ptr + e, mask=starts, other=0).to(tl.int64)
    # Indices outside [0, N) are the caller's bug (the forward reads out of bounds too);
    # the masks keep them from writing past these buffers.
    ok = starts & (u < bound) & (r >= 0) & (r < N)
    tl.store(seg_ptr + u, e, mask=ok)
    tl.store(rows_ptr + u, r, mask=ok)
    if DENSE:
        tl.store(touched_ptr + r, tl.full([BLOCK], 1, tl.int8), mask=ok)


@triton.jit
def _zero_untouched_kernel(
    grad_values_ptr,  # [N, D]
    touched_ptr,  # [N] int8
    N,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Zeros on the rows no lookup read (the walk writes every other row once)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    untouched = (rows < N) & (tl.load(touched_ptr + rows, mask=rows < N, other=1) == 0)
    zeros = tl.zeros([BLOCK_R, BLOCK_D], dtype=grad_values_ptr.dtype.element_ty)
    for d0 in tl.static_range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = untouched[:, None] & (cols < D)[None, :]
        tl.store(grad_values_ptr + rows[:, None] * D + cols[None, :], zeros, mask=mask)


@triton.jit
def _bwd_kernel(
    grad_out_ptr,  # [B, D]
    values_ptr,  # [N, D]
    ws_ptr,  # [E] fp32: weights in sorted order
    packed_ptr,  # [E] int64: bag | first << 62 | last << 61 (see _prep_kernel)
    srows_ptr,  # [E] sorted table rows
    seg_ptr,  # [bound + 1] int64: distinct row u owns sorted lookups seg[u] : seg[u + 1]
    grad_values_ptr,  # [bound, D] (sparse) or [N, D] (dense)
    parts_ptr,  # [n_tiles, E] fp32: each column tile's part of each score gradient
    n_distinct_ptr,  # [1] int32: U, read here so the host need not wait for it
    RPP,  # distinct rows per program
    E,
    D: tl.constexpr,  # a constant: row offsets row * D then carry its alignment
    DENSE_OUT: tl.constexpr,  # write row u's gradient at its table row, not at u
    WRITE_DV: tl.constexpr,
    WRITE_DW: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Program (p, t) walks the sorted lookups of distinct rows [p·RPP, (p+1)·RPP) over
    column tile t, one lookup per step, software-pipelined STAGES deep. Axis 0 varies
    fastest in launch order, so the grid runs (mostly: blocks are dispatched about in
    order) through tile 0 before tile 1, and only a [B, BLOCK_D] slice of grad_out is
    being read at a time: L2 keeps it far better than all of grad_out."""
    p = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)  # tile * E passes 2**31 for large batches
    u_lo = p * RPP  # the grid covers an upper bound on U: programs past it walk nothing
    e_lo = tl.load(seg_ptr + u_lo)
    e_hi = tl.load(seg_ptr + tl.minimum(u_lo + RPP, tl.load(n_distinct_ptr).to(tl.int64)))
    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    dmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)  # the open row's value gradient
    v = tl.zeros([BLOCK_D], dtype=tl.float32)  # the open row's values
    u = u_lo - 1  # ordinal of the open row
    for e in tl.range(e_lo, e_hi, num_stages=STAGES):
        packed = tl.load(packed_ptr + e)
        first = ((packed >> 62) & 1) != 0
        last = ((packed >> 61) & 1) != 0
        bag = packed & ((1 << 61) - 1)
        g = tl.load(grad_out_ptr + bag * D + cols, mask=dmask, other=0.0).to(tl.float32)
        row = tl.load(srows_ptr + e).to(tl.int64)
        if WRITE_DV:
            acc = tl.where(first, 0.0, acc) + tl.load(ws_ptr + e) * g
            u += first.to(tl.int64)
            if DENSE_OUT:
                out_row = row
            else:
                out_row = u
            # One writer per row, once: its last lookup. Streamed out of L2 first.
            tl.store(
                grad_values_ptr + out_row * D + cols, acc.to(grad_values_ptr.dtype.element_ty),
                mask=tl.where(last, dmask, False), eviction_policy="evict_first",
            )  # fmt: skip
        if WRITE_DW:
            # The row's values are read once, at its first lookup (a masked load moves
            # nothing on the others). Masks are where(flag, dmask, False), not
            # dmask & flag: Triton 3.9's interpreter rejects a vector & scalar mask.
            at_first = tl.where(first, dmask, False)
            fresh = tl.load(values_ptr + row * D + cols, mask=at_first, other=0.0)
            v = tl.where(first, fresh.to(tl.float32), v)
            tl.store(parts_ptr + tile * E + e, tl.sum(g * v))


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


class Segments(NamedTuple):
    """The sorted lookups as the backward walk reads them (E = B·K lookups, U distinct
    rows, bound = min(E, N) ≥ U). U stays on the device (``n_distinct [1]`` int32) so
    nothing waits for it before the walk; ``rows``/``seg`` are sized by the bound:
    ``rows[:U]`` int64 ascending, ``seg[:U + 1]`` (row u owns sorted lookups
    ``seg[u] : seg[u + 1]``; the tail holds E). Per lookup, in sorted order: ``perm`` (flat
    (bag, slot)), ``sorted_rows``, ``packed`` (bag and first/last-of-row flags), ``ws``
    (fp32 weight). ``touched [N]`` int8 marks rows read (dense only, else empty)."""

    rows: torch.Tensor
    seg: torch.Tensor
    perm: torch.Tensor
    sorted_rows: torch.Tensor
    packed: torch.Tensor
    ws: torch.Tensor
    touched: torch.Tensor
    n_distinct: torch.Tensor
    n_distinct_host: torch.Tensor  # pinned [1] copy of U on CUDA (else n_distinct itself)
    n_distinct_ready: torch.cuda.Event | None  # recorded after that copy (CUDA only)


def row_segments(
    indices: torch.Tensor,
    weights: torch.Tensor,
    n_rows: int,
    dense: bool = False,
    need_count: bool = False,
):
    """Sort the lookups by row and lay out what the walk reads: see :class:`Segments`.
    ``need_count``: also queue U's copy to the host (the sparse path sizes its result).

    A stable sort (deterministic order within a row), one pass for the per-lookup arrays,
    a scan for row ordinals, one pass for the row starts; nothing waits for the device.
    """
    sorted_rows, perm = sort_by_row(indices, n_rows)
    e = perm.numel()
    dev = indices.device
    packed = torch.empty(e, dtype=torch.int64, device=dev)
    ws = torch.empty(e, dtype=torch.float32, device=dev)
    firsts = torch.empty(e, dtype=torch.int32, device=dev)
    grid = (triton.cdiv(e, _PREP_BLOCK),)
    if e:
        _prep_kernel[grid](sorted_rows, perm, weights, packed, ws, firsts, e, indices.shape[1],
                           BLOCK=_PREP_BLOCK)  # fmt: skip
    ordinal = torch.cumsum(firsts, 0, dtype=torch.int32)
    n_distinct = ordinal[-1:] if e else torch.zeros(1, dtype=torch.int32, device=dev)
    # U goes to the host by an async copy queued here; a caller that needs it waits for
    # this event only, which completes while the walk still runs (no queue drain).
    host, ready = n_distinct, None
    if need_count and dev.type == "cuda":
        host = torch.empty(1, dtype=torch.int32, pin_memory=True)
        host.copy_(n_distinct, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(dev))
    bound = min(e, n_rows)
    seg = torch.full((bound + 1,), e, dtype=torch.int64, device=dev)
    rows = torch.empty(bound, dtype=torch.int64, device=dev)
    touched = torch.zeros(n_rows if dense else 0, dtype=torch.int8, device=dev)
    if e:
        _starts_kernel[grid](sorted_rows, firsts, ordinal, seg, rows, touched, e, n_rows, bound,
                             DENSE=dense, BLOCK=_PREP_BLOCK)  # fmt: skip
    return Segments(rows, seg, perm, sorted_rows, packed, ws, touched, n_distinct, host, ready)


def bwd_launch(d: int, block_d: int | None = None) -> tuple[int, int]:
    """The backward's ``(BLOCK_D, num_warps)`` for rows of ``d`` columns: ``block_d`` (or
    the default) capped at the next power of two of ``d``."""
    return min(block_d or BWD_BLOCK_D, triton.next_power_of_2(max(d, 1))), BWD_WARPS


def _bwd_launch(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    segments: Segments,
    grad_values: torch.Tensor | None,
    dense_out: bool,
    write_dw: bool,
    block_d: int | None = None,
    num_warps: int | None = None,
    stages: int | None = None,
    rows_per_program: int | None = None,
) -> torch.Tensor:
    """Run the backward walk: fills ``grad_values`` (row u's gradient at row u, or at its
    table row when ``dense_out``) and returns the score gradient ``[B, K]`` fp32 (empty
    when not asked for). Launch parameters default to the module's BWD_* constants."""
    d = values.shape[1]
    bound, e = segments.rows.numel(), segments.perm.numel()
    block_d, default_warps = bwd_launch(d, block_d)
    rpp = rows_per_program or BWD_ROWS_PER_PROGRAM
    n_tiles = triton.cdiv(d, block_d)
    dw = torch.empty(indices.shape if write_dw else (0,), dtype=torch.float32,
                     device=values.device)  # fmt: skip
    if bound == 0 or d == 0 or (grad_values is None and not write_dw):
        return dw.zero_()
    parts = torch.empty(n_tiles if write_dw else 0, e, dtype=torch.float32, device=dw.device)
    _bwd_kernel[(triton.cdiv(bound, rpp), n_tiles)](
        grad_out, values, segments.ws, segments.packed, segments.sorted_rows, segments.seg,
        values if grad_values is None else grad_values, parts, segments.n_distinct, rpp, e,
        D=d, DENSE_OUT=dense_out, WRITE_DV=grad_values is not None, WRITE_DW=write_dw,
        BLOCK_D=block_d, STAGES=stages or BWD_STAGES, num_warps=num_warps or default_warps,
    )  # fmt: skip
    if write_dw:
        # Column tiles' parts summed in a fixed order, then back to (bag, slot) order.
        dw.view(-1)[segments.perm] = parts.sum(0) if n_tiles > 1 else parts[0]
    return dw


def _bwd_dense(grad_out, values, indices, weights, need_values, need_weights, **launch):
    """Dense value gradient ``[N, D]`` (zeros on untouched rows) and score gradient."""
    n, d = values.shape
    segments = row_segments(indices, weights, n, dense=need_values)
    gv = None
    if need_values:
        gv = values.new_empty(values.shape)
        if n and d:
            block_d = min(128, triton.next_power_of_2(d))
            _zero_untouched_kernel[(triton.cdiv(n, 16),)](
                gv, segments.touched, n, D=d, BLOCK_R=16, BLOCK_D=block_d
            )
    dw = _bwd_launch(grad_out, values, indices, segments, gv, True, need_weights, **launch)
    return (gv if need_values else values.new_empty(0)), dw


def _bwd_sparse(grad_out, values, indices, weights, need_weights, **launch):
    """Row-sparse value gradient ``(rows [U], grad_rows [U, D])`` and score gradient."""
    segments = row_segments(indices, weights, values.shape[0], need_count=True)
    # Sized by the bound on U, min(B·K, N), so the walk is queued without waiting for U
    # (1.1× U at the paper's shape, at most 1.6× U for uniform lookups); U is read once
    # all the work is queued. Skewed lookups (bound > 2U) get a right-sized copy.
    grad_rows = values.new_empty(segments.rows.numel(), values.shape[1])
    dw = _bwd_launch(grad_out, values, indices, segments, grad_rows, False, need_weights,
                     **launch)  # fmt: skip
    if segments.n_distinct_ready is not None:
        segments.n_distinct_ready.synchronize()
    u = int(segments.n_distinct_host)
    rows, grad_rows = segments.rows[:u], grad_rows[:u]
    if segments.rows.numel() > 2 * u:
        rows, grad_rows = rows.clone(), grad_rows.clone()
    return rows, grad_rows, dw


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
