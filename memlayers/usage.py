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

:class:`TrainingUsage` gives the trainer the count statistics of every memory layer, per
log window, at almost no cost: :class:`RowCounts` on the device, no host sync per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # memory.py imports this module
    from memlayers.memory import ProductKeyMemory


def kl_uniform(mass: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ U) in nats over the last dim of ``mass [..., n]``, ``p = mass / Σ mass``
    (``0 · log 0 = 0``): a float64 tensor ``[...]`` on ``mass``'s device, no host sync (so
    an all-zero row is not refused: its KL is NaN; :func:`kl_from_uniform` refuses it)."""
    m = mass.double()
    p = m / m.sum(-1, keepdim=True)
    return torch.xlogy(p, p * m.shape[-1]).sum(-1)


def gini_coefficient(mass: torch.Tensor) -> torch.Tensor:
    """Gini coefficient over the last dim of non-negative ``mass [..., n]``,
    ``Σ (2i - n - 1) x_(i) / (n Σ x)`` with ``x_(i)`` sorted ascending: float64 ``[...]``
    on ``mass``'s device, no host sync (one sort: meant for log steps, not every step); an
    all-zero row gives NaN (:func:`gini` refuses it)."""
    x = mass.sort(-1).values.double()
    n = x.shape[-1]
    i = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
    return ((2 * i - n - 1) * x).sum(-1) / (n * x.sum(-1))


def _distribution(mass: torch.Tensor, what: str) -> torch.Tensor:
    """``mass`` flattened, refused (ValueError) unless it is non-negative with a positive
    finite sum: an all-zero (or empty) mass is no distribution, and its KL and Gini would
    be 0/0 = NaN."""
    m = mass.flatten()
    total = float(m.double().sum()) if m.numel() else 0.0
    negative = bool((m < 0).any())
    if not (math.isfinite(total) and total > 0) or negative:
        raise ValueError(
            f"{what} needs non-negative values with a positive finite sum, got "
            f"{m.numel()} values summing to {total:g}" + (" (some negative)" if negative else "")
        )
    return m


def kl_from_uniform(mass: torch.Tensor) -> float:
    """KL(p ‖ U) in nats, ``p = mass / mass.sum()``, over ``len(mass)`` outcomes. An
    all-zero (or empty) ``mass``, which defines no p, is refused (ValueError)."""
    return float(kl_uniform(_distribution(mass, "kl_from_uniform")))


def gini(mass: torch.Tensor) -> float:
    """Gini coefficient of non-negative values: ``Σ (2i - n - 1) x_(i) / (n Σ x)``. All
    zero (or none) is refused (ValueError), as :func:`kl_from_uniform` refuses it."""
    return float(gini_coefficient(_distribution(mass, "gini")))


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
        if not float(self.mass.sum()) > 0:  # rows read, all with weight 0: no distribution
            raise ValueError(
                f"the {int(self.counts.sum())} reads recorded have a total weight of "
                f"{float(self.mass.sum()):g}: the weight statistics (kl_uniform, gini) need "
                f"a positive one"
            )
        return {
            "rows_used_pct": 100.0 * float((self.counts > 0).double().mean()),
            "kl_uniform": kl_from_uniform(self.mass),
            "gini": gini(self.mass),
            "kl_uniform_count": kl_from_uniform(self.counts),
            "gini_count": gini(self.counts),
            "kl_max": math.log(self.n_rows),
            "lookups": float(self.lookups),
        }


class RowCounts:
    """Read counts of one layer's rows, kept on the device for the trainer.

    On a GPU, per lookup the ``N · heads · topk`` indices are sorted (as int32: a radix
    sort of 32-bit keys) and each row's count is the width of its run in the sorted keys,
    found by a binary search for every row boundary: ``counts += diff(searchsorted(sorted,
    [0, …, n_rows]))``. No atomics: an ``index_add_`` of ones costs as much as the
    contention on the most read rows, which early in training (or in a collapsed memory)
    is most of the reads on a few rows — compiled by Inductor it took 245 ms for one
    layer's zipf-distributed reads on an H200, the sort 0.29 ms for any distribution
    (benchmarks/bench_usage_counts.py). On the CPU, where a sort costs far more than the
    adds, it is ``index_add_``. No host sync, static shapes (the boundaries are a fixed
    ``[n_rows + 1]``), so inside a compiled forward it adds no graph break. Weights are not
    accumulated: a float scatter whose atomics make the sums differ run to run, for a
    statistic that the counts already give. There is no range check (a host sync): the
    lookup kernels check the indices.
    """

    def __init__(
        self, n_rows: int, device: torch.device | str | None = None, sort: bool | None = None
    ) -> None:
        """``sort``: count by sorting (None: on a GPU) rather than by ``index_add_``."""
        if n_rows <= 0:
            raise ValueError(f"n_rows must be positive, got n_rows={n_rows}")
        if n_rows >= 2**31:
            raise ValueError(f"n_rows must be below 2**31 (int32 row ids), got {n_rows}")
        self.n_rows = n_rows
        self.counts = torch.zeros(n_rows, dtype=torch.int64, device=device)  # [n_rows]
        self.sort = self.counts.is_cuda if sort is None else sort
        # [n_rows + 1] row boundaries for the binary search (sort only)
        self.edges = torch.arange(n_rows + 1 if self.sort else 0, dtype=torch.int32, device=device)

    @torch.no_grad()
    def update(self, indices: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Count the rows ``indices [N, K]`` (``weights`` is ignored: the signature is
        :meth:`MemoryUsage.update`'s)."""
        idx = indices.reshape(-1)  # [N*K]
        if not self.sort:
            self.counts.index_add_(0, idx, idx.new_ones(()).expand_as(idx))
            return
        keys = torch.sort(idx.to(torch.int32)).values
        starts = torch.searchsorted(keys, self.edges, out_int32=True)  # [n_rows + 1]
        self.counts += starts.diff()


