"""Factual QA (answer NLL, greedy exact match / F1) and bios knowledge stored in bits."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from tqdm.auto import tqdm

from memlayers.config import TrainArgs
from memlayers.data.qa import qa_prompt
from memlayers.eval.validation import EvalError
from memlayers.metrics import (
    answer_nll_batch,
    bits_per,
    ce_bits_by_attribute,
    knowledge_bits,
    qa_scores,
)
from memlayers.model import Transformer, restricted_vocab

BIOS_DATASETS = ("bios", "bios_compact")


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
    ``[EOS] + encode(qa_prompt(question, context))`` as in :func:`memlayers.metrics`; an answer
    ends at EOS or a newline. A model whose embedding is padded past the tokenizer decodes
    over the tokenizer's ids alone (:func:`memlayers.model.restricted_vocab`)."""
    with restricted_vocab(model, min(tokenizer.vocab_size, model.config.vocab_size)):
        return _greedy_answers(model, tokenizer, records, max_new_tokens, batch_size, progress)


def _greedy_answers(model, tokenizer, records, max_new_tokens, batch_size, progress):
    device = next(model.parameters()).device
    eos = tokenizer.eos_id
    prompts = [
        [eos] + tokenizer.encode(qa_prompt(r["question"], r.get("context"))) for r in records
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
    """Answer NLL, exact match and F1 over ``records``; returns (summary, predictions).
    An empty ``records`` is an error, raised before the model runs."""
    _check_not_empty(records)
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
        )  # token ids go to the model's device (metrics.input_device)
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


def _check_not_empty(records: list[dict]) -> None:
    # 0 records once scored "0.0% EM, answer NLL 0.000": a perfect-looking NLL
    if not records:
        raise EvalError("the QA set has no QA records: there is nothing to evaluate")


def _qa_summary(records, preds, best) -> dict:
    _check_not_empty(records)
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


# The names of the datasets' own held-out QA sets (:func:`dataset_qa`): a --qa file may not
# take one, or its numbers would be reported under the built-in set's name.
BUILTIN_QA_NAMES = frozenset(f"{d}-heldout" for d in (*BIOS_DATASETS, "facts"))


def dataset_qa(args: TrainArgs) -> tuple[str, list[dict], Any] | None:
    """(name, held-out QA records, BiosData or None) of a bios or facts run."""
    name = args.data.dataset
    if name in BIOS_DATASETS:
        from memlayers.data.datasets import bios_from_args

        bios = bios_from_args(args.data, compact=name == "bios_compact")
        return f"{name}-heldout", bios.qa_eval, bios
    if name == "facts":
        from memlayers.data.datasets import facts_from_args

        return "facts-heldout", facts_from_args(args.data).qa_eval, None
    return None


# ---- knowledge stored ----------------------------------------------------------------------


def knowledge_stored(
    model: Transformer, tokenizer, bios, report: dict, train_flops: float, batch_size=64
) -> dict:
    """Bits of bios knowledge stored and its per-parameter / per-FLOP normalisations."""
    probes = bios.probe_records()
    nll = answer_nll_batch(
        model,
        tokenizer,
        [r["question"] for r in probes],
        [r["answers"][0] for r in probes],
        batch_size=batch_size,
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
