"""Evaluation metrics: factual QA (answer NLL, exact match, F1) and knowledge stored in bits.

- Answer NLL (the paper's metric for small models, docs/method.md §4): the negative
  log-likelihood of the gold answer given the question, per answer token and in total,
  in nats. The prompt is ``[EOS] + encode(question)`` (documents in a packed stream start
  after an EOS) and the continuation is ``encode(" " + answer)``, tokenised apart so the
  answer's tokens are exactly its own.
- Exact match / F1 of a generated answer against any gold answer, after SQuAD-style
  normalisation (lowercase, drop punctuation and the articles a/an/the, collapse
  whitespace), as in open-domain QA (NaturalQuestions EM, TriviaQA F1).
- Knowledge stored in bits (after Allen-Zhu & Li, "Physics of Language Models: Part 3.3,
  Knowledge Capacity Scaling Laws", 2024; :func:`knowledge_bits`):
  Σ_a max(0, N·log2|V_a| − Σ_i CE_i,a), CE in bits, with per-parameter and per-FLOP
  normalisations (:func:`bits_per`). Memory-layer usage statistics live in
  :mod:`memlayers.usage`.

``model_fn`` everywhere is any callable mapping token ids ``[B, T]`` (int64) to logits
``[B, T, V]``; causal, so right padding does not change the positions that are scored.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from memlayers.data.qa import qa_prompt

ModelFn = Callable[[torch.Tensor], torch.Tensor]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------
# Exact match and F1


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, remove punctuation, articles and extra whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    answers = [answers] if isinstance(answers, str) else answers
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)  # both empty: 1, one empty: 0
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: str | Sequence[str]) -> float:
    """Max over gold answers of the bag-of-words F1 of normalised tokens."""
    answers = [answers] if isinstance(answers, str) else answers
    p = normalize_answer(prediction).split()
    return max(_f1(p, normalize_answer(a).split()) for a in answers)


# --------------------------------------------------------------------------------------
# Answer NLL and greedy answers


def _prompt_ids(tokenizer, question: str, context: str | None, prefix_eos: bool) -> list[int]:
    text = qa_prompt(question, context)
    return ([tokenizer.eos_id] if prefix_eos else []) + tokenizer.encode(text)


def input_device(model_fn: ModelFn, device: torch.device | str | None) -> torch.device:
    """Where ``model_fn`` takes its token ids: ``device`` when given, else the device of a
    module's first parameter (a CUDA model gets CUDA ids), else the CPU."""
    if device is not None:
        return torch.device(device)
    if isinstance(model_fn, torch.nn.Module):
        param = next(model_fn.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


@torch.no_grad()
def answer_nll_batch(
    model_fn: ModelFn,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    contexts: Sequence[str | None] | None = None,
    prefix_eos: bool = True,
    batch_size: int = 32,
    device: torch.device | str | None = None,
) -> list[dict[str, float]]:
    """Answer NLL for many (question, answer) pairs; returns one dict per pair with
    ``nll`` (total, nats), ``nll_per_token`` (nats), ``n_tokens`` and ``bits`` (total).

    Sequences are right-padded with EOS; only answer positions are scored, with the
    log-softmax taken in fp32 whatever the model's dtype."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    device = input_device(model_fn, device)
    contexts = contexts if contexts is not None else [None] * len(questions)
    out: list[dict[str, float]] = []
    for lo in range(0, len(questions), batch_size):
        prompts = [
            _prompt_ids(tokenizer, q, c, prefix_eos)
            for q, c in zip(
                questions[lo : lo + batch_size], contexts[lo : lo + batch_size], strict=True
            )
        ]
        conts = [tokenizer.encode(" " + a) for a in answers[lo : lo + batch_size]]
        for i, c in enumerate(conts):
            if not c or not prompts[i]:
                raise ValueError(f"pair {lo + i}: empty prompt or answer after tokenisation")
        seqs = [p + c for p, c in zip(prompts, conts, strict=True)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tokenizer.eos_id, dtype=torch.long)  # [B, T]
        target_mask = torch.zeros((len(seqs), width), dtype=torch.bool)  # [B, T]
        for b, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
            ids[b, : len(s)] = torch.tensor(s)
            target_mask[b, len(p) : len(s)] = True
        logits = model_fn(ids.to(device)).float()  # [B, T, V]
        logp = F.log_softmax(logits[:, :-1], dim=-1)  # [B, T-1, V] predicts ids[:, 1:]
        tok_logp = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)  # [B, T-1]
        nll = -(tok_logp * target_mask[:, 1:].to(device)).sum(1).double().cpu()  # [B]
        for b, c in enumerate(conts):
            total = float(nll[b])
            out.append(
                {
                    "nll": total,
                    "nll_per_token": total / len(c),
                    "n_tokens": float(len(c)),
                    "bits": total / LN2,
                }
            )
    return out


def answer_nll(
    model_fn: ModelFn,
    tokenizer,
    question: str,
    answer: str,
    context: str | None = None,
    prefix_eos: bool = True,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """NLL of ``answer`` given ``question`` (see :func:`answer_nll_batch`; ``device``: where
    ``model_fn`` takes its token ids, by default the model's, :func:`input_device`)."""
    return answer_nll_batch(
        model_fn, tokenizer, [question], [answer], [context], prefix_eos, device=device
    )[0]


def min_answer_nll(
    model_fn: ModelFn,
    tokenizer,
    record: Mapping,
    prefix_eos: bool = True,
    device: torch.device | str | None = None,
) -> dict:
    """The lowest-NLL gold answer of a QA record (several answers may be acceptable)."""
    answers = record["answers"]
    res = answer_nll_batch(
        model_fn,
        tokenizer,
        [record["question"]] * len(answers),
        answers,
        [record.get("context")] * len(answers),
        prefix_eos,
        device=device,
    )
    return min(res, key=lambda r: r["nll"])


@torch.no_grad()
def greedy_answer(
    model_fn: ModelFn,
    tokenizer,
    question: str,
    context: str | None = None,
    max_new_tokens: int = 16,
    prefix_eos: bool = True,
    device: torch.device | str | None = None,
) -> str:
    """Greedy continuation of the question up to EOS, a newline or ``max_new_tokens``;
    recomputes the full prefix each step (no KV cache: answers are a few tokens)."""
    ids = _prompt_ids(tokenizer, question, context, prefix_eos)
    device = input_device(model_fn, device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model_fn(torch.tensor([ids + new], device=device))  # [1, T, V]
        nxt = int(logits[0, -1].argmax())
        if nxt == tokenizer.eos_id:
            break
        new.append(nxt)
        if "\n" in tokenizer.decode(new[-1:]):
            break
    return tokenizer.decode(new).split("\n")[0].strip()


def qa_scores(predictions: Sequence[str], records: Sequence[Mapping]) -> dict[str, float]:
    """Mean exact match and F1 (in [0, 1]) of predictions against records' answers."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions but {len(records)} records")
    em = [exact_match(p, r["answers"]) for p, r in zip(predictions, records, strict=True)]
    fs = [f1(p, r["answers"]) for p, r in zip(predictions, records, strict=True)]
    n = max(1, len(em))
    return {"exact_match": sum(em) / n, "f1": sum(fs) / n, "n": float(len(em))}


# --------------------------------------------------------------------------------------
# Knowledge stored in bits


def knowledge_bits(
    ce_bits_per_attribute: Mapping[str, float],
    n_people: int,
    value_set_sizes: Mapping[str, int],
) -> dict[str, float]:
    """Bits of knowledge stored: Σ_a max(0, N·log2|V_a| − Σ_i CE_i,a).

    ``ce_bits_per_attribute[a]`` is Σ_i over the N people of the cross-entropy (in bits)
    of person i's value of attribute a, e.g. the summed ``bits`` of :func:`answer_nll`
    over bios probe records. A model that knows nothing pays ≥ log2|V_a| per value (a
    uniform guess over the value set), so the clamp at 0 only removes the excess of a
    badly calibrated model. Returns ``{a: bits}`` plus ``"total"`` and ``"capacity"``
    (N·Σ log2|V_a|)."""
    missing = set(value_set_sizes) - set(ce_bits_per_attribute)
    if missing:
        raise ValueError(f"no cross-entropy for attributes {sorted(missing)}")
    out: dict[str, float] = {}
    for a, size in value_set_sizes.items():
        if size < 1:
            raise ValueError(f"value set of {a!r} must be non-empty, got {size}")
        out[a] = max(0.0, n_people * math.log2(size) - float(ce_bits_per_attribute[a]))
    out["total"] = sum(out[a] for a in value_set_sizes)
    out["capacity"] = n_people * sum(math.log2(s) for s in value_set_sizes.values())
    return out


def ce_bits_by_attribute(
    records: Iterable[Mapping], nll: Iterable[Mapping[str, float]]
) -> dict[str, float]:
    """Σ CE in bits per ``record["attribute"]``, from :func:`answer_nll_batch` results."""
    out: dict[str, float] = {}
    for rec, r in zip(records, nll, strict=True):
        out[rec["attribute"]] = out.get(rec["attribute"], 0.0) + r["bits"]
    return out


def bits_per(
    bits: float,
    total_params: int,
    non_embedding_params: int,
    active_params: int,
    train_flops: float,
) -> dict[str, float]:
    """Bits stored per total, non-embedding and active parameter, and per training FLOP.

    Active parameters are those one token touches (for a memory layer: the h·k value rows
    it reads, not the whole table): memory layers should store far more per active
    parameter and per FLOP than dense models, which store ~2 bits/parameter at 1000
    exposures and ~1 at 100 (Allen-Zhu & Li, "Physics of Language Models: Part 3.3,
    Knowledge Capacity Scaling Laws", 2024)."""
    for name, v in (
        ("total_params", total_params),
        ("non_embedding_params", non_embedding_params),
        ("active_params", active_params),
        ("train_flops", train_flops),
    ):
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    return {
        "bits": bits,
        "bits_per_param": bits / total_params,
        "bits_per_non_embedding_param": bits / non_embedding_params,
        "bits_per_active_param": bits / active_params,
        "bits_per_flop": bits / train_flops,
    }
