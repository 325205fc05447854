"""Memory usage statistics over a stream of lookups.

Lample et al. (2019, "Large Memory Layers with Product Keys", §4.4) judged a memory by
the share of its rows that are ever read and by how far the read weight is from uniform;
later implementations dropped these numbers. :class:`MemoryUsage` accumulates, per row,
how often it was read and with what total softmax weight, and reports:

- ``rows_used_pct``: percentage of rows read at least once;
- ``kl_uniform``: KL(p ‖ uniform) in nats of the weight distribution p (0 = perfectly
  even; ``log n_rows`` = all weight on one row);
- ``gini``: Gini coefficient of the per-row weight (0 = even, → 1 = concentrated);
- ``kl_uniform_count`` / ``gini_count``: the same over read counts instead of weights.
"""

from __future__ import annotations

import math

import torch


def kl_from_uniform(mass: torch.Tensor) -> float:
    """KL(p ‖ U) in nats, ``p = mass / mass.sum()``, over ``len(mass)`` outcomes."""
    p = mass.double() / mass.double().sum()
    p = p[p > 0]
    return float((p * (p * mass.numel()).log()).sum())


def gini(mass: torch.Tensor) -> float:
    """Gini coefficient of non-negative values: ``Σ (2i - n - 1) x_(i) / (n Σ x)``."""
    x, _ = mass.double().flatten().sort()
    n = x.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
    return float(((2 * i - n - 1) * x).sum() / (n * x.sum()))


class MemoryUsage:
    """Accumulates row reads of one value table; :meth:`report` gives the statistics."""

    def __init__(self, n_rows: int) -> None:
        if n_rows <= 0:
            raise ValueError(f"n_rows must be positive, got n_rows={n_rows}")
        self.n_rows = n_rows
        self.counts: torch.Tensor | None = None  # [n_rows] int64, on the lookups' device
        self.mass: torch.Tensor | None = None  # [n_rows] float64
        self.lookups = 0  # tokens seen

    @torch.no_grad()
    def update(self, indices: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Record one batch: ``indices [B, K]`` rows read, ``weights [B, K]`` their weight
        (uniform 1 when omitted)."""
        idx = indices.reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n_rows):
            raise ValueError(
                f"indices must be in [0, {self.n_rows}), got range "
                f"[{int(idx.min())}, {int(idx.max())}]"
            )
        if self.counts is None:
            self.counts = torch.zeros(self.n_rows, dtype=torch.int64, device=idx.device)
            self.mass = torch.zeros(self.n_rows, dtype=torch.float64, device=idx.device)
        w = (
            torch.ones_like(idx, dtype=torch.float64)
            if weights is None
            else weights.reshape(-1).detach().double()
        )
        if w.numel() != idx.numel():
            raise ValueError(
                f"weights must match indices, got {tuple(weights.shape)} vs {tuple(indices.shape)}"
            )
        self.counts += torch.bincount(idx, minlength=self.n_rows)
        self.mass.index_add_(0, idx, w)
        self.lookups += indices.shape[0] if indices.dim() > 1 else 1

    def report(self) -> dict[str, float]:
        """The statistics as a dict of floats (see the module docstring)."""
        if self.counts is None or int(self.counts.sum()) == 0:
            raise ValueError("no lookups recorded: call update() with at least one row")
        return {
            "rows_used_pct": 100.0 * float((self.counts > 0).double().mean()),
            "kl_uniform": kl_from_uniform(self.mass),
            "gini": gini(self.mass),
            "kl_uniform_count": kl_from_uniform(self.counts),
            "gini_count": gini(self.counts),
            "kl_max": math.log(self.n_rows),
            "lookups": float(self.lookups),
        }
