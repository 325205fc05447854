"""Parallel memory: value tables sharded by columns over a memory-parallel group.

docs/method.md §5 "Parallel memory". A value table ``[N, D]`` too large for one GPU is split
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
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

from memlayers.memory import MemoryValues
from memlayers.merged_grad import read_copy_lookup
from memlayers.ops.embedding_bag import check_bags, embedding_bag
from memlayers.optim import clip_grad_norm_
from memlayers.value_optim import COLUMN_SHARD


def column_widths(dim: int, parts: int) -> list[int]:
    """Widths of ``torch.chunk(dim, parts)`` column shards; every shard must be non-empty."""
    if parts <= 0:
        raise ValueError(f"the memory-parallel degree must be positive, got mp={parts}")
    widths = _chunk_widths(dim, parts)
    if min(widths) == 0:
        valid = [m for m in range(1, min(dim, 4 * parts) + 1) if min(_chunk_widths(dim, m))]
        raise ValueError(
            f"v_dim={dim} can't be split over mp={parts} memory-parallel ranks: the column "
            f"shards would be {widths} (torch.chunk layout, which leaves a shard empty "
            f"unless ceil(v_dim / mp) * (mp - 1) < v_dim); mp values that work for this "
            f"v_dim: {valid}"
        )
    return widths


def _chunk_widths(dim: int, parts: int) -> list[int]:
    step = math.ceil(dim / parts)
    return [max(0, min(step, dim - i * step)) for i in range(parts)]


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
    """This rank's columns ``[start, start + width)`` of a table sharded over ``group``.

    ``equal_bags``: every rank of the group passes as many bags to each lookup as this
    one (the trainer's fixed ``[batch, seq_len]`` micro-batches: :meth:`ParallelPlan.
    equal_bags`). The ranks' bag counts are then not brought to the host (a wait for the
    device before each lookup could be queued): they are checked on the device instead,
    and a rank that breaks the promise fails there before any bag moves (on a GPU a
    device-side assert, its message on the process's stderr)."""

    def __init__(self, group, full_dim: int) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.widths = column_widths(full_dim, self.world)
        self.start = sum(self.widths[: self.rank])
        self.width = self.widths[self.rank]
        self.equal_bags = False

    def bag_counts(self, indices: torch.Tensor) -> list[int]:
        """Every rank's number of bags in this lookup (this rank's: ``indices.shape[0]``)."""
        mine = indices.shape[0]
        local_b = indices.new_full((1,), mine)  # a fill: torch.tensor would copy from the host
        sizes = [torch.zeros_like(local_b) for _ in range(self.world)]
        dist.all_gather(sizes, local_b, group=self.group)
        if not self.equal_bags:
            return [int(s) for s in sizes]  # waits for the device
        torch._assert_async(
            torch.cat(sizes).eq(mine).all(),
            "parallel memory: equal_bags is set but the ranks of a memory-parallel group "
            "passed different numbers of bags to one lookup",
        )
        return [mine] * self.world

    # Eager under torch.compile (one graph boundary, as memory.py's sparse lookup): its
    # collectives' split sizes are host numbers and its gradient may be deferred to the
    # end of the backward (merged), neither of which a compiled graph can hold.
    @torch.compiler.disable
    def lookup(self, weight, indices, weights, impl, sparse_grad, merged=None, read_copy=None):
        """Gather every rank's bags → local lookup on this shard → return the columns.
        ``merged``: the table's :class:`~memlayers.merged_grad.MergedValueGrad` (Memory+'s
        shared table): with ``sparse_grad``, the shard's gradient is deferred to one walk
        over every layer's gathered bags at the end of the backward, as unsharded.
        ``read_copy``: the shard's :class:`~memlayers.ops.read_copy.ReadCopy`
        (``value_read=int8``): the local lookup reads the shard's int8 copy, whose scales
        are per row *of the shard's columns* (mp scales a row over the group: not the
        numbers of an unsharded table's copy, one scale a whole row)."""
        check_bags(indices, weights)  # on every rank before its first collective
        sizes = self.bag_counts(indices)
        idx_all, w_all = _GatherBags.apply(indices, weights, sizes, self.rank, self.group)
        read = None if read_copy is None else read_copy.rows(weight, impl)
        if sparse_grad and merged is not None:
            partial = merged.lookup(weight, idx_all, w_all, impl, read)
        elif read is not None:
            partial = read_copy_lookup(weight, read, idx_all, w_all, impl, sparse_grad)
        else:
            partial = embedding_bag(weight, idx_all, w_all, impl=impl, sparse_grad=sparse_grad)
        return _ReturnColumns.apply(partial, sizes, self.widths, self.rank, self.group)


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
    mark_shard(values)
    return values


def mark_shard(values: MemoryValues) -> None:
    """Tell optimizers that ``values.weight`` is a column shard (``SparseValueAdam(
    rowwise_v=True)`` refuses it). Again after anything that makes a new parameter of it
    (``to_empty``, ``.to(dtype)``)."""
    if values.shard is not None:
        setattr(values.weight, COLUMN_SHARD, values.shard)


# ---- the whole model: mesh, parallelize, gradients, checkpoints ---------------------------


FSDP_PARAM_DTYPES = ("fp32", "bf16")


@dataclass
class ParallelArgs:
    mp: int = 1  # memory-parallel degree: value tables split by columns over mp ranks
    fsdp: bool = True  # FSDP2 for every other parameter (else replicated on every rank)
    # Ranks each dense parameter is sharded over; 0: all of them. A divisor of the world
    # size gives HSDP: shards inside groups of fsdp_shard consecutive ranks (a node's GPUs
    # under torchrun), replicated over the world / fsdp_shard groups, so only the gradient
    # all-reduce crosses nodes (docs/scaling.md).
    fsdp_shard: int = 0
    # The dtype FSDP2 all-gathers the blocks' dense parameters in and computes with: fp32,
    # or bf16 (half the gather bytes; needs bf16 autocast). With bf16 the ops autocast
    # keeps in fp32 (the norms) read bf16-rounded weights; the residual stream, RoPE
    # tables and the root's parameters (embeddings, final norm, output head) stay fp32,
    # gradients are reduced in fp32 and the optimizer steps the fp32 parameters.
    fsdp_param_dtype: str = "fp32"

    def validate(self) -> None:
        if isinstance(self.mp, bool) or not isinstance(self.mp, int) or self.mp < 1:
            raise ValueError(f"parallel.mp must be a positive int, got parallel.mp={self.mp!r}")
        shard = self.fsdp_shard
        if isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
            raise ValueError(
                f"parallel.fsdp_shard must be an int >= 0 (0: all ranks), got "
                f"parallel.fsdp_shard={shard!r}"
            )
        if self.fsdp_param_dtype not in FSDP_PARAM_DTYPES:
            raise ValueError(
                f"parallel.fsdp_param_dtype must be one of {FSDP_PARAM_DTYPES}, got "
                f"{self.fsdp_param_dtype!r}"
            )
        if not self.fsdp and (shard or self.fsdp_param_dtype != "fp32"):
            raise ValueError(
                f"parallel.fsdp_shard={shard} / parallel.fsdp_param_dtype="
                f"{self.fsdp_param_dtype} configure FSDP, but parallel.fsdp=false"
            )

    def check_world(self, world: int) -> None:
        """The settings against the number of ranks (``validate`` first)."""
        if self.fsdp_shard and world % self.fsdp_shard:
            raise ValueError(
                f"parallel.fsdp_shard={self.fsdp_shard} must divide world_size={world} "
                f"(HSDP: world_size / fsdp_shard replicas of fsdp_shard-way shards)"
            )

    def check_run(self, world: int, bf16_autocast: bool) -> None:
        """The settings against a training run: its number of ranks and whether it
        computes under bf16 autocast (the trainer's ``dtype``)."""
        self.check_world(world)
        if self.fsdp_param_dtype != "bf16":
            return
        if world == 1:
            raise ValueError(
                "parallel.fsdp_param_dtype=bf16 sets FSDP's all-gathers, and one process "
                "(world_size=1) has no FSDP: use parallel.fsdp_param_dtype=fp32"
            )
        if not bf16_autocast:
            raise ValueError(
                "parallel.fsdp_param_dtype=bf16 needs bf16 autocast (dtype=bf16, or "
                "dtype=auto on CUDA): this run computes in fp32, where bf16 parameters "
                "would meet fp32 activations"
            )


def value_tables(model: nn.Module) -> list[tuple[str, MemoryValues]]:
    """``(state_dict prefix, table)`` of every distinct value table of ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MemoryValues)]


@dataclass
class ParallelPlan:
    """What :func:`parallelize` did; the trainer uses it for gradients and checkpoints.
    ``mesh=None``: one process, nothing sharded (every method a no-op)."""

    mesh: DeviceMesh | None
    args: ParallelArgs
    tables: list[tuple[str, MemoryValues]]

    @property
    def world(self) -> int:
        return 1 if self.mesh is None else self.mesh.size()

    @property
    def dp(self) -> int:
        return 1 if self.mesh is None else self.mesh["dp"].size()

    @property
    def fsdp_shard(self) -> int:
        """Ranks each FSDP shard group spans: ``parallel.fsdp_shard``, or every rank."""
        return self.args.fsdp_shard or self.world

    @property
    def sharded(self) -> bool:
        return self.mesh is not None and self.mesh["mp"].size() > 1

    def is_table(self, p: torch.Tensor) -> bool:
        return any(p is t.weight for _, t in self.tables)

    def equal_bags(self) -> None:
        """Promise that every rank passes as many bags to each lookup (fixed micro-batch
        shapes, as the trainer's): sharded lookups then skip a host wait each
        (:class:`ColumnShard`)."""
        for _, table in self.tables:
            if table.shard is not None:
                table.shard.equal_bags = True

    @torch.no_grad()
    def sync_grads(self, model: nn.Module) -> None:
        """Average gradients over all ranks, as if one process had seen every token.

        FSDP2 already reduce-scatters (mean) the sharded parameters. A table shard holds
        the *sum* over its memory-parallel group's tokens (the lookup gathered them), so
        it is summed over the ``dp`` replicas and divided by the world size. Replicated
        dense parameters (``fsdp=False``) are all-reduced here.
        """
        if self.world == 1:
            return
        dp_group = self.mesh["dp"].get_group()
        for p in model.parameters():
            if not p.requires_grad:  # frozen: no gradient to average (every rank alike)
                continue
            if self.is_table(p):
                if p.grad is None:  # no lookup this step: still join the collectives
                    p.grad = _empty_grad(p, sparse=any(p is t.weight and t.sparse_grad
                                                       for _, t in self.tables))  # fmt: skip
                if p.grad.is_sparse:
                    p.grad = _all_reduce_sparse(p.grad, dp_group, self.dp) / self.world
                else:
                    if self.dp > 1:
                        dist.all_reduce(p.grad, group=dp_group)
                    p.grad.div_(self.world)
            elif not isinstance(p, DTensor) and self.world > 1:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(self.world)

    def _copies(self, p: torch.Tensor) -> int:
        """Ranks holding the same numbers as this rank's ``p``: a table shard is replicated
        over ``dp``, an FSDP shard over its mesh's replicated dims (HSDP's replicas; none
        under plain FSDP), a replicated dense parameter is everywhere."""
        if self.is_table(p):
            return self.dp
        if isinstance(p, DTensor):
            return math.prod(
                p.device_mesh.size(i)
                for i, place in enumerate(p.placements)
                if isinstance(place, Replicate)
            )
        return self.world

    def clip_grad_norm_(self, model: nn.Module, max_norm: float, defer_to=None) -> torch.Tensor:
        """Global L2 gradient norm over FSDP shards, table shards and replicas; rescale
        when above ``max_norm`` (``<= 0`` only measures; ``defer_to``: as
        :func:`memlayers.optim.clip_grad_norm_`'s). Call after :meth:`sync_grads`."""
        return clip_grad_norm_(
            model.parameters(),
            max_norm,
            copies=self._copies,
            all_reduce=dist.all_reduce if self.world > 1 else None,
            defer_to=defer_to,
        )

    def table_dtensor(self, table: MemoryValues, local: torch.Tensor) -> torch.Tensor:
        """``local`` (a ``[N, D_r]`` shard of the table or of its optimizer state) as a
        DTensor view over the mesh, so DCP saves and reshards it; unsharded: itself."""
        if not self.sharded:
            return local
        return DTensor.from_local(
            local,
            self.mesh,
            [Replicate(), Shard(1)],
            run_check=False,
            shape=torch.Size([table.n_rows, table.v_dim]),
            stride=(table.v_dim, 1),
        )


def _empty_grad(p: torch.Tensor, sparse: bool) -> torch.Tensor:
    """A zero gradient: row-sparse with no rows (lazy Adam then moves nothing) or dense."""
    if not sparse:
        return torch.zeros_like(p)
    rows = torch.empty(1, 0, dtype=torch.int64, device=p.device)
    empty = p.new_empty(0, p.shape[1])
    return torch.sparse_coo_tensor(rows, empty, p.shape, check_invariants=False).coalesce()


def _all_reduce_sparse(grad: torch.Tensor, group, size: int) -> torch.Tensor:
    """Sum a row-sparse gradient over ``group``: gather every rank's rows, coalesce."""
    grad = grad.coalesce()
    if size == 1:
        return grad
    rows, vals = grad.indices()[0], grad.values()
    n = torch.tensor([rows.numel()], device=rows.device)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    all_rows = _gather_rows(rows, sizes, group)
    all_vals = _gather_rows(vals, sizes, group)
    # Rows of the ranks' own coalesced gradients, in range: no invariant check (and none
    # of torch's warning that it is off, once per rank and step).
    summed = torch.sparse_coo_tensor(all_rows[None], all_vals, grad.shape, check_invariants=False)
    return summed.coalesce()


def shard_tables(model: nn.Module, mesh: DeviceMesh | None, args: ParallelArgs) -> ParallelPlan:
    """Split every value table of ``model`` by columns over ``mesh["mp"]`` (in place; on
    the meta device too). The first half of :func:`parallelize`. ``mesh=None`` (one
    process) shards nothing."""
    args.validate()
    args.check_world(1 if mesh is None else mesh.size())
    if mesh is None:
        if args.mp != 1:
            raise ValueError(
                f"parallel.mp={args.mp} needs that many ranks (torchrun), but world_size=1"
            )
        return ParallelPlan(None, args, value_tables(model))
    if mesh.mesh_dim_names != ("dp", "mp"):
        raise ValueError(f"mesh must have dims ('dp', 'mp'), got {mesh.mesh_dim_names}")
    if mesh["mp"].size() != args.mp:
        raise ValueError(f"mesh mp size {mesh['mp'].size()} != parallel.mp={args.mp}")
    tables = value_tables(model)
    if args.mp > 1:
        for _, table in tables:
            shard_values_(table, mesh["mp"].get_group())
    return ParallelPlan(mesh, args, tables)


def fsdp_mesh(plan: ParallelPlan) -> DeviceMesh:
    """FSDP2's mesh for the dense parameters: 1-D over all ranks, or with
    ``parallel.fsdp_shard`` a divisor of the world, ``("replicate", "shard")`` of
    ``(world / fsdp_shard, fsdp_shard)``: HSDP, shards inside groups of consecutive ranks."""
    world, shard = plan.world, plan.fsdp_shard  # shard divides world: shard_tables checked
    if shard == world:
        return init_device_mesh(plan.mesh.device_type, (world,), mesh_dim_names=("all",))
    return init_device_mesh(
        plan.mesh.device_type, (world // shard, shard), mesh_dim_names=("replicate", "shard")
    )


def describe(plan: ParallelPlan) -> str:
    """One line of what the plan does across ranks ("" on one process), for the log:
    ``"mp 2 × dp 2; dense parameters HSDP: 2 replicas × 2-way shards, bf16 all-gathers"``."""
    if plan.world == 1:
        return ""
    args = plan.args
    line = f"mp {args.mp} × dp {plan.dp}; dense parameters "
    if not args.fsdp:
        return line + "replicated (parallel.fsdp=false)"
    shard = plan.fsdp_shard
    if shard == plan.world:
        line += f"FSDP2 over {plan.world} ranks"
    else:
        line += f"HSDP: {plan.world // shard} replicas × {shard}-way shards"
    return line + f", {args.fsdp_param_dtype} all-gathers"


def apply_fsdp(model: nn.Module, plan: ParallelPlan) -> None:
    """FSDP2 for every parameter but the tables, over :func:`fsdp_mesh` (all ranks, or
    HSDP): one unit per ``model.layers`` block, then the root. With
    ``parallel.fsdp_param_dtype=bf16`` the blocks' parameters are all-gathered in bf16,
    their inputs not cast and gradients reduced in fp32; the root's (embeddings, final
    norm, output head) stay fp32, so the embedding hands the blocks an fp32 residual
    stream. The second half of :func:`parallelize`."""
    if not plan.args.fsdp or plan.world == 1:
        return
    mesh = fsdp_mesh(plan)
    fp32 = MixedPrecisionPolicy()
    blocks = fp32
    if plan.args.fsdp_param_dtype == "bf16":
        # Autocast casts what its matmuls read; the residual stream and the RoPE tables
        # keep their dtype.
        blocks = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    ignored = {t.weight for _, t in plan.tables}
    for block in getattr(model, "layers", []):
        fully_shard(block, mesh=mesh, ignored_params=ignored, mp_policy=blocks)
    fully_shard(model, mesh=mesh, ignored_params=ignored, mp_policy=fp32)


def parallelize(
    model: nn.Module, mesh: DeviceMesh | None, args: ParallelArgs, compile: bool = False
) -> ParallelPlan:
    """Apply parallelism from outside the model: value tables split by columns over
    ``mesh["mp"]``, ``torch.compile`` per block (``compile``), FSDP2 (or HSDP:
    ``args.fsdp_shard``) for the rest. ``mesh=None`` (one process): a no-op plan. On a
    materialised model its tables are sliced; :func:`build` instead shards them on the
    meta device, then initialises."""
    plan = shard_tables(model, mesh, args)
    if compile:
        compile_blocks(model)  # before FSDP, whose hooks then stay outside the graphs
    apply_fsdp(model, plan)
    return plan


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each transformer block in place (state_dict keys unchanged).

    Per block rather than the whole model: blocks of one kind share their compiled code,
    a memory block's sparse lookup stays one eager call (memory.py says why) without
    breaking up the others, and compile time stays that of one block per kind."""
    for block in model.layers:
        block.compile()


def build(
    config,
    args: ParallelArgs,
    device: torch.device,
    seed: int,
    compile: bool = False,
    sparse_values: bool = False,
) -> tuple[nn.Module, ParallelPlan]:
    """The one way to build a model, for every world size: meta device → value tables
    split over ``args.mp`` ranks (no-op on one process) → allocate on ``device`` →
    ``init_weights`` → compile → FSDP2 for the rest. Returns ``(model, plan)``.

    Weights are drawn with the RNG stream of a single process (a table shard draws the
    full table's stream), so any layout of one seed starts from the same weights, and one
    process gets exactly :func:`memlayers.model.build_model`'s. ``sparse_values``: see
    :class:`memlayers.model.Transformer`."""
    from memlayers.model import Transformer

    world = dist.get_world_size() if dist.is_initialized() else 1
    mesh = build_mesh(world, args.mp, device.type) if world > 1 else None
    with torch.device("meta"):
        model = Transformer(config, sparse_values)
    plan = shard_tables(model, mesh, args)
    model.to_empty(device=device)
    for _, table in plan.tables:
        mark_shard(table)  # to_empty made new parameters
    torch.manual_seed(seed)
    model.init_weights()
    if compile:
        compile_blocks(model)  # before FSDP, whose hooks then stay outside the graphs
    apply_fsdp(model, plan)
    return model, plan
