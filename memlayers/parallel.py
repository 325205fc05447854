"""Parallel memory: value tables sharded by columns over a memory-parallel group.

PAPER.md §2 "Parallel memory". A value table ``[N, D]`` too large for one GPU is split
along its *embedding* dimension over the ``mp`` ranks of a device mesh ``(dp, mp)``. Each
rank owns ``D_r`` columns of every row. A lookup

1. gathers the bags (indices and weights) of every rank of the group,
2. runs the embedding bag on its column shard for all gathered tokens, and
3. sends each token's partial row (its columns) back to the token's owner, who
   concatenates the columns of all ranks.

The backward runs the same steps in reverse: column blocks of the output gradient go back
to the ranks that own those columns, each rank computes its value-shard gradient for all
gathered tokens (dense or row-sparse) and its partial score gradient, and the partial
score gradients are summed over the group onto the tokens' owners.

Everything here is applied from outside the model: :func:`shard_values_` converts a
:class:`~memlayers.memory.MemoryValues` in place, so the layers that share it keep their
reference. Shard widths follow ``torch.chunk`` (the layout DTensor and DCP use), so any
width works as long as no shard is empty.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from memlayers.memory import MemoryValues
from memlayers.ops.embedding_bag import embedding_bag


def column_widths(dim: int, parts: int) -> list[int]:
    """Widths of ``torch.chunk(dim, parts)`` column shards; every shard must be non-empty."""
    if parts <= 0:
        raise ValueError(f"the memory-parallel degree must be positive, got mp={parts}")
    step = math.ceil(dim / parts)
    widths = [max(0, min(step, dim - i * step)) for i in range(parts)]
    if min(widths) == 0:
        raise ValueError(
            f"v_dim={dim} can't be split over mp={parts} memory-parallel ranks: the column "
            f"shards would be {widths} (torch.chunk layout); use mp <= {math.ceil(dim / step)}"
            f" or a value dim with ceil(v_dim / mp) * (mp - 1) < v_dim"
        )
    return widths


def build_mesh(world_size: int, mp: int, device_type: str = "cpu") -> DeviceMesh:
    """A ``(dp, mp)`` device mesh; ``world_size = dp × mp``, checked with every factor."""
    if mp <= 0 or world_size % mp:
        raise ValueError(
            f"world_size={world_size} must be dp × mp with mp={mp} dividing it "
            f"(dp = world_size / mp = {world_size / mp if mp else 'undefined'})"
        )
    return init_device_mesh(device_type, (world_size // mp, mp), mesh_dim_names=("dp", "mp"))


def _gather_rows(t: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """All-gather ``t [B_r, ...]`` of every rank, padded to the largest ``B``."""
    pad = max(sizes)
    padded = t.new_zeros(pad, *t.shape[1:])
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


class _GatherBags(torch.autograd.Function):
    """Forward: every rank's bags. Backward: score gradients summed onto their owners."""

    @staticmethod
    def forward(ctx, indices, weights, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_rows(indices, sizes, group), _gather_rows(weights, sizes, group)

    @staticmethod
    def backward(ctx, _grad_indices, grad_weights):
        # Each rank's score gradient covers only its columns: sum over the group. An
        # all-reduce works on every backend (gloo has no reduce-scatter).
        g = grad_weights.contiguous()
        dist.all_reduce(g, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return None, g[start : start + ctx.sizes[ctx.rank]], None, None, None


def _all_to_all(flat: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = flat.new_empty(sum(recv))
    dist.all_to_all_single(out, flat.contiguous(), recv, send, group=group)
    return out


class _ReturnColumns(torch.autograd.Function):
    """Forward: partial rows ``[ΣB, D_r]`` → owners' full rows ``[B_me, D]``.
    Backward: the output gradient's column blocks go back to their shards."""

    @staticmethod
    def forward(ctx, partial, sizes, widths, rank, group):
        ctx.sizes, ctx.widths, ctx.rank, ctx.group = sizes, widths, rank, group
        mine, width = sizes[rank], widths[rank]
        # Rows are grouped by owner, so the flat tensor is already in send order.
        recv = _all_to_all(
            partial.reshape(-1), [n * width for n in sizes], [mine * w for w in widths], group
        )
        blocks = recv.split([mine * w for w in widths])
        return torch.cat([b.view(mine, w) for b, w in zip(blocks, widths, strict=True)], dim=1)

    @staticmethod
    def backward(ctx, grad):
        sizes, widths, rank = ctx.sizes, ctx.widths, ctx.rank
        mine, width = sizes[rank], widths[rank]
        send = torch.cat([b.reshape(-1) for b in grad.split(widths, dim=1)])
        back = _all_to_all(send, [mine * w for w in widths], [n * width for n in sizes], ctx.group)
        return back.view(sum(sizes), width), None, None, None, None


class ColumnShard:
    """This rank's columns ``[start, start + width)`` of a table sharded over ``group``."""

    def __init__(self, group, full_dim: int) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.full_dim = full_dim
        self.widths = column_widths(full_dim, self.world)
        self.start = sum(self.widths[: self.rank])
        self.width = self.widths[self.rank]

    def lookup(self, weight, indices, weights, impl, sparse_grad):
        """Gather every rank's bags → local lookup on this shard → return the columns."""
        local_b = torch.tensor([indices.shape[0]], device=indices.device)
        sizes = [torch.zeros_like(local_b) for _ in range(self.world)]
        dist.all_gather(sizes, local_b, group=self.group)
        sizes = [int(s) for s in sizes]
        idx_all, w_all = _GatherBags.apply(indices, weights, sizes, self.rank, self.group)
        partial = embedding_bag(weight, idx_all, w_all, impl=impl, sparse_grad=sparse_grad)
        return _ReturnColumns.apply(partial, sizes, self.widths, self.rank, self.group)

    @torch.no_grad()
    def init_normal_(self, weight: torch.Tensor, std: float, chunk_rows: int = 1 << 16) -> None:
        """Draw the full table row-chunk by row-chunk and keep this shard's columns, so a
        seed gives the same table whatever the number of shards."""
        cols = slice(self.start, self.start + self.width)
        for s in range(0, weight.shape[0], chunk_rows):
            rows = min(chunk_rows, weight.shape[0] - s)
            full = torch.empty(rows, self.full_dim, dtype=weight.dtype, device=weight.device)
            weight[s : s + rows] = full.normal_(0.0, std)[:, cols]


def shard_values_(values: MemoryValues, group) -> MemoryValues:
    """Keep only this rank's columns of ``values`` (in place) and route its lookups
    through the group. The current full weight is sliced, so shard after loading or
    initialising it; build optimizers afterwards (the parameter object changes)."""
    if values.shard is not None:
        raise ValueError("values are already sharded")
    shard = ColumnShard(group, values.v_dim)
    full = values.weight.detach()
    if full.is_meta:  # built on the meta device: to_empty + init_weights come later
        local = torch.empty(full.shape[0], shard.width, dtype=full.dtype, device="meta")
    else:
        local = full[:, shard.start : shard.start + shard.width].clone()
    values.weight = torch.nn.Parameter(local, requires_grad=values.weight.requires_grad)
    values.shard = shard
    return values
