"""Teach a trained run new text: sparse memory finetuning, full finetuning or LoRA.

    memlayers finetune runs/tiny-memory-plus --data new_facts.txt            # sparse-memory
    memlayers finetune runs/tiny-memory-plus --data new_facts.txt --top-t 500 --steps 100
    memlayers finetune runs/tiny-memory-plus --data new_facts.txt --method full
    memlayers finetune runs/tiny-memory-plus --data new_facts.txt --method lora --rank 8
    memlayers finetune RUN --data new.txt --out runs/ft [--overwrite] [--background old.txt]
    memlayers eval runs/tiny-memory-plus-ft-sparse-memory     # loads like any run

The methods, on the same data, steps and batch (GitHub issue 11; Lin et al. 2025,
"Continual learning via sparse memory finetuning"):

- ``sparse-memory``: every parameter frozen but the value tables. Each step counts the
  rows its batch reads (summed over the layers reading a table) and ranks them by how
  specific that use is to the new data, TF-IDF-like against the background sequences
  that read each row, counted once at the start (:func:`specificity_scores`); only the
  top ``top_t`` rows keep their gradient and the lazy row-wise Adam
  (:class:`memlayers.value_optim.SparseValueAdam`) updates only them: every other row,
  and its moments, stays bit-identical, and so does every other tensor (the routers route
  in eval mode, by their running query statistics, as the background pass does:
  :func:`train_mode_`). A token of the tiny Memory+ model reads 3 layers
  × 2 heads × 16 = 96 rows, so a 16 × 128 batch makes ~197k reads of its 16,384 rows; the
  default ``top_t=500`` (3% of that table) keeps the few rows most specific to the batch;
  a table of 1M rows may want more (not measured here).
- ``full``: every parameter trained with the run's own optimizer setup (AdamW, and its
  value-table optimizer at the run's ratio of value to dense learning rate).
- ``lora``: rank-``r`` adapters ``W x + (B A x)·α/r`` (A random, B zero: step 0 is the
  base model) on the attention projections and the feed-forward / Memory+ gating linears,
  everything else frozen; merged into the weights when saved, so the output is a plain run.

The data file is UTF-8 text, one document per line (blank lines skipped), each encoded
with the run's tokenizer and ended by EOS; the stream is repeated to whole batches, so that
every token is a target within the first epoch (:func:`training_stream`). The background
is by default ``background_batches`` batches of the run's own training split
(``--background FILE`` reads a text file instead). The learning rate is constant; by
default the run's ``optim.value_lr`` for sparse-memory and ``optim.lr`` for full and lora.
Options of another method (``--rank`` with sparse-memory, ``--top-t`` with lora, ...) are
refused.

The new run directory (never the source; an existing non-empty one only with
``--overwrite``) holds the source's ``config.yaml`` (its ``run_dir`` the new directory)
and ``tokenizer.json`` (so ``eval`` measures the run's own held-out text and QA),
``checkpoints/step_XXXXXX`` at the source's step + ``steps`` and ``finetune.json``
(method, settings, source checkpoint, per-step loss and rows updated). It is written into
a hidden temporary directory and renamed into place. ``memlayers train <new>/config.yaml
steps=N --resume`` trains it further in place: its checkpoint holds the weights only, so
the optimizer starts fresh, the data from the start of their order and the random streams
re-seeded (the log says so). A finetuning whose loss or gradient goes non-finite stops
there, naming the step, and writes nothing.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from memlayers.data.loader import PackedLoader, load_dataset
from memlayers.data.tokenizer import load_tokenizer
from memlayers.memory import MemoryValues, ProductKeyMemory, _positive_number
from memlayers.model import Attention, SwiGLU
from memlayers.optim import build_optimizer, clip_grad_norm_, uses_sparse_values, value_master
from memlayers.quantize import value_tables, write_derived_run
from memlayers.router import ProductKeyRouter
from memlayers.run import Run, load_run
from memlayers.value_optim import SparseValueAdam, coalesce_rows

METHODS = ("sparse-memory", "full", "lora")


# The defaults of the options only some methods read (:data:`METHOD_OPTIONS`): their
# FinetuneArgs fields default to None ("not set"), so that one set explicitly, even to
# this value, with a method that does not read it is refused (check_method_options), and
# :meth:`FinetuneArgs.resolved` fills in these for the method that does.
METHOD_DEFAULTS = {"top_t": 500, "background_batches": 8, "rank": 8, "alpha": 16.0}


@dataclass
class FinetuneArgs:
    method: str = "sparse-memory"  # sparse-memory | full | lora
    steps: int = 100
    lr: float | None = None  # None: the run's optim.value_lr (sparse-memory) or optim.lr
    # sparse-memory: rows updated per step (per value table); None: 500
    top_t: int | None = None
    # sparse-memory: top_t rows per document of the batch (their union is trained), not
    # per batch; needs the EOS id that ends each document (finetune_model's eos_id)
    per_document: bool = False
    rank: int | None = None  # lora; None: 8
    alpha: float | None = None  # lora: the adapter's output is scaled by alpha / rank; None: 16
    batch_size: int | None = None  # None: the run's data.batch_size (seq_len is the run's)
    background_batches: int | None = None  # sparse-memory: batches of background text; None: 8
    grad_clip: float = 1.0  # max gradient norm of the trained parameters; 0: off
    seed: int = 0  # batch order, LoRA's A

    def validate(self) -> None:
        """Refuse a setting that would fail, or do nothing sensible, only later: each
        named with its value."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got method={self.method!r}")
        for name in ("steps", "top_t", "rank", "background_batches", "batch_size"):
            v = getattr(self, name)
            if v is None and name != "steps":
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {name}={v!r}")
        # (a negative one: numpy's generator refused it inside the loader, the run loaded)
        seed = self.seed
        integer = isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
        if not integer or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got seed={seed!r}")
        # a learning rate, scale or clip of inf (or nan) trains the weights to nan
        _positive_number("lr", self.lr, allow_none=True)
        _positive_number("alpha", self.alpha, allow_none=True)
        _positive_number("grad_clip", self.grad_clip, allow_zero=True)
        if not isinstance(self.per_document, bool):
            raise ValueError(f"per_document must be true or false, got {self.per_document!r}")

    def resolved(self) -> FinetuneArgs:
        """A copy with :data:`METHOD_DEFAULTS` filled in for the options ``method`` reads
        and left unset (the options it does not read stay as they are)."""
        fill = {
            name: METHOD_DEFAULTS[name]
            for name, (_, methods) in METHOD_OPTIONS.items()
            if name in METHOD_DEFAULTS and self.method in methods and getattr(self, name) is None
        }
        return replace(self, **fill)


