"""Token streams → fixed-length training batches; datasets chosen by name.

**Datasets.** ``DataArgs.dataset`` names a function registered with
:func:`register_dataset`; ``fn(args: DataArgs)`` returns ``(train_tokens, val_tokens,
vocab_size, tokenizer_or_None)`` with 1-D integer arrays (``np.ndarray`` or
``np.memmap``, uint16/uint32/int). Before a name that is not registered yet is looked up,
``memlayers.data.register_datasets()`` (when the package defines it) registers the
datasets of the rest of ``memlayers.data``, so ``data.dataset=bios`` works without the
trainer knowing those modules. Dataset-specific knobs go in ``data.options`` (a free
dict); read them with :func:`dataset_options`, which rejects unknown keys. Built-ins:

- ``synthetic``: deterministic records ``key v1 … vC``, each key with fixed random
  values (a tiny fact store: 3 of 4 tokens are predictable only by memorising the key's
  values; the loss floor is ``ln(n_keys) / (C + 1)``). Options: ``vocab_size`` (512),
  ``values_per_key`` (3), ``n_tokens`` (1,000,000), ``seed`` (1234).
- ``text``: a UTF-8 text file, or every ``*.txt`` under a directory (``data.path``), as
  bytes: token = byte value, 256 = end of document, vocabulary 257. The last
  ``val_fraction`` of the stream is the validation split.

**Packing.** :class:`PackedLoader` cuts the stream into ``n = (len - 1) // seq_len``
sequences of ``seq_len + 1`` tokens (consecutive sequences share one token, so every token
is a target once). Each epoch visits the sequences in an order drawn from ``(seed,
epoch)``; global batch ``s`` is ``order[s·W·B : (s+1)·W·B]`` and rank ``r`` takes its
``B``-slice, so ranks never overlap. The position is ``(epoch, batch)``:
``state_dict()`` / ``load_state_dict()`` resume exactly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch


@dataclass
class DataArgs:
    dataset: str = "synthetic"  # a registered name: synthetic | text | (bios, ...)
    path: str | None = None  # file or directory, for datasets that read one
    seq_len: int = 128
    batch_size: int = 16  # sequences per micro-batch and rank
    val_fraction: float = 0.05  # share of the stream held out (datasets that split)
    seed: int = 0  # sequence order of every epoch
    options: dict[str, Any] = field(default_factory=dict)  # dataset-specific knobs

    def validate(self) -> None:
        for name in ("seq_len", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"data.{name} must be a positive int, got {v!r}")
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
_DATASETS: dict[str, DatasetFn] = {}


def register_dataset(name: str, fn: DatasetFn) -> None:
    """Make ``data.dataset=name`` call ``fn(args)`` (re-registering replaces)."""
    if not name or not callable(fn):
        raise ValueError(f"register_dataset needs a name and a callable, got {name!r}, {fn!r}")
    _DATASETS[name] = fn


def available_datasets() -> list[str]:
    return sorted(_DATASETS)


def dataset_options(args: DataArgs, defaults: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``args.options``; unknown keys raise ``ValueError``."""
    unknown = sorted(set(args.options) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown data.options {unknown} for dataset {args.dataset!r}; "
            f"known: {sorted(defaults)}"
        )
    return {**defaults, **args.options}


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


