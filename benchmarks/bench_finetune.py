"""Facts learned against forgetting: sparse-memory, full and LoRA finetuning of a bios run
(GitHub issue 11, item 4, at CPU scale).

    memlayers train                                   # the main job -> runs/tiny-memory-plus
    python benchmarks/bench_finetune.py runs/tiny-memory-plus --people 50 --steps 100 \\
        --out benchmarks/results/finetune_cpu_20261201.md

New people, drawn like the run's (same universe, templates and tokenizer; a name the run
trained on is skipped), are taught through their bios alone (``--exposures`` documents a
person, one a line: the ``--data`` file); their questions, a phrasing never trained on,
are the held-out test of facts learned (greedy exact match). Forgetting: the loss on the
run's own validation bios (``--val-tokens``), and exact match on the run's held-out
questions (the first ``--orig-qa``) that the model answered right before finetuning.
Every method gets the same data, steps and batch; learning rates per method with
``--lr sparse-memory=0.03`` (default: :mod:`memlayers.finetune`'s).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from memlayers.data.bios import build_bios
from memlayers.data.datasets import bios_from_args
from memlayers.data.qa import write_qa_jsonl
from memlayers.eval import perplexity, qa_eval
from memlayers.finetune import METHOD_DEFAULTS, METHODS, FinetuneArgs, finetune
from memlayers.metrics import exact_match
from memlayers.run import load_run


def new_people(run_args, n: int, exposures: int, seed: int):
    """(bio documents, held-out questions) of ``n`` people the run never saw."""
    bios_args = run_args.data.bios
    trained = set(bios_from_args(run_args.data).names)
    new = build_bios(
        n_people=2 * n + 10, exposures=exposures, seed=seed, qa_train_frac=0.0,
        company_exposures=0, n_templates=bios_args.n_templates,
    )  # fmt: skip
    keep = [i for i, name in enumerate(new.names) if name not in trained][:n]
    names = {new.names[i] for i in keep}
    docs = [d for d in new.documents() if any(name in d for name in names)]
    qa = [r for r in new.qa_eval if r["person"] in set(keep)]
    return docs, qa


def measure(model, tok, val_tokens, seq_len, new_qa, orig_qa, n_val):
    new, _ = qa_eval(model, tok, new_qa, progress=False)
    orig, preds = qa_eval(model, tok, orig_qa, progress=False)
    ppl = perplexity(model, val_tokens, seq_len, 16, None, n_val, progress=False)
    correct = [
        exact_match(p["prediction"], r["answers"]) == 1.0
        for p, r in zip(preds, orig_qa, strict=True)
    ]
    return {"new_em": new["exact_match"], "orig_em": orig["exact_match"],
            "val_loss": ppl["loss"], "correct": correct}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--people", type=int, default=50)
    p.add_argument("--exposures", type=int, default=10, help="bio documents per new person")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR")
    p.add_argument("--top-t", type=int, default=METHOD_DEFAULTS["top_t"])
    p.add_argument("--orig-qa", type=int, default=600)
    p.add_argument("--val-tokens", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--work", default="runs/finetune-bench", help="data and finetuned runs")
    p.add_argument("--out", default=None, help="markdown results file")
    a = p.parse_args()
    lrs = {k: float(v) for k, v in (s.split("=") for s in a.lr)}

    base = load_run(a.run, "cpu")
    docs, new_qa = new_people(base.args, a.people, a.exposures, a.seed)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "new_people.txt"
    data.write_text("\n".join(docs) + "\n")
    write_qa_jsonl(work / "new_people_qa.jsonl", new_qa)
    bios = bios_from_args(base.args.data)
    orig_qa = bios.qa_eval[: a.orig_qa]
    seq_len = base.args.data.seq_len
    m0 = measure(base.model, base.tokenizer, bios.val_tokens, seq_len, new_qa, orig_qa,
                 a.val_tokens)  # fmt: skip
    right = [i for i, c in enumerate(m0["correct"]) if c]
    rows = [("base (before)", "", m0, 100.0, 0.0)]
    for method in a.methods:
        t0 = time.perf_counter()
        args = FinetuneArgs(method=method, steps=a.steps, lr=lrs.get(method))
        if method == "sparse-memory":  # full and lora refuse an option they do not read
            args = replace(args, top_t=a.top_t)
        r = finetune(a.run, data, args, out=work / f"ft-{method}", overwrite=True)
        secs = time.perf_counter() - t0
        ft = load_run(r.out, "cpu")
        m = measure(ft.model, ft.tokenizer, bios.val_tokens, seq_len, new_qa, orig_qa,
                    a.val_tokens)  # fmt: skip
        kept = 100.0 * sum(m["correct"][i] for i in right) / max(1, len(right))
        label = f"{method} (lr {r.record['lr']:g}" + (
            f", t={a.top_t}: {r.record['rows_touched']:,} rows touched)"
            if method == "sparse-memory"
            else ")"
        )
        rows.append((label, f"{secs:.0f}", m, kept, m["val_loss"] - m0["val_loss"]))
        print(label, {k: v for k, v in m.items() if k != "correct"}, f"kept {kept:.1f}%")

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if "Model name" in ln),
               platform.processor())  # fmt: skip
    n_tok = sum(len(base.tokenizer.encode(d)) + 1 for d in docs)
    lines = [
        f"`{' '.join(['python benchmarks/bench_finetune.py', *sys.argv[1:]])}`",
        "",
        f"CPU: {cpu}; {time.strftime('%Y-%m-%d')}. New people: {a.people} ({len(docs)} bio "
        f"documents, {n_tok:,} tokens; {len(new_qa)} held-out questions). Steps: {a.steps} of "
        f"{base.args.data.batch_size} x {seq_len} tokens. Forgetting: val loss on "
        f"{a.val_tokens:,} tokens of the run's validation bios; EM on the {len(right)} of the "
        f"first {len(orig_qa)} original held-out questions answered right before.",
        "",
        "| method | seconds | new facts EM (held-out phrasing) | val loss | Δ val loss | "
        "original QA EM | kept of those right before |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, secs, m, kept, dloss in rows:
        lines.append(
            f"| {label} | {secs} | {m['new_em']:.1%} | {m['val_loss']:.4f} | {dloss:+.4f} | "
            f"{m['orig_em']:.1%} | {kept:.1f}% |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