# The options only some methods read: FinetuneArgs field -> (its flag, the methods reading it).
METHOD_OPTIONS = {
    "top_t": ("--top-t", ("sparse-memory",)),
    "background_batches": ("--background-batches", ("sparse-memory",)),
    "per_document": ("--per-document", ("sparse-memory",)),
    "rank": ("--rank", ("lora",)),
    "alpha": ("--alpha", ("lora",)),
}


def check_method_options(args: FinetuneArgs, background: str | Path | None = None) -> None:
    """Refuse the :data:`METHOD_OPTIONS` set (not None; ``per_document`` true), and a
    ``background`` file, that ``args.method`` does not read (``--rank 4`` with
    sparse-memory would otherwise be silently ignored; so would ``--top-t 500`` with lora,
    although 500 is sparse-memory's default), naming them and their values."""
    unset = {"per_document": False}
    unused = [
        f"{flag}={getattr(args, name)!r}"
        for name, (flag, methods) in METHOD_OPTIONS.items()
        if args.method not in methods and getattr(args, name) != unset.get(name)
    ]
    if background is not None and args.method != "sparse-memory":
        unused.insert(0, f"--background={str(background)!r}")
    if unused:
        raise ValueError(
            f"method {args.method!r} does not use {', '.join(unused)}: --top-t, --background, "
            f"--background-batches and --per-document are sparse-memory's, --rank and --alpha "
            f"lora's; drop them or choose the method they belong to"
        )


# ---- data ----------------------------------------------------------------------------------


