"""Evaluate a trained run: perplexity, factual QA, knowledge stored in bits, memory usage.

    memlayers eval runs/tiny-memory-plus                     # newest checkpoint of a run
    memlayers eval runs/tiny-memory-plus/checkpoints/step_000400
    memlayers eval runs/x --qa my_questions.jsonl --qa more.jsonl   # bring your own QA
    memlayers eval runs/x --max-qa 200 --max-val-tokens 20000 --device cpu   # quicker
    memlayers eval runs/x --json                            # print the JSON, not the table

What it measures (results in ``RUN_DIR/eval/results.json``, written atomically, plus
``RUN_DIR/eval/<qa set>.predictions.jsonl`` and a printed table; an older checkpoint's go
to ``RUN_DIR/eval/<step_dir>/``):

- ``perplexity``: next-token loss on the run's validation tokens, cut into ``seq_len``
  sequences like training: nats/token, perplexity, bits/token and **bits per byte**
  (bytes of the decoded text; each EOS counts as one byte, a document separator).
- ``qa``: for the held-out QA of a bios / bios_compact / facts run and every ``--qa``
  file (JSONL, one ``{"question", "answers": [...], "context"?}`` per line): the
  **answer NLL** (PAPER.md §3: the metric for small models; the lowest over a record's
  gold answers, per question in nats and per answer token, token-weighted) and **exact
  match / F1** of greedy answers after open-domain-QA normalisation
  (:mod:`memlayers.metrics`). bios adds a per-attribute breakdown.
- ``knowledge`` (bios runs): bits stored = Σ_a max(0, N·log2|V_a| − Σ_i CE_i,a) from the
  answer NLL of a bio-style probe of every person and attribute, per total,
  non-embedding and active parameter and per training FLOP (:mod:`memlayers.report`
  counts; FLOPs = ``train_flops_per_token`` × tokens trained).
- ``usage``: per memory layer (and over the shared table), the rows read at least once,
  KL from uniform and Gini of the read weight over the perplexity tokens
  (:class:`memlayers.usage.MemoryUsage`).

The run directory must hold ``config.yaml`` (the data config) and a checkpoint; the
tokenizer comes from ``RUN_DIR/tokenizer.json`` (the trainer writes it) or, for older
runs, from rebuilding the dataset.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from memlayers.checkpoint import (
    CheckpointError,
    load_model_from_checkpoint,
    resolve_checkpoint,
)
from memlayers.config import TrainArgs, load_config
from memlayers.data.loader import load_dataset
from memlayers.data.qa import read_qa_jsonl
from memlayers.data.tokenizer import load_tokenizer
from memlayers.files import write_atomic
from memlayers.memory import ProductKeyMemory
from memlayers.metrics import (
    answer_nll_batch,
    bits_per,
    ce_bits_by_attribute,
    knowledge_bits,
    qa_scores,
)
from memlayers.model import Transformer
from memlayers.report import parameter_report, si
from memlayers.usage import MemoryUsage

LN2 = math.log(2.0)
BIOS_DATASETS = ("bios", "bios_compact")


class EvalError(ValueError):
    """The run cannot be evaluated (no run directory, config or checkpoint, bad input)."""


class Run(NamedTuple):
    """A trained model with what evaluating or sampling it needs."""

    run_dir: Path
    checkpoint: Path
    args: TrainArgs  # the resolved training config
    model: Transformer  # in eval mode
    tokenizer: Any  # encode / decode / eos_id, or None (synthetic data)
    step: int
    tokens_trained: int


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _run_dir_of(path: Path) -> Path:
    """The run directory of a run directory or of a checkpoint inside one."""
    for p in (path, *path.parents):
        if (p / "config.yaml").is_file():
            return p
    raise EvalError(
        f"{path}: no config.yaml here or above; pass a run directory written by "
        f"`memlayers train` (or one of its checkpoints)"
    )


def load_run(path: str | Path, device: str = "auto", need_tokenizer: bool = True) -> Run:
    """Load a run directory's newest checkpoint (or the checkpoint ``path`` names)."""
    path = Path(path)
    if not path.exists():
        raise EvalError(f"no such run directory or checkpoint: {path}")
    run_dir = _run_dir_of(path)
    try:
        ckpt = resolve_checkpoint(path)
    except CheckpointError as e:
        raise EvalError(f"{e} (has the run finished a checkpoint?)") from None
    args = load_config([run_dir / "config.yaml"])
    model = load_model_from_checkpoint(ckpt, _device(device)).eval()  # verifies the files
    step = int(json.loads((ckpt / "meta.json").read_text())["step"])
    trainer = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
    world = int(trainer.get("data", {}).get("world_size", 1))  # tokens per step × ranks
    tokens = step * args.data.batch_size * args.data.seq_len * args.grad_accum * world
    tok = None
    if (run_dir / "tokenizer.json").is_file():
        tok = load_tokenizer(run_dir / "tokenizer.json")
    elif need_tokenizer:
        tok = load_dataset(args.data).tokenizer  # older runs: rebuild (deterministic)
    if tok is not None and tok.vocab_size != model.config.vocab_size:
        raise EvalError(
            f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}: {run_dir / 'tokenizer.json'} is not this run's"
        )
    return Run(run_dir, ckpt, args, model, tok, step, tokens)


