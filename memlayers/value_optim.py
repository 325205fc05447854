"""Optimizers for value tables: row-wise lazy Adam and SGD.

A dense AdamW over a 1M × 1024 fp32 table reads and writes param, grad and two moments
for every row, ~16 GB per step, while a step touches at most ``tokens × heads × topk``
rows. With ``sparse_grad=True`` the lookup returns a coalesced sparse COO gradient; these
optimizers then update only its rows ("lazy" Adam: an untouched row keeps its parameter
and moments bit-identical, as in ``torch.optim.SparseAdam``). A dense gradient updates
every row (plain Adam / SGD). Moments are fp32 whatever the table's dtype (bf16 as an
option, below); bias correction uses the optimizer's global step count.

``SparseValueAdam(..., rowwise_v=True)`` keeps one fp32 second moment per row (the running
mean over the row of ``g²``, as embedding-table trainers' row-wise Adagrad/Adam do):
``[N, D] + [N]`` of state instead of ``2 × [N, D]``, and 30-36% fewer bytes moved per
touched row (counted: 20·D + 8 vs 28·D for an fp32 table, 14·D + 8 vs 22·D for bf16; GPU
time not yet measured).

``SparseValueAdam(..., moments="bf16")`` stores ``exp_avg`` and an element-wise
``exp_avg_sq`` in bf16, stochastically rounded (fp32 arithmetic in the step; unbiased
rounding, deterministic per step: :mod:`memlayers.ops.row_adam`): half the state, 29-36%
fewer bytes per touched row (20·D vs 28·D for an fp32 table, 14·D vs 22·D for bf16).

A bf16 table (``model.memory.value_dtype=bf16``) is stored stochastically rounded from
each step's fp32 result by both optimizers (unbiased, so updates far below a bf16 step
still move it; bits of their own, deterministic per step: :mod:`memlayers.ops.row_adam`).
Bytes per touched row with a bf16 table (and its bf16 gradient): 22·D with fp32
moments, 14·D with bf16 moments, 14·D + 8 with a row-wise v, against 28·D for an fp32
table with fp32 moments; SGD 6·D against 12·D (counted; GPU time not yet measured).

``SparseValueAdam(..., master=True)`` (the trainer's default, ``optim.value_master``)
keeps instead an fp32 master copy of each bf16 table in its state (``state["master"]``,
made from the table at the first step or load): the step reads and writes the master and
stores the table rounded to nearest. That is mixed precision as autocast does it for
every other weight (fp32 weights, bf16 copies for the products): no update is lost and
the lookups still read half the bytes of an fp32 table's rows (the forward, the score
gradient), for 28·D bytes per touched row in the step, as an fp32 table's. State: 4 + 8
bytes per element beside the 2 of the table, against 4 + 8 for an fp32 table.
``master="split"`` (``optim.value_master_split``) keeps the same fp32 values in half the
bytes: the table is their high half (rounded to nearest, ties away from zero) and the
state ``state["master"]`` an int16 ``[N, D]`` of the remainders
(:func:`memlayers.ops.row_adam.split_master`). The steps are the fp32 master's bit for
bit, 2 bytes fewer a touched value (18·D with bf16 moments against 20·D) and 2 bytes of
state fewer a value. A saved master of either kind loads into either (an fp32 one into a
split master moves the table to the master's high half: the two roundings differ at
exact ties).

The steps run as Triton kernels on CUDA (``impl="auto"``) and as the PyTorch references
elsewhere; both live in :mod:`memlayers.ops.row_adam`.
"""

from __future__ import annotations

import math

import torch

from memlayers.memory import _positive_number
from memlayers.ops.embedding_bag import IMPLS, resolve_impl
from memlayers.ops.read_copy import READ_COPY
from memlayers.ops.row_adam import (
    join_master,
    row_adam_step_,
    row_sgd_step_,
    row_slices,
    split_master,
)

__all__ = [
    "SparseValueAdam",
    "SparseValueSGD",
    "coalesce_rows",
    "row_adam_step_",
    "row_sgd_step_",
]


MOMENTS = {"fp32": torch.float32, "bf16": torch.bfloat16}
# SparseValueAdam's ``master``: none, an fp32 copy, or the table's remainders (int16).
MASTERS = {False: None, True: torch.float32, "fp32": torch.float32, "split": torch.int16}

# The attribute :func:`memlayers.parallel.shard_values_` sets on a column-sharded table's
# parameter (its :class:`~memlayers.parallel.ColumnShard`).
COLUMN_SHARD = "_memlayers_column_shard"


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")


