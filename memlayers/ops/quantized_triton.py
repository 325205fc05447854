"""Triton forward of the lookup on quantized rows (format: :mod:`memlayers.ops.quantized`).

``out[b] = Σ_k weights[b, k] · q[idx_k] · s[idx_k]``, the packed bytes and the bf16 scales
read from memory and dequantized in registers: an int8 row moves ``D + 2`` bytes, a
4-bit one ``ceil(D/2) + 2·ceil(D/group)``, against ``2D`` (bf16) or ``4D`` (fp32) for the
float kernel. The structure is :func:`memlayers.ops.embedding_bag_triton._fwd_kernel`'s:
one program per (bag, column tile), the bag's rows walked one at a time in order (k = 0,
1, …) into an fp32 accumulator, so no launch parameter changes a bit of the output, and
an index outside ``[0, N)`` reads nothing and raises the flag that
``torch._assert_async`` turns into an error.

The 4-bit kernel works on bytes: a tile is ``BLOCK`` bytes of the row (``2·BLOCK``
columns), loaded as one contiguous vector, split into the low-nibble (even) and
high-nibble (odd) columns, each with its own accumulator, and stored with a stride of 2
at the end. A byte's two columns share a scale (groups are even), so one scale load
serves both.

Forward only: the reference is :func:`memlayers.ops.quantized.embedding_bag_quantized_torch`.
The op is registered with ``torch.library`` (``memlayers::embedding_bag_quantized``) so
``torch.compile`` traces through it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memlayers.ops.embedding_bag_triton import add_in_order, bag_entry, bag_rows, sm_count
from memlayers.ops.quantized import QuantizedRows
from memlayers.ops.triton_interpreter import patch_triton_interpreter

patch_triton_interpreter()

# (SPLIT column tiles per bag, warps, stages, ROWS gathered a load): the float forward's
# measured rule (embedding_bag_triton.FWD_CONFIG: the whole row per program, 4 warps, no
# pipelining, a row a step). Not yet swept for packed rows: bench_quantized.py --sweep does.
QFWD_CONFIG = (1, 4, 1, 1)
QFWD_SWEEP = [(1, 4, 1, 1), (1, 4, 3, 1), (1, 8, 3, 1), (2, 4, 3, 1), (2, 2, 3, 1)]
# Few bags (decoding: fewer bags than SMs): rows cut into tiles, 1 warp (qfwd_config), by
# format: QFWD_FEW[bits] = (tile bytes, warps, stages, ROWS gathered a load). Swept on an
# H200, L2 flushed before each lookup (benchmarks/bench_decode_layer.py; D = 768, 128-row
# bags, batch 1; results/decode_layer_h200_20261202.md, decode_layer_h200_20261202b.md):
# - int8: 256-byte tiles, 3 stages, 16 rows a load: 30.2 us from HBM (a row a step in
#   64-byte tiles, the former rule: 31.2) and 39.9 us from a zero-copy host table (87.1:
#   a row a step pays a round trip of the host link per row);
# - int4: 32-byte tiles, a row a step, no pipelining: 31.9 us from HBM, 93 from the host.
#   Gathering 16 int4 rows a load was never faster from HBM (71-669 us: the unpacking of
#   a gathered tile), and only 10% faster from the host (84.6 us); 2 or 4 stages were 2x
#   slower. The tile is fixed: int4 in 64-byte tiles took 73 us at batch 32.
QFWD_FEW = {8: (256, 1, 3, 16), 4: (32, 1, 1, 1)}
QFWD_FEW_SWEEP = [
    (16, 1, 1, 1), (16, 1, 2, 1), (16, 1, 4, 1), (8, 1, 1, 1), (8, 1, 2, 1), (8, 1, 4, 1),
    (4, 1, 1, 1), (4, 2, 1, 1), (4, 2, 4, 1), (2, 2, 1, 1), (1, 4, 2, 1),  # ROWS 1: as timed
    (16, 1, 3, 16), (16, 1, 2, 16), (16, 1, 3, 8), (8, 1, 3, 16), (8, 1, 2, 16),
    (8, 2, 3, 16), (4, 1, 3, 16), (4, 2, 2, 16),
]  # fmt: skip


def qfwd_config(bags: int, d: int, bits: int, n_sm: int) -> tuple[int, int, int, int]:
    """The launch ``(SPLIT, warps, stages, ROWS)`` for ``bags`` bags of ``bits``-bit rows
    of ``d`` columns on ``n_sm`` SMs: :data:`QFWD_CONFIG` for at least a bag per SM, else
    the few-bags launch. No launch changes a bit of the output."""
    if bags >= n_sm:
        return QFWD_CONFIG
    block, warps, stages, rows = QFWD_FEW[bits]
    units = d if bits == 8 else (d + 1) // 2  # bytes of a packed row
    split = max(1, triton.next_power_of_2(units) // block)
    return split, warps, stages, rows


@triton.jit
def gather_packed(data_ptr, scales_ptr, indices_ptr, weights_ptr, bag, K, k0, N, r, offs,
                  omask, gcol, ROW_LEN: tl.constexpr, OTHER: tl.constexpr, G: tl.constexpr,
                  CHECK: tl.constexpr):  # fmt: skip
    """Entries ``k0 + r`` of bag ``bag`` (:func:`bag_rows`) gathered by one load: ``(the
    rows' elements [ROWS, BLOCK] at ``offs`` (``OTHER`` where masked), their fp32 scales
    ([ROWS, 1] with one a row, else [ROWS, BLOCK] at the scale column ``gcol``), fp32
    weights [ROWS], how many indices are outside [0, N))``."""
    idx, ws, ok, bad = bag_rows(indices_ptr, weights_ptr, bag, K, k0, N, r, CHECK)
    mask = ok[:, None] & omask[None, :]
    q = tl.load(data_ptr + idx[:, None] * ROW_LEN + offs[None, :], mask=mask, other=OTHER)
    if G == 1:
        s = tl.load(scales_ptr + idx, mask=ok, other=0.0).to(tl.float32)[:, None]
    else:
        s = tl.load(scales_ptr + idx[:, None] * G + gcol[None, :], mask=mask, other=0.0)
        s = s.to(tl.float32)
    return q, s, ws, bad


@triton.jit
def _int8_fwd_kernel(
    data_ptr,  # [N, D] int8
    scales_ptr,  # [N, G] bf16
    indices_ptr,  # [B, K] int64
    weights_ptr,  # [B, K]
    out_ptr,  # [B, D]
    bad_ptr,  # [1] int32: set to 1 when some index is outside [0, N)
    N,
    K,
    D: tl.constexpr,  # a constant: row offsets idx * D carry its alignment
    G: tl.constexpr,  # scales per row: cdiv(D, GROUP)
    GROUP: tl.constexpr,  # columns per scale
    BLOCK_D: tl.constexpr,  # columns per program: next_power_of_2(D) // SPLIT
    STAGES: tl.constexpr,
    CHECK: tl.constexpr,
    ROWS: tl.constexpr,  # rows gathered per load (1: one row per step)
):
    """Program (bag, tile): ``acc += w_k · q[idx_k, tile] · s[idx_k, tile // GROUP]``.
    ``ROWS > 1``: ROWS rows (bytes and scales) gathered by one load, then added one at a
    time in the same order, as :func:`memlayers.ops.embedding_bag_triton._fwd_kernel`
    does (each picked out of the tile by a sum with zeros: the same fp32 numbers)."""
    n_dtiles = tl.cdiv(D, BLOCK_D)
    pid = tl.program_id(0).to(tl.int64)
    bag = pid // n_dtiles
    cols = (pid % n_dtiles) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    dmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_bad = tl.full([], 0, tl.int32)
    if ROWS == 1:
        for k in tl.range(0, K, num_stages=STAGES):
            # (row 0 for an index outside the table: the scalar scale load is unmasked)
            idx, w, rmask, bad = bag_entry(indices_ptr, weights_ptr, bag, K, k, N, dmask, CHECK)
            n_bad += bad
            q = tl.load(data_ptr + idx * D + cols, mask=rmask, other=0).to(tl.float32)
            if G == 1:  # one scale per row: a scalar load
                s = tl.load(scales_ptr + idx).to(tl.float32)
            else:
                s = tl.load(scales_ptr + idx * G + cols // GROUP, mask=rmask, other=0.0)
                s = s.to(tl.float32)
            acc += (q * s) * w  # q · s is exact in fp32: 7 + 8 significant bits
    else:
        r = tl.arange(0, ROWS)
        for k0 in tl.range(0, K, ROWS, num_stages=STAGES):
            q, s, ws, bad = gather_packed(data_ptr, scales_ptr, indices_ptr, weights_ptr, bag,
                                          K, k0, N, r, cols, dmask, cols // GROUP, D, 0, G,
                                          CHECK)  # fmt: skip
            n_bad += bad
            qs = q.to(tl.float32) * s  # [ROWS, BLOCK_D], exact
            for j in tl.static_range(ROWS):
                acc = add_in_order(acc, qs, ws, r, j, k0 + j < K)
    tl.store(out_ptr + bag * D + cols, acc.to(out_ptr.dtype.element_ty), mask=dmask)
    tl.store(bad_ptr, 1, mask=n_bad > 0)


@triton.jit
def _int4_fwd_kernel(
    data_ptr,  # [N, P] uint8, P = cdiv(D, 2): column 2j low nibble, 2j+1 high, as q + 8
    scales_ptr,  # [N, G] bf16
    indices_ptr,  # [B, K] int64
    weights_ptr,  # [B, K]
    out_ptr,  # [B, D]
    bad_ptr,  # [1] int32
    N,
    K,
    D: tl.constexpr,
    P: tl.constexpr,  # bytes per row
    G: tl.constexpr,
    GROUP: tl.constexpr,  # columns per scale, even
    BLOCK: tl.constexpr,  # bytes per program: next_power_of_2(P) // SPLIT
    STAGES: tl.constexpr,
    CHECK: tl.constexpr,
    ROWS: tl.constexpr,  # rows gathered per load (1: one row per step)
):
    """Program (bag, byte tile): the even and odd columns of ``BLOCK`` bytes, one
    accumulator each; ``acc += w_k · (nibble − 8) · s`` for k = 0 … K-1, in order
    (``ROWS > 1``: gathered ROWS rows a load, added in order, as in the int8 kernel)."""
    n_tiles = tl.cdiv(P, BLOCK)
    pid = tl.program_id(0).to(tl.int64)
    bag = pid // n_tiles
    j = (pid % n_tiles) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] byte of the row
    bmask = j < P
    gidx = j // (GROUP // 2)  # [BLOCK] the scale of both columns of byte j
    acc_lo = tl.zeros([BLOCK], dtype=tl.float32)  # columns 2j
    acc_hi = tl.zeros([BLOCK], dtype=tl.float32)  # columns 2j + 1
    n_bad = tl.full([], 0, tl.int32)
    if ROWS == 1:
        for k in tl.range(0, K, num_stages=STAGES):
            idx, w, rmask, bad = bag_entry(indices_ptr, weights_ptr, bag, K, k, N, bmask, CHECK)
            n_bad += bad
            byte = tl.load(data_ptr + idx * P + j, mask=rmask, other=136).to(tl.int32)  # 0x88
            if G == 1:
                s = tl.load(scales_ptr + idx).to(tl.float32)
            else:
                s = tl.load(scales_ptr + idx * G + gidx, mask=rmask, other=0.0).to(tl.float32)
            acc_lo += (((byte & 15) - 8).to(tl.float32) * s) * w  # q · s exact, as for int8
            acc_hi += (((byte >> 4) - 8).to(tl.float32) * s) * w
    else:
        r = tl.arange(0, ROWS)
        for k0 in tl.range(0, K, ROWS, num_stages=STAGES):
            byte, s, ws, bad = gather_packed(data_ptr, scales_ptr, indices_ptr, weights_ptr,
                                             bag, K, k0, N, r, j, bmask, gidx, P, 136, G,
                                             CHECK)  # fmt: skip
            n_bad += bad
            byte = byte.to(tl.int32)  # [ROWS, BLOCK]
            lo = ((byte & 15) - 8).to(tl.float32) * s  # exact
            hi = ((byte >> 4) - 8).to(tl.float32) * s
            for i in tl.static_range(ROWS):
                acc_lo = add_in_order(acc_lo, lo, ws, r, i, k0 + i < K)
                acc_hi = add_in_order(acc_hi, hi, ws, r, i, k0 + i < K)
    out = out_ptr + bag * D + 2 * j
    tl.store(out, acc_lo.to(out_ptr.dtype.element_ty), mask=2 * j < D)
    tl.store(out + 1, acc_hi.to(out_ptr.dtype.element_ty), mask=2 * j + 1 < D)
    tl.store(bad_ptr, 1, mask=n_bad > 0)


def _qfwd_launch(
    table: QuantizedRows,
    indices: torch.Tensor,
    weights: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    config: tuple[int, int, int, int] | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Forward on contiguous inputs: ``[B, D]`` in ``out_dtype``. ``config``: ``(SPLIT,
    warps, stages, ROWS)``, None: :func:`qfwd_config` for these bags on this device; ``check``:
    raise (asynchronously) on an index outside ``[0, N)``."""
    data, scales, bits, group, d = table
    b, k = indices.shape
    n, p = data.shape
    if b == 0 or k == 0:
        return torch.zeros(b, d, dtype=out_dtype, device=indices.device)
    out = torch.empty(b, d, dtype=out_dtype, device=indices.device)
    bad = (torch.zeros if check else torch.empty)(1, dtype=torch.int32, device=indices.device)
    if config is None:
        config = qfwd_config(b, d, bits, sm_count(indices.device))
    split, warps, stages, rows = config
    g = scales.shape[1]
    if bits == 8:
        block = max(triton.next_power_of_2(d) // split, 1)
        _int8_fwd_kernel[(b * triton.cdiv(d, block),)](
            data, scales, indices, weights, out, bad, n, k,
            D=d, G=g, GROUP=group, BLOCK_D=block, STAGES=stages, CHECK=check, ROWS=rows,
            num_warps=warps,
        )  # fmt: skip
    else:
        block = max(triton.next_power_of_2(p) // split, 1)
        _int4_fwd_kernel[(b * triton.cdiv(p, block),)](
            data, scales, indices, weights, out, bad, n, k,
            D=d, P=p, G=g, GROUP=group, BLOCK=block, STAGES=stages, CHECK=check, ROWS=rows,
            num_warps=warps,
        )  # fmt: skip
    if check:
        torch._assert_async(bad[0] == 0, "embedding_bag_quantized: an index is outside [0, N)")
    return out


@torch.library.custom_op("memlayers::embedding_bag_quantized", mutates_args=())
def embedding_bag_quantized_op(
    data: torch.Tensor,
    scales: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    bits: int,
    group: int,
    dim: int,
    out_dtype: torch.dtype,
    check: bool = True,
) -> torch.Tensor:
    """``[B, dim]`` weighted sum of dequantized rows (no autograd: forward only)."""
    table = QuantizedRows(data.contiguous(), scales.contiguous(), bits, group, dim)
    return _qfwd_launch(table, indices.contiguous(), weights.contiguous(), out_dtype, None, check)


@embedding_bag_quantized_op.register_fake
def _(data, scales, indices, weights, bits, group, dim, out_dtype, check=True):
    return indices.new_empty(indices.shape[0], dim, dtype=out_dtype)


def embedding_bag_quantized_triton(
    table: QuantizedRows,
    indices: torch.Tensor,
    weights: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    check_indices: bool = True,
) -> torch.Tensor:
    """The Triton path (inputs checked by
    :func:`memlayers.ops.quantized.embedding_bag_quantized`)."""
    data, scales, bits, group, dim = table
    return embedding_bag_quantized_op(
        data, scales, indices, weights, bits, group, dim, out_dtype, check_indices
    )


# ---------------------------------------------------------------------------------------
# Packing rows (the int8 read copy's refresh after an optimizer step: read_copy.py).

# 1.5 · 2**23: adding it and taking it away again rounds an fp32 number of magnitude under
# 2**22 to an integer, ties to even (the product of the float adds, not a library call:
# the interpreter has no rint), as torch.round does. A constexpr: a kernel compiled for a
# GPU may read no other global (the interpreter would not notice:
# tests/test_triton_compile.py compiles the kernel for a GPU target on the CPU).
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def bf16_nearest(x):
    """fp32 ``x`` rounded to the nearest bf16 number, ties to even, kept in fp32: done on
    the bits, because the interpreter's conversion to bf16 truncates where the GPU's (and
    torch's) rounds; both then store this exactly. Finite ``x`` only."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & tl.full([], 0xFFFF0000, tl.uint32)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _int8_pack_kernel(
    weight_ptr,  # [N, D] float: the table
    rows_ptr,  # [U] int64: the rows to pack (unread with ALL)
    data_ptr,  # [N, D] int8, written at the rows
    scales_ptr,  # [N] bf16, written at the rows
    U,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,  # columns a tile: the row is walked in tiles, twice
    ALL: tl.constexpr,  # pack rows 0 … U-1 (no row list)
):
    """Program u packs row ``rows[u]`` as :func:`memlayers.ops.quantized.quantize_rows`
    does at 8 bits with one scale a row, bit for bit: ``s = bf16(absmax / 127)``, ``q =
    clamp(round(w / s), ±127)`` (0 where ``s`` is 0), divisions correctly rounded. Two
    passes over the row's tiles (the absmax, then the packing; the second reads from
    cache): on an H100 0.79 ms for 925k rows of 768 against 1.29 for the whole row padded
    to 1,024 in one tile (benchmarks/NOTES.md, session 37)."""
    u = tl.program_id(0).to(tl.int64)
    if ALL:
        row = u
    else:
        row = tl.load(rows_ptr + u)
    top = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c in tl.static_range(0, D, BLOCK_D):
        cols = c + tl.arange(0, BLOCK_D)
        w = tl.load(weight_ptr + row * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        top = tl.maximum(top, tl.abs(w))
    s = bf16_nearest(tl.math.div_rn(tl.max(top, axis=0), 127.0))
    for c in tl.static_range(0, D, BLOCK_D):
        cols = c + tl.arange(0, BLOCK_D)
        w = tl.load(weight_ptr + row * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        q = tl.where(s > 0, tl.math.div_rn(w, tl.where(s > 0, s, 1.0)), 0.0)
        q = (q + _ROUND_MAGIC) - _ROUND_MAGIC
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(data_ptr + row * D + cols, q.to(tl.int8), mask=cols < D)
    tl.store(scales_ptr + row, s.to(scales_ptr.dtype.element_ty))


# The packing's tile and warps (an H100 sweep at 925k rows of 768, session 37: 256
# columns and 2 warps 0.79 ms, 1 warp 0.82, 4 warps 1.00; 128 columns 0.85).
PACK_BLOCK_D = 256
PACK_WARPS = 2


def pack_int8_rows_(
    table: QuantizedRows, weight: torch.Tensor, rows: torch.Tensor | None = None
) -> None:
    """Pack ``weight``'s ``rows`` (all when None; int64, in range) into ``table`` (int8,
    one scale a row, on ``weight``'s device) in place: the Triton path of
    :func:`memlayers.ops.quantized.requantize_rows_torch`, bit for bit."""
    n, d = weight.shape
    u = n if rows is None else rows.numel()
    if u == 0 or d == 0:
        return
    block = min(PACK_BLOCK_D, triton.next_power_of_2(d))
    weight = weight.contiguous()
    _int8_pack_kernel[(u,)](
        weight, weight if rows is None else rows.contiguous(), table.data, table.scales, u,
        D=d, BLOCK_D=block, ALL=rows is None, num_warps=PACK_WARPS if block >= 256 else 1,
    )  # fmt: skip
