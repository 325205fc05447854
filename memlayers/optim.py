"""Optimizer groups, the value-table optimizer, the learning-rate schedule, clipping.

Groups are built from module types and shapes, never from attributes stored on
parameters (STYLE.md):

- ``decay``: every matrix (``ndim >= 2``) outside a value table, AdamW with weight decay;
- ``no_decay``: vectors (norm gains), AdamW without decay;
- ``values``: every :class:`~memlayers.memory.MemoryValues` table, with its own learning
  rate (paper: 1e-3, no weight decay, docs/method.md §4);
- ``memory_decay`` / ``memory_no_decay``, only when ``memory_lr`` is set: the memory
  layers' other parameters (query projections, keys, qk-norm gains, gating and output
  projections), split as above, at ``memory_lr``. A retrofit adds these layers to a
  pretrained body (docs/retrofit.md): new, zero-output layers beside weights that should
  move little want a rate of their own.

``value_optimizer="sparse_adam"`` (the default) needs a model built with row-sparse
table gradients (:func:`uses_sparse_values`) and steps them with
:class:`~memlayers.value_optim.SparseValueAdam`, which
touches only the rows read this step; ``"adamw"`` keeps dense gradients and puts the
table in the AdamW as a third group (every row's moments decay every step).
``"sparse_adam_rowwise"`` is ``sparse_adam`` with one second moment per table row
(``SparseValueAdam(rowwise_v=True)``): about half the optimizer state, 30-36% fewer bytes
per step. Its per-row mean of ``g²`` needs whole rows, so column-sharded tables
(``parallel.mp > 1``) refuse it. ``"sparse_adam_bf16"`` keeps both moments in bf16 with
stochastic rounding (``SparseValueAdam(moments="bf16")``): half the state, 29-36% fewer
bytes per step. ``value_master`` (default on) keeps an fp32 master copy of a bf16 table
(``model.memory.value_dtype=bf16``) in the value optimizer's state, the table stored
rounded to nearest from it (mixed precision, as autocast treats every other weight);
off, the bf16 table alone is stored stochastically rounded. ``value_master_split``
(default on) keeps that master as the table and a 16-bit remainder a value
(``SparseValueAdam(master="split")``): the same steps bit for bit in 2 bytes of state a
value instead of 4, and 2 fewer bytes moved a touched value.

The schedule is a multiplier of each group's ``base_lr``: linear warmup, then cosine or
linear decay to ``min_lr_ratio``. It is a pure function of the step, so the checkpoint
only needs the step to resume it exactly. A resume (one file or DCP) restores moments and
step counts and keeps every hyperparameter of the current config (``lr``, decay, betas,
eps: a resumed run may change them); saved state of other groups (``memory_lr`` set or
unset) or of another ``value_optimizer`` is refused, naming the key.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from memlayers.memory import MemoryValues, ProductKeyMemory
from memlayers.model import SwiGLU
from memlayers.router import ProductKeyRouter
from memlayers.value_optim import SparseValueAdam, coalesce_rows

VALUE_OPTIMIZERS = ("sparse_adam", "sparse_adam_rowwise", "sparse_adam_bf16", "adamw")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class OptimArgs:
    lr: float = 1e-3  # dense parameters (the paper's larger models used 1e-4)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    value_lr: float = 1e-3  # the value tables (paper: 1e-3); presets.PRESET_OPTIM per preset
    # The memory layers' dense parameters (query, keys, gating, output projection); None:
    # optim.lr, as every other dense parameter. For retrofits (docs/retrofit.md).
    memory_lr: float | None = None
    value_weight_decay: float = 0.0
    value_optimizer: str = "sparse_adam"  # sparse_adam | ..._rowwise | ..._bf16 | adamw
    # A bf16 value table's fp32 master copy in the sparse optimizer's state (no effect on
    # an fp32 table); false: the table alone, stochastically rounded.
    value_master: bool = True
    # That master kept as the table (its high half) and an int16 remainder a value: the
    # same steps, 2 bytes of state a value instead of 4 and 2 fewer moved a touched value
    # (SparseValueAdam(master="split")); false: a separate fp32 copy; no effect without
    # value_master (or on an fp32 table). On an H100 the
    # presets' step 4.65 -> 4.15 ms at 134m's table, 134m-memory+ +1.0-1.4% tokens/s, 1.5
    # GiB less (benchmarks/results/row_adam_h100_20261206.md, train_h100_20261206e.md).
    value_master_split: bool = True
    schedule: str = "cosine"  # cosine | linear | constant
    # shorter than the run's steps (0: none); left unset, fitted to a short run
    # (memlayers.config.fit_warmup)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping

    def validate(self) -> None:
        # isfinite: inf passes "> 0" and NaN fails every comparison, "< 0" too
        for name in ("lr", "eps", "value_lr"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"optim.{name} must be finite and > 0, got {v!r}")
        if self.memory_lr is not None and not (
            math.isfinite(self.memory_lr) and self.memory_lr > 0
        ):
            raise ValueError(
                f"optim.memory_lr must be finite and > 0 (or null: optim.lr), got "
                f"{self.memory_lr!r}"
            )
        for name in ("weight_decay", "value_weight_decay", "grad_clip", "warmup_steps"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"optim.{name} must be finite and >= 0, got {v!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"optim.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.value_optimizer not in VALUE_OPTIMIZERS:
            raise ValueError(
                f"optim.value_optimizer must be one of {VALUE_OPTIMIZERS}, "
                f"got {self.value_optimizer!r}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")


def value_master(args: OptimArgs) -> bool | str:
    """``SparseValueAdam``'s ``master`` for ``args``: False, True (fp32) or ``"split"``."""
    if args.value_master and args.value_master_split:
        return "split"
    return args.value_master