def coalesce_rows(grad: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """A row-sparse gradient ``[N, D]`` (COO, one sparse dim) with each row once, ascending.

    The lookup's own gradient is coalesced as built (AccumulateGrad drops the flag; a
    sortedness check restores it). A sum of several (three Memory+ layers on one shared
    table: autograd concatenates their rows) is summed here by the lookup's backward walk
    (:func:`memlayers.ops.embedding_bag_triton.sum_rows`: fp32 sums, deterministic) on
    CUDA, where ``torch.Tensor.coalesce`` sorts and adds far slower; ``coalesce()`` elsewhere.
    Dense gradients come back unchanged.
    """
    _check_impl(impl)
    if not grad.is_sparse or grad.is_coalesced():
        return grad
    rows = grad._indices()[0]
    # One comparison (and one host sync) instead of a copy of [U, D].
    if rows.numel() <= 1 or bool((rows[1:] > rows[:-1]).all()):
        return grad._coalesced_(True)
    if grad.sparse_dim() != 1 or resolve_impl(impl, grad.device) != "triton":
        return grad.coalesce()
    from memlayers.ops.embedding_bag_triton import sum_rows

    distinct, sums = sum_rows(rows, grad._values(), grad.shape[0])
    return torch.sparse_coo_tensor(
        distinct.unsqueeze(0), sums, grad.shape, is_coalesced=True, check_invariants=False
    )


def _rows_and_grad(p: torch.Tensor, impl: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(rows [U] or None for all rows, grad rows [U or N, D])`` of ``p.grad``."""
    g = p.grad
    if g.is_sparse:
        g = coalesce_rows(g, impl)
        return g.indices()[0], g.values().contiguous()
    return None, g.contiguous()


class _RowOptimizer(torch.optim.Optimizer):
    """The shared frame of the row-wise optimizers: ``impl`` and ``lr`` checks, the
    closure, and a loop over parameters with a gradient handing each one's touched rows
    (or all rows) to :meth:`_update`."""

    def __init__(self, params, defaults: dict, impl: str):
        _check_impl(impl)
        self.impl = impl
        self.check_group(defaults)  # the defaults' errors before any group's
        super().__init__(params, defaults)
        # id(param) -> the [1] fp32 factor its next step multiplies its gradient by
        self.grad_scales: dict[int, torch.Tensor] = {}

    def check_group(self, group: dict) -> None:
        """Raise ``ValueError`` naming a hyperparameter of ``group`` that is out of range
        or not finite (the constructor's defaults and every group added)."""
        _positive_number("lr", group["lr"])

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer``'s, the group's values checked before it is added."""
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        self.check_group({**self.defaults, **group})
        super().add_param_group(group)

    def defer_grad_scale(self, coef: torch.Tensor, params) -> None:
        """The next :meth:`step` multiplies the gradients of ``params`` (parameters this
        optimizer steps) by ``coef`` (a one-element tensor on their device) as it reads
        them: a clip's rescale (:func:`memlayers.optim.clip_grad_norm_` with ``defer_to``)
        without a pass of its own over a table's gradient (1.4 GB at 134m's touched rows,
        bf16). One scale per parameter between steps (a second raises: a norm measured
        then would miss the first); :meth:`zero_grad` drops them with the gradients."""
        coef = coef.detach().float().reshape(1)
        params = list(params)
        self.check_no_scale_pending(params)
        for p in params:
            self.grad_scales[id(p)] = coef

    def check_no_scale_pending(self, params) -> None:
        """Raise ``RuntimeError`` if any of ``params`` has a deferred scale not yet applied."""
        if any(id(p) in self.grad_scales for p in params):
            raise RuntimeError(
                "a clip's scale of these gradients is already pending (defer_grad_scale): "
                "clip once between optimizer steps, or clip without defer_to"
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.grad_scales = {}
        super().zero_grad(set_to_none=set_to_none)

    def _update(self, p: torch.Tensor, group: dict, rows, grad: torch.Tensor, scale) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scales, self.grad_scales = self.grad_scales, {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    rows, g = _rows_and_grad(p, self.impl)
                    # A table whose lookups read an int8 copy: only the stepped rows
                    # are packed again (memlayers/ops/read_copy.py).
                    copy = getattr(p, READ_COPY, None)
                    if copy is not None:
                        copy.sync(p, self.impl)
                    self._update(p, group, rows, g, scales.get(id(p)))
                    if copy is not None:
                        copy.refresh_rows_(p, rows, self.impl)
        return loss


class SparseValueAdam(_RowOptimizer):
    """Row-wise lazy Adam(W) for value tables; sparse or dense gradients.

    ``impl``: ``"auto"`` (Triton on CUDA) | ``"torch"`` | ``"triton"``. ``rowwise_v``:
    ``exp_avg_sq`` is ``[N]``, one second moment per row, updated with the row's mean of
    ``g²`` (``m`` stays ``[N, D]``). ``moments``: ``"fp32"`` | ``"bf16"`` (stochastically
    rounded; a row-wise ``exp_avg_sq`` stays fp32). ``master``: a bf16 (any non-fp32)
    table gets an fp32 master copy in the state (``True`` or ``"fp32"``), the table stored
    rounded to nearest from it, or a bf16 table a split master (``"split"``: the int16
    remainders of the fp32 values whose high half the table is; other non-fp32 tables
    then keep the fp32 copy); without (``False``), the table is stored stochastically
    rounded.
    """

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, impl="auto",
        rowwise_v=False, moments="fp32", master=False,
    ):  # fmt: skip
        if moments not in MOMENTS:
            raise ValueError(f"moments must be one of {tuple(MOMENTS)}, got moments={moments!r}")
        self.rowwise_v = bool(rowwise_v)  # before the groups: their check reads it
        self.moments = moments
        if isinstance(master, str) and master not in MASTERS or not isinstance(master, bool | str):
            raise ValueError(f"master must be one of False, True, 'fp32', 'split', got "
                             f"master={master!r}")  # fmt: skip
        self.master = MASTERS[master] is not None
        self.master_dtype = MASTERS[master]
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, impl)

    def check_group(self, group: dict) -> None:
        super().check_group(group)
        betas = group["betas"]
        if not (len(betas) == 2 and all(math.isfinite(b) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got betas={betas!r}")
        _positive_number("eps", group["eps"])
        _positive_number("weight_decay", group["weight_decay"], allow_zero=True)
        if self.rowwise_v:
            for p in group.get("params", ()):
                shard = getattr(p, COLUMN_SHARD, None)
                if shard is not None and shard.world > 1:
                    raise ValueError(
                        f"rowwise_v=True needs whole table rows, but a table of shape "
                        f"{tuple(p.shape)} is split by columns over {shard.world} ranks "
                        f"(parallel.mp={shard.world}): its mean of g² over a row would "
                        f"cover this rank's columns only. Use rowwise_v=False "
                        f"(optim.value_optimizer=sparse_adam) or parallel.mp=1"
                    )

    def has_master(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s state holds a master copy (``master`` and a non-fp32 ``p``)."""
        return self.master and p.dtype != torch.float32

    def master_kind(self, p: torch.Tensor) -> torch.dtype:
        """The dtype of ``p``'s master: int16 remainders for a bf16 table with
        ``master="split"`` (only bf16 is an fp32 value's high half), else fp32."""
        split = self.master_dtype == torch.int16 and p.dtype == torch.bfloat16
        return torch.int16 if split else torch.float32

    def moment_dtype(self, key: str) -> torch.dtype:
        """The dtype ``exp_avg`` / ``exp_avg_sq`` are kept in."""
        if key == "exp_avg_sq" and self.rowwise_v:
            return torch.float32
        return MOMENTS[self.moments]

    def init_state(self, p: torch.Tensor) -> dict:
        """``p``'s state before its first step (zero moments, step 0), made now."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype("exp_avg"))
            sq_shape = p.shape[:1] if self.rowwise_v else p.shape
            state["exp_avg_sq"] = p.new_zeros(sq_shape, dtype=self.moment_dtype("exp_avg_sq"))
            self.set_master(p, None)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer``'s, but the moments keep the saved values in this
        optimizer's moment dtype: the base class casts floating state to the parameter's
        dtype, which for a bf16 table would round fp32 moments. Saved moments of the other
        dtype are converted (fp32 → bf16 rounds once, to nearest), as a DCP load into this
        optimizer's state does (:meth:`memlayers.optim.Optimizers.distributed_state_dict`).
        A saved master copy of either kind is converted to this optimizer's
        (:meth:`set_master`), made from the (loaded) table when none was saved, and
        dropped when this optimizer keeps none."""
        saved = state_dict["state"]
        params = [p for g in self.param_groups for p in g["params"]]
        # The saved state is keyed by the ids its param_groups list (0..n-1 from
        # state_dict(); torch's distributed helpers key by parameter name), in the order
        # of this optimizer's parameters, as the base class pairs them.
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        pairs = [(p, saved.get(i, {})) for i, p in zip(ids, params, strict=False)]
        if len(ids) == len(params):  # else the base class names the mismatch
            for p, st in pairs:  # every check before any state changes
                for key in ("exp_avg", "master"):
                    if key in st and tuple(st[key].shape) != tuple(p.shape):
                        raise ValueError(
                            f"saved {key} is {tuple(st[key].shape)} but the value table is "
                            f"{tuple(p.shape)}: the table's shape changed since the state "
                            f"was saved (model.memory.n_keys or the value dim)"
                        )
                if "exp_avg_sq" in st:
                    self.check_saved_sq(st["exp_avg_sq"].shape, p.shape)
        super().load_state_dict(state_dict)
        for p, st in pairs:  # the saved values, not the base class's copies
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    want = self.moment_dtype(key)
                    self.state[p][key] = st[key].to(p.device, want).clone()
            self.set_master(p, st.get("master"))

    def check_saved_sq(self, saved, table, what: str = "saved exp_avg_sq") -> None:
        """A saved second moment of shape ``saved`` for a table of shape ``table`` must be
        what this optimizer keeps: ``[N]`` row-wise, else ``[N, D]`` (a one-file load
        checks the tensor, a DCP load the checkpoint's metadata before reading it)."""
        want = tuple(table[:1] if self.rowwise_v else table)
        other = tuple(table if self.rowwise_v else table[:1])
        if tuple(saved) != want and tuple(saved) != other:
            raise ValueError(
                f"{what} is {tuple(saved)} but the value table is {tuple(table)}: the "
                f"table's shape changed since the state was saved (model.memory.n_keys or "
                f"the value dim)"
            )
        if tuple(saved) != want:
            raise ValueError(
                f"{what} is {tuple(saved)} but this optimizer (rowwise_v={self.rowwise_v}) "
                f"keeps {want}: optim.value_optimizer changed since the run started; resume "
                f"with the run's own optim.value_optimizer"
            )

    @torch.no_grad()
    def set_master(self, p: torch.Tensor, saved: torch.Tensor | None) -> None:
        """``p``'s master copy (its state made or loaded): ``saved``, or ``p`` itself when
        nothing was saved; none when this optimizer keeps none. ``saved`` may be of either
        kind (fp32 values or a split master's int16 remainders beside ``p``): it is
        converted to this optimizer's, exactly; an fp32 one into a split master sets ``p``
        to the values' high half (:func:`memlayers.ops.row_adam.split_master`)."""
        state = self.state[p]
        if not self.has_master(p):
            state.pop("master", None)
            return
        if not state:
            return
        split = self.master_kind(p) == torch.int16
        if saved is None:  # the table's own values: a bf16 value's remainder is 0
            if split:
                state["master"] = torch.zeros_like(p, dtype=torch.int16)
            else:
                state["master"] = p.detach().float().contiguous()
            return
        saved = saved.to(p.device)
        if split == (saved.dtype == torch.int16):  # the same kind: as saved
            state["master"] = saved.to(self.master_kind(p)).contiguous().clone()
            return
        # The other kind, converted a piece of rows at a time (as the reference step
        # walks them): the bit arithmetic's int64 temporaries are 8 bytes a value.
        out = torch.empty_like(p, dtype=self.master_kind(p))
        table = p.detach()
        for rows in row_slices(*p.shape):
            if split:
                table[rows], out[rows] = split_master(saved[rows].float())
            else:
                out[rows] = join_master(table[rows], saved[rows])
        state["master"] = out

    def _update(self, p, group, rows, grad, scale):
        state = self.init_state(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        row_adam_step_(
            p, rows, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"],
            beta1, beta2, group["eps"], group["weight_decay"], impl=self.impl,
            rowwise_v=self.rowwise_v, master=state.get("master"), grad_scale=scale,
            check_range=False,  # a coalesced gradient's rows: in the table by making
        )  # fmt: skip


class SparseValueSGD(_RowOptimizer):
    """Row-wise SGD for value tables: ``p[rows] -= lr * g`` on the touched rows only.

    ``impl``: ``"auto"`` (Triton on CUDA) | ``"torch"`` | ``"triton"``. The state is a
    step count per parameter (in ``state_dict``): it seeds a bf16 table's stochastic
    rounding, so a resumed run draws the bits the uninterrupted one would.
    """

    def __init__(self, params, lr=1e-2, impl="auto"):
        super().__init__(params, dict(lr=lr), impl)

    def _update(self, p, group, rows, grad, scale):
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        row_sgd_step_(p, rows, grad, state["step"], group["lr"], impl=self.impl,
                      grad_scale=scale, check_range=False)  # fmt: skip