def read_documents(path: str | Path, tokenizer, flag: str = "--data") -> np.ndarray:
    """The token stream of a text file: each non-blank line encoded, followed by EOS.
    ``flag``: the option that named the file (``--data``, ``--background``), for errors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    docs = [ln for ln in lines if ln]
    if not docs:
        raise ValueError(f"{flag} {path}: no text (every line is blank)")
    out: list[int] = []
    for i, doc in enumerate(docs, 1):
        try:
            out += tokenizer.encode(doc) + [tokenizer.eos_id]
        except KeyError as e:  # a closed vocabulary (bios) meets an unknown word
            raise ValueError(f"{flag} {path}, document {i}: {e.args[0]}") from None
    return np.asarray(out, dtype=np.int64)


def training_stream(tokens: np.ndarray, batch_size: int, seq_len: int) -> np.ndarray:
    """``tokens`` repeated and cut to ``n·seq_len + 1`` tokens, ``n`` the fewest sequences
    that is a multiple of ``batch_size`` with ``n·seq_len >= len(tokens)``: what the
    finetuning :class:`~memlayers.data.loader.PackedLoader` walks.

    Why this length: sequence ``i``'s targets are stream positions ``i·T+1 .. i·T+T``, so the
    ``n`` sequences make targets of positions ``1 .. n·T``, which hold every token of the
    data (token 0 at position ``len(tokens)``, in the repeat); and with ``n`` a multiple of
    the batch an epoch of the loader uses every sequence (none left over), so every token
    of the data is a target within the first ``n / batch_size`` steps. A stream cut to one
    batch left the tail of a longer file out."""
    n_seq = batch_size * math.ceil(math.ceil(len(tokens) / seq_len) / batch_size)
    n = n_seq * seq_len + 1
    return np.tile(tokens, math.ceil(n / len(tokens)))[:n]


# ---- sparse-memory: which rows -------------------------------------------------------------


def _layers_by_table(model: nn.Module):
    """``(tables, layers, where)``: the value tables (:func:`memlayers.quantize.
    value_tables`), the memory layers, and the index in ``tables`` of each layer's table."""
    tables = value_tables(model)
    layers = [m for m in model.modules() if isinstance(m, ProductKeyMemory)]
    where = [next(i for i, t in enumerate(tables) if t is m.values) for m in layers]
    return tables, layers, where


@contextmanager
def counting_reads(model: nn.Module, training: bool = False):
    """Count the rows every value table is read at while the block runs. Yields
    ``take()``: the counts since the last call, ``[n_rows]`` int64 per table of
    :func:`memlayers.quantize.value_tables` (summed over the layers reading it), on the
    tables' device.

    ``training``: the finetuning steps' reads, counted on the device by
    :class:`memlayers.usage.RowCounts` (training-mode forwards only; no host sync, no
    range check: the lookup checks the rows). Otherwise every forward's reads, by the
    evaluation's :class:`memlayers.usage.MemoryUsage` (checked, a host sync a lookup: the
    background pass, once)."""
    tables, layers, where = _layers_by_table(model)
    for m in layers:
        m.track_usage(training=training)

    def take() -> list[torch.Tensor]:
        counts = [torch.zeros(t.n_rows, dtype=torch.int64, device=t.weight.device) for t in tables]
        for m, i in zip(layers, where, strict=True):
            if m.usage.counts is not None:
                counts[i] += m.usage.counts
            if training:
                m.usage.counts.zero_()  # a fresh window, the same buffer
            else:
                m.track_usage()
        return counts

    try:
        yield take
    finally:
        for m in layers:
            m.track_usage(False)


def specificity_scores(
    counts: torch.Tensor, background: torch.Tensor, background_docs: int
) -> torch.Tensor:
    """TF-IDF of each row's reads ``[n_rows]`` (float64): ``tf = counts / Σ counts`` (the
    row's share of this batch's reads), ``idf = log((N + 1) / (background + 1))`` with
    ``background`` the number of the ``N`` background sequences that read the row (its
    document frequency). A row the new data reads often and the background rarely scores
    high; a row every background sequence reads scores 0.

    Why document frequency, not read counts: with idf over background *reads*, the log
    compresses a row read 100x more often than another into a factor of ~2 of idf, tf
    dominates, and the top rows are the ones every text reads most (template words). On
    the main job that picked rows that lost 21% of the answers it had right and learned 2%
    of the new facts, against 1.6% and 3% here (benchmarks/results/finetune_cpu_20261201.md)."""
    tf = counts.double() / counts.sum().clamp(min=1)
    return tf * _idf(background, background_docs)


def _idf(background: torch.Tensor, background_docs: int | Sequence[int]) -> torch.Tensor:
    """``log((N + 1) / (df + 1))`` per row (:func:`specificity_scores`), float64. A
    background of several kinds (``background [K, n_rows]``, ``background_docs`` K counts:
    :func:`finetune_model`'s list of streams) gives each row its lowest idf over the
    kinds: a row every sequence of one kind reads scores 0, however rare the other kinds
    make it (in one mixed stream a row read by all of half the sequences keeps log 2)."""
    if background.dim() == 1:
        return torch.log((background_docs + 1) / (background.double() + 1))
    docs = torch.as_tensor(background_docs, dtype=torch.float64, device=background.device)
    return torch.log((docs[:, None] + 1) / (background.double() + 1)).min(dim=0).values


