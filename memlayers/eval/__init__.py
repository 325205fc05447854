"""Evaluate a trained run: perplexity, factual QA, knowledge stored in bits, memory usage.

    memlayers eval runs/tiny-memory-plus                     # newest checkpoint of a run
    memlayers eval runs/tiny-memory-plus/checkpoints/step_000400
    memlayers eval runs/x --qa my_questions.jsonl --qa more.jsonl   # bring your own QA
    memlayers eval runs/x --max-qa 200 --max-val-tokens 20000 --device cpu   # quicker
    memlayers eval runs/x --json                            # print the JSON, not the table
    memlayers eval runs/x --offload     # value tables memory-mapped on the host (serving)

What it measures (results in ``RUN_DIR/eval/results.json``, written atomically, plus
``RUN_DIR/eval/<qa set>.predictions.jsonl`` and a printed table; an older checkpoint's go
to ``RUN_DIR/eval/<step_dir>/``). A partial or different evaluation (``--qa`` files,
``--no-builtin-qa``, ``--max-qa``, ``--max-val-tokens``, ``--max-new-tokens`` other than
the defaults) never replaces those: it writes ``results-<what>.json`` and
``<qa set>.predictions-<what>.jsonl`` beside them, ``<what>`` naming the differences
(e.g. ``results-qa-my_questions_max-qa-200.json``):

- ``perplexity``: next-token loss on the run's validation tokens, cut into ``seq_len``
  sequences like training: nats/token, perplexity, bits/token and **bits per byte**
  (bytes of the decoded text; each EOS counts as one byte, a document separator).
- ``qa``: for the held-out QA of a bios / bios_compact / facts run and every ``--qa``
  file (JSONL, one ``{"question", "answers": [...], "context"?}`` per line): the
  **answer NLL** (docs/method.md §4: the metric for small models; the lowest over a record's
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

Modules: :mod:`~memlayers.eval.validation` (the validation-loss loop, perplexity,
usage), :mod:`~memlayers.eval.knowledge` (QA, bits), :mod:`~memlayers.eval.table`
(printing); :func:`evaluate` here puts them together.

``--offload`` evaluates with the value tables memory-mapped from the checkpoint and the
rows each lookup reads gathered to the device (:mod:`memlayers.offload`), for a table that
does not fit there (``--zero-copy``: read into page-locked RAM, the rows read in place by
the GPU): the same numbers as on the device (tests/test_offload.py), so the same results
file; ``value_table`` records ``"offloaded": true`` and the ``"offload_mode"``.

The run directory must hold ``config.yaml`` (the data config) and a checkpoint; the
tokenizer comes from ``RUN_DIR/tokenizer.json`` (the trainer writes it) or, for older
runs, from rebuilding the dataset.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from memlayers.data.loader import load_dataset
from memlayers.data.qa import read_qa_jsonl
from memlayers.eval.knowledge import (
    BIOS_DATASETS,
    BUILTIN_QA_NAMES,
    dataset_qa,
    greedy_answers,
    knowledge_stored,
    qa_eval,
)
from memlayers.eval.table import format_results, headline
from memlayers.eval.validation import (
    LN2,
    EvalError,
    _bytes_of,
    check_counts,
    perplexity,
    track_memory_usage,
    usage_report,
    validation_loss,
)
from memlayers.files import write_atomic
from memlayers.metrics import input_device
from memlayers.quantize import table_format, value_tables
from memlayers.report import parameter_report
from memlayers.run import TrainedRun, load_run

Run = TrainedRun  # the name of a loaded run here before memlayers.run

__all__ = [
    "BIOS_DATASETS",
    "LN2",
    "EvalError",
    "Run",
    "TrainedRun",
    "_bytes_of",
    "dataset_qa",
    "evaluate",
    "format_results",
    "greedy_answers",
    "headline",
    "knowledge_stored",
    "load_run",
    "perplexity",
    "qa_eval",
    "track_memory_usage",
    "usage_report",
    "validation_loss",
]


MAX_VAL_TOKENS = 100_000  # perplexity tokens of the run's own evaluation
MAX_NEW_TOKENS = 16  # greedy answer length of the run's own evaluation


def partial_name(
    qa_files: list[Path],
    builtin_qa: bool,
    knowledge: bool,
    max_qa: int | None,
    max_val_tokens: int | None,
    max_new_tokens: int,
) -> str | None:
    """``<what>`` of ``results-<what>.json``: how an evaluation differs from the run's own
    (:func:`evaluate` with its defaults, whose ``results.json`` `compare --reuse` and the
    docs read); None when it does not."""
    parts = [f"qa-{f.stem}" for f in qa_files]
    parts += ["no-builtin-qa"] if not builtin_qa else []
    parts += ["no-knowledge"] if not knowledge else []
    parts += [f"max-qa-{max_qa}"] if max_qa else []
    if max_val_tokens != MAX_VAL_TOKENS:
        parts.append(f"val-tokens-{max_val_tokens or 'all'}")
    parts += [f"new-tokens-{max_new_tokens}"] if max_new_tokens != MAX_NEW_TOKENS else []
    return re.sub(r"[^\w.+-]+", "-", "_".join(parts)) if parts else None


# The knowledge probes are one short sequence per person and attribute (250,000 for the
# 50,000 people of configs/study_134m.yaml), so at the QA batch each forward is tiny and a
# GPU waits on launches: there they go PROBE_BATCH_GPU times as many a forward.
PROBE_BATCH_GPU = 8


def probe_batch_size(model: torch.nn.Module, batch_size: int) -> int:
    """The knowledge probes' batch: ``batch_size``, times :data:`PROBE_BATCH_GPU` on a GPU."""
    on_gpu = input_device(model, None).type == "cuda"
    return batch_size * (PROBE_BATCH_GPU if on_gpu else 1)


