"""Triton kernels for the weighted embedding bag, forward and backward (docs/method.md §5).

``out[b] = Σ_k weights[b, k] · values[indices[b, k]]``. The reference is
:class:`memlayers.ops.embedding_bag._TorchEmbeddingBag`; tests compare the two.

Forward: one program per (bag, column tile) walks the bag's rows one at a time,
``acc += w · row`` in fp32; by the measured rule (:func:`fwd_config`) the tile is the
whole row when there are at least as many bags as SMs (training, prefill), and for fewer
(decoding) tiles of 128+ columns, 16 rows gathered per load and added in order (3.3× the
training launch's speed at batch 1 on an H200, L2 cold). Every launch adds the rows in
the same order (k = 0, 1, …, per column), so no launch parameter changes a bit of the
output (checked bit for bit on an H200). The simplest kernel (one program per bag,
whole row per load, default warps, no checks) is the benchmark's baseline
(:func:`simple_forward`).

Backward (benchmarks/NOTES.md, sessions 3 and 4): the flattened lookups are sorted by row
(stable, so every sum below has a fixed order and the result is bitwise deterministic); a
prep pass lays out, per sorted lookup, its bag and its weight, and a scan gives each
lookup its row's ordinal. The walk then splits the work by *lookups*, not rows: program c
owns the sorted lookups ``[c·CHUNK, (c+1)·CHUNK)``, moved to whole-row bounds for rows of
at most CHUNK lookups (such a row belongs to the program where it starts). A longer row —
skewed lookups put tens of thousands on one row — is cut at the chunk bounds: each
program writes its piece's fp32 partial sum (``heads``/``tails``) and a second small pass
adds a row's pieces in chunk order. So no program walks more than 2·CHUNK lookups
whatever the distribution (the walk before this gave each program 16 whole rows: a hot
row was one serial chain, 4× slower in the 134m trainer, 12-160× slower than this walk on
skewed lookups in benchmarks/bench_embedding_bag.py). Each program walks its chunk row by
row (:func:`_bwd_kernel`): an outer loop over the rows meeting the chunk, their bounds
and stores once per row, an inner loop over one row's lookups that only loads and adds.
Walked lookup by lookup (flags, a piece test and two predicated stores per lookup: the
walk to session 20) the same sums took 1.9× as long at the merged 134m shape
(results/walk_rows_h200_20261203.md); a hybrid that gave short rows programs of their own
won only on uniform lookups and was dropped (results/walk_hybrid_h200_20261203.md).

Per lookup the walk accumulates its row's value gradient ``Σ w · grad_out[bag]`` (written
once, after the row's last lookup, or as a piece) and the score-gradient part
``grad_out[bag] · values[row]`` (the row read once per piece). Programs take one column
tile each (up to 512 columns: :func:`bwd_launch`) and are launched tile-major, so only a
``[B, tile]`` slice of grad_out is live at a time, which L2 keeps (ncu: 3.3 GB read where
a per-row kernel read 4.3 GB). No atomics: a row has one writer, the tiles' score parts
are summed in a fixed order.

The value gradient comes back row-sparse (``rows [U]``, ``grad_rows [U, D]``: untouched
rows cost nothing) or dense ``[N, D]`` (a kernel zero-fills the untouched rows, the walk
writes each touched row at its place). U, the number of distinct rows, reaches the host
by an async copy: nothing waits for the device before the walk is queued. The same walk
sums the repeated rows of an uncoalesced sparse gradient (:func:`sum_rows`).

Indices outside ``[0, N)`` are the caller's bug: the forward reads no row for them
(masked) and fails with a device-side assert instead (``torch._assert_async``: no host
wait), as PyTorch's own index kernels do; the backward's writes are masked too.

The ops are registered with ``torch.library`` (``memlayers::embedding_bag_fwd`` and the
two backward ops) so ``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from memlayers.ops.triton_interpreter import patch_triton_interpreter

patch_triton_interpreter()

# Backward: tiles of up to 512 columns (bwd_launch: 256 at D = 768) walked by one warp
# (H100, 2026-11-26); one stage, i.e. no software pipelining of the row-by-row walk's
# inner loop (H200, 2026-12-03: 3.16 ms at the merged 134m shape against 5.00 at four
# stages, 0.82 against 1.54 at the paper's: results/walk_rows_h200_20261203.md).
# CHUNK, lookups per program (H100 sweep, 2026-11-28): 256 keeps every skewed case within
# 1.22x of uniform (128: 1.57x, the pieces' second pass grows) at +0-5% on uniform
# against 128.
BWD_BLOCK_D = 512
BWD_WARPS = 1
BWD_STAGES = 1
BWD_CHUNK = 256
# The pass that adds a long row's pieces: [BLOCK_R pieces, BLOCK_D columns] per step.
_COMBINE_BLOCK_R = 8
_COMBINE_BLOCK_D = 256
_PREP_BLOCK = 1024


@triton.jit
def bag_entry(indices_ptr, weights_ptr, bag, K, k, N, mask, CHECK: tl.constexpr):
    """Entry ``k`` of bag ``bag`` of a forward: ``(row, fp32 weight, the row's load mask,
    1 if the index is outside [0, N) else 0)``. With CHECK such an index reads nothing:
    row 0 (for unmasked scalar loads, e.g. a quantized row's scale) and a false mask."""
    idx = tl.load(indices_ptr + bag * K + k)  # int64: idx * D passes 2**31 on big tables
    w = tl.load(weights_ptr + bag * K + k).to(tl.float32)
    bad = tl.full([], 0, tl.int32)
    if CHECK:
        ok = (idx >= 0) & (idx < N)
        bad = (~ok).to(tl.int32)
        mask = tl.where(ok, mask, False)
        idx = tl.where(ok, idx, 0)
    return idx, w, mask, bad


@triton.jit
def bag_rows(indices_ptr, weights_ptr, bag, K, k0, N, r, CHECK: tl.constexpr):
    """Entries ``k0 + r`` (``r = arange(ROWS)``) of bag ``bag``, for a forward that
    gathers ROWS rows a load: ``(rows [ROWS], fp32 weights [ROWS] (0 past the bag's end),
    the rows' load mask, how many indices are outside [0, N))``. With CHECK such an index
    reads nothing (row 0, masked); without, only the bag's end is masked."""
    kk = k0 + r
    kmask = kk < K
    idx = tl.load(indices_ptr + bag * K + kk, mask=kmask, other=0)
    ws = tl.load(weights_ptr + bag * K + kk, mask=kmask, other=0.0).to(tl.float32)
    ok = kmask
    bad = tl.full([], 0, tl.int32)
    if CHECK:
        inside = (idx >= 0) & (idx < N)
        bad = tl.sum((kmask & ~inside).to(tl.int32))
        ok = ok & inside
        idx = tl.where(ok, idx, 0)
    return idx, ws, ok, bad


@triton.jit
def add_in_order(acc, tile, ws, r, j, inside):
    """``acc + ws[j] · tile[j]`` where ``inside`` (else ``acc``): row ``j`` of a gathered
    ``[ROWS, BLOCK]`` tile, picked out by a sum of it and zeros (exact), so gathered rows
    add in the order, and to the fp32 numbers, of a walk that loads a row a step."""
    pick = r == j
    row = tl.sum(tl.where(pick[:, None], tile, 0.0), axis=0)  # [BLOCK]
    w = tl.sum(tl.where(pick, ws, 0.0))
    return tl.where(inside, acc + row * w, acc)


@triton.jit
def _fwd_kernel(
    values_ptr,  # [N, D]
    indices_ptr,  # [B, K] int64
    weights_ptr,  # [B, K]
    out_ptr,  # [B, D]
    bad_ptr,  # [1] int32: set to 1 when some index is outside [0, N)
    N,
    K,
    D: tl.constexpr,  # a constant: row offsets idx * D then carry its alignment
    BLOCK_D: tl.constexpr,  # columns per program: next_power_of_2(D) // SPLIT
    STAGES: tl.constexpr,  # loads in flight (software pipelining of the loop over K)
    CHECK: tl.constexpr,  # flag indices outside [0, N) (off: the caller made them in range)
    ROWS: tl.constexpr,  # rows gathered per load (1: one row per step)
):
    """Program (bag, tile): ``acc += w_k · values[idx_k, tile]`` for k = 0 … K-1, in order.
    One row per step and no reduction across lanes: each column's sum has the same order
    for every launch, so no launch parameter can change a bit of the output.

    ``ROWS > 1`` (few bags: decoding): ROWS rows are gathered by one load, so ROWS rows
    are in flight instead of one, then added one at a time in the same order, each picked
    out of the tile by a sum of it and zeros (exact: the same fp32 number). Only a row
    that is exactly -0.0 where the sum so far is ±0 could give a zero of the other sign."""
    n_dtiles = tl.cdiv(D, BLOCK_D)
    pid = tl.program_id(0).to(tl.int64)
    bag = pid // n_dtiles
    cols = (pid % n_dtiles) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    dmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_bad = tl.full([], 0, tl.int32)
    if ROWS == 1:
        for k in tl.range(0, K, num_stages=STAGES):
            # An index outside the table reads nothing (masked) and raises the flag.
            idx, w, rmask, bad = bag_entry(indices_ptr, weights_ptr, bag, K, k, N, dmask, CHECK)
            n_bad += bad
            row = tl.load(values_ptr + idx * D + cols, mask=rmask, other=0.0)
            acc += row.to(tl.float32) * w
    else:
        r = tl.arange(0, ROWS)
        for k0 in tl.range(0, K, ROWS, num_stages=STAGES):
            idx, ws, ok, bad = bag_rows(indices_ptr, weights_ptr, bag, K, k0, N, r, CHECK)
            n_bad += bad
            tile = tl.load(values_ptr + idx[:, None] * D + cols[None, :],
                           mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # fmt: skip
            for j in tl.static_range(ROWS):
                acc = add_in_order(acc, tile, ws, r, j, k0 + j < K)
    tl.store(out_ptr + bag * D + cols, acc.to(out_ptr.dtype.element_ty), mask=dmask)
    tl.store(bad_ptr, 1, mask=n_bad > 0)


# Forward launch (SPLIT column tiles per bag, warps, stages, ROWS). The rule for many bags
# (training, prefill: at least a bag per SM): the whole row per
# program, 4 warps, no pipelining: on an H100 (2026-11-28) a six-launch autotune picked
# it at D = 512, 1000 and 2048, where it ran at 97-99% of copy bandwidth (93% at 1000,
# as the simple kernel); 256-column tiles with 2 warps were 1-9% slower on uniform and
# up to 4.6x slower on skewed lookups. On an H200 the simple kernel (the same launch) ran
# at 100% (issue 16). The other entries are the benchmark's sweep; every one adds the
# rows in the same order (see _fwd_kernel), so none changes a bit of the output.
FWD_CONFIG = (1, 4, 1, 1)
# Few bags (decoding: one bag per sequence): a whole-row program walks its bag's 128 rows
# one dependent index-then-row load after another, 41 us a lookup at batch 1 (H200,
# 134m-memory+ decode step, 2026-12-02) where the rows are 0.2 MB. Then the rows are cut
# into tiles of FWD_FEW_BLOCK_D columns or more, until there are about as many programs
# as SMs, and each gathers FWD_FEW_ROWS rows per load (fwd_config). Swept on an H200
# with L2 flushed before each lookup (benchmarks/bench_decode_layer.py, results/
# decode_layer_h200_20261202.md; D = 768, 128-row bags of a 1M-row bf16 table): 14.8 us at
# batch 1 and 16.1 at 32, against 48.4 / 52.2 for the training launch and 32.2 / 34.8 for
# the simplest kernel; one row per load at best 18.2 (8 stages), 2 warps 45+.
FWD_FEW_BLOCK_D = 128
FWD_FEW_WARPS = 1
FWD_FEW_STAGES = 3
FWD_FEW_ROWS = 16
# Score gradient alone (merged shared-table backward): rows per reduction, warps,
# programs per bag, columns per load. One row per reduction took 2.67 ms a layer at
# 134m-memory+ (32 x 1024 tokens, fp32 1M x 768 table, H200, 2026-12-01): a cross-warp
# sum for every one of 4M rows. One warp (its sums stay inside the warp: no shared memory,
# no barrier per chunk), two programs per bag and 256-column tiles: on the trainer's own
# lookups (replayed, results/embedding_bag_h200_20261202b.md) 0.65 ms against 1.30 for the
# former launch (8 rows, 4 warps, the whole row padded to 1024), and within +5% / -9% of
# it on uniform, narrow, L2-resident and Zipf lookups of the same shape, same run.
SCORE_GRAD_CHUNK, SCORE_GRAD_WARPS, SCORE_GRAD_SPLIT, SCORE_GRAD_BLOCK_D = 8, 1, 2, 256
FWD_SWEEP = [(1, 4, 1, 1), (1, 4, 3, 1), (1, 8, 3, 1), (2, 4, 3, 1), (2, 2, 3, 1), (4, 2, 3, 1)]
# The benchmark's sweep for few bags (D = 768: SPLIT 16 is 64-column tiles).
FWD_FEW_SWEEP = [
    (16, 1, 1, 1), (16, 1, 4, 1), (16, 1, 8, 1), (8, 1, 4, 1), (8, 1, 8, 1), (4, 1, 4, 1),
    (16, 1, 2, 8), (16, 1, 2, 16), (8, 1, 1, 8), (8, 1, 2, 8), (8, 1, 2, 16), (8, 1, 3, 16),
    (8, 2, 2, 16), (4, 1, 2, 16), (4, 2, 2, 16), (2, 2, 2, 16), (1, 4, 2, 16), (1, 4, 1, 8),
    # More rows in flight (deeper pipelines, 32 rows a load): added 2026-12-02.
    (8, 1, 4, 16), (8, 1, 6, 16), (8, 1, 8, 16), (8, 1, 2, 32), (8, 1, 3, 32), (8, 1, 4, 32),
    (8, 2, 3, 32),
]  # fmt: skip


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (8 elsewhere: the interpreter)."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sm_count(index)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    # Asked by every lookup and top-k launch: once per device, not a property query a call.
    return torch.cuda.get_device_properties(index).multi_processor_count


def fwd_config(bags: int, d: int, n_sm: int) -> tuple[int, int, int, int]:
    """The forward's launch ``(SPLIT, warps, stages, ROWS)`` for ``bags`` bags of rows of
    ``d`` on a device of ``n_sm`` SMs: :data:`FWD_CONFIG` when there are at least as many
    bags as SMs, else tiles halved (down to :data:`FWD_FEW_BLOCK_D` columns) until the
    programs fill the SMs, gathering :data:`FWD_FEW_ROWS` rows per load. Neither changes
    a bit of the output (:func:`_fwd_kernel`)."""
    if bags >= n_sm:
        return FWD_CONFIG
    width = triton.next_power_of_2(max(d, 1))
    split = 1
    while width // (2 * split) >= FWD_FEW_BLOCK_D and bags * triton.cdiv(d, width // split) < n_sm:
        split *= 2
    return split, FWD_FEW_WARPS, FWD_FEW_STAGES, FWD_FEW_ROWS


@triton.jit
def _simple_fwd_kernel(
    values_ptr,  # [N, D]
    indices_ptr,  # [B, K] int64
    weights_ptr,  # [B, K]
    out_ptr,  # [B, D]
    K,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two of D: the whole row per load
):
    """The simplest forward: one program per bag, a loop over its rows. The benchmark's
    baseline (issue 16): the shipped forward must not be slower on any card."""
    bag = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(K):
        idx = tl.load(indices_ptr + bag * K + k)
        w = tl.load(weights_ptr + bag * K + k).to(tl.float32)
        acc += tl.load(values_ptr + idx * D + cols, mask=dmask, other=0.0).to(tl.float32) * w
    tl.store(out_ptr + bag * D + cols, acc.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _score_grad_kernel(
    values_ptr,  # [N, D] float, or int8 with SCALED
    scales_ptr,  # [N] bf16 with SCALED: row r stands for values[r] · scales[r] (else unread)
    indices_ptr,  # [B, K] int64
    grad_out_ptr,  # [B, D]
    dw_ptr,  # [B, K] fp32 out: grad_out[b] · values[indices[b, k]] (· its scale)
    K,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,  # columns per load: a power of two, the row in cdiv(D, BLOCK_D)
    CHUNK: tl.constexpr,  # rows loaded (and reduced) together
    SPLIT: tl.constexpr,  # programs per bag, each taking every SPLIT-th chunk
    SCALED: tl.constexpr,  # int8 rows with a scale each (a read copy: memlayers.ops.read_copy)
):
    """The score gradient alone: the forward's access pattern (one program per bag, or
    SPLIT per bag, its rows streamed once), a dot product per row instead of a weighted
    sum; no sort. Rows go in chunks: one reduction across the program per CHUNK rows, not
    per row; a row wider than BLOCK_D is multiplied tile by tile into the same [CHUNK,
    BLOCK_D] products first (768 columns as 3 × 256: no lane idles on a padded 1024).
    ``SCALED``: the rows are int8 with one scale a row, which multiplies the row's dot
    product once (D + 2 bytes a row read, against 2·D for bf16)."""
    pid = tl.program_id(0).to(tl.int64)
    bag = pid // SPLIT
    part = pid % SPLIT
    for k0 in tl.range(part * CHUNK, K, SPLIT * CHUNK):
        ks = k0 + tl.arange(0, CHUNK)
        km = ks < K
        idx = tl.load(indices_ptr + bag * K + ks, mask=km, other=0)
        acc = tl.zeros([CHUNK, BLOCK_D], dtype=tl.float32)
        for d0 in tl.static_range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            dmask = cols < D
            g = tl.load(grad_out_ptr + bag * D + cols, mask=dmask, other=0.0).to(tl.float32)
            m = km[:, None] & dmask[None, :]
            rows = tl.load(values_ptr + idx[:, None] * D + cols[None, :], mask=m, other=0.0)
            acc += rows.to(tl.float32) * g[None, :]
        dots = tl.sum(acc, axis=1)  # [CHUNK]
        if SCALED:
            dots *= tl.load(scales_ptr + idx, mask=km, other=0.0).to(tl.float32)
        tl.store(dw_ptr + bag * K + ks, dots, mask=km)


@triton.jit
def _prep_kernel(
    srows_ptr,  # [E] table row of each lookup, ascending
    perm_ptr,  # [E] int64: flat (bag, slot) position of each sorted lookup
    weights_ptr,  # [B * K]
    bags_ptr,  # out [E] int64: the bag of each sorted lookup
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
    j = tl.load(perm_ptr + e, mask=m, other=0)
    first = r != r_prev
    tl.store(bags_ptr + e, j // K, mask=m)
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
def _chunk_bounds(ordinal_ptr, seg_ptr, c, E, CHUNK):
    """``(begin, end)``: the sorted lookups program c walks. Nominally ``[c·CHUNK,
    (c+1)·CHUNK)``; a row of at most CHUNK lookups is never cut: the program where it
    starts takes all of it (begin skips a short row begun earlier, end runs on to the end
    of a short row begun here). Longer rows are cut at the nominal bounds."""
    e_lo = c * CHUNK
    e_hi = tl.minimum(e_lo + CHUNK, E)
    u_lo = tl.load(ordinal_ptr + e_lo).to(tl.int64) - 1  # row of the first lookup
    s_lo = tl.load(seg_ptr + u_lo)
    t_lo = tl.load(seg_ptr + u_lo + 1)
    begin = tl.where((s_lo < e_lo) & (t_lo - s_lo <= CHUNK), t_lo, e_lo)
    u_hi = tl.load(ordinal_ptr + e_hi - 1).to(tl.int64) - 1  # row of the last lookup
    s_hi = tl.load(seg_ptr + u_hi)
    t_hi = tl.load(seg_ptr + u_hi + 1)
    end = tl.where(t_hi - s_hi <= CHUNK, t_hi, e_hi)
    return begin, tl.maximum(end, begin)


@triton.jit
def _bwd_kernel(
    grad_out_ptr,  # [B, D]
    values_ptr,  # [N, D]
    ws_ptr,  # [E] fp32: weights in sorted order
    bags_ptr,  # [E] int64: the bag of each sorted lookup
    srows_ptr,  # [E] sorted table rows
    ordinal_ptr,  # [E] int32: 1 + the ordinal of each lookup's row
    seg_ptr,  # [bound + 1] int64: distinct row u owns sorted lookups seg[u] : seg[u + 1]
    grad_values_ptr,  # [bound, D] (sparse) or [N, D] (dense)
    heads_ptr,  # [C, D] fp32: chunk c's piece of a long row that began before chunk c
    tails_ptr,  # [C, D] fp32: chunk c's piece of a long row that begins in c, ends later
    parts_ptr,  # [n_tiles, E] fp32: each column tile's part of each score gradient
    gscales_ptr,  # [B] bf16 with GSCALED: grad_out's rows are int8, times these
    E,
    CHUNK,  # lookups per program (C = cdiv(E, CHUNK) programs per tile)
    D: tl.constexpr,  # a constant: row offsets row * D then carry its alignment
    DENSE_OUT: tl.constexpr,  # write row u's gradient at its table row, not at u
    WRITE_DV: tl.constexpr,
    WRITE_DW: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr,
    GSCALED: tl.constexpr,  # grad_out packed as int8 rows with a scale a row (no WRITE_DW)
):
    """Program (c, t) walks the sorted lookups of chunk c (:func:`_chunk_bounds`) over
    column tile t, row by row: an outer loop over the rows that meet the chunk (their
    bounds, values and stores once per row), an inner loop over one row's lookups there
    (a grad_out tile loaded and added per lookup, software-pipelined STAGES deep, nothing
    else). A row whose lookups all lie in the chunk is written to grad_values; a piece of
    a longer row goes to heads or tails (fp32) for :func:`_combine_kernel`. Axis 0 varies
    fastest in launch order, so the grid runs (mostly) through tile 0 before tile 1, and
    only a [B, BLOCK_D] slice of grad_out is being read at a time: L2 keeps it far better
    than all of grad_out. GSCALED: grad_out's rows are int8 (``MemoryConfig.grad_read``),
    each standing for itself times its bag's scale: a lookup adds ``(w · s) · q``, half
    the bytes of a bf16 row."""
    c = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)  # tile * E passes 2**31 for large batches
    begin, end = _chunk_bounds(ordinal_ptr, seg_ptr, c, E, CHUNK)
    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    dmask = cols < D
    walked = end > begin
    u_first = tl.load(ordinal_ptr + begin, mask=walked, other=1).to(tl.int64) - 1
    u_last = tl.load(ordinal_ptr + end - 1, mask=walked, other=0).to(tl.int64) - 1
    for u in range(u_first, u_last + 1):
        s = tl.load(seg_ptr + u)
        t = tl.load(seg_ptr + u + 1)
        lo = tl.maximum(s, begin)
        hi = tl.minimum(t, end)
        row = tl.load(srows_ptr + lo).to(tl.int64)
        if WRITE_DW:
            # The row's values, read once per piece.
            v = tl.load(values_ptr + row * D + cols, mask=dmask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)  # the piece's value gradient
        for e in tl.range(lo, hi, num_stages=STAGES):
            bag = tl.load(bags_ptr + e)
            g = tl.load(grad_out_ptr + bag * D + cols, mask=dmask, other=0.0).to(tl.float32)
            if WRITE_DV:
                if GSCALED:
                    acc += (tl.load(ws_ptr + e) * tl.load(gscales_ptr + bag).to(tl.float32)) * g
                else:
                    acc += tl.load(ws_ptr + e) * g
            if WRITE_DW:
                tl.store(parts_ptr + tile * E + e, tl.sum(g * v))
        if WRITE_DV:
            whole = s >= begin  # the piece begins at the row's first lookup
            closed = t <= end  # ... and ends at its last
            if whole & closed:
                if DENSE_OUT:
                    out_row = row
                else:
                    out_row = u
                # One writer per row, once. Streamed out of L2 first.
                tl.store(grad_values_ptr + out_row * D + cols,
                         acc.to(grad_values_ptr.dtype.element_ty), mask=dmask,
                         eviction_policy="evict_first")  # fmt: skip
            elif whole:  # a long row's first piece, ending past the chunk
                tl.store(tails_ptr + c * D + cols, acc, mask=dmask)
            else:  # a long row's later piece (begun in an earlier chunk)
                tl.store(heads_ptr + c * D + cols, acc, mask=dmask)


@triton.jit
def _combine_kernel(
    srows_ptr,  # [E]
    ordinal_ptr,  # [E] int32
    seg_ptr,  # [bound + 1] int64
    heads_ptr,  # [C, D] fp32
    tails_ptr,  # [C, D] fp32
    grad_values_ptr,  # [bound, D] or [N, D]
    E,
    CHUNK,
    D: tl.constexpr,
    DENSE_OUT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (c, t): if a long row (more than CHUNK lookups) ends in chunk c, write its
    gradient ``tails[c0] + Σ_{c0 < j ≤ c} heads[j]`` (c0: the chunk where it begins), the
    heads added in a fixed order. Few rows are long; the other programs return at once."""
    c = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    e_lo = c * CHUNK
    u = tl.load(ordinal_ptr + e_lo).to(tl.int64) - 1  # the row open at the chunk's start
    s = tl.load(seg_ptr + u)
    t = tl.load(seg_ptr + u + 1)
    if (s < e_lo) & (t - s > CHUNK) & (t <= tl.minimum(e_lo + CHUNK, E)):
        c0 = s // CHUNK
        cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
        dmask = cols < D
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for j0 in range(c0 + 1, c + 1, BLOCK_R):
            js = j0 + tl.arange(0, BLOCK_R)  # [BLOCK_R]
            m = (js <= c)[:, None] & dmask[None, :]
            acc += tl.load(heads_ptr + js[:, None] * D + cols[None, :], mask=m, other=0.0)
        total = tl.load(tails_ptr + c0 * D + cols, mask=dmask, other=0.0) + tl.sum(acc, axis=0)
        if DENSE_OUT:
            out_row = tl.load(srows_ptr + e_lo).to(tl.int64)
        else:
            out_row = u
        tl.store(grad_values_ptr + out_row * D + cols,
                 total.to(grad_values_ptr.dtype.element_ty), mask=dmask)  # fmt: skip


@triton.jit
def _simple_bwd_kernel(
    grad_out_ptr,  # [B, D]
    values_ptr,  # [N, D]
    ws_ptr,  # [E] fp32, sorted order
    bags_ptr,  # [E] int64
    rows_ptr,  # [bound] int64
    seg_ptr,  # [bound + 1] int64
    grad_rows_ptr,  # [bound, D]
    dw_ptr,  # [E] fp32: score gradient of each sorted lookup
    n_distinct_ptr,  # [1] int32
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two of D: the whole row per load
):
    """The simplest reverse-index backward: one program per distinct row, a loop over the
    row's lookups. The benchmark's baseline (row-sparse value grad + score grads)."""
    u = tl.program_id(0).to(tl.int64)
    if u < tl.load(n_distinct_ptr):
        cols = tl.arange(0, BLOCK_D)
        dmask = cols < D
        row = tl.load(rows_ptr + u)
        v = tl.load(values_ptr + row * D + cols, mask=dmask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for e in range(tl.load(seg_ptr + u), tl.load(seg_ptr + u + 1)):
            bag = tl.load(bags_ptr + e)
            g = tl.load(grad_out_ptr + bag * D + cols, mask=dmask, other=0.0).to(tl.float32)
            acc += tl.load(ws_ptr + e) * g
            tl.store(dw_ptr + e, tl.sum(g * v))
        tl.store(grad_rows_ptr + u * D + cols, acc.to(grad_rows_ptr.dtype.element_ty),
                 mask=dmask)  # fmt: skip


def _fwd_launch(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    config: tuple[int, int, int, int] | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Forward on contiguous inputs: ``[B, D]`` in ``values.dtype``. ``config``: ``(SPLIT,
    warps, stages, ROWS)``, BLOCK_D = next_power_of_2(D) // SPLIT; None: :func:`fwd_config`
    for these bags on this device. ``check``: raise
    (asynchronously, on the device: nothing waits) when an index is outside ``[0, N)``;
    off (indices the caller made in range, or the benchmark's A/B of the check's cost),
    such an index is read."""
    b, k = indices.shape
    n, d = values.shape
    if b == 0 or k == 0 or d == 0:
        return values.new_zeros(b, d)
    out = values.new_empty(b, d)
    # The flag; unchecked, a placeholder the kernel never writes (no fill kernel either).
    bad = (torch.zeros if check else torch.empty)(1, dtype=torch.int32, device=values.device)
    if config is None:
        config = fwd_config(b, d, sm_count(values.device))
    split, warps, stages, rows = config
    block_d = max(triton.next_power_of_2(d) // split, 1)
    _fwd_kernel[(b * triton.cdiv(d, block_d),)](
        values, indices, weights, out, bad, n, k,
        D=d, BLOCK_D=block_d, STAGES=stages, CHECK=check, ROWS=rows, num_warps=warps,
    )  # fmt: skip
    if check:
        torch._assert_async(bad[0] == 0, "embedding_bag: an index is outside [0, N)")
    return out


def simple_forward(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor):
    """The benchmark's baseline forward (:func:`_simple_fwd_kernel`), contiguous inputs."""
    b, k = indices.shape
    d = values.shape[1]
    out = values.new_empty(b, d)
    if b and d:
        _simple_fwd_kernel[(b,)](values, indices, weights, out, k, D=d,
                                 BLOCK_D=triton.next_power_of_2(d))  # fmt: skip
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
    (bag, slot)), ``sorted_rows``, ``bags`` (the bag of each), ``ws``
    (fp32 weight), ``ordinal`` (int32, 1 + its row's ordinal). ``touched [N]`` int8 marks
    rows read (dense only, else empty)."""

    rows: torch.Tensor
    seg: torch.Tensor
    perm: torch.Tensor
    sorted_rows: torch.Tensor
    bags: torch.Tensor
    ws: torch.Tensor
    ordinal: torch.Tensor
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
    bags = torch.empty(e, dtype=torch.int64, device=dev)
    ws = torch.empty(e, dtype=torch.float32, device=dev)
    firsts = torch.empty(e, dtype=torch.int32, device=dev)
    grid = (triton.cdiv(e, _PREP_BLOCK),)
    if e:
        _prep_kernel[grid](sorted_rows, perm, weights, bags, ws, firsts, e, indices.shape[1],
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
    return Segments(
        rows, seg, perm, sorted_rows, bags, ws, ordinal, touched, n_distinct, host, ready
    )


def bwd_launch(d: int, block_d: int | None = None) -> tuple[int, int]:
    """The backward's ``(BLOCK_D, num_warps)`` for rows of ``d`` columns: ``block_d``, or
    by default the widest tile of at most BWD_BLOCK_D columns that divides ``d`` (no tile
    walked half masked: 768 columns go as 3 × 256, not 512 + 256 of which half is
    masked), capped at the next power of two of ``d``."""
    if block_d is None:
        block_d = BWD_BLOCK_D
        while block_d > 128 and d % block_d:
            block_d //= 2
        if d % block_d:  # no power-of-two tile of 128 or more divides d: as before
            block_d = BWD_BLOCK_D
    return min(block_d, triton.next_power_of_2(max(d, 1))), BWD_WARPS


def _bwd_launch(
    grad_out: torch.Tensor,
    values: torch.Tensor | None,
    segments: Segments,
    grad_values: torch.Tensor | None,
    dense_out: bool,
    write_dw: bool,
    block_d: int | None = None,
    num_warps: int | None = None,
    stages: int | None = None,
    chunk: int | None = None,
    grad_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the backward walk (and the pass over long rows): fills ``grad_values`` (row u's
    gradient at row u, or at its table row when ``dense_out``) and returns the score
    gradient of each flat (bag, slot) ``[E]`` fp32 (empty when not asked for). ``values``
    is read only for the score gradient. ``grad_scales [B]``: ``grad_out`` is int8 rows,
    each times its scale (the value gradient only). Launch parameters default to the
    BWD_* constants.
    """
    if grad_scales is not None and write_dw:
        raise ValueError("the walk reads an int8 grad_out for the value gradient only")
    d = grad_out.shape[1]
    bound, e = segments.rows.numel(), segments.perm.numel()
    block_d, default_warps = bwd_launch(d, block_d)
    chunk = chunk or BWD_CHUNK
    n_tiles, n_chunks = triton.cdiv(d, block_d), triton.cdiv(e, chunk)
    dev = grad_out.device
    dw = torch.empty(e if write_dw else 0, dtype=torch.float32, device=dev)
    if bound == 0 or d == 0 or (grad_values is None and not write_dw):
        return dw.zero_()
    parts = torch.empty(n_tiles if write_dw else 0, e, dtype=torch.float32, device=dev)
    # A long row's pieces: [C, D] fp32 each (34 MB apiece at the paper's shape, untouched
    # where no row is long).
    n_pieces = n_chunks if grad_values is not None else 0
    heads = torch.empty(n_pieces, d, dtype=torch.float32, device=dev)
    tails = torch.empty(n_pieces, d, dtype=torch.float32, device=dev)
    dummy = grad_out
    _bwd_kernel[(n_chunks, n_tiles)](
        grad_out, dummy if values is None else values, segments.ws, segments.bags,
        segments.sorted_rows, segments.ordinal, segments.seg,
        dummy if grad_values is None else grad_values, heads, tails, parts,
        dummy if grad_scales is None else grad_scales, e, chunk,
        D=d, DENSE_OUT=dense_out, WRITE_DV=grad_values is not None, WRITE_DW=write_dw,
        BLOCK_D=block_d, STAGES=stages or BWD_STAGES, num_warps=num_warps or default_warps,
        GSCALED=grad_scales is not None,
    )  # fmt: skip
    if grad_values is not None:
        cblock = min(_COMBINE_BLOCK_D, triton.next_power_of_2(d))
        _combine_kernel[(n_chunks, triton.cdiv(d, cblock))](
            segments.sorted_rows, segments.ordinal, segments.seg, heads, tails, grad_values,
            e, chunk, D=d, DENSE_OUT=dense_out, BLOCK_R=_COMBINE_BLOCK_R, BLOCK_D=cblock,
        )  # fmt: skip
    if write_dw:
        # Column tiles' parts summed in a fixed order, then back to (bag, slot) order.
        dw[segments.perm] = parts.sum(0) if n_tiles > 1 else parts[0]
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
    dw = _bwd_launch(grad_out, values, segments, gv, True, need_weights, **launch)
    return (gv if need_values else values.new_empty(0)), dw.view(
        indices.shape if need_weights else (0,)
    )


def _sparse_rows(segments: Segments, grad_rows: torch.Tensor):
    """``(rows [U], grad_rows [U, D])`` once U is on the host; buffers sized by the bound
    (min(B·K, N)) are trimmed, and copied when the bound is over 2U (skewed lookups)."""
    if segments.n_distinct_ready is not None:
        segments.n_distinct_ready.synchronize()
    u = int(segments.n_distinct_host)
    rows, grad_rows = segments.rows[:u], grad_rows[:u]
    if segments.rows.numel() > 2 * u:
        rows, grad_rows = rows.clone(), grad_rows.clone()
    return rows, grad_rows


def _bwd_sparse(grad_out, values, indices, weights, need_weights, **launch):
    """Row-sparse value gradient ``(rows [U], grad_rows [U, D])`` and score gradient."""
    segments = row_segments(indices, weights, values.shape[0], need_count=True)
    # Sized by the bound on U, min(B·K, N), so the walk is queued without waiting for U
    # (1.1× U at the paper's shape, at most 1.6× U for uniform lookups); U is read once
    # all the work is queued.
    grad_rows = values.new_empty(segments.rows.numel(), values.shape[1])
    dw = _bwd_launch(grad_out, values, segments, grad_rows, False, need_weights, **launch)
    rows, grad_rows = _sparse_rows(segments, grad_rows)
    return rows, grad_rows, dw.view(indices.shape if need_weights else (0,))


def simple_backward(grad_out, values, indices, weights):
    """The benchmark's baseline backward (:func:`_simple_bwd_kernel`): ``(rows [U],
    grad_rows [U, D], grad_weights [B, K] fp32)``, contiguous inputs."""
    segments = row_segments(indices, weights, values.shape[0], need_count=True)
    bound, d = segments.rows.numel(), values.shape[1]
    grad_rows = values.new_empty(bound, d)
    dw_sorted = torch.zeros(segments.perm.numel(), dtype=torch.float32, device=values.device)
    if bound and d:
        _simple_bwd_kernel[(bound,)](
            grad_out, values, segments.ws, segments.bags, segments.rows, segments.seg,
            grad_rows, dw_sorted, segments.n_distinct, D=d, BLOCK_D=triton.next_power_of_2(d),
        )  # fmt: skip
    dw = torch.empty_like(dw_sorted)
    dw[segments.perm] = dw_sorted
    rows, grad_rows = _sparse_rows(segments, grad_rows)
    return rows, grad_rows, dw.view(indices.shape)


def sum_rows(
    rows: torch.Tensor, grads: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coalesce a row gradient with repeats: ``(distinct rows [U] ascending, sums [U, D])``
    of ``rows [M]`` int64 and ``grads [M, D]`` (e.g. the sum of several lookups' sparse
    gradients, which autograd concatenates). It is the backward walk with one-row bags and
    unit weights: deterministic (repeats added in their order in ``rows``), fp32 sums, and
    no serial chain on a row that repeats many times."""
    m, d = grads.shape
    indices = rows.reshape(m, 1)
    ones = torch.ones(m, 1, dtype=torch.float32, device=grads.device)
    segments = row_segments(indices, ones, n_rows, need_count=True)
    out = grads.new_empty(segments.rows.numel(), d)
    _bwd_launch(grads.contiguous(), None, segments, out, False, False)
    return _sparse_rows(segments, out)


def score_grad(
    values: torch.Tensor,
    indices: torch.Tensor,
    grad_out: torch.Tensor,
    chunk: int = SCORE_GRAD_CHUNK,
    num_warps: int = SCORE_GRAD_WARPS,
    num_stages: int | None = None,
    split: int = SCORE_GRAD_SPLIT,
    block_d: int | None = SCORE_GRAD_BLOCK_D,
    scales: torch.Tensor | None = None,
):
    """``[B, K]`` fp32 score gradient ``grad_out[b] · values[indices[b, k]]`` (contiguous
    inputs, indices in range: the forward checked them). ``scales [N]`` (or ``[N, 1]``):
    ``values`` are int8 rows standing for ``values[r] · scales[r]`` (an int8 read copy,
    :mod:`memlayers.ops.read_copy`), and the dot products are of those. ``chunk``: rows
    per reduction
    (at most 64 loaded values per thread per tile, as many again in the products);
    ``split``: programs per bag (each takes every split-th chunk); ``block_d``: columns
    per load, a power of two (None: the whole row, padded to one); ``num_stages``: the
    loop's software pipelining (None: Triton's default).
    Every launch is the same sum up to fp32 rounding (the order within a row follows the
    launch); the benchmark's sweep tries them."""
    if block_d is not None and (block_d < 1 or block_d & (block_d - 1)):
        raise ValueError(f"score_grad: block_d must be a power of two, got block_d={block_d}")
    if scales is not None and scales.numel() != values.shape[0]:
        raise ValueError(
            f"score_grad: scales must be one a row of values ({values.shape[0]}), got "
            f"{tuple(scales.shape)}"
        )
    b, k = indices.shape
    d = values.shape[1]
    dw = torch.empty(b, k, dtype=torch.float32, device=values.device)
    if b and k:
        block_d = min(block_d or triton.next_power_of_2(d), triton.next_power_of_2(d))
        chunk = max(1, min(chunk, 64 * 32 * num_warps // block_d, triton.next_power_of_2(k)))
        split = max(1, min(split, triton.cdiv(k, chunk)))
        stages = {} if num_stages is None else {"num_stages": num_stages}
        _score_grad_kernel[(b * split,)](values, values if scales is None else scales, indices,
                                         grad_out, dw, k, D=d, BLOCK_D=block_d, CHUNK=chunk,
                                         SPLIT=split, SCALED=scales is not None,
                                         num_warps=num_warps, **stages)  # fmt: skip
    return dw


def row_sparse(rows: torch.Tensor, grad_rows: torch.Tensor, shape) -> torch.Tensor:
    """The walk's row-sparse gradient as a COO tensor of ``shape``: its rows come out of a
    sort and are distinct, so it is coalesced as built (no invariant check)."""
    return torch.sparse_coo_tensor(
        rows.unsqueeze(0), grad_rows, shape, is_coalesced=True, check_invariants=False
    )


def triton_grads(values, indices, weights, grad_out, need_values, need_weights, sparse_grad):
    """:func:`memlayers.ops.embedding_bag.embedding_bag_grads` on the Triton path."""
    args = (grad_out.contiguous(), values.contiguous(), indices.contiguous(),
            weights.contiguous())  # fmt: skip
    if need_values and sparse_grad:
        rows, grad_rows, dw = embedding_bag_bwd_sparse(*args, need_weights)
        return row_sparse(rows, grad_rows, values.shape), (dw if need_weights else None)
    if need_values:
        gv, dw = embedding_bag_bwd(*args, True, need_weights)
        return gv, (dw if need_weights else None)
    if need_weights:
        return None, score_grad(args[1], args[2], args[0]).to(weights.dtype)
    return None, None


# ---------------------------------------------------------------------------------------
# torch.library registration: opaque ops that torch.compile traces as single nodes.


@torch.library.custom_op("memlayers::embedding_bag_fwd", mutates_args=())
def embedding_bag_fwd(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    sparse_grad: bool,
    check: bool = True,
) -> torch.Tensor:
    """``[B, D]`` weighted sum; ``sparse_grad`` only selects the backward's value grad;
    ``check``: assert (on the device) that every index is inside the table."""
    return _fwd_launch(values.contiguous(), indices.contiguous(), weights.contiguous(), None, check)


@embedding_bag_fwd.register_fake
def _(values, indices, weights, sparse_grad, check=True):
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
    values, indices, weights, sparse_grad = inputs[:4]
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
        grad_values = row_sparse(rows, grad_rows, values.shape)
    elif need_values or need_weights:
        gv, dw = embedding_bag_bwd(grad_out, values, indices, weights, need_values, need_weights)
        grad_values = gv if need_values else None
    if need_weights:
        grad_weights = dw
    return grad_values, None, grad_weights, None, None


torch.library.register_autograd(
    "memlayers::embedding_bag_fwd", _backward, setup_context=_setup_context
)


def embedding_bag_triton(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    sparse_grad: bool = False,
    check_indices: bool = True,
) -> torch.Tensor:
    """The Triton path (inputs checked by :func:`memlayers.ops.embedding_bag`)."""
    return embedding_bag_fwd(values, indices, weights, sparse_grad, check_indices)