def _undecayed(model: nn.Module) -> set[int]:
    """Matrices that are not weights: product keys (lookup addresses; with qk-norm their
    scale means nothing) and the qk-norm gain ``[heads, k_dim]`` (a norm gain, like the
    RMSNorm vectors), of every router (memory and PEER). Decay would shrink the gain and
    flatten the router's softmax."""
    out = set()
    for m in model.modules():
        if isinstance(m, ProductKeyRouter):
            out.update(id(p) for p in (m.keys, m.gain) if p is not None)
    return out


def param_groups(model: nn.Module, memory_apart: bool = False) -> dict[str, list[nn.Parameter]]:
    """``{"decay": [...], "no_decay": [...], "values": [...]}``, each parameter once; with
    ``memory_apart`` the memory layers' parameters other than their tables (and other than
    a retrofit's pretrained MLP beside them) go to ``memory_decay`` / ``memory_no_decay``."""
    values = {id(m.weight): m.weight for m in model.modules() if isinstance(m, MemoryValues)}
    undecayed = _undecayed(model)
    memory = set()
    if memory_apart:
        for m in model.modules():
            if isinstance(m, ProductKeyMemory):
                memory.update(id(p) for p in m.parameters())
                # a retrofit's pretrained MLP beside the memory (ParallelMemory) is the body's
                for mlp in m.modules():
                    if isinstance(mlp, SwiGLU):
                        memory.difference_update(id(p) for p in mlp.parameters())
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "values": []}
    if memory_apart:
        groups.update(memory_decay=[], memory_no_decay=[])
    groups["values"] = list(values.values())
    for p in model.parameters():  # parameters() already skips duplicates
        if id(p) in values or not p.requires_grad:
            continue
        name = "decay" if p.dim() >= 2 and id(p) not in undecayed else "no_decay"
        groups[f"memory_{name}" if id(p) in memory else name].append(p)
    return groups


# The DCP section (:meth:`Optimizers.distributed_state_dict`) of each optimizer.
DCP_SECTIONS = {"adamw": "optim", "values": "values_optim"}