def evaluate(
    run: str | Path | Run,
    qa: list[str | Path] | tuple = (),
    device: str = "auto",
    max_qa: int | None = None,
    max_val_tokens: int | None = MAX_VAL_TOKENS,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 64,
    builtin_qa: bool = True,
    knowledge: bool = True,
    progress: bool = True,
    write: bool = True,
    offload: bool | str = False,
) -> dict:
    """Evaluate a run directory or checkpoint (see the module docstring); returns the
    results dict and, with ``write``, saves it to ``RUN_DIR/eval/results.json`` (an
    older checkpoint's to ``RUN_DIR/eval/<step_dir>/results.json``; a partial one's to
    ``results-<what>.json`` beside it, :func:`partial_name`).

    ``max_qa`` keeps the first records of each QA set; ``max_val_tokens`` caps the
    perplexity tokens (None: all); ``offload`` keeps the value tables in host memory
    (:func:`memlayers.run.load_run`; a loaded ``run`` is used as it is)."""
    t0 = time.perf_counter()
    check_counts(max_qa=max_qa, max_new_tokens=max_new_tokens, batch_size=batch_size,
                 max_val_tokens=max_val_tokens)  # fmt: skip
    qa_files = [Path(q) for q in qa]
    qa_sets: dict[str, list[dict]] = {}
    for f in qa_files:  # fail on a bad file before loading anything big
        if not f.is_file():
            raise EvalError(f"--qa {f}: no such file")
        if f.stem in qa_sets:  # a set is named by its file's stem: one would replace the other
            other = next(g for g in qa_files if g.stem == f.stem)
            raise EvalError(f"--qa {f} and {other}: two QA sets named {f.stem!r} (rename one)")
        if f.stem in BUILTIN_QA_NAMES:
            raise EvalError(
                f"--qa {f}: {f.stem!r} is the name of a dataset's own held-out set (rename it)"
            )
        qa_sets[f.stem] = read_qa_jsonl(f)
    run = run if isinstance(run, Run) else load_run(run, device, offload=offload)
    model, tok, args = run.model, run.tokenizer, run.args
    # From the config: a quantized table (memlayers.quantize) is stored in buffers, not
    # parameters, but the model has the same parameters as the float one it came from.
    rep = parameter_report(model.config, seq_len=args.data.seq_len)
    train_flops = float(rep["train_flops_per_token"]) * run.tokens_trained
    results: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "tokens_trained": run.tokens_trained,
        "train_seconds": run.progress.train_seconds,
        "dataset": args.data.dataset,
        "preset": args.model.preset,
        "params": {k: v for k, v in rep.items() if k != "seq_len"},
        "train_flops": train_flops,
    }
    table = table_format(model)
    if table is not None:  # how the value table is stored: float dtype or int8/int4
        modes = {t.offloaded.mode for t in value_tables(model) if t.offloaded is not None}
        if modes:
            table = {**table, "offloaded": True, "offload_mode": "/".join(sorted(modes))}
        results["value_table"] = table
    wants = builtin_qa or (knowledge and args.data.dataset in BIOS_DATASETS)
    builtin = dataset_qa(args) if wants and tok is not None else None
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
        t1 = time.perf_counter()
        results["knowledge"] = knowledge_stored(
            model, tok, bios, rep, train_flops, probe_batch_size(model, batch_size)
        )
        results["knowledge_seconds"] = time.perf_counter() - t1  # (the pass's own time)
    results["eval_seconds"] = time.perf_counter() - t0
    if write:
        out = run.run.eval_dir(run.checkpoint)
        what = partial_name(qa_files, builtin_qa, knowledge, max_qa, max_val_tokens, max_new_tokens)
        suffix = f"-{what}" if what else ""
        results["results_path"] = str(out / f"results{suffix}.json")
        out.mkdir(parents=True, exist_ok=True)
        for name, preds in predictions.items():
            write_atomic(
                out / f"{name}.predictions{suffix}.jsonl",
                "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds),
            )
        write_atomic(Path(results["results_path"]), json.dumps(results, indent=2) + "\n")
    return results