# ---- perplexity and memory usage -----------------------------------------------------------


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
    total = 0.0
    bar = tqdm(range(0, n_seq, batch_size), desc="perplexity", disable=not progress, leave=False)
    for lo in bar:
        chunk = torch.from_numpy(np.asarray(tokens[idx[lo : lo + batch_size]]).astype(np.int64))
        x, y = chunk[:, :-1].to(device), chunk[:, 1:].to(device)  # [B, T] each
        logits = model(x).float()  # [B, T, V]
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
    n_tok = n_seq * seq_len
    loss = total / n_tok
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
    reads of the one Memory+ table together) when the layers share values."""
    out = {f"block_{i}": u.report() for i, u in trackers.items() if u.counts is not None}
    used = [u for u in trackers.values() if u.counts is not None]
    if model.memory_values is not None and len(used) > 1:
        merged = MemoryUsage(used[0].n_rows)
        merged.counts = sum(u.counts for u in used)
        merged.mass = sum(u.mass for u in used)
        merged.lookups = sum(u.lookups for u in used)
        out["shared_table"] = merged.report()
    return out


# ---- factual QA ----------------------------------------------------------------------------


@torch.no_grad()
def greedy_answers(
    model: Transformer,
    tokenizer,
    records: list[dict],
    max_new_tokens: int = 16,
    batch_size: int = 64,
    progress: bool = True,
) -> list[str]:
    """Greedy answers to ``records`` with the KV cache, batched by prompt length (no
    padding, so every answer is exactly what one-by-one decoding gives). The prompt is
    ``[EOS] + encode(context + " " + question)`` as in :func:`memlayers.metrics`; an answer
    ends at EOS or a newline."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_id
    prompts = [
        [eos]
        + tokenizer.encode(f"{r['context']} {r['question']}" if r.get("context") else r["question"])
        for r in records
    ]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    out: list[str] = [""] * len(records)
    batches = [
        ids[lo : lo + batch_size]
        for _, ids in sorted(by_len.items())
        for lo in range(0, len(ids), batch_size)
    ]
    for ids in tqdm(batches, desc="generate", disable=not progress, leave=False):
        t0 = len(prompts[ids[0]])
        room = model.config.max_seq_len - t0
        if room < 1:
            raise EvalError(
                f"a prompt of {t0} tokens leaves no room below max_seq_len="
                f"{model.config.max_seq_len}: {records[ids[0]]['question'][:80]!r}"
            )
        x = torch.tensor([prompts[i] for i in ids], device=device)  # [B, t0]
        gen = model.generate(x, min(max_new_tokens, room), eos_id=eos)[:, t0:].tolist()
        for i, new in zip(ids, gen, strict=True):
            new = new[: new.index(eos)] if eos in new else new
            out[i] = tokenizer.decode(new).split("\n")[0].strip()
    return out