class Optimizers:
    """The dense AdamW and the value optimizer of ``model``, stepped and saved as one:
    :meth:`state_dict` for one file, :meth:`distributed_state_dict` for DCP."""

    def __init__(self, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.model = model
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @property
    def clip_defer(self) -> torch.optim.Optimizer | None:
        """The value optimizer when it applies a clip's rescale itself (``defer_grad_scale``:
        :func:`clip_grad_norm_`'s ``defer_to``), else None."""
        values = self.optimizers.get("values")
        return values if hasattr(values, "defer_grad_scale") else None

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def check_saved(self, saved: dict[str, list]) -> None:
        """Refuse saved state of other optimizers or other parameter groups than this
        config makes (the single-file and the DCP load alike): ``saved`` maps each saved
        optimizer (``"adamw"``, ``"values"``) to its parameter groups' names; empty (a
        checkpoint saved without optimizer state) passes: the optimizers start fresh."""
        if not saved:
            return
        if set(saved) != set(self.optimizers):
            hint = ""
            if set(saved) ^ set(self.optimizers) == {"values"}:
                hint = (
                    ": optim.value_optimizer changed since the run started (adamw steps the "
                    "value tables inside the AdamW, sparse_adam* in an optimizer of their "
                    "own, 'values'); resume with the run's own optim.value_optimizer"
                )
            raise ValueError(
                f"optimizer state holds {sorted(saved)}, expected {sorted(self.optimizers)}" + hint
            )
        for name, opt in self.optimizers.items():
            now = [g.get("name") for g in opt.param_groups]
            if saved[name] != now:
                raise ValueError(
                    f"the checkpoint's {name} optimizer has parameter groups {saved[name]}, "
                    f"this config makes {now}: optim.memory_lr set (or unset) since the run "
                    f"started changes them; resume with the run's own optim.memory_lr"
                )

    @contextlib.contextmanager
    def current_hyperparameters(self):
        """Around a load of saved state: every group's hyperparameters (``lr``,
        ``base_lr``, ``weight_decay``, betas, eps, ...) are put back to those of the
        current config afterwards, so a resumed run may change them."""
        fresh = {
            name: [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            for name, opt in self.optimizers.items()
        }
        yield
        for name, opt in self.optimizers.items():
            for group, hyper in zip(opt.param_groups, fresh[name], strict=True):
                group.update(hyper)

    def load_state_dict(self, state: dict) -> None:
        """Restore moments and step counts; hyperparameters (``base_lr``, decay, betas)
        stay those of the current config, so a resumed run may change them."""
        self.check_saved(
            {name: [g.get("name") for g in s.get("param_groups", [])] for name, s in state.items()}
        )
        if not state:  # saved without optimizer state: the optimizers start fresh
            return
        with self.current_hyperparameters():
            for name, opt in self.optimizers.items():
                opt.load_state_dict(state[name])

    def distributed_state_dict(self, wrap_table=None) -> dict:
        """The state DCP saves, or loads in place: ``"optim"``, AdamW's state keyed by
        parameter name (``get_optimizer_state_dict``: FSDP shards as DTensors), and
        ``"values_optim"``, each value table's step and Adam moments keyed by its module
        name. ``wrap_table(container, key, table)`` may replace a table-shaped entry in
        place (a DTensor view of a column shard, :mod:`memlayers.checkpoint`)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        from memlayers.parallel import value_tables

        wrap = wrap_table or (lambda container, key, table: None)
        tables = value_tables(self.model)
        state = {}
        if "adamw" in self.optimizers:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizers["adamw"])
            for prefix, table in tables:
                moments = state["optim"]["state"].get(f"{prefix}.weight")
                for key in ("exp_avg", "exp_avg_sq") if moments else ():
                    wrap(moments, key, table)
        if "values" in self.optimizers:
            opt = self.optimizers["values"]
            state["values_optim"] = {}
            for prefix, table in tables:
                # Moments exist from the first step on; make them now to load into.
                st = opt.init_state(table.weight)
                entry = {k: st[k] for k in ("step", "exp_avg", "exp_avg_sq", "master") if k in st}
                wrap(entry, "exp_avg", table)
                if not opt.rowwise_v:  # a row-wise [N] vector is whole on every rank (mp=1)
                    wrap(entry, "exp_avg_sq", table)
                if "master" in entry:
                    wrap(entry, "master", table)
                state["values_optim"][prefix] = entry
        return state

    def load_distributed_state_dict(self, state: dict) -> None:
        """Finish a DCP load into :meth:`distributed_state_dict`'s tensors (table moments
        arrive in place; AdamW's state and the step counts are set here). The load checks
        the saved sections and groups first (:meth:`check_saved`, from the checkpoint's
        metadata): a checkpoint without optimizer state (saved for inference, or by one
        process for a distributed run) leaves the optimizers fresh, one of other
        optimizers or groups is refused. Hyperparameters
        stay those of the current config, as in :meth:`load_state_dict`. A master copy
        the checkpoint lacks (the entry without ``"master"``: saved without one) is made
        from the loaded table; one saved as the other kind (fp32 or split) is converted."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        with self.current_hyperparameters():
            if "optim" in state:
                set_optimizer_state_dict(self.model, self.optimizers["adamw"], state["optim"])
            opt = self.optimizers.get("values")
            if opt is not None and "values_optim" not in state:
                # No optimizer state saved: the moments start fresh, and a master copy
                # made (distributed_state_dict) before the tables loaded is the tables'.
                from memlayers.parallel import value_tables

                for _, table in value_tables(self.model):
                    opt.set_master(table.weight, None)
            for prefix, entry in state.get("values_optim", {}).items():
                weight = self.model.get_submodule(prefix).weight
                opt.state[weight]["step"] = int(entry["step"])
                if "master" not in entry:
                    opt.set_master(weight, None)
                elif entry["master"] is not opt.state[weight].get("master"):
                    # Saved as the other kind of master (checkpoint._read_as_saved).
                    opt.set_master(weight, entry["master"])


def uses_sparse_values(args: OptimArgs) -> bool:
    """Whether the value tables need row-sparse gradients: ``sparse_adam`` (and its
    row-wise variant) steps only the rows a step read. The model is built with it
    (``sparse_values``)."""
    return args.value_optimizer.startswith("sparse_adam")


def build_optimizer(model: nn.Module, args: OptimArgs, impl: str = "auto") -> Optimizers:
    """AdamW over the dense groups; the value tables per ``args.value_optimizer``.

    ``impl`` picks the sparse step's kernel (pass ``memory.impl``). The tables' gradient
    sparsity is the model's, decided when it was built
    (``build_model(..., sparse_values=uses_sparse_values(args))``); a mismatch is an error.
    """
    groups = param_groups(model, memory_apart=args.memory_lr is not None)
    value_lr = args.value_lr
    betas = (args.beta1, args.beta2)
    adamw_groups = []
    for prefix, lr in (("", args.lr), ("memory_", args.memory_lr)):
        for name, decay in (("decay", args.weight_decay), ("no_decay", 0.0)):
            if prefix + name in groups:
                adamw_groups.append(
                    dict(
                        name=prefix + name, params=groups[prefix + name],
                        weight_decay=decay, lr=lr, base_lr=lr,
                    )
                )  # fmt: skip
    values_group = dict(
        name="values",
        params=groups["values"],
        weight_decay=args.value_weight_decay,
        lr=value_lr,
        base_lr=value_lr,
    )
    sparse = uses_sparse_values(args)
    tables = [m for m in model.modules() if isinstance(m, MemoryValues)]
    if any(t.sparse_grad != sparse for t in tables):
        raise ValueError(
            f"optim.value_optimizer={args.value_optimizer!r} needs value tables built with "
            f"sparse_values={sparse}, but the model's are "
            f"{sorted({t.sparse_grad for t in tables})}: build the model with "
            f"sparse_values=uses_sparse_values(optim args)"
        )
    if not sparse and any(t.dtype == torch.bfloat16 for t in tables):
        # torch's AdamW would keep bf16 moments and round each update of the table to
        # nearest: updates below half a bf16 step (2^-9 to 2^-8 of the value) are lost.
        raise ValueError(
            f"bf16 value tables (model.memory.value_dtype=bf16) need a row-sparse value "
            f"optimizer, which stores them stochastically rounded: use "
            f"optim.value_optimizer=sparse_adam (or _rowwise, _bf16), not "
            f"{args.value_optimizer!r}"
        )
    if not sparse and any(t.grad_read != "float" for t in tables):
        # The packed output gradient is read by the merged walk, which only row-sparse
        # value gradients run: with a dense one the setting would do nothing.
        raise ValueError(
            f"model.memory.grad_read=int8 packs the output gradient that the merged walk of "
            f"row-sparse value gradients reads: use optim.value_optimizer=sparse_adam (or "
            f"_rowwise, _bf16), not {args.value_optimizer!r}"
        )
    rowwise_v = args.value_optimizer == "sparse_adam_rowwise"
    sharded = [t.shard.world for t in tables if t.shard is not None and t.shard.world > 1]
    if rowwise_v and sharded:
        # A shard sees D/mp columns: its mean of g² is not the row's. Correct would need an
        # all-reduce of the per-row sums over the mp group every step; not built (yet).
        raise ValueError(
            f"optim.value_optimizer='sparse_adam_rowwise' needs whole table rows, but the "
            f"value tables are split by columns over parallel.mp={sharded[0]} ranks: use "
            f"parallel.mp=1 or optim.value_optimizer=sparse_adam"
        )
    optimizers = {}
    if groups["values"] and not sparse:
        adamw_groups.append(values_group)
    adamw_groups = [g for g in adamw_groups if g["params"]]
    params = [p for g in adamw_groups for p in g["params"]]
    # One fused kernel for every parameter on a single CUDA device (no DTensor shards):
    # the foreach default launches several kernels per group and step.
    fused = bool(params) and all(p.is_cuda and type(p) is nn.Parameter for p in params)
    optimizers["adamw"] = torch.optim.AdamW(
        adamw_groups, lr=args.lr, betas=betas, eps=args.eps, fused=fused or None
    )
    copies = [t.read_copy for t in tables if t.read_copy is not None]
    if groups["values"] and not sparse and copies:
        # Tables read through an int8 copy (value_read=int8), stepped by AdamW: its fused
        # kernel moves no version counter, so the copies are told after each step (the
        # next lookup packs the whole table again; a dense step changes every row).

        def stale(*_) -> None:
            for copy in copies:
                copy.invalidate()

        optimizers["adamw"].register_step_post_hook(stale)
    if groups["values"] and sparse:
        optimizers["values"] = SparseValueAdam(
            [values_group], betas=betas, eps=args.eps, impl=impl, rowwise_v=rowwise_v,
            moments="bf16" if args.value_optimizer == "sparse_adam_bf16" else "fp32",
            master=value_master(args),
        )  # fmt: skip
    return Optimizers(model, optimizers)


def lr_multiplier(step: int, total_steps: int, args: OptimArgs) -> float:
    """Multiplier of ``base_lr`` at optimizer step ``step`` (1-based).

    Linear warmup from ``1/warmup`` to 1 over ``warmup_steps``, then cosine or linear decay
    to ``min_lr_ratio`` at ``total_steps``.
    """
    if args.warmup_steps and step <= args.warmup_steps:
        return step / args.warmup_steps
    if args.schedule == "constant":
        return 1.0
    span = max(1, total_steps - args.warmup_steps)
    progress = min(1.0, (step - args.warmup_steps) / span)
    if args.schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        decay = 1 - progress
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * decay


def set_lr(optimizer: Optimizers, step: int, total_steps: int, args: OptimArgs) -> float:
    """Set every group's ``lr`` for ``step``; returns the multiplier."""
    mult = lr_multiplier(step, total_steps, args)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * mult
    return mult


@torch.no_grad()
def clip_grad_norm_(
    params, max_norm: float, copies=None, all_reduce=None, defer_to=None
) -> torch.Tensor:
    """Global L2 norm over dense, row-sparse and sharded (DTensor) gradients; rescale them
    when above ``max_norm`` (``max_norm <= 0`` only measures). Returns a device scalar:
    nothing here waits for the device.

    ``defer_to``: a value optimizer (:class:`memlayers.value_optim.SparseValueAdam` or
    ``SparseValueSGD``): the gradients of ``params`` it steps are left as they are and it
    is handed the coefficient for them (``defer_grad_scale``), which its next step
    multiplies in (fp32) as it reads them: no pass over the table's gradient (the
    trainer's choice). The same update as rescaling an fp32 gradient in place; for a bf16
    gradient it skips the rounding of the rescaled gradient to bf16. Anything that reads
    those gradients before the step sees them unscaled, and a second clip before the step
    raises (its norm would miss the pending scale).

    ``torch.nn.utils.clip_grad_norm_`` rejects sparse gradients, and an uncoalesced sparse
    gradient (accumulation appends rows) would count a repeated row twice, so sparse
    gradients are coalesced first. Distributed (:mod:`memlayers.parallel`): each rank sums
    the squares of its local gradients, divided by ``copies(p)`` (how many ranks hold the
    same numbers), and ``all_reduce`` sums that over the ranks. Norms and the rescale run
    as foreach kernels (a few launches, not a few per parameter).
    """
    if defer_to is not None and not hasattr(defer_to, "defer_grad_scale"):
        raise TypeError(
            f"defer_to must be a value optimizer with defer_grad_scale (SparseValueAdam, "
            f"SparseValueSGD), got {type(defer_to).__name__}"
        )
    grads, divs = [], []
    stepped = set() if defer_to is None else {
        id(p) for g in defer_to.param_groups for p in g["params"]}  # fmt: skip
    deferred, deferred_params = set(), []  # the gradients defer_to scales, their params
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = coalesce_rows(p.grad)
            local = p.grad._values()
        else:
            local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        if id(p) in stepped:
            deferred.add(id(local))
            deferred_params.append(p)
        grads.append(local)
        divs.append(float(copies(p)) if copies is not None else 1.0)
    if deferred_params:  # before any work: a pending scale would make this norm wrong
        defer_to.check_no_scale_pending(deferred_params)
    device = grads[0].device if grads else None
    total = torch.zeros((), dtype=torch.float64, device=device)
    # Grouped by (dtype, copies): one foreach norm per group, and the divisor a Python
    # number (a tensor of divisors would be a host-to-device copy, which waits).
    groups: dict[tuple[torch.dtype, float], list[torch.Tensor]] = {}
    for g, div in zip(grads, divs, strict=True):
        groups.setdefault((g.dtype, div), []).append(g)
    for (dtype, div), group in groups.items():
        acc = torch.promote_types(dtype, torch.float32)  # fp32 at least, fp64 stays fp64
        norms = torch._foreach_norm(group, 2, dtype=acc)
        total = total + torch.stack(norms).double().square().sum() / div
    if all_reduce is not None:
        all_reduce(total)
    norm = total.sqrt().float()
    if max_norm > 0 and grads:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for (dtype, _), group in groups.items():
            group = [g for g in group if id(g) not in deferred]
            if group:
                torch._foreach_mul_(group, coef.to(dtype))
        if deferred_params:
            defer_to.defer_grad_scale(coef, deferred_params)
    return norm
