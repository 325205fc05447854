"""Quantized value tables: packed rows, their PyTorch reference and the lookup dispatcher.

A trained table ``[N, D]`` is quantized once, after training, for serving
(docs/method.md §5 "Quantized tables"); lookups read the packed rows and dequantize them
on the fly, forward only. The format:

- **int8** (``bits=8``): ``data [N, D]`` int8, ``q ∈ [-127, 127]``; by default one scale
  per row (``group = D``).
- **4-bit** (``bits=4``): ``data [N, ceil(D/2)]`` uint8, two columns a byte: column
  ``2j`` in the low nibble of byte ``j``, ``2j+1`` in the high one, each stored as
  ``q + 8`` with ``q ∈ [-7, 7]`` (an odd ``D`` pads the last high nibble with 8, a zero);
  by default one scale per 32 columns (``group = 32``, even: a byte's two columns share a
  scale).
- **scales** ``[N, G]`` bf16, ``G = ceil(D / group)``: scale ``g`` covers columns
  ``[g·group, (g+1)·group)`` of its row; a ``D`` that is not a multiple of ``group``
  leaves the last group short, and ``group >= D`` is one scale per row.

Symmetric, absmax: ``s = bf16(absmax / qmax)`` over the group (``qmax`` 127 or 7), ``q =
clamp(round(w / s), ±qmax)``, ``ŵ = q · s``. Values are rounded against the *stored*
scale, so its 8-bit mantissa does not enter the error: ``|w − ŵ| ≤ s / 2`` for every
element (bf16 rounds the scale by at most 2⁻⁸ of itself, so ``|w| / s ≤ qmax / (1 −
2⁻⁸)``, under ``qmax + ½``: the clamp changes nothing), with ``s ≤ absmax·(1 + 2⁻⁸) /
qmax``. (Scales below bf16's normal range, groups whose absmax is under ~1e-36, round
more coarsely; their error is still under the group's absmax.) A lookup's column ``c``
then moves by at most ``Σ_k |weights[b, k]| · s[idx_k, c // group] / 2``. bf16 scales
keep fp32's range (no table overflows them) at 2 bytes; ``q · s`` is exact in fp32 (7 + 8
significant bits), so dequantized rows are exact fp32 numbers. A zero group (or one whose
absmax underflows bf16) gets ``s = 0`` and stores zeros.

Bytes per row: ``D`` (int8) or ``ceil(D/2)`` (4-bit) plus ``2·ceil(D/group)``: int8 with
a scale per row ``D + 2``, 4-bit with group 32 at D = 1024 576, against 2048 for bf16 and
4096 for fp32.

The reference (:func:`embedding_bag_quantized_torch`) gathers the packed rows,
dequantizes them and sums in fp32; the Triton path
(:mod:`memlayers.ops.quantized_triton`) dequantizes in registers, tested against it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from memlayers.ops.embedding_bag import check_bags, resolve_impl

BITS = (8, 4)
QMAX = {8: 127, 4: 7}
DEFAULT_GROUP_4BIT = 32
SCALE_DTYPE = torch.bfloat16
# Rows quantized (or gathered by the reference) per step: ~16M elements, so a 1M × 1024
# table never needs a full-size fp32 copy.
_CHUNK_ELEMENTS = 1 << 24


class QuantizedRows(NamedTuple):
    """A quantized ``[N, dim]`` table (format in the module docstring)."""

    data: torch.Tensor  # [N, dim] int8 (bits 8) | [N, ceil(dim/2)] uint8 (bits 4)
    scales: torch.Tensor  # [N, ceil(dim/group)] bf16
    bits: int
    group: int  # columns per scale
    dim: int  # D, the float table's width

    @property
    def n_rows(self) -> int:
        return self.data.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed data and the scales."""
        return self.data.nbytes + self.scales.nbytes


def packed_width(dim: int, bits: int) -> int:
    """Bytes per row of ``data``."""
    return dim if bits == 8 else (dim + 1) // 2