# The columns of TrainingUsage.collect, in order.
TRAINING_STATS = ("rows_used_pct", "rows_ever_used_pct", "kl_uniform_count", "gini_count")


class TrainingUsage:
    """Count statistics of every memory layer's reads over the trainer's log windows.

    ``layers`` maps a name (``block_<i>``, as ``memlayers eval`` names them) to a
    :class:`~memlayers.memory.ProductKeyMemory`; each gets a :class:`RowCounts` counting
    its training-mode lookups (validation passes are not counted). ``shared``: the layers
    read one value table, whose reads (the sum of the layers' counts) are reported too, as
    ``shared_table``. At a log step :meth:`collect` computes, on the device, per layer and
    for the shared table:

    - ``rows_used_pct``: rows read at least once in the window;
    - ``rows_ever_used_pct``: rows read at least once since the run's first step
      (:meth:`state_dict` carries it across a resume);
    - ``kl_uniform_count``, ``gini_count``: KL from uniform and Gini of the window's read
      counts (the statistics of :meth:`MemoryUsage.report` of the same name);

    then zeroes the counts for the next window. Per log step: a copy of the counts
    (``R × n_rows`` int64, R = layers + shared), an all-reduce of it when the run is
    distributed (each rank counts its own tokens: the statistics are the global batch's),
    a sort of it for the Gini, a few reductions, and one ``[R, 4]`` float64 result.
    """

    def __init__(self, layers: dict[str, ProductKeyMemory], shared: bool) -> None:
        if not layers:
            raise ValueError("TrainingUsage needs at least one memory layer")
        rows = {name: layer.config.n_rows for name, layer in layers.items()}
        if len(set(rows.values())) > 1:
            raise ValueError(f"memory layers of different sizes are not supported: {rows}")
        self.n_rows = next(iter(rows.values()))
        self.shared = shared
        self.names = list(layers) + (["shared_table"] if shared else [])
        self.layers = list(layers.values())
        self.counters = [layer.track_usage(training=True) for layer in self.layers]
        device = self.counters[0].counts.device
        self.seen = torch.zeros(len(self.names), self.n_rows, dtype=torch.bool, device=device)

    @torch.no_grad()
    def collect(self, all_reduce: Callable[[torch.Tensor], object] | None = None) -> torch.Tensor:
        """The window's statistics, ``[len(names), len(TRAINING_STATS)]`` float64 on the
        device (no host sync), and a fresh window. ``all_reduce``: sums a tensor over the
        ranks in place (``torch.distributed.all_reduce``; every rank must call)."""
        counts = torch.stack([c.counts for c in self.counters])  # [L, n_rows]
        for c in self.counters:
            c.counts.zero_()
        if all_reduce is not None:
            all_reduce(counts)
        if self.shared:
            counts = torch.cat([counts, counts.sum(0, keepdim=True)])  # [R, n_rows]
        used = counts > 0
        self.seen |= used
        return torch.stack(
            [
                100.0 * used.double().mean(-1),
                100.0 * self.seen.double().mean(-1),
                kl_uniform(counts),
                gini_coefficient(counts),
            ],
            dim=-1,
        )  # [R, 4]

    def record(self, stats: list[float]) -> dict[str, float]:
        """``{"usage/<name>/<stat>": value}`` of :meth:`collect`'s result read to the host
        and flattened (``collect(...).flatten().tolist()``)."""
        keys = [f"usage/{name}/{stat}" for name in self.names for stat in TRAINING_STATS]
        if len(stats) != len(keys):
            raise ValueError(f"expected {len(keys)} statistics ({self.names}), got {len(stats)}")
        return dict(zip(keys, stats, strict=True))

    def close(self) -> None:
        """Stop counting: the layers drop their counters."""
        for layer in self.layers:
            layer.track_usage(False)

    def state_dict(self) -> dict:
        """What a resumed run needs: the rows read so far (a checkpoint is a window's end)."""
        return {"names": list(self.names), "seen": self.seen.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names or tuple(state["seen"].shape) != tuple(self.seen.shape):
            raise ValueError(
                f"the checkpoint's usage statistics are of {state['names']} "
                f"{tuple(state['seen'].shape)}, the model's {self.names} {tuple(self.seen.shape)}"
            )
        self.seen.copy_(state["seen"])
