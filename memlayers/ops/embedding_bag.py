"""The weighted sum of value rows: ``out[b] = Σ_k weights[b, k] · values[indices[b, k]]``.

This is EmbeddingBag(mode="sum", per_sample_weights) (docs/method.md §5 "Kernels"). FLOPs are
negligible; the op is bound by memory bandwidth. This module holds the input checks, the
dispatcher and the PyTorch path, which runs on CPU and GPU, in any floating dtype, and is
the reference every faster implementation is tested against.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

IMPLS = ("auto", "torch", "triton")

# The backward materialises [rows, K, D] fp32 products; bound that to ~64 MB per chunk so
# a 16k-token batch with 128-row bags and D = 1024 doesn't need 8 GB at once.
_CHUNK_ELEMENTS = 1 << 24


def check_embedding_bag_inputs(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> None:
    """Raise ``ValueError`` naming the offending value before any kernel runs."""
    if values.dim() != 2:
        raise ValueError(f"values must be [N, D], got shape {tuple(values.shape)}")
    if not values.is_floating_point():
        raise ValueError(f"values must be floating point, got dtype {values.dtype}")
    check_bags(indices, weights)
    if not (values.device == indices.device == weights.device):
        raise ValueError(
            f"values, indices and weights must be on one device, got {values.device}, "
            f"{indices.device} and {weights.device}"
        )


def check_bags(indices: torch.Tensor, weights: torch.Tensor) -> None:
    """The bags' part of the checks: ``indices [B, K]`` int64, ``weights`` floating, of
    the same shape (any table's lookup: float or quantized)."""
    if indices.dim() != 2:
        raise ValueError(f"indices must be [B, K], got shape {tuple(indices.shape)}")
    if indices.dtype != torch.int64:
        raise ValueError(f"indices must be int64, got dtype {indices.dtype}")
    if weights.shape != indices.shape:
        raise ValueError(
            f"weights must have the shape of indices {tuple(indices.shape)}, "
            f"got {tuple(weights.shape)}"
        )
    if not weights.is_floating_point():
        raise ValueError(f"weights must be floating point, got dtype {weights.dtype}")


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``impl`` to the implementation that will run on ``device``.

    ``auto`` picks Triton on CUDA (when Triton imports) and PyTorch elsewhere. ``triton``
    on a CPU tensor is allowed only under ``TRITON_INTERPRET=1`` (how CI tests kernels).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl='triton' but triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"impl='triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1"
            )
    return impl


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _row_chunk(k: int, d: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, k * d))