def qa_eval(
    model: Transformer,
    tokenizer,
    records: list[dict],
    max_new_tokens: int = 16,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Answer NLL, exact match and F1 over ``records``; returns (summary, predictions)."""
    device = next(model.parameters()).device
    flat = [(i, a) for i, r in enumerate(records) for a in r["answers"]]
    nll: list[dict] = []
    for lo in tqdm(range(0, len(flat), 1024), desc="answer NLL", disable=not progress, leave=False):
        part = flat[lo : lo + 1024]
        nll += answer_nll_batch(
            model,
            tokenizer,
            [records[i]["question"] for i, _ in part],
            [a for _, a in part],
            [records[i].get("context") for i, _ in part],
            batch_size=batch_size,
            device=device,
        )
    best: list[dict] = [{} for _ in records]
    for (i, _), r in zip(flat, nll, strict=True):
        if not best[i] or r["nll"] < best[i]["nll"]:
            best[i] = r
    preds = greedy_answers(model, tokenizer, records, max_new_tokens, batch_size, progress)
    summary = _qa_summary(records, preds, best)
    by_attr = defaultdict(list)
    for k, r in enumerate(records):
        if "attribute" in r:
            by_attr[r["attribute"]].append(k)
    if by_attr:
        summary["by_attribute"] = {
            a: _qa_summary([records[k] for k in ks], [preds[k] for k in ks], [best[k] for k in ks])
            for a, ks in by_attr.items()
        }
    predictions = [
        {
            "question": r["question"],
            "answers": r["answers"],
            "prediction": p,
            "nll": b["nll"],
            **{k: v for k, v in r.items() if k in ("person", "attribute", "subject", "relation")},
        }
        for r, p, b in zip(records, preds, best, strict=True)
    ]
    return summary, predictions


def _qa_summary(records, preds, best) -> dict:
    s = qa_scores(preds, records)
    n_tok = sum(b["n_tokens"] for b in best)
    total = sum(b["nll"] for b in best)
    return {
        "n": len(records),
        "exact_match": s["exact_match"],
        "f1": s["f1"],
        "answer_nll": total / max(1, len(records)),  # nats per question
        "answer_nll_per_token": total / max(1.0, n_tok),  # nats per answer token
    }


def _builtin_qa(args: TrainArgs) -> tuple[str, list[dict], Any] | None:
    """(name, held-out QA records, BiosData or None) of a bios or facts run."""
    name = args.data.dataset
    if name in BIOS_DATASETS:
        from memlayers.data.datasets import bios_from_args

        bios = bios_from_args(args.data, compact=name == "bios_compact")
        return f"{name}-heldout", bios.qa_eval, bios
    if name == "facts":
        from memlayers.data.facts import build_facts

        opts = {k: v for k, v in args.data.options.items() if k != "tokenizer"}
        return "facts-heldout", build_facts(args.data.path, **opts).qa_eval, None
    return None


# ---- knowledge stored ----------------------------------------------------------------------


def knowledge_stored(
    model: Transformer, tokenizer, bios, report: dict, train_flops: float, batch_size=64
) -> dict:
    """Bits of bios knowledge stored and its per-parameter / per-FLOP normalisations."""
    device = next(model.parameters()).device
    probes = bios.probe_records()
    nll = answer_nll_batch(
        model,
        tokenizer,
        [r["question"] for r in probes],
        [r["answers"][0] for r in probes],
        batch_size=batch_size,
        device=device,
    )
    ce = ce_bits_by_attribute(probes, nll)
    kb = knowledge_bits(ce, bios.config.n_people, bios.value_set_sizes)
    out = bits_per(
        kb["total"],
        report["total"],
        report["non_embedding"],
        report["active_per_token"],
        max(train_flops, 1.0),
    )
    out["capacity"] = kb["capacity"]
    out["fraction"] = kb["total"] / kb["capacity"]
    out["by_attribute"] = {a: kb[a] for a in bios.value_set_sizes}
    return out


# ---- the whole evaluation ------------------------------------------------------------------


def evaluate(
    run: str | Path | Run,
    qa: list[str | Path] | tuple = (),
    device: str = "auto",
    max_qa: int | None = None,
    max_val_tokens: int | None = 100_000,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    builtin_qa: bool = True,
    knowledge: bool = True,
    progress: bool = True,
    write: bool = True,
) -> dict:
    """Evaluate a run directory or checkpoint (see the module docstring); returns the
    results dict and, with ``write``, saves it to ``RUN_DIR/eval/results.json`` (an
    older checkpoint's to ``RUN_DIR/eval/<step_dir>/results.json``).

    ``max_qa`` keeps the first records of each QA set; ``max_val_tokens`` caps the
    perplexity tokens (None: all)."""
    t0 = time.perf_counter()
    qa_files = [Path(q) for q in qa]
    qa_sets: dict[str, list[dict]] = {}
    for f in qa_files:  # fail on a bad file before loading anything big
        if not f.is_file():
            raise EvalError(f"--qa {f}: no such file")
        qa_sets[f.stem] = read_qa_jsonl(f)
    run = run if isinstance(run, Run) else load_run(run, device)
    model, tok, args = run.model, run.tokenizer, run.args
    rep = parameter_report(model, seq_len=args.data.seq_len)
    train_flops = float(rep["train_flops_per_token"]) * run.tokens_trained
    results: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "tokens_trained": run.tokens_trained,
        "dataset": args.data.dataset,
        "preset": args.model.preset,
        "params": {k: v for k, v in rep.items() if k != "seq_len"},
        "train_flops": train_flops,
    }
    wants = builtin_qa or (knowledge and args.data.dataset in BIOS_DATASETS)
    builtin = _builtin_qa(args) if wants and tok is not None else None
    bios = builtin[2] if builtin is not None else None
    if bios is not None:  # the dataset is built already: its validation stream is here
        val, split = bios.val_tokens, "val"
    else:
        data = load_dataset(args.data)
        split = "val" if len(data.val) > args.data.seq_len else "train-tail"
        val = data.val if split == "val" else data.train[-(200_000 + 1) :]
    results["perplexity_split"] = split
    with track_memory_usage(model) as trackers:
        results["perplexity"] = perplexity(
            model, val, args.data.seq_len, args.data.batch_size, tok, max_val_tokens, progress
        )
    if trackers:
        results["usage"] = usage_report(model, trackers)

    if builtin is not None and builtin_qa:
        qa_sets = {builtin[0]: builtin[1], **qa_sets}
    if qa_sets and tok is None:
        raise EvalError(f"dataset {args.data.dataset!r} has no tokenizer: it cannot answer QA")
    results["qa"] = {}
    predictions = {}
    for name, records in qa_sets.items():
        records = records[:max_qa] if max_qa else records
        try:
            summary, preds = qa_eval(model, tok, records, max_new_tokens, batch_size, progress)
        except KeyError as e:  # a closed vocabulary meets an unknown word
            raise EvalError(f"QA set {name!r}: {e.args[0]}") from None
        results["qa"][name] = summary
        predictions[name] = preds

    if knowledge and bios is not None:
        results["knowledge"] = knowledge_stored(model, tok, bios, rep, train_flops, batch_size)
    results["eval_seconds"] = time.perf_counter() - t0
    if write:
        out = eval_dir(run)
        results["results_path"] = str(out / "results.json")
        out.mkdir(parents=True, exist_ok=True)
        for name, preds in predictions.items():
            write_atomic(
                out / f"{name}.predictions.jsonl",
                "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds),
            )
        write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def eval_dir(run: Run) -> Path:
    """``RUN_DIR/eval`` for the run's newest checkpoint, ``RUN_DIR/eval/<step_dir>`` for an
    older one (so evaluating an intermediate checkpoint never replaces the run's results)."""
    latest = resolve_checkpoint(run.run_dir)
    same = run.checkpoint.resolve() == latest.resolve()
    return run.run_dir / "eval" if same else run.run_dir / "eval" / run.checkpoint.name


# ---- the printed table ---------------------------------------------------------------------


def format_results(r: dict) -> str:
    """The results as a readable table."""
    p = r["params"]
    lines = [
        f"eval of {r['run_dir']} at step {r['step']} ({si(r['tokens_trained'])} tokens, "
        f"{r['train_flops']:.3g} training FLOPs; dataset {r['dataset']})",
        f"  parameters  total {si(p['total'])}, non-embedding {si(p['non_embedding'])}, "
        f"active/token {si(p['active_per_token'])}, memory table {si(p['memory_table'])}",
    ]
    pp = r["perplexity"]
    bpb = f", {pp['bits_per_byte']:.3f} bits/byte" if "bits_per_byte" in pp else ""
    lines.append(
        f"  perplexity  {pp['ppl']:.3f} on {pp['tokens']:,} {r['perplexity_split']} tokens "
        f"({pp['loss']:.4f} nats/token, {pp['bits_per_token']:.3f} bits/token{bpb})"
    )
    if r.get("qa"):
        w = max(12, *(len(n) for n in r["qa"]))
        lines.append(
            f"  {'QA set':<{w}}  {'n':>6}  {'EM':>6}  {'F1':>6}  {'NLL/tok':>8}  {'NLL/ans':>8}"
        )
        for name, s in r["qa"].items():
            rows = [(name, s)] + [(f"  {a}", v) for a, v in s.get("by_attribute", {}).items()]
            for label, v in rows:
                lines.append(
                    f"  {label:<{w}}  {v['n']:>6}  {100 * v['exact_match']:>5.1f}%  "
                    f"{100 * v['f1']:>5.1f}%  {v['answer_nll_per_token']:>8.3f}  "
                    f"{v['answer_nll']:>8.3f}"
                )
    if "knowledge" in r:
        k = r["knowledge"]
        lines.append(
            f"  knowledge   {k['bits']:,.0f} bits stored of {k['capacity']:,.0f} "
            f"({100 * k['fraction']:.1f}%): {k['bits_per_param']:.4f} /param, "
            f"{k['bits_per_non_embedding_param']:.4f} /non-embedding param, "
            f"{k['bits_per_active_param']:.4f} /active param, {k['bits_per_flop']:.3g} /FLOP"
        )
        lines.append(
            "              " + ", ".join(f"{a} {b:,.0f}" for a, b in k["by_attribute"].items())
        )
    if r.get("usage"):
        lines.append(
            f"  {'memory':<12}  {'rows used':>9}  {'KL(u)':>7}  {'Gini':>6}  (of log n = "
            f"{next(iter(r['usage'].values()))['kl_max']:.2f})"
        )
        for name, u in r["usage"].items():
            lines.append(
                f"  {name:<12}  {u['rows_used_pct']:>8.1f}%  {u['kl_uniform']:>7.3f}  "
                f"{u['gini']:>6.3f}"
            )
    return "\n".join(lines)


def headline(r: dict) -> str:
    """Two lines for the end of ``memlayers train``: QA accuracy and bits stored."""
    out = []
    for name, s in r.get("qa", {}).items():
        out.append(
            f"{name} QA: exact match {100 * s['exact_match']:.1f}% (F1 {100 * s['f1']:.1f}%) "
            f"on {s['n']} questions, answer NLL {s['answer_nll_per_token']:.3f} nats/token"
        )
    if "knowledge" in r:
        k = r["knowledge"]
        out.append(
            f"knowledge stored: {k['bits']:,.0f} bits of {k['capacity']:,.0f} "
            f"({100 * k['fraction']:.1f}%), {k['bits_per_active_param']:.4f} bits/active param"
        )
    return "\n".join(out)