def top_rows(
    counts: torch.Tensor, background: torch.Tensor, background_docs: int, t: int
) -> torch.Tensor:
    """The (at most) ``t`` rows read in ``counts`` with the highest
    :func:`specificity_scores`, ascending. Unread rows are never picked."""
    read = counts.nonzero().squeeze(1)  # [U]
    score = specificity_scores(counts, background, background_docs)[read]
    best = score.topk(min(t, read.numel())).indices
    return read[best].sort().values


class CapturedReads:
    """The rows each token read, per value table, since the last :meth:`take` or
    :meth:`clear` (:func:`capturing_reads`)."""

    def __init__(self, n_tables: int) -> None:
        self.seen: list[list[torch.Tensor]] = [[] for _ in range(n_tables)]

    def take(self) -> list[torch.Tensor | None]:
        """Per table ``[N, R]``: the one forward's tokens and the rows they read (the layers
        reading the table side by side), or None for a table no layer read."""
        out = [torch.cat(s, dim=1) if s else None for s in self.seen]
        self.clear()
        return out

    def clear(self) -> None:
        for s in self.seen:
            s.clear()


@contextmanager
def capturing_reads(model: nn.Module):
    """Yields a :class:`CapturedReads` that every memory layer's search reports to while
    the block runs (tables as :func:`memlayers.quantize.value_tables` lists them)."""
    tables, layers, where = _layers_by_table(model)
    reads = CapturedReads(len(tables))

    def capture(m: ProductKeyMemory, i: int):
        search = type(m).lookup

        def lookup(x):
            indices, weights = search(m, x)
            reads.seen[i].append(indices.detach())
            return indices, weights

        return lookup

    for m, i in zip(layers, where, strict=True):
        m.lookup = capture(m, i)
    try:
        yield reads
    finally:
        for m in layers:
            del m.lookup  # the class's method again


def document_ids(x: torch.Tensor, eos_id: int) -> torch.Tensor:
    """``[B·T]`` int64: the document of each token of a batch ``x [B, T]``, numbered
    through the batch. A document ends at its EOS (which belongs to it); a batch row starts
    a new one (a document cut by the row boundary is two)."""
    b, t = x.shape
    ends = (x == eos_id).long()
    within = ends.cumsum(1) - ends  # EOS tokens before each token in its row
    per_row = ends.sum(1) + 1  # documents a row can hold: one more than its EOS
    offset = torch.cat([per_row.new_zeros(1), per_row.cumsum(0)[:-1]])
    return (within + offset[:, None]).reshape(b * t)


def top_rows_per_document(
    indices: torch.Tensor,
    docs: torch.Tensor,
    background: torch.Tensor,
    background_docs: int,
    t: int,
) -> torch.Tensor:
    """The union, ascending, of each document's ``t`` rows with the highest
    :func:`specificity_scores` of that document's own reads: ``indices [N, R]`` the rows
    token n read (every layer reading the table), ``docs [N]`` its document
    (:func:`document_ids`). Every fact then gets rows of its own, where a batch-wide top-t
    favours the rows several documents of the batch read."""
    n_rows = background.shape[-1]  # [n_rows], or [K, n_rows] for K kinds of background
    pair = docs[:, None] * n_rows + indices  # [N, R]: (document, row)
    keys, counts = pair.reshape(-1).unique(return_counts=True)  # ascending: by document
    doc, row = keys // n_rows, keys % n_rows
    totals = torch.zeros(int(doc.max()) + 1, dtype=torch.float64, device=doc.device)
    totals.index_add_(0, doc, counts.double())
    score = counts.double() / totals[doc] * _idf(background, background_docs)[row]
    # best first within each document: sort by score, then (stably) by document
    order = score.argsort(descending=True, stable=True)
    order = order[doc[order].argsort(stable=True)]
    first = torch.searchsorted(doc[order], doc[order], right=False)  # each document's start
    rank = torch.arange(len(order), device=doc.device) - first
    return row[order[rank < t]].unique()