class _TorchEmbeddingBag(torch.autograd.Function):
    """PyTorch path with a backward that also supports bf16/fp16 score gradients."""

    @staticmethod
    def forward(ctx, values, indices, weights, sparse_grad=False):
        ctx.sparse_grad = sparse_grad
        ctx.save_for_backward(values, indices, weights)
        if indices.numel() == 0 or values.shape[1] == 0:
            return values.new_zeros(indices.shape[0], values.shape[1])
        if torch.promote_types(values.dtype, weights.dtype) == values.dtype:
            # F.embedding_bag accumulates in fp32 for half types and is PyTorch's own
            # kernel: the honest baseline for the Triton path.
            return F.embedding_bag(
                indices, values, per_sample_weights=weights.to(values.dtype), mode="sum"
            )
        # Weights wider than the table (fp32 softmax weights, bf16 table): F.embedding_bag
        # would round them to the table's dtype first. The rows in fp32 (or wider), each
        # times its weight as given, summed, as the Triton path does.
        acc = torch.promote_types(weights.dtype, torch.float32)
        out = values.new_empty(indices.shape[0], values.shape[1])
        step = _row_chunk(indices.shape[1], values.shape[1])
        for s in range(0, indices.shape[0], step):
            rows = values[indices[s : s + step]].to(acc)  # [b', K, D]
            w = weights[s : s + step].to(acc).unsqueeze(-1)
            out[s : s + step] = (rows * w).sum(dim=1).to(values.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, weights = ctx.saved_tensors
        need_v, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_values, grad_weights = _torch_grads(
            values, indices, weights, grad_out, need_v, need_w, ctx.sparse_grad
        )
        return grad_values, None, grad_weights, None


def _torch_grads(values, indices, weights, grad_out, need_v, need_w, sparse):
    """The PyTorch backward: ``(value grad or None, score grad or None)``; the value grad
    is row-sparse (coalesced COO) when ``sparse``."""
    n, d = values.shape
    b, k = indices.shape
    acc = torch.promote_types(values.dtype, torch.float32)
    grad_values = grad_weights = None
    if need_v:
        if sparse:
            # Row-sparse: accumulate into the U unique rows only.
            rows, target = torch.unique(indices, sorted=True, return_inverse=True)
        else:
            rows, target = None, indices
        grad_rows = values.new_zeros(n if rows is None else rows.numel(), d, dtype=acc)
    if need_w:
        grad_weights = torch.empty(b, k, dtype=acc, device=weights.device)
    step = _row_chunk(k, d)
    for s in range(0, b, step):
        g = grad_out[s : s + step].to(acc)  # [b', D]
        if need_w:
            vals = values[indices[s : s + step]].to(acc)  # [b', K, D]
            grad_weights[s : s + step] = torch.einsum("bkd,bd->bk", vals, g)
        if need_v:
            contrib = weights[s : s + step].to(acc).unsqueeze(-1) * g.unsqueeze(1)
            grad_rows.index_add_(0, target[s : s + step].reshape(-1), contrib.flatten(0, 1))
    if need_v:
        grad_values = (
            grad_rows.to(values.dtype)
            if rows is None
            else torch.sparse_coo_tensor(
                rows.unsqueeze(0),
                grad_rows.to(values.dtype),
                (n, d),
                is_coalesced=True,
                check_invariants=False,
            )
        )
    if need_w:
        grad_weights = grad_weights.to(weights.dtype)
    return grad_values, grad_weights


def embedding_bag_grads(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    need_values: bool = True,
    need_weights: bool = True,
    impl: str = "auto",
    sparse_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The lookup's backward as a plain function, for callers that run it themselves (one
    backward over several lookups of a shared table: :mod:`memlayers.merged_grad`).

    Returns ``(value gradient or None, score gradient [B, K] or None)``: the value gradient
    row-sparse (coalesced COO) when ``sparse_grad``, else dense ``[N, D]``; the score
    gradient in ``weights.dtype``. Inputs as for :func:`embedding_bag`, plus ``grad_out
    [B, D]``.
    """
    check_embedding_bag_inputs(values, indices, weights)
    if grad_out.shape != (indices.shape[0], values.shape[1]):
        raise ValueError(
            f"grad_out must be [B={indices.shape[0]}, D={values.shape[1]}], "
            f"got {tuple(grad_out.shape)}"
        )
    if resolve_impl(impl, values.device) == "torch":
        return _torch_grads(values, indices, weights, grad_out, need_values, need_weights,
                            sparse_grad)  # fmt: skip
    from memlayers.ops.embedding_bag_triton import triton_grads

    return triton_grads(values, indices, weights, grad_out, need_values, need_weights, sparse_grad)


def embedding_bag_torch(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    sparse_grad: bool = False,
) -> torch.Tensor:
    """The PyTorch path (no input checks; call :func:`embedding_bag`)."""
    return _TorchEmbeddingBag.apply(values, indices, weights, sparse_grad)


def embedding_bag(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    impl: str = "auto",
    sparse_grad: bool = False,
    check_indices: bool = True,
) -> torch.Tensor:
    """Weighted sum of value rows per bag, differentiable in ``values`` and ``weights``.

    Args:
        values: ``[N, D]`` value table, any floating dtype, any ``D``.
        indices: ``[B, K]`` int64 row indices into ``values``.
        weights: ``[B, K]`` weight of each row in its bag.
        impl: ``"auto"`` | ``"torch"`` | ``"triton"`` (see :func:`resolve_impl`).
        sparse_grad: return the value gradient as a coalesced sparse COO tensor holding
            only the rows read (for :mod:`memlayers.value_optim`), instead of dense.
        check_indices: the Triton forward fails (a device-side assert: no host wait) on
            an index outside ``[0, N)``. False when the caller made the indices itself
            and they cannot be out of range (the memory layer's search): it saves the
            check's three small kernels a call, which a batch-1 decode step notices.

    Returns:
        ``[B, D]`` in ``values.dtype``, accumulated in fp32 (wider weights are not rounded
        to the table's dtype first).

    Differentiable once on the Triton path; a second derivative (double backward,
    ``gradgradcheck``) needs ``impl="torch"``, whose backward is made of PyTorch ops.
    """
    check_embedding_bag_inputs(values, indices, weights)
    impl = resolve_impl(impl, values.device)
    if impl == "triton":
        from memlayers.ops.embedding_bag_triton import embedding_bag_triton

        return embedding_bag_triton(values, indices, weights, sparse_grad, check_indices)
    return embedding_bag_torch(values, indices, weights, sparse_grad)
