"""A run directory and the trained model in it: the one place that knows their layout.

``memlayers train`` writes, ``memlayers eval`` / ``generate`` / ``compare`` read::

    <run_dir>/
      config.yaml             the resolved config of the last (re)start
      tokenizer.json          the dataset's tokenizer (eval and generate decode with it)
      metrics.jsonl, tb/, loss.png   the logger's (memlayers/logger.py)
      checkpoints/step_XXXXXX/       model.safetensors | dcp/, optimizer.pt, trainer.pt,
                                     meta.json (manifest, model config, progress)
      checkpoints/latest      name of the newest complete checkpoint
      eval/results.json       `memlayers eval` of the newest checkpoint
      eval/results-<what>.json   a partial or different one (memlayers/eval/__init__.py)
      eval/<step_dir>/        of an older one

:class:`Run` names those files, finds the checkpoint a path means, verifies it once and
reads its progress (tokens trained, training seconds) from ``meta.json``.
:func:`load_run` turns a path into a :class:`TrainedRun`: model, config and tokenizer,
ready to evaluate or sample.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch

from memlayers.checkpoint import (
    CheckpointError,
    model_from_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from memlayers.config import TrainArgs, load_config, resolve_device
from memlayers.model import Transformer, restrict_vocab_


class RunError(ValueError):
    """The path is not a run directory (or a checkpoint inside one), or lacks a file."""


class Progress(NamedTuple):
    """How far a checkpoint's run had trained."""

    step: int
    tokens_trained: int
    train_seconds: float | None  # wall time from the start of training; None: unknown


class Run:
    """The run directory ``root`` (which need not exist yet: the trainer creates it)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config_path = self.root / "config.yaml"
        self.tokenizer_path = self.root / "tokenizer.json"
        self.metrics_path = self.root / "metrics.jsonl"
        self.checkpoints = self.root / "checkpoints"
        self.eval_root = self.root / "eval"
        # everything a run writes here, removed by start_fresh(overwrite=True) (and the
        # configs a resume with changes keeps: config.until_step_XXXXXX.yaml)
        self.files = (
            self.config_path, self.tokenizer_path, self.metrics_path, self.checkpoints,
            self.eval_root, self.root / "tb", self.root / "loss.png", self.root / "usage.png",
        )  # fmt: skip

    def holds(self, path: str | Path) -> bool:
        """Whether ``path`` (a checkpoint, or the run directory itself) lies in this run."""
        root = self.root.resolve()
        p = Path(path).resolve()
        return p == root or root in p.parents

    def start_fresh(self, overwrite: bool = False, clear: bool = True) -> None:
        """Make way for a new run (not a resume). A directory that already holds a run
        (config.yaml, metrics.jsonl or checkpoints) is refused: a fresh start would
        truncate its metrics, replace its config and overwrite its checkpoints. With
        ``overwrite`` that run's files are deleted instead (when ``clear``: the logging
        rank does it, the others only check); files the trainer did not write stay."""
        found = [p.name for p in (self.config_path, self.metrics_path) if p.is_file()]
        if self.checkpoints.is_dir() and any(self.checkpoints.iterdir()):
            found.append("checkpoints/")
        if not found:
            return
        if not overwrite:
            raise RunError(
                f"{self.root} already holds a run ({', '.join(found)}): pass --resume to "
                f"continue it, another run_dir=... for a new run, or --overwrite to replace "
                f"it (library: train(args, resume='latest') or train(args, overwrite=True))"
            )
        kept = sorted(self.root.glob("config.until_step_*.yaml"))
        for p in (*self.files, *kept) if clear else ():
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    @classmethod
    def of(cls, path: str | Path) -> Run:
        """The run of a run directory or of a checkpoint inside one."""
        path = Path(path)
        if not path.exists():
            raise RunError(f"no such run directory or checkpoint: {path}")
        for p in (path, *path.parents):
            if (p / "config.yaml").is_file():
                return cls(p)
        raise RunError(
            f"{path}: no config.yaml here or above; pass a run directory written by "
            f"`memlayers train` (or one of its checkpoints)"
        )

    def config(self) -> TrainArgs:
        """The resolved training config (validated by the loader)."""
        return load_config([self.config_path])

    def checkpoint(self, path: str | Path | None = None) -> Path:
        """The checkpoint directory ``path`` names (a step directory, ``checkpoints/`` or
        the run directory), by default the newest."""
        try:
            return resolve_checkpoint(self.root if path is None else path)
        except CheckpointError as e:
            raise RunError(f"{e} (has the run finished a checkpoint?)") from None

    def eval_dir(self, checkpoint: Path) -> Path:
        """``eval/`` for the newest checkpoint, ``eval/<step_dir>`` for an older one (so
        evaluating an intermediate checkpoint never replaces the run's results)."""
        same = checkpoint.resolve() == self.checkpoint().resolve()
        return self.eval_root if same else self.eval_root / checkpoint.name

    def progress(self, meta: dict, args: TrainArgs, checkpoint: Path) -> Progress:
        """Progress from a verified checkpoint's ``meta``. Checkpoints written before the
        trainer recorded ``progress`` derive the tokens from the step and the config
        (× the ranks in ``trainer.pt``) and have no training time."""
        step = int(meta["step"])
        if "progress" in meta:
            p = meta["progress"]
            return Progress(step, int(p["tokens_trained"]), p.get("train_seconds"))
        trainer = torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=True)
        world = int(trainer.get("data", {}).get("world_size", 1))
        d = args.data
        return Progress(step, step * d.batch_size * d.seq_len * args.grad_accum * world, None)


