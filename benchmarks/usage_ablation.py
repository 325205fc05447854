"""Issue 10's usage ablation: which settings keep a memory table read, at what loss.

Each variant is ``memlayers train`` with the study's base command plus its overrides
(:data:`VARIANTS`); several run at once on one card (their tokens/s are not compared, only
usage and loss), each with a time limit so that a cut run still leaves its metrics:

    python benchmarks/usage_ablation.py run --out /tmp/usage base bal10 bal10:seed=1
    python benchmarks/usage_ablation.py run --out /tmp/usage --preset 373m-memory+ \\
        --steps 800 base bal10
    python benchmarks/usage_ablation.py report /tmp/usage \\
        --md benchmarks/results/usage_ablation_h200_20261204.md

A variant is a name of :data:`VARIANTS`, optionally followed by ``:key=value`` overrides
(``bal10:seed=1``). Its run directory and log are named by all of it made safe for file
names (``bal10_seed=1``, ``bal10_seed=1.log``: ``memlayers.compare.slug``); the spec itself
stays its label in the report (``variants.json`` in ``--out`` maps one to the other). A spec
given twice, or whose run directory already exists, is refused before anything runs (another
``--out``, or remove the directory); the warm-up run (``_warm``) is replaced. ``run`` exits
with 1, naming them, when a variant failed or was cut by ``--limit`` (after the table: a cut
run still leaves its metrics).

``report`` reads every ``<dir>/*/metrics.jsonl`` (or ``<dir>/*.metrics.jsonl``) and writes
one table (rows used in the last usage window per memory layer and for the shared table, the
lowest any layer read after step 300, Gini, the last validation loss and its step), a figure
of each layer's rows used against step (``.png`` beside the ``.md``) and the curves as JSON
(``.json``). A variant with no metrics (``variants.json`` or its ``.log`` names it) is listed
as such; a last line cut short (a run killed while writing it) is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# The study's base command (docs/usage.md, study 3 onwards): bios, 32 x 512 tokens a step,
# the paper's dense learning rate; usage logged every 25 steps (a window of 52M reads per
# layer at 134m: uniform reads would touch every row).
BASE = [
    "data.dataset=bios", "data.bios.n_people=5000", "data.bios.exposures=40",
    "data.batch_size=32", "data.seq_len=512", "logging.every=25", "eval_every=500",
    "eval_batches=20", "final_eval=false", "checkpoint.enabled=false", "optim.lr=1e-3",
]  # fmt: skip
OFF = ["model.memory.query_batch_norm=false", "model.memory.balance_loss=0"]
VARIANTS = {
    "base": OFF,  # neither lever (the memory+ presets before 2026-12-04)
    "vlr": [*OFF, "optim.value_lr=1e-2"],
    "bn": ["model.memory.query_batch_norm=true", "model.memory.balance_loss=0"],
    "both01": ["model.memory.query_batch_norm=true", "model.memory.balance_loss=0.01",
               "optim.value_lr=1e-2"],
    "both10": ["model.memory.query_batch_norm=true", "model.memory.balance_loss=0.1",
               "optim.value_lr=1e-2"],
    "both30": ["model.memory.query_batch_norm=true", "model.memory.balance_loss=0.3",
               "optim.value_lr=1e-2"],
    "bal10": ["model.memory.query_batch_norm=true", "model.memory.balance_loss=0.1"],
    # The other factors, each on the collapsed layer (not run yet: docs/usage.md)
    "qkoff": [*OFF, "model.memory.qk_norm=false"],
    "warm500": [*OFF, "optim.warmup_steps=500"],  # the learning rate's warm-up (all weights)
    "h8k16": [*OFF, "model.memory.heads=8", "model.memory.topk=16"],
}  # fmt: skip
EARLY = 300  # "lowest after step": the first steps are the warm-up's, not the steady state
LABELS = "variants.json"  # in --out: {run directory name: the variant's spec}


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``"bal10:seed=1"`` -> ``("bal10:seed=1", [*VARIANTS["bal10"], "seed=1"])``."""
    name, *extra = spec.split(":")
    if name not in VARIANTS:
        raise SystemExit(f"error: unknown variant {name!r}; choose from {sorted(VARIANTS)}")
    bad = [e for e in extra if "=" not in e]
    if bad:
        raise SystemExit(f"error: variant {spec!r}: {bad[0]!r} is not key=value")
    return spec, [*VARIANTS[name], *extra]