def resolve_group(bits: int, group: int | None, dim: int) -> int:
    """``group`` checked (``None``: a row for int8, 32 columns for 4-bit); raises
    ``ValueError`` naming the value."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got bits={bits!r}")
    if group is None:
        group = dim if bits == 8 else DEFAULT_GROUP_4BIT
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be a positive int (columns per scale), got group={group!r}")
    if bits == 4 and group % 2:
        raise ValueError(
            f"4-bit groups must be even (a byte's two columns share a scale), got group={group}"
        )
    return group


def quantized_nbytes(n_rows: int, dim: int, bits: int, group: int | None = None) -> int:
    """Bytes of a quantized ``[n_rows, dim]`` table, without building it."""
    group = resolve_group(bits, group, dim)
    n_groups = -(-dim // group)
    return n_rows * (packed_width(dim, bits) + n_groups * SCALE_DTYPE.itemsize)


def empty_quantized(
    n_rows: int, dim: int, bits: int, group: int | None = None, device=None
) -> QuantizedRows:
    """Uninitialised buffers of a quantized table (a meta-device build, a checkpoint load)."""
    group = resolve_group(bits, group, dim)
    dtype = torch.int8 if bits == 8 else torch.uint8
    data = torch.empty(n_rows, packed_width(dim, bits), dtype=dtype, device=device)
    scales = torch.empty(n_rows, -(-dim // group), dtype=SCALE_DTYPE, device=device)
    return QuantizedRows(data, scales, bits, group, dim)


def _quantize_chunk(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(data, scales)`` of rows ``w [n, D]`` (see the module docstring)."""
    n, d = w.shape
    n_groups = -(-d // group)
    qmax = QMAX[bits]
    wg = F.pad(w.float(), (0, n_groups * group - d)).view(n, n_groups, group)  # [n, G, group]
    absmax = wg.abs().amax(-1)  # [n, G]
    scales = (absmax / qmax).to(SCALE_DTYPE)  # [n, G]
    s = scales.float().unsqueeze(-1)  # [n, G, 1]
    q = torch.where(s > 0, wg / s, 0.0).round_().clamp_(-qmax, qmax)  # [n, G, group]
    q = q.view(n, n_groups * group)[:, :d]  # [n, D]
    if bits == 8:
        return q.to(torch.int8), scales
    u = (q + 8).to(torch.uint8)  # [n, D] in [1, 15]
    if d % 2:
        u = F.pad(u, (0, 1), value=8)  # the last byte's high nibble: a zero
    return u[:, 0::2] | (u[:, 1::2] << 4), scales  # [n, ceil(D/2)]


@torch.no_grad()
def quantize_rows(
    weight: torch.Tensor, bits: int, group: int | None = None, progress: bool = False
) -> QuantizedRows:
    """Quantize a float table ``weight [N, D]`` row by row (module docstring), in chunks of
    rows so the temporaries stay ~64 MB on any table. ``group``: columns per scale (None:
    a row for int8, 32 for 4-bit). ``progress``: a bar for tables that take a while."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, D], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got dtype {weight.dtype}")
    n, d = weight.shape
    if d == 0:
        raise ValueError(f"weight must have at least one column, got shape {tuple(weight.shape)}")
    group = resolve_group(bits, group, d)
    out = empty_quantized(n, d, bits, group, weight.device)
    step = max(1, _CHUNK_ELEMENTS // d)
    starts = range(0, n, step)
    # delay: no bar on tables that take under two seconds.
    for s in tqdm(starts, desc=f"quantize int{bits}", disable=not progress, delay=2.0):
        rows = weight[s : s + step]
        if not torch.isfinite(rows).all():
            bad = (~torch.isfinite(rows)).any(1).nonzero()[0, 0].item() + s
            raise ValueError(f"weight has a non-finite value in row {bad}: cannot quantize it")
        out.data[s : s + step], out.scales[s : s + step] = _quantize_chunk(rows, bits, group)
    return out


def check_quantized(table: QuantizedRows) -> None:
    """Raise ``ValueError`` naming the offending value when ``table`` breaks the format."""
    if not isinstance(table, QuantizedRows):
        raise ValueError(f"table must be a QuantizedRows, got {type(table).__name__}")
    data, scales, bits, group, dim = table
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got dim={dim!r}")
    resolve_group(bits, group, dim)
    want = torch.int8 if bits == 8 else torch.uint8
    if data.dtype != want:
        raise ValueError(f"{bits}-bit data must be {want}, got dtype {data.dtype}")
    n_groups = -(-dim // group)
    if data.dim() != 2 or data.shape[1] != packed_width(dim, bits):
        raise ValueError(
            f"{bits}-bit data of a width-{dim} table must be [N, {packed_width(dim, bits)}], "
            f"got shape {tuple(data.shape)}"
        )
    if scales.shape != (data.shape[0], n_groups) or scales.dtype != SCALE_DTYPE:
        raise ValueError(
            f"scales must be [N={data.shape[0]}, ceil(dim/group)={n_groups}] {SCALE_DTYPE}, "
            f"got {tuple(scales.shape)} {scales.dtype}"
        )
    if scales.device != data.device:
        raise ValueError(
            f"data and scales must be on one device, got {data.device} and {scales.device}"
        )


def _dequantize(data, scales, bits: int, group: int, dim: int) -> torch.Tensor:
    """fp32 rows ``[..., dim]`` from packed ``data [..., P]`` and ``scales [..., G]``."""
    if bits == 8:
        q = data.float()  # [..., D]
    else:
        lo = (data & 15).float() - 8  # [..., P] columns 0, 2, 4, ...
        hi = (data >> 4).float() - 8  # [..., P] columns 1, 3, 5, ...
        q = torch.stack((lo, hi), -1).flatten(-2)[..., :dim]  # [..., D]
    s = scales.float().repeat_interleave(group, -1)[..., :dim]  # [..., D]
    return q * s


def dequantize_rows(table: QuantizedRows, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 table ``[N, D]`` a quantized one stands for (or its ``rows`` only)."""
    check_quantized(table)
    data, scales = table.data, table.scales
    if rows is not None:
        data, scales = data[rows], scales[rows]
    return _dequantize(data, scales, table.bits, table.group, table.dim)


def check_lookup_inputs(table: QuantizedRows, indices: torch.Tensor, weights: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the offending value before any kernel runs."""
    check_quantized(table)
    check_bags(indices, weights)
    if not (table.data.device == indices.device == weights.device):
        raise ValueError(
            f"table, indices and weights must be on one device, got {table.data.device}, "
            f"{indices.device} and {weights.device}"
        )
    if torch.is_grad_enabled() and weights.requires_grad:
        raise ValueError(
            "a quantized table's lookup is forward only (serving): the weights require a "
            "gradient. Run it under torch.no_grad(), or train the float table and quantize "
            "it afterwards (memlayers quantize)"
        )


def embedding_bag_quantized_torch(
    table: QuantizedRows,
    indices: torch.Tensor,
    weights: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The reference (no input checks; call :func:`embedding_bag_quantized`): gather the
    packed rows, dequantize, weighted sum in fp32, bags in chunks of ~16M elements."""
    b, k = indices.shape
    out = torch.empty(b, table.dim, dtype=torch.float32, device=indices.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, k * table.dim))
    for s in range(0, b, step):
        idx = indices[s : s + step]  # [b', K]
        rows = _dequantize(table.data[idx], table.scales[idx], *table[2:])  # [b', K, D]
        w = weights[s : s + step].float().unsqueeze(1)  # [b', 1, K]
        out[s : s + step] = torch.bmm(w, rows).squeeze(1)  # [b', D]
    return out.to(out_dtype)


def score_grad_quantized_torch(
    table: QuantizedRows, indices: torch.Tensor, grad_out: torch.Tensor
) -> torch.Tensor:
    """``[B, K]`` fp32 ``grad_out[b] · dequantize(table)[indices[b, k]]``: the score
    gradient of a lookup that read the packed rows (a training read copy,
    :mod:`memlayers.ops.read_copy`), the reference. No input checks; bags in chunks of
    ~16M elements, as the lookup's reference."""
    b, k = indices.shape
    out = torch.empty(b, k, dtype=torch.float32, device=indices.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, k * table.dim))
    for s in range(0, b, step):
        idx = indices[s : s + step]  # [b', K]
        rows = _dequantize(table.data[idx], table.scales[idx], *table[2:])  # [b', K, D]
        g = grad_out[s : s + step].float().unsqueeze(-1)  # [b', D, 1]
        out[s : s + step] = torch.bmm(rows, g).squeeze(-1)  # [b', K]
    return out