def keep_rows_(table: MemoryValues, rows: torch.Tensor) -> torch.Tensor:
    """Drop every row but ``rows`` from the table's row-sparse gradient (the others stay
    untouched by the lazy optimizer: value and moments). Returns the rows kept ``[<= t]``."""
    g = table.weight.grad
    if g is None:
        return rows[:0]
    if not g.is_sparse:
        raise ValueError("keep_rows_ needs a row-sparse gradient (MemoryValues(sparse_grad=True))")
    g = coalesce_rows(g)
    idx = g._indices()[0]  # [U] ascending
    keep = torch.isin(idx, rows.to(idx.device))
    table.weight.grad = torch.sparse_coo_tensor(
        idx[keep].unsqueeze(0),
        g._values()[keep],
        g.shape,
        is_coalesced=True,
        check_invariants=False,
    )
    return idx[keep]


# ---- lora ----------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """``base(x) + (x Aᵀ Bᵀ)·alpha/rank`` around a frozen ``nn.Linear`` (no bias here: the
    model's linears have none). ``A [rank, in]`` is uniform in ``±1/sqrt(in)``, ``B [out,
    rank]`` zero, so the wrapped layer starts equal to the base."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, w.shape[1], device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))
        self.scale = alpha / rank
        bound = w.shape[1] ** -0.5
        nn.init.uniform_(self.lora_a, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base linear with ``W + (B A)·alpha/rank`` as its weight."""
        self.base.weight += (self.lora_b @ self.lora_a) * self.scale  # [out, in]
        return self.base


# Per module type, the linears that get adapters: attention and the feed-forward (SwiGLU,
# or Memory+'s gating w1 and output w2; out_proj without swilu).
LORA_TARGETS = {
    Attention: ("wq", "wk", "wv", "wo"),
    SwiGLU: ("w1", "w2", "w3"),
    ProductKeyMemory: ("w1", "w2", "out_proj"),
}


def add_lora(model: nn.Module, rank: int, alpha: float) -> list[LoRALinear]:
    """Freeze ``model`` and wrap every :data:`LORA_TARGETS` linear in a
    :class:`LoRALinear` (draws A from the global RNG); returns the adapters."""
    model.requires_grad_(False)
    adapters = []
    for m in list(model.modules()):
        for kind, names in LORA_TARGETS.items():
            if not isinstance(m, kind):
                continue
            for name in names:
                lin = getattr(m, name, None)
                if isinstance(lin, nn.Linear):
                    adapter = LoRALinear(lin, rank, alpha)
                    setattr(m, name, adapter)
                    adapters.append(adapter)
    if not adapters:
        raise ValueError("the model has no attention or feed-forward linear for LoRA")
    return adapters


def merge_lora_(model: nn.Module) -> None:
    """Fold every :class:`LoRALinear` back into its base linear, in place (the model's
    parameter names are then the plain model's)."""
    for m in list(model.modules()):
        for name, child in list(m.named_children()):
            if isinstance(child, LoRALinear):
                setattr(m, name, child.merged())


# ---- the loop ------------------------------------------------------------------------------


@dataclass
class Finetuned:
    """What :func:`finetune_model` did: per-step loss and, for sparse-memory, rows updated."""

    losses: list[float] = field(default_factory=list)
    rows_updated: list[int] = field(default_factory=list)
    rows_touched: int = 0  # distinct rows updated over all steps (sparse-memory)


def train_mode_(model: nn.Module, method: str) -> None:
    """``model.train()``, but for sparse-memory and lora every
    :class:`~memlayers.router.ProductKeyRouter` in eval mode: the frozen routers route by
    their running query statistics (``query_batch_norm``), which stay as they were, and
    without query dropout. In training mode a batch-normed router would update
    ``query_mean`` / ``query_var`` (breaking "every other tensor stays bit-identical") and
    route each token by its batch's statistics, not as the eval-mode background pass of
    :func:`_background_counts` (nor generation) does."""
    model.train()
    if method in ("sparse-memory", "lora"):
        for m in model.modules():
            if isinstance(m, ProductKeyRouter):
                m.eval()


def _default_lr(method: str, optim) -> float:
    return optim.value_lr if method == "sparse-memory" else optim.lr


def finetune_model(
    model: nn.Module,
    tokens: np.ndarray,
    args: FinetuneArgs,
    seq_len: int,
    batch_size: int,
    optim,
    background: np.ndarray | Sequence[np.ndarray] | None = None,
    after_step: Callable[[int, nn.Module], object] | None = None,
    eos_id: int | None = None,
) -> Finetuned:
    """Train ``model`` in place on ``tokens`` by ``args.method`` (module docstring).
    ``optim``: the run's :class:`~memlayers.optim.OptimArgs` (betas, eps, default learning
    rates, the full method's optimizer); ``background``: the token stream the sparse-memory
    scores compare against (how many of its sequences read each row), or a list of streams
    of different kinds (e.g. corpus text and QA pairs), each read for its share of
    ``args.background_batches`` and scored apart, a row taking its lowest idf over them
    (:func:`_idf`). ``after_step(step,
    model)``: called after each optimizer step (1-based), e.g. to evaluate the model so far
    (a lora model with its adapters live); the model goes back to training mode after it.
    A lora model comes back merged. ``eos_id``: the token that ends each document
    (``args.per_document`` needs it)."""
    args.validate()
    args = args.resolved()
    if args.per_document and (args.method != "sparse-memory" or eos_id is None):
        raise ValueError("per_document chooses sparse-memory rows per document: it needs "
                         f"method 'sparse-memory' and an eos_id, got method={args.method!r}, "
                         f"eos_id={eos_id!r}")  # fmt: skip
    device = next(model.parameters()).device
    lr = args.lr if args.lr is not None else _default_lr(args.method, optim)
    tables = value_tables(model)
    torch.manual_seed(args.seed)
    stream = training_stream(tokens, batch_size, seq_len)
    loader = PackedLoader(stream, batch_size, seq_len, seed=args.seed)
    betas = (optim.beta1, optim.beta2)
    # per table [n_rows] ([K, n_rows] for K kinds): background sequences reading a row
    bg_df: list[torch.Tensor] = []
    bg_docs = 0
    if args.method == "sparse-memory":
        if not tables:
            raise ValueError(
                "method 'sparse-memory' trains value-table rows, but the model has no memory "
                "layers: use --method full or lora"
            )
        kinds = _kinds(background)
        for i, stream in enumerate(kinds):
            check_background(stream, seq_len, f"background {i}" if len(kinds) > 1 else "")
        model.requires_grad_(False)
        for t in tables:
            t.weight.requires_grad_(True)
            t.sparse_grad = True  # row-sparse gradients: the lazy optimizer's input
        bg_df, bg_docs = _background_counts(model, kinds, args, seq_len, batch_size)
        touched = [torch.zeros(t.n_rows, dtype=torch.bool) for t in tables]
        opt = SparseValueAdam(
            [t.weight for t in tables], lr=lr, betas=betas, eps=optim.eps,
            impl=model.config.memory.impl, master=value_master(optim),
        )  # fmt: skip
        trained = [t.weight for t in tables]
    elif args.method == "full":
        model.requires_grad_(True)
        for t in tables:
            t.sparse_grad = uses_sparse_values(optim)
        # the run's value/dense (and memory/dense) learning-rate ratios (tiny presets:
        # 3e-2 / 3e-3)
        scale = lr / optim.lr
        memory_lr = None if optim.memory_lr is None else scale * optim.memory_lr
        scaled = replace(optim, lr=lr, value_lr=scale * optim.value_lr, memory_lr=memory_lr)
        opt = build_optimizer(model, scaled, impl=model.config.memory.impl)
        trained = [p for p in model.parameters() if p.requires_grad]
    else:
        adapters = add_lora(model, args.rank, args.alpha)
        trained = [p for a in adapters for p in (a.lora_a, a.lora_b)]
        opt = torch.optim.AdamW(trained, lr=lr, betas=betas, eps=optim.eps, weight_decay=0.0)

    out = Finetuned()
    train_mode_(model, args.method)
    sparse = args.method == "sparse-memory"
    per_doc = sparse and args.per_document
    with (
        counting_reads(model, training=True) if sparse and not per_doc else nullcontext() as take,
        capturing_reads(model) if per_doc else nullcontext() as captured,
    ):
        bar = tqdm(range(args.steps), desc=f"finetune {args.method}", disable=None)
        for step in bar:
            x, y = (t.to(device) for t in next(loader))  # [B, T] each
            if per_doc:
                captured.clear()  # what after_step's evaluation read
            loss = model(x, targets=y)
            out.losses.append(loss.item())
            if not math.isfinite(out.losses[-1]):  # stopped before it reaches the weights
                raise _diverged(f"the loss is {out.losses[-1]}", step + 1, args, lr)
            loss.backward()
            if args.method == "sparse-memory":
                kept = 0
                if per_doc:
                    reads, docs = captured.take(), document_ids(x, eos_id)
                else:
                    reads = take()  # per table, the batch's read counts
                for i, (read, df) in enumerate(zip(reads, bg_df, strict=True)):
                    if not per_doc:
                        chosen = top_rows(read, df, bg_docs, args.top_t)
                    elif read is None:  # no layer read this table
                        chosen = torch.empty(0, dtype=torch.int64, device=df.device)
                    else:
                        chosen = top_rows_per_document(read, docs, df, bg_docs, args.top_t)
                    rows = keep_rows_(tables[i], chosen)
                    touched[i][rows.cpu()] = True
                    kept += len(rows)
                out.rows_updated.append(kept)
            norm = float(clip_grad_norm_(trained, args.grad_clip))
            if not math.isfinite(norm):
                raise _diverged(f"the gradient norm is {norm}", step + 1, args, lr)
            opt.step()
            opt.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{out.losses[-1]:.4f}", refresh=False)
            if after_step is not None:
                after_step(step + 1, model)
                train_mode_(model, args.method)
    if args.method == "sparse-memory":
        out.rows_touched = int(sum(m.sum() for m in touched))
    if args.method == "lora":
        merge_lora_(model)
    # the last step's update (a finite loss and gradient can still step a weight to inf);
    # max |w| is a reduction: no table-sized temporary
    tensors = [(n, t) for n, t in (*model.named_parameters(), *model.named_buffers())
               if t.is_floating_point() and t.numel()]  # fmt: skip
    bad = next(
        (n for n, t in tensors if not math.isfinite(float(t.detach().norm(float("inf"))))), None
    )
    if bad is not None:
        raise _diverged(f"{bad} holds non-finite values", args.steps, args, lr, after=True)
    model.requires_grad_(True)
    model.eval()
    return out


def check_background(background: np.ndarray | None, seq_len: int, what: str = "") -> None:
    """Refuse a sparse-memory background of no sequence (``seq_len + 1`` tokens): ``what``
    names it (``--background FILE``; default: "the background")."""
    n = 0 if background is None else len(background)
    if n <= seq_len:
        raise ValueError(
            f"{what or 'the background'} has {n:,} tokens: sparse-memory counts the rows "
            f"background sequences read, and one sequence needs seq_len + 1 = {seq_len + 1:,} "
            f"tokens (data.seq_len={seq_len})"
        )


def _diverged(what: str, step: int, args: FinetuneArgs, lr: float, after: bool = False):
    """The error of a finetuning that went non-finite at ``step`` (nothing is written)."""
    from memlayers.train import NonFiniteLossError

    return NonFiniteLossError(
        f"finetuning diverged: {what} {'after' if after else 'at'} step {step} of "
        f"{args.steps} ({args.method}, lr={lr:g}); nothing is written. Try a lower --lr"
    )


def _kinds(background) -> list:
    """The background's streams: a list or tuple of them as a list, one stream alone as
    a list of one."""
    return list(background) if isinstance(background, (list, tuple)) else [background]


@torch.no_grad()
def _background_counts(model, kinds, args, seq_len, batch_size):
    """Per table, in how many sequences of ``args.background_batches`` batches of the
    background each row is read (eval mode), and the number of sequences: ``([n_rows]
    per table, N)`` for one stream (``kinds`` a stream, or a list of one); for several,
    each read for its share of the batches (at least one), ``([K, n_rows] per table,
    [N_k])``."""
    kinds = _kinds(kinds)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tables = value_tables(model)
    per_kind = max(1, args.background_batches // len(kinds))
    dfs, docs = [], []
    with counting_reads(model) as take:
        for stream in kinds:
            n = (len(stream) - 1) // seq_len
            b = min(batch_size, n)
            loader = PackedLoader(stream, b, seq_len, seed=args.seed)
            n_batches = min(per_kind, len(loader))
            df = [torch.zeros(t.n_rows, dtype=torch.int64, device=t.weight.device) for t in tables]
            for _ in range(n_batches):
                x, _ = next(loader)
                for seq in x.to(device):  # one sequence a pass: its rows, not their reads
                    model(seq[None])
                    for d, c in zip(df, take(), strict=True):
                        d += (c > 0).long()
            dfs.append(df)
            docs.append(n_batches * b)
    model.train(was_training)
    if len(kinds) == 1:
        return dfs[0], docs[0]
    return [torch.stack(per_table) for per_table in zip(*dfs, strict=True)], docs


# ---- the run directory ---------------------------------------------------------------------


def _check_out(src: Path, out: Path, overwrite: bool, name: str = "--out") -> None:
    """Refuse an ``out`` that is the source run ``src`` (or inside it, or holds it), a file,
    or a non-empty directory without ``overwrite``. ``name``: how the command calls it
    (``--out``; ``OUT`` for export), for the message."""
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise ValueError(f"{name} {out} overlaps the source run {src}: use a directory of its own")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{name} {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"{name} {out} is not empty: pass --overwrite to replace it, or another {name}"
        )


def _read_texts(tokenizer, data_path, background, method: str, seq_len: int):
    """The ``--data`` tokens and, for sparse-memory, the ``--background`` file's (None
    without one), the background checked to hold a sequence."""
    tokens = read_documents(data_path, tokenizer)
    bg = None
    if method == "sparse-memory" and background is not None:
        bg = read_documents(background, tokenizer, "--background")
        check_background(bg, seq_len, f"--background {background}")
    return tokens, bg


class FinetuneResult(NamedTuple):
    out: Path  # the new run directory
    checkpoint: Path  # its checkpoint
    source: Path  # the checkpoint it was finetuned from
    record: dict  # what finetune.json holds


def finetune(
    run_dir: str | Path,
    data_path: str | Path,
    args: FinetuneArgs | None = None,
    background: str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    device: str = "cpu",
) -> FinetuneResult:
    """Finetune the run at ``run_dir`` on the text file ``data_path`` and write a new run
    directory ``out`` (default ``<run>-ft-<method>``); see the module docstring. Options
    the method does not read are refused before the run loads
    (:func:`check_method_options`)."""
    args = args or FinetuneArgs()
    args.validate()
    check_method_options(args, background)
    src = Run.of(run_dir)
    out = Path(out) if out is not None else src.root.parent / f"{src.root.name}-ft-{args.method}"
    _check_out(src.root, out, overwrite)
    for flag, path in (("--data", data_path), ("--background", background)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")
    # The text files against the run's tokenizer and seq_len before the model loads (a run
    # written before tokenizer.json was saved rebuilds its tokenizer in load_run: after).
    d = src.config().data
    tokens = bg = None
    if src.tokenizer_path.is_file():
        tokens, bg = _read_texts(load_tokenizer(src.tokenizer_path), data_path, background,
                                 args.method, d.seq_len)  # fmt: skip
    trained = load_run(run_dir, device)
    if trained.tokenizer is None:
        raise ValueError(f"{src.root}: the run has no tokenizer to encode --data with")
    tables = value_tables(trained.model)
    if args.method == "sparse-memory" and not tables:
        raise ValueError(
            f"{src.root}: method 'sparse-memory' trains value-table rows, but the model has "
            f"no memory layers: use --method full or lora"
        )
    if any(t.bits is not None for t in tables):
        raise ValueError(f"{trained.checkpoint} is quantized (for serving): finetune its float run")
    if tokens is None:
        tokens, bg = _read_texts(trained.tokenizer, data_path, background, args.method,
                                 d.seq_len)  # fmt: skip
    if args.method == "sparse-memory" and background is None:
        bg = load_dataset(trained.args.data).train
        check_background(bg, d.seq_len, f"the run's training split ({src.root})")
    batch = args.batch_size or d.batch_size
    model = trained.model
    eos = trained.tokenizer.eos_id
    done = finetune_model(model, tokens, args, d.seq_len, batch, trained.args.optim, bg,
                          eos_id=eos)  # fmt: skip

    record = {
        "method": args.method,
        "args": asdict(args.resolved()),
        "lr": args.lr if args.lr is not None else _default_lr(args.method, trained.args.optim),
        "source": str(trained.checkpoint.resolve()),
        "data": str(Path(data_path).resolve()),
        "data_tokens": int(len(tokens)),
        "background": str(background) if background is not None else "run train split",
        "batch_size": batch,
        "seq_len": d.seq_len,
        "losses": done.losses,
        "rows_updated": done.rows_updated,
        "rows_touched": done.rows_touched,
    }
    meta = json.loads((trained.checkpoint / "meta.json").read_text())
    step = trained.step + args.steps
    progress = {
        "tokens_trained": trained.tokens_trained + args.steps * batch * d.seq_len,
        "train_seconds": None,
    }
    saved = write_derived_run(
        out, src, step, model.cpu(), meta["model_config"], progress,
        files={"finetune.json": json.dumps(record, indent=2) + "\n"},
    )  # fmt: skip
    return FinetuneResult(out, saved, trained.checkpoint, record)