def plan(specs: list[str], out: Path) -> list[tuple[str, str, list[str]]]:
    """``(spec, folder, overrides)`` of each variant; ``folder``: the spec made safe for file
    names. Refused before anything runs: a spec given twice, two specs of one folder name,
    a folder already in ``out`` (its run would be refused, or mixed with the new one)."""
    from memlayers.compare import slug

    twice = sorted({s for s in specs if specs.count(s) > 1})
    if twice:
        raise SystemExit(f"error: variants given more than once: {', '.join(twice)}")
    variants = [(spec, slug(spec), overrides) for spec, overrides in map(parse_variant, specs)]
    owner: dict[str, str] = {}
    for spec, folder, _ in variants:
        if owner.setdefault(folder, spec) != spec:
            raise SystemExit(
                f"error: variants {owner[folder]!r} and {spec!r} would share the run "
                f"directory {out / folder}"
            )
    there = [str(out / folder) for _, folder, _ in variants if (out / folder).exists()]
    if there:
        raise SystemExit(
            f"error: run directories already exist: {', '.join(there)} (remove them, or pass "
            f"another --out)"
        )
    return variants


def common(ns: argparse.Namespace) -> list[str]:
    """The overrides every variant's run starts from (the study's base command)."""
    return [f"model.preset={ns.preset}", *BASE, f"steps={ns.steps}", *ns.override]


