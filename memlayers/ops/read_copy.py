"""An int8 copy of a float value table for its lookups to read (``MemoryConfig.value_read``).

A Memory+ step moves its table's rows four times: the lookup forward and the score
gradient read every row of every bag, the value step reads and writes the rows it steps,
and the backward walk reads the output gradient by lookup. On an H100 the first two take
5.8 ms each of a 96 ms 134m-memory+ step, both at the card's bandwidth
(benchmarks/results/profile_134m_h100_20261205.md): only fewer bytes make them faster.

With ``value_read="int8"`` the table keeps its float rows (bf16 or fp32), its fp32 master
and its moments, as before, and beside them a **read copy**: the same rows packed as the
serving format packs them (:mod:`memlayers.ops.quantized`: int8, one bf16 scale a row,
``D + 2`` bytes against ``2·D`` for bf16). The forward and the score gradient read the
copy; the value gradient is the float table's, straight through (the walk does not read
rows), and the optimizer steps the float table as before. After a step the copy's stepped
rows are packed again from the table (:func:`requantize_rows_`): one read of the bf16
rows and a write of the int8 ones, against the two reads of a step's bags it halves.

The lookups of a model so trained compute ``Σ w · ŵ_row`` with ``ŵ = q · s``, each element
within ``s / 2`` of the table's (the format's bound). Its quality on the main job was
tested before the kernels were written (benchmarks/read_precision_quality.py: 81.4% held
-out exact match over five seeds against 80.7% for bf16 reads;
benchmarks/results/read_precision_quality_cpu_20261205.md).

The copy is derived state: not saved, rebuilt from the table at the first lookup after a
load, a move to another device or dtype, or an in-place change the optimizer did not
report (:class:`ReadCopy` stamps it with the table's version counter and storage;
:class:`memlayers.MemoryValues` forgets it on a load or a move). The row-wise value
optimizers (:mod:`memlayers.value_optim`) report their steps and refresh only the rows
they stepped; the trainer's AdamW on a dense-gradient table forgets the copies after each
step (its fused kernel moves no version counter), and the whole copy is packed again at
the next lookup (1.6 GB read for a 1M × 768 bf16 table). Any other write the version
counter cannot see (torch's fused optimizers of one's own, a kernel on ``weight.data``)
is not seen: call :meth:`ReadCopy.invalidate` after it.
"""

from __future__ import annotations

import torch

from memlayers.ops.embedding_bag import embedding_bag_grads, resolve_impl
from memlayers.ops.quantized import (
    QuantizedRows,
    dequantize_rows,
    empty_quantized,
    requantize_rows_torch,
    score_grad_quantized_torch,
)

VALUE_READS = ("table", "int8")
# What a shared table's merged value-gradient walk reads of the lookups' output gradient
# (``MemoryConfig.grad_read``): the float rows, or the same packed as int8 rows with a
# bf16 scale a row (:func:`pack_rows`, :func:`value_grad_packed`).
GRAD_READS = ("float", "int8")
# The attribute a table's parameter carries its ReadCopy in (set by MemoryValues when it
# builds the copy), so an optimizer stepping the parameter can refresh the rows it steps.
READ_COPY = "_memlayers_read_copy"


def is_row_int8(table: QuantizedRows) -> bool:
    """Whether ``table`` is in the read copy's format: int8 with one scale a row (what
    the Triton packing and score-gradient kernels take)."""
    return table.bits == 8 and table.group >= table.dim


def requantize_rows_(
    table: QuantizedRows, weight: torch.Tensor, rows: torch.Tensor | None = None, impl="auto"
) -> None:
    """Pack ``weight``'s ``rows`` (all when None; int64, in range) into ``table`` in place,
    as :func:`memlayers.ops.quantized.quantize_rows` packs them (int8, one scale a row):
    Triton on CUDA, the PyTorch reference elsewhere, the same bits."""
    if resolve_impl(impl, weight.device) == "triton" and is_row_int8(table):
        from memlayers.ops.quantized_triton import pack_int8_rows_

        pack_int8_rows_(table, weight, rows)
    else:
        requantize_rows_torch(table, weight, rows)


def pack_rows(x: torch.Tensor, impl: str = "auto") -> QuantizedRows:
    """``x [B, D]`` (float) packed as int8 rows with one bf16 scale a row, the read copy's
    format (:func:`requantize_rows_`): what a merged walk with ``grad_read="int8"`` reads
    of the output gradient."""
    b, d = x.shape
    packed = empty_quantized(b, d, 8, None, x.device)
    requantize_rows_(packed, x.detach(), None, impl)
    return packed


