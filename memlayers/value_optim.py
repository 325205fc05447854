"""Optimizers for value tables: row-wise lazy Adam and SGD.

A dense AdamW over a 1M × 1024 fp32 table reads and writes param, grad and two moments
for every row, ~16 GB per step, while a step touches at most ``tokens × heads × topk``
rows. With ``sparse_grad=True`` the lookup returns a coalesced sparse COO gradient; these
optimizers then update only its rows ("lazy" Adam: an untouched row keeps its parameter
and moments bit-identical, as in ``torch.optim.SparseAdam``). A dense gradient updates
every row (plain Adam / SGD). Moments are fp32 whatever the table's dtype; bias correction
uses the optimizer's global step count.
"""

from __future__ import annotations

import math

import torch


def _rows_and_grad(p: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(rows [U] or None for all rows, grad rows [U or N, D])`` of ``p.grad``."""
    g = p.grad
    if g.is_sparse:
        g = g.coalesce()
        return g.indices()[0], g.values()
    return None, g


def row_adam_step_(
    param: torch.Tensor,
    rows: torch.Tensor | None,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Adam(W) on ``param[rows]`` (all rows when ``rows`` is None), in place, fp32 math.

    The arithmetic follows ``torch.optim.Adam``'s order (denominator ``sqrt(v)/sqrt(bc2)
    + eps``, step ``lr / bc1``) so touched rows match it; decay is decoupled (AdamW).
    """
    sel = slice(None) if rows is None else rows
    g = grad.float()
    m = exp_avg[sel].mul_(beta1).add_(g, alpha=1 - beta1)
    v = exp_avg_sq[sel].mul_(beta2).addcmul_(g, g, value=1 - beta2)
    p = param[sel].float()
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bc1)
    exp_avg[sel] = m
    exp_avg_sq[sel] = v
    param[sel] = p.to(param.dtype)


class SparseValueAdam(torch.optim.Optimizer):
    """Row-wise lazy Adam(W) for value tables; fp32 moments; sparse or dense gradients."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got lr={lr!r}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got betas={betas!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got eps={eps!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got weight_decay={weight_decay!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                rows, g = _rows_and_grad(p)
                row_adam_step_(
                    p,
                    rows,
                    g,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    state["step"],
                    group["lr"],
                    beta1,
                    beta2,
                    group["eps"],
                    group["weight_decay"],
                )
        return loss


class SparseValueSGD(torch.optim.Optimizer):
    """Row-wise SGD for value tables: ``p[rows] -= lr * g`` on the touched rows only."""

    def __init__(self, params, lr=1e-2):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got lr={lr!r}")
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, g = _rows_and_grad(p)
                sel = slice(None) if rows is None else rows
                p[sel] = (p[sel].float() - group["lr"] * g.float()).to(p.dtype)
        return loss
