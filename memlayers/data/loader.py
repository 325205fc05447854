"""Token streams → fixed-length training batches; datasets chosen by name.

**Datasets.** ``DataArgs.dataset`` names a row of the table
:data:`memlayers.data.datasets.DATASETS` (synthetic, text, bios, bios_compact, corpus,
facts); :func:`load_dataset` calls it and checks what it returns. A dataset's own knobs
are its typed section of ``DataArgs``: ``data.<dataset>.<option>``.

**Packing.** :class:`PackedLoader` cuts the stream into ``n = (len - 1) // seq_len``
sequences of ``seq_len + 1`` tokens (consecutive sequences share one token, so every token
is a target once). Each epoch visits the sequences in an order drawn from ``(seed,
epoch)`` alone; global batch ``s`` is ``order[s·W·B : (s+1)·W·B]`` and rank ``r`` takes its
``B``-slice, so ranks never overlap (an epoch ends when a whole global batch no longer
fits). The position is ``(epoch, offset)``, ``offset`` the sequences of the epoch's order
read so far by all ranks together: ``state_dict()`` / ``load_state_dict()`` resume
exactly, and a position saved by another number of ranks ``W`` or another ``B`` maps to
the same place in the order (the next global batch starts at ``offset``; only ``seed``,
``seq_len`` and the stream must be the same).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from omegaconf import OmegaConf

from memlayers.data.datasets import (
    DATASETS,
    BiosArgs,
    CorpusArgs,
    FactsArgs,
    SyntheticArgs,
)


@dataclass
class DataArgs:
    dataset: str = "synthetic"  # a name in DATASETS: synthetic | text | bios | ...
    path: str | None = None  # file or directory, for datasets that read one
    seq_len: int = 128
    batch_size: int = 16  # sequences per micro-batch and rank
    val_fraction: float = 0.05  # share of the stream held out (datasets that split)
    seed: int = 0  # sequence order of every epoch
    # Each dataset's own options (memlayers/data/datasets.py); only the named one is read.
    synthetic: SyntheticArgs = field(default_factory=SyntheticArgs)
    # bios: the main job's CPU size (docs/main_job.md), ~36 exposures a person in 1,000
    # steps; bios_compact keeps BiosConfig's defaults
    bios: BiosArgs = field(default_factory=lambda: BiosArgs(n_people=1000, exposures=36))
    bios_compact: BiosArgs = field(default_factory=BiosArgs)
    corpus: CorpusArgs = field(default_factory=CorpusArgs)
    facts: FactsArgs = field(default_factory=FactsArgs)

    def validate(self) -> None:
        for name in ("seq_len", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"data.{name} must be a positive int, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            # numpy's seed sequences (the epochs' orders) take non-negative integers only
            raise ValueError(f"data.seed must be an int >= 0, got data.seed={self.seed!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not self.dataset:
            raise ValueError("data.dataset must name a dataset")


class Dataset(NamedTuple):
    train: np.ndarray  # [n_train] token ids
    val: np.ndarray  # [n_val] token ids (may be empty)
    vocab_size: int
    tokenizer: Any  # an object with encode/decode, or None


DatasetFn = Callable[[DataArgs], tuple]


def reject_old_options(layers: list, dataset: str) -> None:
    """Raise for a config layer (YAML or CLI) that still uses the untyped ``data.options``
    dict, naming the typed key each option moved to: ``data.<dataset>.<option>``."""
    for layer in layers:  # the dataset named last, else the default
        dataset = OmegaConf.select(layer, "data.dataset", default=None) or dataset
    for layer in layers:
        options = OmegaConf.select(layer, "data.options", default=None)
        if options is not None:
            keys = list(options) if hasattr(options, "keys") else ["<option>"]
            new = ", ".join(f"data.{dataset}.{k}" for k in keys or ["<option>"])
            raise ValueError(
                f"data.options is gone: each dataset has its own typed section; write "
                f"{new} (data.<dataset>.<option>, see memlayers/data/datasets.py)"
            )


def _check_tokens(name: str, t, vocab_size: int) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.numpy()
    t = np.asarray(t) if not isinstance(t, np.ndarray) else t
    if t.ndim != 1 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(
            f"dataset {name}: tokens must be a 1-D integer array, "
            f"got shape {t.shape}, dtype {t.dtype}"
        )
    if t.size and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
        raise ValueError(
            f"dataset {name}: token ids must be in [0, vocab_size={vocab_size}), "
            f"got [{int(t.min())}, {int(t.max())}]"
        )
    return t


def check_dataset_name(name: str, datasets: Mapping[str, DatasetFn] = DATASETS) -> None:
    if name not in datasets:
        raise ValueError(f"unknown data.dataset={name!r}; known: {sorted(datasets)}")


def load_dataset(args: DataArgs, datasets: Mapping[str, DatasetFn] = DATASETS) -> Dataset:
    """Call ``datasets[args.dataset]`` (the built-in table by default) and check what it
    returns."""
    args.validate()
    name = args.dataset
    check_dataset_name(name, datasets)
    train, val, vocab_size, tokenizer = datasets[name](args)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"dataset {name}: vocab_size must be a positive int, got {vocab_size!r}")
    train = _check_tokens(name, train, vocab_size)
    val = _check_tokens(name, val, vocab_size)  # may be empty: training skips validation
    if train.size == 0:
        raise ValueError(f"dataset {name}: no training tokens")
    return Dataset(train, val, vocab_size, tokenizer)


class PackedLoader:
    """Yields ``(x, y)``, int64 ``[B, T]`` each, ``y`` = ``x`` shifted by one, forever."""

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        self.tokens, self.B, self.T = tokens, batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        # max(0, …): an empty stream gives (0 - 1) // T = -1, which would slip past the check
        self.n_seq = max(0, (len(tokens) - 1) // seq_len)
        self.batches_per_epoch = self.n_seq // (batch_size * world_size)
        if self.batches_per_epoch <= 0:
            raise ValueError(
                f"{len(tokens):,} tokens make {self.n_seq} sequences of seq_len={seq_len}, "
                f"fewer than one global batch (batch_size={batch_size} × world_size="
                f"{world_size}); use more data or a smaller batch"
            )
        self.epoch, self.offset = 0, 0  # sequences of this epoch's order read (all ranks)
        self._order_epoch, self._order = -1, None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def rewind(self) -> None:
        """Back to the first batch of epoch 0."""
        self.epoch, self.offset = 0, 0

    def __iter__(self) -> PackedLoader:
        return self

    def order(self, epoch: int) -> np.ndarray:
        """Sequence order of ``epoch`` (a pure function of ``seed`` and ``epoch``)."""
        if self._order_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order, self._order_epoch = rng.permutation(self.n_seq), epoch
        return self._order

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        global_batch = self.B * self.world_size
        if self.offset + global_batch > self.n_seq:  # no whole global batch left: next epoch
            self.epoch, self.offset = self.epoch + 1, 0
        start = self.offset + self.rank * self.B
        seqs = self.order(self.epoch)[start : start + self.B]  # [B]
        idx = seqs[:, None] * self.T + np.arange(self.T + 1)  # [B, T+1]
        chunk = torch.from_numpy(np.asarray(self.tokens[idx]).astype(np.int64))
        self.offset += global_batch
        return chunk[:, :-1], chunk[:, 1:]  # [B, T] each

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "offset": self.offset, "seed": self.seed, "seq_len": self.T,
            "batch_size": self.B, "world_size": self.world_size, "n_tokens": len(self.tokens),
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state``'s place in the sequence order. The order must be the same
        (``seed``, ``seq_len``, the stream's length); ``batch_size`` and ``world_size``
        may differ: the next global batch starts where the saved run's would have."""
        mine = self.state_dict()
        for key in ("seed", "seq_len", "n_tokens"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"data position was saved with {key}={state.get(key)} but this loader has "
                    f"{key}={mine[key]}: the sequence order differs, the run cannot continue "
                    f"where it stopped"
                )
        if "offset" in state:
            offset = int(state["offset"])
        else:  # saved before the offset: (epoch, batch) of batch_size × world_size sequences
            offset = int(state["batch"]) * int(state["batch_size"]) * int(state["world_size"])
        if not 0 <= offset <= self.n_seq:
            raise ValueError(f"data position offset={offset} is outside the epoch's {self.n_seq}")
        self.epoch, self.offset = int(state["epoch"]), offset
