"""The one validation-loss loop, perplexity and memory usage over validation tokens.

:func:`validation_loss` is the loop both the trainer (its periodic ``val_loss``) and
``memlayers eval`` (:func:`perplexity`) use: the model's own loss (chunked head, no
logits tensor) on each batch, token-weighted, accumulated on the device.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from memlayers.memory import ProductKeyMemory
from memlayers.model import Transformer
from memlayers.run import RunError
from memlayers.usage import MemoryUsage

LN2 = math.log(2.0)


class EvalError(RunError):
    """The run cannot be evaluated (no run directory, config or checkpoint, bad input)."""


def check_counts(**counts) -> None:
    """Raise :class:`EvalError` naming a count that is not an integer >= 1 (``max_qa=-1``
    kept all but the last record, ``batch_size=0`` failed inside ``range``); None (the
    default, or no cap) passes."""
    for name, value in counts.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise EvalError(f"{name} must be an integer >= 1, got {value!r}")


@torch.no_grad()
def validation_loss(
    model: Transformer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], autocast=None
) -> tuple[torch.Tensor, int]:
    """Mean next-token loss over ``batches`` of ``(x [B, T], y [B, T])``, weighted by
    tokens, as a float64 device scalar (no host sync), and the number of tokens. The model
    runs in eval mode (no dropout) and is put back in its previous mode."""
    was_training = model.training
    model.eval()
    total, n = None, 0
    for x, y in batches:
        with autocast or contextlib.nullcontext():
            loss = model(x, targets=y).double() * y.numel()  # [] sum over the batch
        total = loss if total is None else total + loss
        n += y.numel()
    model.train(was_training)
    if total is None:
        raise EvalError("no validation batches")
    return total / n, n


def _bytes_of(tokens: np.ndarray, tokenizer) -> int:
    """UTF-8 bytes of the decoded text; every EOS counts one byte (a separator)."""
    eos = tokenizer.eos_id
    cuts = np.flatnonzero(tokens == eos)
    n, start = len(cuts), 0
    for end in [*cuts.tolist(), len(tokens)]:
        if end > start:
            n += len(tokenizer.decode(tokens[start:end].tolist()).encode("utf-8"))
        start = end + 1
    return n


@torch.no_grad()
def perplexity(
    model: Transformer,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int = 16,
    tokenizer=None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Mean next-token NLL over ``tokens`` cut into sequences of ``seq_len`` targets
    (consecutive sequences share one token, as in :class:`PackedLoader`)."""
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    n_seq = (len(tokens) - 1) // seq_len
    if n_seq == 0:
        raise EvalError(f"{len(tokens)} validation tokens make no sequence of seq_len={seq_len}")
    device = next(model.parameters()).device
    idx = np.arange(n_seq)[:, None] * seq_len + np.arange(seq_len + 1)  # [n_seq, T+1]

    def batches():
        bar = tqdm(
            range(0, n_seq, batch_size), desc="perplexity", disable=not progress, leave=False
        )
        for lo in bar:
            chunk = np.asarray(tokens[idx[lo : lo + batch_size]]).astype(np.int64)
            chunk = torch.from_numpy(chunk).to(device)  # [B, T+1]
            yield chunk[:, :-1], chunk[:, 1:]  # [B, T] each

    mean, n_tok = validation_loss(model, batches())
    loss = mean.item()
    total = loss * n_tok
    out = {"tokens": n_tok, "loss": loss, "ppl": math.exp(min(loss, 700.0))}
    out["bits_per_token"] = loss / LN2
    if tokenizer is not None:
        n_bytes = _bytes_of(np.asarray(tokens[1 : n_tok + 1]), tokenizer)
        out["bytes"] = n_bytes
        out["bits_per_byte"] = total / LN2 / max(1, n_bytes)
    return out


@contextlib.contextmanager
def track_memory_usage(model: Transformer):
    """Collect :class:`MemoryUsage` on every memory layer while the block runs; yields
    ``{block index: collector}``."""
    layers = {i: b.ffn for i, b in enumerate(model.layers) if isinstance(b.ffn, ProductKeyMemory)}
    trackers = {i: m.track_usage() for i, m in layers.items()}
    try:
        yield trackers
    finally:
        for m in layers.values():
            m.track_usage(False)


def usage_report(model: Transformer, trackers: dict[int, MemoryUsage]) -> dict[str, dict]:
    """``{"block_<i>": stats}`` per memory layer, plus ``"shared_table"`` (all layers'
    reads of the one Memory+ table together) when the layers share values. Its
    ``lookups`` are tokens, as a layer's are: every layer reads the table once for each
    of the same tokens (summing the layers' counted each token once per layer)."""
    out = {f"block_{i}": u.report() for i, u in trackers.items() if u.counts is not None}
    used = [u for u in trackers.values() if u.counts is not None]
    if model.memory_values is not None and len(used) > 1:
        merged = MemoryUsage(used[0].n_rows)
        merged.counts = sum(u.counts for u in used)
        merged.mass = sum(u.mass for u in used)
        merged.lookups = max(u.lookups for u in used)  # the tokens (the same for each)
        out["shared_table"] = merged.report()
    return out