def run(ns: argparse.Namespace) -> None:
    variants = plan(ns.variants, ns.out)
    ns.out.mkdir(parents=True, exist_ok=True)
    train = [sys.executable, "-m", "memlayers", "train"]
    # Build the data once, before the runs race to build it (replacing an earlier call's
    # warm-up run).
    warm = subprocess.run(
        [*train, "--overwrite", *common(ns), "steps=1", "compile=false",
         f"run_dir={ns.out / '_warm'}"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    if warm.returncode != 0:
        raise SystemExit(f"error: the warm-up run failed (exit {warm.returncode}): see above")
    labels = ns.out / LABELS
    known = json.loads(labels.read_text()) if labels.is_file() else {}
    labels.write_text(json.dumps(known | {f: spec for spec, f, _ in variants}, indent=1) + "\n")
    procs = []
    for spec, folder, overrides in variants:
        log = open(ns.out / f"{folder}.log", "w")  # noqa: SIM115 (closed below)
        cmd = ["timeout", str(ns.limit), *train, *common(ns), *overrides,
               f"run_dir={ns.out / folder}"]  # fmt: skip
        procs.append(
            (spec, folder, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
        )
        print(f"{spec}: {' '.join(cmd[2:])}", flush=True)
    failed = []
    for spec, folder, proc, log in procs:
        rc = proc.wait()
        log.close()
        # timeout's 124: cut by --limit (137, a KILL, is something else: the OOM killer...)
        why = f"exit {rc}" + (" (time limit)" if rc == 124 else " (killed)" if rc == 137 else "")
        print(f"{spec}: {why}", flush=True)
        if rc != 0:
            failed.append(f"{spec} ({why}, {ns.out / folder}.log)")
    print("\n".join(table(read(ns.out))))
    if failed:
        raise SystemExit(
            f"error: {len(failed)} of {len(procs)} variants failed: {'; '.join(failed)}"
        )


def read_metrics(path: Path) -> list[dict]:
    """:func:`memlayers.logger.read_metrics`, its error as this script's one error line."""
    from memlayers.logger import read_metrics as read_records

    try:
        return read_records(path)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def read(folder: Path) -> dict[str, list[dict]]:
    """``{label: metrics records}`` of every run under ``folder``, labelled by its spec
    (``variants.json``) or else its name; a variant that ``variants.json`` or a ``.log``
    names but that left no metrics has no records."""
    files = {f.parent.name: f for f in sorted(folder.glob("*/metrics.jsonl"))}
    files |= {f.name[: -len(".metrics.jsonl")]: f for f in sorted(folder.glob("*.metrics.jsonl"))}
    labels = json.loads((folder / LABELS).read_text()) if (folder / LABELS).is_file() else {}
    logs = {f.stem for f in folder.glob("*.log")}
    names = sorted(n for n in {*files, *labels, *logs} if not n.startswith("_"))
    if not names:
        raise SystemExit(f"error: no metrics.jsonl under {folder}")
    return {labels.get(n, n): read_metrics(files[n]) if n in files else [] for n in names}


def _layer_order(name: str) -> tuple:
    """block_2 < block_10 < shared_table."""
    tail = name.rsplit("_", 1)[-1]
    return (name == "shared_table", int(tail) if tail.isdigit() else 0, name)


def curves(records: list[dict]) -> dict:
    """Per logged step: rows used per layer (and table), Gini, loss; validation losses."""
    usage = [r for r in records if any(k.startswith("usage/") for k in r)]
    names = sorted({k.split("/")[1] for r in usage for k in r if k.startswith("usage/")},
                   key=_layer_order)  # fmt: skip
    return {
        "step": [r["step"] for r in usage],
        "loss": [r.get("loss") for r in usage],
        "used": {n: [r.get(f"usage/{n}/rows_used_pct") for r in usage] for n in names},
        "gini": {n: [r.get(f"usage/{n}/gini_count") for r in usage] for n in names},
        "val": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
    }


def table(runs: dict[str, list[dict]]) -> list[str]:
    lines = [
        "| run | last step | rows used, last window: per layer | shared table | lowest layer "
        f"after step {EARLY} | Gini per layer | val loss (step) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, logged in runs.items():
        if not logged:
            lines.append(f"| {name} | – | no metrics.jsonl: see its .log | | | | |")
            continue
        c = curves(logged)
        if not c["step"]:
            lines.append(f"| {name} | – | no usage logged | | | | |")
            continue
        layers = [n for n in c["used"] if n != "shared_table"]
        late = [i for i, s in enumerate(c["step"]) if s >= EARLY]
        lows = [(c["used"][n][i], n, c["step"][i]) for n in layers for i in late]
        lowest = min(lows) if lows else None
        used = " / ".join(f"{c['used'][n][-1]:.1f}" for n in layers)
        gini = " / ".join(f"{c['gini'][n][-1]:.3f}" for n in layers)
        table_used = c["used"].get("shared_table", [None])[-1]
        val = f"{c['val'][-1][1]:.4f} ({c['val'][-1][0]})" if c["val"] else "–"
        low = f"{lowest[0]:.1f} ({lowest[1]}, step {lowest[2]})" if lowest else "–"
        shared = "–" if table_used is None else f"{table_used:.1f}"
        lines.append(f"| {name} | {c['step'][-1]} | {used} ({', '.join(layers)}) | {shared} | "
                     f"{low} | {gini} | {val} |")  # fmt: skip
    return lines


def plot(runs: dict[str, list[dict]], path: Path) -> Path | None:
    runs = {name: logged for name, logged in runs.items() if logged}
    if not runs:
        return None
    from memlayers.logger import pyplot

    plt = pyplot(path.name)
    if plt is None:
        return None
    n = len(runs)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), sharey=True,
                             squeeze=False)  # fmt: skip
    for ax, (name, logged) in zip(axes.flat, runs.items(), strict=False):
        c = curves(logged)
        for layer, ys in c["used"].items():
            ax.plot(c["step"], ys, label=layer, lw=1.2, ls="--" if layer == "shared_table" else "-")
        ax.axhline(80, color="grey", lw=0.6, ls=":")
        val = f", val {c['val'][-1][1]:.4f}" if c["val"] else ""
        ax.set_title(f"{name}{val}", fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[n:]:
        ax.axis("off")
    axes[0][0].set_ylabel("rows used, % (25-step window)", fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(ns: argparse.Namespace) -> None:
    runs = read(ns.folder)
    lines = table(runs)
    print("\n".join(lines))
    missing = [name for name, logged in runs.items() if not logged]
    if missing:
        print(f"no metrics: {', '.join(missing)}")
    if ns.md:
        ns.md.parent.mkdir(parents=True, exist_ok=True)
        head = ns.md.read_text() if ns.md.exists() and ns.keep_head else ""
        marker = "<!-- table -->"
        head = head.split(marker)[0] if marker in head else head
        ns.md.write_text(head + marker + "\n" + "\n".join(lines) + "\n")
        data = {name: curves(logged) for name, logged in runs.items()}
        ns.md.with_suffix(".json").write_text(json.dumps(data, separators=(",", ":")) + "\n")
        png = plot(runs, ns.md.with_suffix(".png"))
        print(f"wrote {ns.md}, {ns.md.with_suffix('.json')}" + (f", {png}" if png else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the variants at once on one card")
    r.add_argument("variants", nargs="+", help=f"of {sorted(VARIANTS)}, each [:key=value]...")
    r.add_argument("--out", type=Path, required=True, help="one run directory per variant")
    r.add_argument("--preset", default="134m-memory+")
    r.add_argument("--steps", type=int, default=2000)
    r.add_argument("--limit", type=int, default=470, help="seconds each run may take")
    r.add_argument("--override", nargs="*", default=[], help="key=value for every run")
    q = sub.add_parser("report", help="the table, figure and curves of finished runs")
    q.add_argument("folder", type=Path)
    q.add_argument("--md", type=Path, help="write the table here (.png and .json beside it)")
    q.add_argument("--keep-head", action="store_true",
                   help="keep what the .md holds above its table (the prose)")  # fmt: skip
    ns = p.parse_args()
    if ns.cmd == "run":
        if ns.steps < 1 or ns.limit < 1:
            raise SystemExit(f"error: --steps and --limit must be >= 1, got {ns.steps}, {ns.limit}")
        run(ns)
    else:
        report(ns)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