def value_grad_packed(
    weight: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    grad: QuantizedRows,
    impl: str = "auto",
) -> torch.Tensor:
    """The row-sparse (coalesced COO, ``weight``'s dtype) value gradient of the lookups
    ``(indices [B, K], weights)`` into ``weight [N, D]`` for the output gradient ``grad``
    packed by :func:`pack_rows`: row ``r`` gets ``Σ w[b, k] · dequantize(grad)[b]`` over
    the lookups of ``r``. Triton's walk on CUDA reads the int8 rows (``D + 2`` bytes a
    lookup against ``2·D`` for bf16); elsewhere the lookup's PyTorch backward of the
    dequantized rows, the reference. Run eagerly (a merged walk's end-of-pass callback);
    inputs as the lookup's, indices in range."""
    if (grad.n_rows, grad.dim) != (indices.shape[0], weight.shape[1]) or not is_row_int8(grad):
        raise ValueError(
            f"the packed output gradient must be int8 rows [B={indices.shape[0]}, "
            f"D={weight.shape[1]}] with a scale a row, got [{grad.n_rows}, {grad.dim}], "
            f"bits={grad.bits}, group={grad.group}"
        )
    if resolve_impl(impl, weight.device) == "triton":
        from memlayers.ops.embedding_bag_triton import _bwd_sparse, row_sparse

        rows, grad_rows, _ = _bwd_sparse(
            grad.data, weight.contiguous(), indices.contiguous(), weights.contiguous(), False,
            grad_scales=grad.scales,
        )  # fmt: skip
        return row_sparse(rows, grad_rows, weight.shape)
    g = dequantize_rows(grad)
    gv, _ = embedding_bag_grads(weight, indices, weights, g, True, False, "torch", True)
    return gv


def score_grad_read(
    table: QuantizedRows, indices: torch.Tensor, grad_out: torch.Tensor, impl: str = "auto"
) -> torch.Tensor:
    """``[B, K]`` fp32 ``grad_out[b] · dequantize(table)[indices[b, k]]``: the score
    gradient of a lookup that read the copy (indices in range: the forward checked them).
    Triton on CUDA for int8 rows with a scale a row, the PyTorch reference elsewhere."""
    grad_out = grad_out.contiguous()
    if resolve_impl(impl, indices.device) == "triton" and is_row_int8(table):
        from memlayers.ops.embedding_bag_triton import score_grad

        return score_grad(table.data, indices.contiguous(), grad_out, scales=table.scales)
    return score_grad_quantized_torch(table, indices, grad_out)


def check_read_copy(read: QuantizedRows, weight: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the value when ``read`` is not an int8 copy of
    ``weight [N, D]`` (one scale a row, the same rows and width, on its device)."""
    if not isinstance(read, QuantizedRows):
        raise ValueError(f"read must be a QuantizedRows, got {type(read).__name__}")
    if not is_row_int8(read):
        raise ValueError(
            f"a read copy is int8 with one scale a row, got bits={read.bits}, "
            f"group={read.group} for dim={read.dim}"
        )
    if weight.dim() != 2 or (read.n_rows, read.dim) != tuple(weight.shape):
        raise ValueError(
            f"the read copy is [{read.n_rows}, {read.dim}] but the table is "
            f"{list(weight.shape)}: it must be a copy of the table's rows"
        )
    if read.data.device != weight.device:
        raise ValueError(f"the read copy is on {read.data.device} but the table on {weight.device}")


def _stamp(weight: torch.Tensor) -> tuple:
    """What a copy of ``weight`` is a copy of: its storage, shape, dtype and version."""
    return (weight.device, weight.data_ptr(), tuple(weight.shape), weight.dtype, weight._version)


class ReadCopy:
    """The int8 rows a float table's lookups read, and the state of the table they were
    packed from. :meth:`rows` gives them, packing the whole table first when they are
    missing or stale; an optimizer that steps some rows calls :meth:`sync` before and
    :meth:`refresh_rows_` after, so only those rows are packed again."""

    def __init__(self) -> None:
        self.packed: QuantizedRows | None = None
        self.stamp: tuple | None = None

    def invalidate(self) -> None:
        """Forget the copy: the next lookup packs the whole table again."""
        self.packed, self.stamp = None, None

    def current(self, weight: torch.Tensor) -> bool:
        """Whether the copy holds ``weight`` as it is now."""
        return self.packed is not None and self.stamp == _stamp(weight)

    @torch.no_grad()
    def rows(self, weight: torch.Tensor, impl: str = "auto") -> QuantizedRows:
        """The packed rows of ``weight [N, D]`` as it is now (packed again if stale)."""
        if not self.current(weight):
            n, d = weight.shape
            packed = self.packed
            if (
                packed is None
                or packed.data.device != weight.device
                or (packed.n_rows, packed.dim) != (n, d)
                or packed.data.is_inference()
            ):
                # Normal tensors even when the first lookup runs under inference_mode (an
                # evaluation before training): the optimizer writes into them later.
                with torch.inference_mode(False):
                    packed = empty_quantized(n, d, 8, None, weight.device)
            requantize_rows_(packed, weight.detach(), None, impl)
            self.packed, self.stamp = packed, _stamp(weight)
        setattr(weight, READ_COPY, self)  # for the optimizer that steps it (value_optim)
        return self.packed

    def sync(self, weight: torch.Tensor, impl: str = "auto") -> None:
        """Before an optimizer steps ``weight``: a copy that went stale since it was packed
        (a change nobody reported) is packed again now, so that :meth:`refresh_rows_`
        after the step may refresh the stepped rows only. No copy yet: nothing to do."""
        if self.packed is not None and not self.current(weight):
            self.rows(weight, impl)

    @torch.no_grad()
    def refresh_rows_(self, weight: torch.Tensor, rows: torch.Tensor | None, impl="auto") -> None:
        """After an optimizer stepped ``weight``'s ``rows`` (None: all): pack them again
        and take the table as it now is (the stamp is taken again: a step may or may not
        move the version counter)."""
        if self.packed is None:
            return
        requantize_rows_(self.packed, weight.detach(), rows, impl)
        self.stamp = _stamp(weight)