class TrainedRun(NamedTuple):
    """A trained model with what evaluating or sampling it needs."""

    run: Run
    checkpoint: Path
    args: TrainArgs  # the resolved training config
    model: Transformer  # in eval mode
    tokenizer: Any  # encode / decode / eos_id, or None (synthetic data)
    progress: Progress

    @property
    def run_dir(self) -> Path:
        return self.run.root

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def tokens_trained(self) -> int:
        return self.progress.tokens_trained


def _device(device: str) -> torch.device:
    return torch.device(resolve_device(device))  # a ValueError naming a bad one


def load_run(
    path: str | Path,
    device: str = "auto",
    need_tokenizer: bool = True,
    offload: bool | str = False,
    decodable: bool = False,
) -> TrainedRun:
    """Load a run directory's newest checkpoint (or the checkpoint ``path`` names),
    verified once, with the run's tokenizer; ``offload``: value tables memory-mapped on the
    host (:mod:`memlayers.offload`; ``"zero-copy"``: page-locked, read in place).

    The tokenizer may have fewer tokens than the model in a ``model.hf`` run (a pretrained
    model's padded embedding), never more. ``decodable``: the model then cut to the
    tokenizer's ids (:func:`restrict_vocab_`), so that decoding never emits an id the
    tokenizer cannot decode (``memlayers generate``); the logits are then normalised over
    those ids alone, so it is not for losses that compare with training's.

    The optimizer state is not read, so only its size is checked, not its sha256 (twice
    the table's bytes for Adam). With ``offload`` the weights file gets the same
    size-only check: hashing it would read the whole table, which offloading exists to
    avoid."""
    from memlayers.data.loader import load_dataset
    from memlayers.data.tokenizer import load_tokenizer

    run = Run.of(path)
    ckpt = run.checkpoint(path)
    args = run.config()
    unread = {"optimizer.pt", *(["model.safetensors"] if offload else [])}
    meta = verify_checkpoint(ckpt, size_only=unread)
    model = model_from_checkpoint(ckpt, meta, _device(device), offload).eval()
    tok = None
    if run.tokenizer_path.is_file():
        tok = load_tokenizer(run.tokenizer_path)
    elif need_tokenizer:
        tok = load_dataset(args.data).tokenizer  # older runs: rebuild (deterministic)
    # A pretrained model's embedding may have more rows than its tokenizer has tokens (the
    # trainer accepts it: memlayers.train.read_pretrained); any other run's vocab_size is
    # its tokenizer's (config.with_vocab). More tokens than rows: ids the model lacks.
    n_tok, rows = (tok.vocab_size, model.config.vocab_size) if tok is not None else (0, 0)
    if n_tok > rows or (n_tok < rows and args.model.hf is None):
        raise RunError(
            f"the tokenizer has {n_tok} tokens but the model's vocab_size is {rows}: "
            f"{run.tokenizer_path} is not this run's"
        )
    if decodable and tok is not None:
        restrict_vocab_(model, tok.vocab_size)
    return TrainedRun(run, ckpt, args, model, tok, run.progress(meta, args, ckpt))
