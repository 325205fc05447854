"""Facts learned against forgetting on a retrofitted pretrained model: sparse-memory, full
and LoRA finetuning of SmolLM2-135M + Memory+ (GitHub issue 11, item 4).

    memlayers train configs/smollm2_memory_plus.yaml run_dir=runs/smollm2-memory
    python benchmarks/bench_retrofit.py runs/smollm2-memory --steps 24 --eval-every 8 \\
        --out benchmarks/results/retrofit_cpu_20261201.md --plot docs/retrofit_cpu_20261201.png

The facts are real (:func:`memlayers.data.facts.load_facts`: elements, states, countries,
cities from pinned packages). Every question is asked in the held-out phrasing (a question
template; training text holds only statements) after two solved examples of the same
relation (``Q: ...\\nA: ...\\n`` twice, then ``Q: <question>\\nA:``; the examples' facts
are used for nothing else), answered greedily, scored by exact match. The run answers a
pool of ``--pool`` questions balanced over the relations. Of the ones it gets wrong,
``--teach`` are the new facts: taught through their statements alone (the relation's three
statement templates, ``--exposures`` times each, one a line), or with ``--teach-as qa`` as
question-answer pairs in the relation's *other* question phrasing (``Q: ...\nA: ...``, as
many documents a fact as the statements give; the asked phrasing stays held out), or
``both``. Of the ones it gets right,
``--keep`` are the forgetting test (the share still answered right), with the loss on
``--val-tokens`` of the run's held-out corpus text. Every method gets the same data, steps,
batch and seed, and is evaluated every ``--eval-every`` steps (a lora model with its
adapters live); learning rates per method with ``--lr full=1e-4``. The table's seconds are
the finetuning's alone (background counts and steps), without the evaluations. A pool
with no question answered right (or none wrong) is refused: nothing to keep (or teach).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from profile_step import at_least

from memlayers.data.datasets import encode_documents
from memlayers.data.facts import RELATIONS, load_facts, qa_pair, split_shown
from memlayers.data.loader import load_dataset
from memlayers.eval import perplexity
from memlayers.eval.knowledge import greedy_answers
from memlayers.finetune import METHODS, FinetuneArgs, finetune_model
from memlayers.metrics import exact_match
from memlayers.run import load_run

DEFAULT_LR = {"sparse-memory": 3e-2, "full": 1e-4, "lora": 1e-3}


def question(fact) -> str:
    return RELATIONS[fact.relation][1][0].format(s=fact.subject)


def records(facts, shots: dict) -> list[dict]:
    """QA records with two solved examples of the relation as context; ``asked``: the
    question alone (what a lost answer is filed under)."""
    out = []
    for f in facts:
        ctx = "".join(qa_pair(question(e), e.object) + "\n" for e in shots[f.relation])
        out.append({"question": ctx + qa_pair(question(f), "").rstrip(), "answers": [f.object],
                    "relation": f.relation, "asked": question(f)})  # fmt: skip
    return out


TEACH_AS = ("statements", "qa", "both")


def statements(facts, exposures: int, seed: int, teach_as: str = "statements") -> list[str]:
    """The documents that teach ``facts``, shuffled: each statement template ``exposures``
    times (``statements``); question-answer pairs in every question phrasing but the asked
    one (:func:`question`), as many a fact as its statements (``qa``); or both."""
    if teach_as not in TEACH_AS:
        raise ValueError(f"teach_as must be one of {TEACH_AS}, got {teach_as!r}")
    docs = []
    for f in facts:
        said, asked = RELATIONS[f.relation]
        n = len(said) * exposures
        if teach_as != "qa":
            docs += [t.format(s=f.subject, o=f.object) for t in said for _ in range(exposures)]
        if teach_as != "statements":
            other = asked[1:]
            if not other:
                raise ValueError(
                    f"relation {f.relation!r} has one question phrasing: none to teach"
                )
            docs += [qa_pair(other[i % len(other)].format(s=f.subject), f.object)
                     for i in range(n)]  # fmt: skip
    random.Random(seed).shuffle(docs)
    return docs


def answers(model, tok, recs) -> list[str]:
    return greedy_answers(model, tok, recs, max_new_tokens=6, batch_size=64, progress=False)


def right(preds: list[str], recs) -> list[bool]:
    return [exact_match(p, r["answers"]) == 1.0 for p, r in zip(preds, recs, strict=True)]


def em(model, tok, recs) -> list[bool]:
    return right(answers(model, tok, recs), recs)


def measure(model, tok, taught, kept, val, seq_len) -> dict:
    """Facts learned, kept answers still right, held-out loss; ``lost``: what each kept
    question now gets instead of its answer (the question without its examples)."""
    ppl = perplexity(model, val, seq_len, 4, None, None, progress=False)
    said = answers(model, tok, kept)
    still = right(said, kept)
    lost = {r["asked"]: f"{p} (was {r['answers'][0]})"
            for p, r, ok in zip(said, kept, still, strict=True) if not ok}  # fmt: skip
    return {"learned": float(np.mean(em(model, tok, taught))), "kept": float(np.mean(still)),
            "val_loss": ppl["loss"], "lost": lost}  # fmt: skip


def _method_lr(text: str) -> tuple[str, float]:
    """``METHOD=LR`` of ``--lr``, METHOD one of :data:`METHODS` and LR a finite number > 0
    (a mistyped method, ``LoRA=5``, was silently ignored; ``full`` alone failed to unpack)."""
    method, sep, value = text.partition("=")
    if not sep or method not in METHODS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not METHOD=LR with METHOD one of {', '.join(METHODS)}"
        )
    try:
        lr = float(value)
    except ValueError:
        lr = math.nan
    if not (math.isfinite(lr) and lr > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: LR must be a finite number > 0")
    return method, lr


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, refused at parse time where it would fail (or be ignored) later;
    ``lrs``: the learning rate of every method."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps", type=at_least(1), default=24)
    p.add_argument("--eval-every", type=at_least(1), default=8)
    p.add_argument("--batch-size", type=at_least(1), default=4)
    p.add_argument("--seq-len", type=at_least(1), default=64)
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", type=_method_lr,
                   help=f"METHOD one of {', '.join(METHODS)} (default {DEFAULT_LR})")  # fmt: skip
    p.add_argument("--top-t", type=at_least(1), default=2000)
    p.add_argument("--per-document", action="store_true",
                   help="sparse-memory: --top-t rows per document, not per batch")  # fmt: skip
    p.add_argument("--rank", type=at_least(1), default=8)
    p.add_argument("--pool", type=at_least(1), default=280, help="questions asked before")
    p.add_argument("--teach", type=at_least(1), default=40)
    p.add_argument("--keep", type=at_least(1), default=60)
    p.add_argument("--exposures", type=at_least(1), default=2, help="per statement template")
    p.add_argument("--teach-as", choices=TEACH_AS, default="statements",
                   help="the taught documents: statements, QA pairs in the other question "
                        "phrasing (the asked one stays held out), or both")  # fmt: skip
    p.add_argument("--val-tokens", type=at_least(1), default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--background-batches", type=at_least(1), default=4,
        help="sparse-memory: batches of corpus text whose row reads set the rows' specificity",
    )  # fmt: skip
    p.add_argument(
        "--background-qa", type=at_least(0), default=0, metavar="N",
        help="sparse-memory: N facts outside the pool, written as the taught documents "
             "are (--teach-as), make half the background (the corpus the other half)",
    )  # fmt: skip
    p.add_argument(
        "--background-qa-known", action="store_true",
        help="with --background-qa N: N facts the model answers right before (asked with "
             "the pool's examples; up to 3N candidates tried), not any N others",
    )  # fmt: skip
    p.add_argument(
        "--background-corpus-whole", action="store_true",
        help="with --background-qa: the whole corpus background beside the QA pairs, not "
             "as many corpus tokens as they hold",
    )  # fmt: skip
    p.add_argument(
        "--background-by-kind", action="store_true",
        help="with --background-qa: score rows against the corpus half and the QA half "
             "apart (each row its lowest idf of the two), not against one mixed stream",
    )  # fmt: skip
    p.add_argument(
        "--unseen-like", type=_share_seed, default=None, metavar="FRAC[:SEED]",
        help="draw every question from the facts a corpus run with data.corpus.facts_qa=FRAC "
             "(and facts_qa_seed=SEED, default 0) would not show (default: the run's own): "
             "the same questions for a run trained without them",
    )  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="markdown results (+ .json beside it)")
    p.add_argument("--plot", default=None, help="learned vs forgotten over steps (png)")
    a = p.parse_args(argv)
    if a.seed < 0:
        p.error(f"argument --seed: must be >= 0, got {a.seed}")
    for flag in ("background_by_kind", "background_qa_known", "background_corpus_whole"):
        if getattr(a, flag) and not a.background_qa:
            p.error(f"argument --{flag.replace('_', '-')}: shapes the QA pairs of the "
                    f"background, so it needs --background-qa N > 0")  # fmt: skip
    a.lrs = DEFAULT_LR | dict(a.lr)
    return a


def check_split(pool: int, wrong: int, known: int, teach: int, keep: int) -> None:
    """Refuse a split with nothing to teach or nothing to keep: the learned (or kept)
    share of none is no measurement (it printed nan%, and "kept 100%" before)."""
    if teach and keep:
        return
    missing = " and ".join(
        w for w, n in (("to teach (--teach: of those it gets wrong)", teach),
                       ("to keep (--keep: of those it gets right)", keep)) if not n
    )  # fmt: skip
    raise SystemExit(
        f"bench_retrofit: the run answers {known} of the {pool} pool questions right and "
        f"{wrong} wrong, so there is nothing {missing}: a larger --pool, or a run that "
        f"answers some questions right and some wrong"
    )


def _share_seed(text: str) -> tuple[float, int]:
    """``FRAC[:SEED]`` of ``--unseen-like``: a share in (0, 1) and a seed >= 0 (default 0)."""
    frac, _, seed = text.partition(":")
    try:
        share, n = float(frac), int(seed or 0)
    except ValueError:
        share, n = math.nan, -1
    if not (0 < share < 1 and n >= 0):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not FRAC[:SEED] with FRAC in (0, 1) and SEED an integer >= 0"
        )
    return share, n


def unseen_facts(data_args, like: tuple[float, int] | None = None) -> tuple[list, int, tuple]:
    """The facts the run's training never showed, how many were left out, and the
    ``(facts_qa, facts_qa_seed)`` that left them out (None: none): a corpus run with
    ``data.corpus.facts_qa`` > 0 saw that share of them as question-answer pairs
    (:func:`memlayers.data.facts.split_shown`), so none of those may be asked, taught, kept
    or given as an example. ``like``: leave out what a run with that ``(facts_qa,
    facts_qa_seed)`` would have shown, whatever this run showed, so that a run without
    them draws the same questions (the control of an A/B)."""
    corpus = data_args.corpus
    is_corpus = data_args.dataset == "corpus"
    # data.path is a corpus run's package cache (and the file of a text run)
    facts = load_facts(data_args.path if is_corpus else None)
    split = (corpus.facts_qa, corpus.facts_qa_seed) if is_corpus and corpus.facts_qa else None
    if like is not None:
        if split is not None and tuple(like) != split:
            raise SystemExit(
                f"bench_retrofit: --unseen-like {like[0]}:{like[1]} differs from the run's "
                f"own data.corpus.facts_qa={split[0]} (facts_qa_seed={split[1]}): its "
                f"training showed those facts"
            )
        split = tuple(like)
    if split is None:
        return facts, 0, None
    _, unseen = split_shown(facts, *split)
    return unseen, len(facts) - len(unseen), split


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    lrs = a.lrs
    t_start = time.perf_counter()

    base = load_run(a.run, a.device)
    tok, seq_len = base.tokenizer, a.seq_len
    data = load_dataset(base.args.data)
    val = np.asarray(data.val[: a.val_tokens + 1])
    background = np.asarray(data.train[: 64 * 1024])

    rng = random.Random(a.seed)
    facts, shown, split = unseen_facts(base.args.data, a.unseen_like)
    by_rel = defaultdict(list)
    for f in facts:
        by_rel[f.relation].append(f)
    if split:
        print(
            f"{shown} facts left out: shown as QA pairs with facts_qa={split[0]}, "
            f"facts_qa_seed={split[1]} (or pairing their entities)"
        )
    shots, pool = {}, []
    per_rel = a.pool // len(by_rel)
    for rel in sorted(by_rel):
        fs = rng.sample(by_rel[rel], min(len(by_rel[rel]), per_rel + 2))
        shots[rel], pool = fs[:2], pool + fs[2:]
    pool_recs = records(pool, shots)
    t0 = time.perf_counter()
    was_right = em(base.model, tok, pool_recs)
    pool_secs = time.perf_counter() - t0
    wrong = [f for f, r in zip(pool, was_right, strict=True) if not r]
    known = [f for f, r in zip(pool, was_right, strict=True) if r]
    teach = rng.sample(wrong, min(a.teach, len(wrong)))
    keep = rng.sample(known, min(a.keep, len(known)))
    check_split(len(pool), len(wrong), len(known), len(teach), len(keep))
    if a.background_qa:
        # facts never asked, taught or shown, in the taught documents' form: rows that
        # form reads for any fact (the "Q: ... A:" frame) then score low in the TF-IDF
        asked = set(pool) | {f for fs in shots.values() for f in fs}
        others = [f for rel in sorted(by_rel) for f in by_rel[rel] if f not in asked]
        if a.background_qa_known:  # the facts it answers right: their rows protected
            tried = random.Random(a.seed + 1).sample(
                others, min(3 * a.background_qa, len(others)))  # fmt: skip
            ok = em(base.model, tok, records(tried, shots))
            picked = [f for f, r in zip(tried, ok, strict=True) if r][: a.background_qa]
            print(f"background QA: {len(picked)} facts answered right of {len(tried)} tried")
        else:
            picked = random.Random(a.seed + 1).sample(
                others, min(a.background_qa, len(others)))  # fmt: skip
        form = list(dict.fromkeys(statements(picked, 1, a.seed, a.teach_as)))
        qa = encode_documents(tok, form)
        corpus_half = background if a.background_corpus_whole else background[: len(qa)]
        if a.background_by_kind:  # two streams, scored apart (finetune_model's kinds)
            background = [corpus_half, qa]
        else:
            background = np.concatenate([qa, corpus_half])
    taught_recs, kept_recs = records(teach, shots), records(keep, shots)
    docs = statements(teach, a.exposures, a.seed, a.teach_as)
    tokens = encode_documents(tok, docs)
    print(f"pool {len(pool)}: {len(known)} right; teach {len(teach)}, keep {len(keep)}; "
          f"{len(docs)} documents, {len(tokens):,} tokens ({pool_secs:.0f}s)")  # fmt: skip

    # before: no taught fact right, every kept one right (that is how they were chosen)
    loss0 = perplexity(base.model, val, seq_len, 4, None, None, progress=False)["loss"]
    m0 = {"learned": 0.0, "kept": 1.0, "val_loss": loss0}
    print("before", m0, flush=True)
    curves = {"before": m0, "taught": [(f.subject, f.relation, f.object) for f in teach],
              "kept": [(f.subject, f.relation, f.object) for f in keep]}  # fmt: skip
    if split:  # the facts left out of every question: the A/B's pairing
        curves["unseen"] = {"facts_qa": split[0], "facts_qa_seed": split[1], "left_out": shown}
    seconds = {}
    for method in a.methods:
        run = load_run(a.run, a.device)
        points, eval_seconds = [], [0.0]

        def evaluate(step, model, points=points, method=method, eval_seconds=eval_seconds):
            if step % a.eval_every == 0 or step == a.steps:
                t = time.perf_counter()
                m = measure(model, tok, taught_recs, kept_recs, val, seq_len) | {"step": step}
                eval_seconds[0] += time.perf_counter() - t  # not the training's
                points.append(m)
                print(method, {k: v for k, v in m.items() if k != "lost"}, flush=True)

        args = FinetuneArgs(method=method, steps=a.steps, lr=lrs[method], top_t=a.top_t,
                            rank=a.rank, batch_size=a.batch_size,
                            background_batches=a.background_batches, seed=a.seed,
                            per_document=a.per_document and method == "sparse-memory")  # fmt: skip
        t0 = time.perf_counter()
        done = finetune_model(run.model, tokens, args, seq_len, a.batch_size, run.args.optim,
                              background, after_step=evaluate, eos_id=tok.eos_id)  # fmt: skip
        # the finetuning alone (its background counts and steps), not the evaluations
        seconds[method] = time.perf_counter() - t0 - eval_seconds[0]
        curves[method] = {"lr": lrs[method], "points": points, "losses": done.losses,
                          "rows_touched": done.rows_touched, "train_seconds": seconds[method],
                          "eval_seconds": eval_seconds[0]}  # fmt: skip
        del run

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if "Model name" in ln),
               platform.processor())  # fmt: skip
    if a.device.startswith("cuda"):
        import torch

        cpu = f"GPU {torch.cuda.get_device_name(a.device)} (host {cpu})"
    cmd = " ".join(["python benchmarks/bench_retrofit.py", *sys.argv[1:]])
    lines = [
        f"`{cmd}`",
        "",
        f"Device: {cpu}; {time.strftime('%Y-%m-%d')}; {time.perf_counter() - t_start:.0f} s in "
        f"all. Run: {base.run_dir} (step {base.step}"
        + (
            f"; {shown} facts left out of every question: those a corpus run with "
            f"data.corpus.facts_qa={split[0]}, facts_qa_seed={split[1]} shows as QA pairs "
            f"(or pairs in another relation): "
            + ("this run" if a.unseen_like is None else "not this run (--unseen-like)")
            if split
            else ""
        )
        + f"). Pool: {len(pool)} questions, "
        f"{len(known)} answered right before. Taught: {len(teach)} facts it got wrong, "
        f"{len(docs)} documents as {a.teach_as} ({len(tokens):,} tokens); {a.steps} steps of "
        f"{a.batch_size} x {seq_len} tokens. Forgetting: the {len(keep)} kept questions (right "
        f"before), loss on {a.val_tokens:,} held-out corpus tokens.",
        "",
        "| method | lr | train seconds | facts learned (EM, held-out phrasing) | kept (EM of those "
        "right before) | val loss | Δ val loss |",
        "|---|---|---|---|---|---|---|",
        f"| before | | | {m0['learned']:.1%} | {m0['kept']:.1%} | {m0['val_loss']:.4f} | |",
    ]
    for method in a.methods:
        c = curves[method]
        m = c["points"][-1]
        label = method + (
            f", t = {a.top_t}{' per document' if a.per_document else ''}, "
            f"{a.background_batches} background batches"
            + (f" ({a.teach_as} of {a.background_qa} other facts"
               + (" it answered right" if a.background_qa_known else "")
               + (" beside the whole corpus background" if a.background_corpus_whole
                  else ", about half of them")
               + ("; the two kinds scored apart" if a.background_by_kind else "") + ")"
               if a.background_qa else "")
            if method == "sparse-memory" else ""
        )  # fmt: skip
        label += f", r = {a.rank}" if method == "lora" else ""
        lines.append(
            f"| {label} | {c['lr']:g} | {seconds[method]:.0f} | {m['learned']:.1%} | "
            f"{m['kept']:.1%} | {m['val_loss']:.4f} | {m['val_loss'] - m0['val_loss']:+.4f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
        Path(a.out).with_suffix(".json").write_text(json.dumps(curves, indent=1) + "\n")
    if a.plot:
        plot(curves, a.methods, a.plot)


def plot(curves: dict, methods, path: str) -> None:
    """Facts learned (y) against forgetting (x: right answers lost; Δ val loss), one line
    per method through its evaluation steps, from the model before finetuning."""
    from memlayers.logger import pyplot

    plt = pyplot(Path(path).name)
    if plt is None:
        return
    m0 = curves["before"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in methods:
        pts = [m0 | {"step": 0}, *curves[method]["points"]]
        y = [100 * p["learned"] for p in pts]
        for ax, x in (
            (axes[0], [100 * (m0["kept"] - p["kept"]) for p in pts]),
            (axes[1], [p["val_loss"] - m0["val_loss"] for p in pts]),
        ):
            ax.plot(x, y, marker="o", label=method)
            for xi, yi, p in zip(x, y, pts, strict=True):
                ax.annotate(str(p["step"]), (xi, yi), fontsize=7, alpha=0.7)
    axes[0].set_xlabel("right answers lost (points of EM)")
    axes[1].set_xlabel("Δ held-out loss (nats)")
    for ax in axes:
        ax.set_ylabel("new facts learned (EM %)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("SmolLM2-135M + Memory+: facts learned vs forgotten (labels: steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