def load_dataset(args: DataArgs) -> Dataset:
    """Call the function registered for ``args.dataset`` and check what it returns."""
    args.validate()
    name = args.dataset
    if name not in _DATASETS:
        # The rest of memlayers.data registers its datasets on request (bios, corpus, ...).
        register_all = getattr(importlib.import_module("memlayers.data"), "register_datasets", None)
        if register_all is not None:
            register_all()
    if name not in _DATASETS:
        raise ValueError(f"unknown data.dataset={name!r}; registered: {available_datasets()}")
    train, val, vocab_size, tokenizer = _DATASETS[name](args)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"dataset {name}: vocab_size must be a positive int, got {vocab_size!r}")
    train = _check_tokens(name, train, vocab_size)
    val = _check_tokens(name, val, vocab_size)
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
        self.n_seq = (len(tokens) - 1) // seq_len
        self.batches_per_epoch = self.n_seq // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(tokens):,} tokens make {self.n_seq} sequences of seq_len={seq_len}, "
                f"fewer than one global batch (batch_size={batch_size} × world_size="
                f"{world_size}); use more data or a smaller batch"
            )
        self.epoch, self.batch = 0, 0
        self._order_epoch, self._order = -1, None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def rewind(self) -> None:
        """Back to the first batch of epoch 0."""
        self.epoch, self.batch = 0, 0

    def __iter__(self) -> PackedLoader:
        return self

    def order(self, epoch: int) -> np.ndarray:
        """Sequence order of ``epoch`` (a pure function of ``seed`` and ``epoch``)."""
        if self._order_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order, self._order_epoch = rng.permutation(self.n_seq), epoch
        return self._order

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        start = (self.batch * self.world_size + self.rank) * self.B
        seqs = self.order(self.epoch)[start : start + self.B]  # [B]
        idx = seqs[:, None] * self.T + np.arange(self.T + 1)  # [B, T+1]
        chunk = torch.from_numpy(np.asarray(self.tokens[idx]).astype(np.int64))
        self.batch += 1
        return chunk[:, :-1], chunk[:, 1:]  # [B, T] each

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "batch": self.batch, "seed": self.seed, "seq_len": self.T,
            "batch_size": self.B, "world_size": self.world_size, "n_tokens": len(self.tokens),
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "seq_len", "batch_size", "world_size", "n_tokens"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"data position was saved with {key}={state.get(key)} but this loader has "
                    f"{key}={mine[key]}: the run cannot resume exactly"
                )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


# ---- built-in datasets -------------------------------------------------------------------


def synthetic_dataset(args: DataArgs) -> tuple:
    """Records ``key v1 … vC``; see the module docstring."""
    opt = dataset_options(
        args, {"vocab_size": 512, "values_per_key": 3, "n_tokens": 1_000_000, "seed": 1234}
    )
    V, C = int(opt["vocab_size"]), int(opt["values_per_key"])
    if V < 4 or C < 1:
        raise ValueError(f"synthetic needs vocab_size >= 4 and values_per_key >= 1, got {opt}")
    n_keys = V // 2  # keys in [0, V/2), values in [V/2, V)
    rng = np.random.default_rng(int(opt["seed"]))
    facts = rng.integers(n_keys, V, size=(n_keys, C))  # [n_keys, C]

    def stream(n_records: int) -> np.ndarray:
        keys = rng.integers(0, n_keys, size=n_records)  # [R]
        return np.concatenate([keys[:, None], facts[keys]], axis=1).reshape(-1)  # [R*(C+1)]

    n_records = max(2, int(opt["n_tokens"]) // (C + 1))
    n_val = int(n_records * args.val_fraction)
    train = stream(n_records - n_val).astype(np.uint16 if V <= 65536 else np.uint32)
    val = stream(n_val).astype(train.dtype)
    return train, val, V, None


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, ``eos_id = 256``."""

    vocab_size, eos_id = 257, 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def text_dataset(args: DataArgs) -> tuple:
    """A UTF-8 file or a directory of ``*.txt`` files as byte tokens; see the module docs."""
    dataset_options(args, {})
    if not args.path:
        raise ValueError("data.dataset=text needs data.path (a text file or a directory)")
    path = Path(args.path).expanduser()
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise ValueError(f"data.path={args.path!r}: no such file, or no *.txt under it")
    eos = np.array([ByteTokenizer.eos_id], dtype=np.uint16)
    parts = []
    for f in files:
        parts += [np.frombuffer(f.read_bytes(), dtype=np.uint8).astype(np.uint16), eos]
    tokens = np.concatenate(parts)
    n_val = int(len(tokens) * args.val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :], 257, ByteTokenizer()


register_dataset("synthetic", synthetic_dataset)
register_dataset("text", text_dataset)