@torch.no_grad()
def requantize_rows_torch(
    table: QuantizedRows, weight: torch.Tensor, rows: torch.Tensor | None = None
) -> None:
    """Write ``table``'s packed ``rows`` (all when None) from ``weight [N, D]`` in place,
    as :func:`quantize_rows` packs them: the reference of the read copy's refresh after an
    optimizer step. Chunks of ~16M elements."""
    n, d = weight.shape
    count = n if rows is None else rows.numel()
    step = max(1, _CHUNK_ELEMENTS // max(1, d))
    for s in range(0, count, step):
        if rows is None:
            data, scales = _quantize_chunk(weight[s : s + step], table.bits, table.group)
            table.data[s : s + step], table.scales[s : s + step] = data, scales
        else:
            r = rows[s : s + step]
            data, scales = _quantize_chunk(weight[r], table.bits, table.group)
            table.data[r], table.scales[r] = data, scales


def embedding_bag_quantized(
    table: QuantizedRows,
    indices: torch.Tensor,
    weights: torch.Tensor,
    impl: str = "auto",
    out_dtype: torch.dtype = torch.float32,
    check_indices: bool = True,
) -> torch.Tensor:
    """``out[b] = Σ_k weights[b, k] · dequantize(table)[indices[b, k]]``, forward only.

    Args:
        table: a :class:`QuantizedRows` (from :func:`quantize_rows`).
        indices: ``[B, K]`` int64 row indices.
        weights: ``[B, K]`` weight of each row in its bag; must not require a gradient
            (``ValueError``: a packed table has none to give).
        impl: ``"auto"`` | ``"torch"`` | ``"triton"``
            (:func:`memlayers.ops.embedding_bag.resolve_impl`).
        out_dtype: of the result; sums are fp32 either way.
        check_indices: an index outside ``[0, N)`` fails: on the Triton path through a
            device-side assert (no host wait), on the PyTorch path with a ``ValueError``
            naming it (one host sync; plain indexing would wrap a negative index to a row
            from the end). False: the caller made the indices and they are in range (the
            memory layer's search), both checks skipped.

    Returns:
        ``[B, D]`` in ``out_dtype``.
    """
    check_lookup_inputs(table, indices, weights)
    if resolve_impl(impl, indices.device) == "triton":
        from memlayers.ops.quantized_triton import embedding_bag_quantized_triton

        return embedding_bag_quantized_triton(table, indices, weights, out_dtype, check_indices)
    if check_indices:
        check_index_range(indices, table.n_rows)
    return embedding_bag_quantized_torch(table, indices, weights, out_dtype)


def check_index_range(indices: torch.Tensor, n_rows: int) -> None:
    """Raise ``ValueError`` naming an index outside ``[0, n_rows)`` (one host sync), in
    the words of the offloaded gather's check (:class:`memlayers.ops.offloaded.
    HostTable`)."""
    if indices.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(indices))
    if lo < 0 or hi >= n_rows:
        bad = lo if lo < 0 else hi
        raise ValueError(f"index {bad} is out of range for a table of {n_rows} rows")
