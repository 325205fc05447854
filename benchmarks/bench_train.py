"""Training throughput of the presets, through the real trainer, on one card: tokens/s,
MFU, ratio to the dense twin, peak memory — and a guard against regressions.

    python benchmarks/bench_train.py                                   # 134m, 373m x 4
    python benchmarks/bench_train.py --presets 134m-dense 134m-memory+ --steps 30
    python benchmarks/bench_train.py --out benchmarks/results/train_h100_20261128.md
    python benchmarks/bench_train.py --presets tiny-dense --device cpu --steps 6 \
        --warmup 2 --every 2 --batch 2 --seq-len 128 --compile false    # smoke

Each preset runs ``python -m memlayers train`` in its own process (synthetic tokens, no
evaluation, no checkpoint) so that what is timed is exactly what a user runs, and GPU
memory and compile caches don't leak between presets. Throughput is the median of the
trainer's logged tokens/s over the log intervals after ``--warmup`` steps (compilation
happens in the first steps); MFU and peak memory come from the same records.

A/B of checkouts (a bisect, or a change against main), side by side in one run:
``--trees DIR...`` runs every preset from each source tree in turn (``git archive REV |
tar -x -C DIR`` makes one; its ``.rev`` file, if any, names it), ``--rounds N`` times
alternating A B A B, and prints each tree's median tokens/s and its ratio to the first
tree's. Rows are named ``preset@tree``, so they never become a guard's baseline.

Reads spread over the table: with the default layer, synthetic tokens (and real data
early in training) read a few hot rows of a memory table (issue 10's collapse), which the
lookup kernels then find in L2: a flattering state. The paper memory+ presets now keep
the reads spread by default (batch-normalised queries and the balance loss at 0.1, since
2026-12-04: docs/usage.md); ``--collapsed-reads`` turns both off (:data:`COLLAPSED`) to
time the collapsed state. Earlier results' "spread" rows were the flag ``--spread-reads``
of then: the two settings at weight 0.01, now ``--override`` of those. The "table rows
read" column says which state a row measured.

The guard: the newest committed ``benchmarks/results/train_<card>_*.md`` for the same card
is read, and every preset measured in both with the same overrides (``--override``,
``--collapsed-reads``) and micro-batch prints its ratio to that result; a fall of more than
10% is printed as a REGRESSION banner (and ``--strict`` makes it the exit status). Each row
also records its run's resolved settings that set the work of a step
(:func:`throughput_settings`, from the run's ``config.yaml``: a preset's defaults, which
its overrides alone do not say); where a setting both rows record differs, the row is not
compared and names the settings (``model.memory.balance_loss 0.0 -> 0.1``). Results from
before these settings (none, or the short-lived ``config`` hash, which also hashed
learning rates and unused sections) are compared by preset, overrides and micro-batch alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = [f"{s}-{v}" for s in ("134m", "373m") for v in ("dense", "memory+", "moe", "peer")]
TOLERANCE = 0.9  # a preset slower than 90% of its last committed result is a regression
# --collapsed-reads: the memory+ presets without the settings that keep their reads spread
# over the table (docs/usage.md)
COLLAPSED = ["model.memory.query_batch_norm=false", "model.memory.balance_loss=0"]


def card_name(device: str) -> str:
    """``cpu`` on the CPU, else :func:`card_of` the CUDA device's name."""
    if device == "cpu":
        return "cpu"
    import torch

    return card_of(torch.cuda.get_device_name())


def card_of(name: str) -> str:
    """A card's name in results files: ``h100`` / ``h200`` (SXM), ``h100-pcie``,
    ``h100-nvl``, ``h200-nvl`` (other peaks: :data:`memlayers.report.PEAK_BF16_FLOPS`, whose
    names it goes by), else the chip's (``a100``) or the whole name's slug."""
    from memlayers.report import known_card

    known = known_card(name)
    if known is not None:
        return re.sub(r"[^a-z0-9]+", "-", known.lower())
    found = re.search(r"\b([a-z]\d{2,3})\b", name.lower())
    return found.group(1) if found else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def tree_label(tree: Path) -> str:
    """A source tree's name in the results: its ``.rev`` file (a commit), else its folder."""
    rev = tree / ".rev"
    return rev.read_text().strip() if rev.is_file() else tree.name


def train_overrides(preset: str, ns: argparse.Namespace, run_dir: Path) -> list[str]:
    """The ``memlayers train`` settings of one benchmark run of ``preset``."""
    return [
        f"model.preset={preset}", "data.dataset=synthetic",
        f"data.batch_size={ns.batch}", f"data.seq_len={ns.seq_len}", f"steps={ns.steps}",
        f"logging.every={ns.every}", f"device={ns.device}", f"compile={ns.compile}",
        "eval_every=0", "eval_batches=0", "final_eval=false", "checkpoint.enabled=false",
        f"data.synthetic.vocab_size={ns.vocab}",
        "logging.progress=false", "logging.tensorboard=false", "logging.plot=false",
        f"run_dir={run_dir}", *ns.override,
    ]  # fmt: skip


def run_preset(
    preset: str, ns: argparse.Namespace, tmp: Path, tree: Path | None = None, tag: str = ""
) -> dict:
    """One ``memlayers train`` run of ``preset`` (from ``tree``'s memlayers when given:
    its folder first on the path) and its summary row, named ``preset`` + ``tag``."""
    name = preset + tag
    # a fresh folder per run: names that differ only in case or punctuation stay apart
    run_dir = Path(tempfile.mkdtemp(dir=tmp)) / re.sub(r"[^a-z0-9]+", "-", name.lower())
    cmd = [sys.executable, "-m", "memlayers", "train", *train_overrides(preset, ns, run_dir)]
    env, cwd = None, None
    if tree is not None:  # python -m puts the cwd first on the path: the tree's memlayers
        cwd = tree
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(tree), *filter(None, [os.environ.get("PYTHONPATH")])]
        ))  # fmt: skip
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ns.timeout, cwd=cwd, env=env)
    # A failed run's row names its setting too: the guard then reports a preset that ran
    # before and fails now.
    failed = {"preset": name, "batch": f"{ns.batch}x{ns.seq_len}", "overrides": list(ns.override)}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**failed, "error": " | ".join(tail)}
    records = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    steady = [r for r in records if "tok_per_s" in r and r["step"] > ns.warmup]
    if not steady:
        return {**failed, "error": f"no log records after step {ns.warmup}"}
    speeds = [r["tok_per_s"] for r in steady]
    return {
        "preset": name,
        "tokens_per_s": statistics.median(speeds),
        "intervals": [round(v) for v in speeds],
        "mfu": statistics.median(r.get("mfu", 0.0) for r in steady),
        "peak_gib": max(r.get("peak_mem_gib", 0.0) for r in steady),
        "batch": f"{ns.batch}x{ns.seq_len}",
        "rows_read_pct": rows_read_pct(records),
        # the CUDA allocator's free-and-retry count by the last log (train.py)
        "alloc_retries": steady[-1].get("alloc_retries"),
        "overrides": list(ns.override),
        "settings": throughput_settings(run_dir),
    }


# Saved settings (dotted, with everything under them) that do not change what a training
# step computes, only its numbers or what happens outside the timed steps: left out of
# throughput_settings, so that changing them leaves the guard comparing.
NOT_WORK = (
    # the run's length and place; evaluation and checkpoints are not timed (train.py)
    "run_dir", "steps", "eval_every", "eval_batches", "final_eval", "checkpoint",
    "data.val_fraction", "data.path",
    # auto and cuda are one card; the card is the results file's own name
    "device",
    # a threshold: its check (a max over the weights at log steps, off at 0) is small
    # beside a log interval's steps
    "max_weight",
    # written outside the timed steps, or a progress bar's microseconds a step
    "logging.progress", "logging.tensorboard", "logging.plot",
    "model.preset",  # the row's own name
    # constants of the same arithmetic
    "model.norm_eps", "model.rope_theta", "model.init_std", "model.memory.norm_eps",
    "model.memory.query_batch_norm_momentum", "model.peer.norm_eps",
    # optimizer hyperparameters: the same update with other numbers (the gradient norm is
    # measured whatever grad_clip is)
    "optim.lr", "optim.value_lr", "optim.memory_lr", "optim.weight_decay",
    "optim.value_weight_decay", "optim.beta1", "optim.beta2", "optim.eps", "optim.schedule",
    "optim.warmup_steps", "optim.min_lr_ratio", "optim.grad_clip",
)  # fmt: skip
# Settings only a kind of block reads (model.ffn, memory_layers, peer_layers): left out
# for a model without such blocks (a dense model's unused memory section).
USED_BY = {
    "memory": (
        "model.memory",
        "model.memory_mode",
        "optim.value_optimizer",
        "optim.value_master",
        "optim.value_master_split",
        "logging.usage",  # the usage counters: memory layers' reads
    ),
    "moe": ("model.moe",),
    "peer": ("model.peer",),
}


def _flatten(tree: dict, prefix: str = "") -> dict:
    """``{"model": {"memory": {"topk": 32}}}`` -> ``{"model.memory.topk": 32}`` (lists kept)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def throughput_settings(run_dir: Path) -> dict | None:
    """The run's resolved settings that set the work of a training step, flattened
    (``{"model.memory.n_keys": 1024, "data.batch_size": 32, ...}``), from its saved
    ``config.yaml``: the model, the data's shape and source, dtype, compile, gradient
    accumulation, the optimizer kinds, parallelism and the usage counters. Left out:
    :data:`NOT_WORK`, seeds, the sections of block kinds the model has none of
    (:data:`USED_BY`) and the options of datasets it did not read. None when the run saved
    no config."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    cfg = yaml.safe_load(path.read_text()) or {}
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    special = set(model.get("memory_layers") or []) | set(model.get("peer_layers") or [])
    kinds = {"memory"} if model.get("memory_layers") else set()
    kinds |= {"peer"} if model.get("peer_layers") else set()
    if len(special) < model.get("n_layers", 0):  # some blocks keep model.ffn
        kinds.add(model.get("ffn", "dense"))
    unused = [p for kind, prefixes in USED_BY.items() if kind not in kinds for p in prefixes]
    unused += [
        f"data.{k}" for k, v in data.items() if isinstance(v, dict) and k != data.get("dataset")
    ]
    return {
        key: value
        for key, value in _flatten(cfg).items()
        if not _under(key, (*NOT_WORK, *unused)) and key.rsplit(".", 1)[-1] != "seed"
    }


def rows_read_pct(records: list[dict]) -> float | None:
    """The share of a memory table's rows read in the run's last usage window (the shared
    table's, else the mean over the layers' own tables); None for a model with no memory
    table. Synthetic tokens leave a table in issue 10's collapsed state (few hot rows,
    which the lookup kernels then read from L2): this says which state a row measured."""
    last = next((r for r in reversed(records) if any("usage/" in k for k in r)), {})
    shared = last.get("usage/shared_table/rows_used_pct")
    if shared is not None:
        return shared
    own = [v for k, v in last.items() if k.startswith("usage/") and k.endswith("/rows_used_pct")]
    return sum(own) / len(own) if own else None


def slowest(row: dict) -> str:
    """The slowest steady log interval against the median, e.g. ``0.38x``: far under 1, a
    stall hit some steps (the median then hides it only while most intervals are clean);
    with the CUDA allocator's free-and-retry count when there were any."""
    runs = row.get("intervals")
    if not runs:
        return ""
    retries = row.get("alloc_retries")
    more = f", {retries} alloc retries" if retries else ""
    return f"{min(runs) / row['tokens_per_s']:.2f}x of {len(runs)}{more}"


def add_ratios(rows: list[dict]) -> None:
    """``vs_dense``: tokens/s over the dense twin's (same size) measured in this run."""
    speed = {r["preset"]: r.get("tokens_per_s") for r in rows}
    for r in rows:
        preset, at, tag = r["preset"].partition("@")  # an A/B row: preset@tree#round
        twin = speed.get(preset.rsplit("-", 1)[0] + "-dense" + at + tag)
        if r.get("tokens_per_s") and twin:
            r["vs_dense"] = r["tokens_per_s"] / twin


def setting(row: dict) -> tuple:
    """What a result is compared by: its preset, its overrides (none in older files) and
    its micro-batch (none in a failed run's row)."""
    return row["preset"], tuple(row.get("overrides", ())), row.get("batch")


def previous_result(card: str, exclude: Path | None) -> dict[tuple, tuple[Path, dict]]:
    """Per :func:`setting`, its newest committed result on ``card``: ``{setting: (path,
    row)}`` (a run of a few presets does not hide the others' older results)."""
    files = sorted(RESULTS.glob(f"train_{card}_*.md"))
    files = [f for f in files if exclude is None or f.resolve() != exclude.resolve()]
    found: dict[tuple, tuple[Path, dict]] = {}
    for path in reversed(files):
        blob = re.search(r"<!-- bench_train (.*) -->", path.read_text())
        for row in json.loads(blob.group(1))["rows"] if blob else []:
            if row.get("tokens_per_s"):  # a failed run is nobody's baseline
                found.setdefault(setting(row), (path, row))
    return found


def _shown(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def changed_settings(new: dict, old: dict, most: int = 3) -> str:
    """The :func:`throughput_settings` both rows record that differ, e.g.
    ``model.memory.balance_loss 0.0 -> 0.1`` (at most ``most`` named); "" when none do or
    either row records none (older results)."""
    a, b = new.get("settings") or {}, old.get("settings") or {}
    keys = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
    shown = [f"{k} {_shown(b[k])} -> {_shown(a[k])}" for k in keys[:most]]
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return ", ".join(shown) + more


def guard(rows: list[dict], previous: dict[tuple, tuple[Path, dict]]) -> list[str]:
    """Lines comparing this run with each preset's ``previous`` result (same overrides and
    micro-batch, no other recorded setting changed); regressions are shouted."""
    lines = [
        "guard: against the newest committed result of each preset, same overrides and micro-batch"
    ]
    bad = []
    for r in rows:
        path, old = previous.get(setting(r), (None, {}))
        then = old.get("tokens_per_s")
        if "error" in r and then:  # it ran before: the worst regression there is
            lines.append(f"  {r['preset']:<14} FAILED ({then:,.0f} tokens/s in {path.name})")
            bad.append(f"{r['preset']} failed ({path.name} ran it)")
            continue
        if not (r.get("tokens_per_s") and then):
            lines.append(
                f"  {r['preset']:<14} no earlier result on this card with these overrides "
                f"and micro-batch"
            )
            continue
        changed = changed_settings(r, old)
        if changed:  # a ratio would measure the change, not a regression
            lines.append(
                f"  {r['preset']:<14} not compared: {path.name} ran other settings: {changed}"
            )
            continue
        ratio = r["tokens_per_s"] / then
        lines.append(
            f"  {r['preset']:<14} {ratio:6.2f}x  ({then:,.0f} -> {r['tokens_per_s']:,.0f}, "
            f"{path.name})"
        )
        if ratio < TOLERANCE:
            bad.append(f"{r['preset']} at {ratio:.2f}x ({path.name})")
    if bad:
        banner = "!" * 78
        lines += [
            banner, f"REGRESSION: slower by more than 10%, or failed: {', '.join(bad)}", banner
        ]  # fmt: skip
    return lines


def table(rows: list[dict]) -> str:
    out = [
        "| preset | micro-batch | tokens/s | MFU | vs dense twin | peak GiB | slowest interval "
        "| table rows read |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['preset']} | | failed: {r['error'][:120]} | | | | | |")
            continue
        ratio = f"{r['vs_dense']:.2f}" if "vs_dense" in r else ""
        read = r.get("rows_read_pct")
        read = "–" if read is None else f"{read:.1f}%"
        out.append(
            f"| {r['preset']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% "
            f"| {ratio} | {r['peak_gib']:.1f} | {slowest(r)} | {read} |"
        )
    return "\n".join(out)


def ab_summary(rows: list[dict], labels: list[str]) -> str:
    """Per preset, each tree's median tokens/s over its rounds and its ratio to the first
    tree's (an A/B's answer); empty without ``--trees``."""
    if not labels:
        return ""
    speeds: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        preset, _, tag = r["preset"].partition("@")
        runs = speeds.setdefault(preset, {}).setdefault(tag.rsplit("#", 1)[0], [])
        if r.get("tokens_per_s"):
            runs.append(r["tokens_per_s"])
    out = ["| preset | tree | rounds | median tokens/s | vs first tree |", "|---|---|---|---|---|"]
    for preset, by_tree in speeds.items():
        first = by_tree.get(labels[0])
        base = statistics.median(first) if first else None
        for label in labels:
            runs = by_tree.get(label)
            if not runs:
                out.append(f"| {preset} | {label} | 0 | failed | |")
                continue
            med = statistics.median(runs)
            ratio = f"{med / base:.3f}" if base else ""
            out.append(f"| {preset} | {label} | {len(runs)} | {med:,.0f} | {ratio} |")
    return "\n".join(out) + "\n\n"


def dataset(ns: argparse.Namespace) -> str:
    """The data the runs trained on, as the results file names it."""
    chosen = [o.split("=", 1)[1] for o in ns.override if o.startswith("data.dataset=")]
    name = chosen[-1] if chosen else "synthetic"
    return f"synthetic tokens (vocabulary {ns.vocab:,})" if name == "synthetic" else f"{name} data"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--batch", type=int, default=8, help="micro-batch (sequences)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000, help="synthetic tokens' vocabulary")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=15, help="steps left out (compilation)")
    p.add_argument("--every", type=int, default=5, help="trainer log interval (steps)")
    p.add_argument("--compile", default="true", help="the trainer's compile setting")
    p.add_argument("--device", default="cuda")
    p.add_argument("--timeout", type=int, default=900, help="seconds per preset")
    p.add_argument("--override", nargs="*", default=[], help="extra key=value for every run")
    p.add_argument(
        "--collapsed-reads", action="store_true",
        help="train with COLLAPSED: the memory+ presets' reads left to collapse",
    )  # fmt: skip
    p.add_argument("--out", type=Path, help="write the markdown results here")
    p.add_argument("--strict", action="store_true", help="exit 1 on a regression")
    p.add_argument(
        "--trees", nargs="+", type=Path, default=[],
        help="source trees to A/B (each with memlayers/ inside), run in turn",
    )  # fmt: skip
    p.add_argument("--rounds", type=int, default=1, help="alternations of --trees")
    ns = p.parse_args()
    if ns.collapsed_reads:
        ns.override = [*COLLAPSED, *ns.override]
    for tree in ns.trees:
        if not (tree / "memlayers" / "__init__.py").is_file():
            raise SystemExit(f"error: --trees {tree} holds no memlayers/ package")
    if ns.rounds < 1:
        raise SystemExit(f"error: --rounds must be >= 1, got {ns.rounds}")
    if ns.steps <= ns.warmup:
        raise SystemExit(
            f"error: --steps={ns.steps} must exceed --warmup={ns.warmup} (the steps left "
            f"out of the timing): no log record would be timed"
        )
    labels = [tree_label(t) for t in ns.trees]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"error: --trees need distinct names (.rev or folder), got {labels}")

    card = card_name(ns.device)
    with tempfile.TemporaryDirectory() as tmp:
        if ns.trees:
            rows = [
                run_preset(preset, ns, Path(tmp), tree.resolve(), f"@{label}#{k + 1}")
                for k in range(ns.rounds)
                for tree, label in zip(ns.trees, labels, strict=True)
                for preset in ns.presets
            ]
        else:
            rows = [run_preset(preset, ns, Path(tmp)) for preset in ns.presets]
    add_ratios(rows)
    checks = guard(rows, previous_result(card, ns.out))
    date = datetime.date.today().isoformat()
    text = (
        f"# Training throughput, {card.upper()}, {date}\n\n"
        f"`python benchmarks/bench_train.py {' '.join(sys.argv[1:])}`: {dataset(ns)}, "
        f"bf16 autocast, compile={ns.compile}, {ns.steps} steps, median of the logged "
        f"tokens/s after step {ns.warmup}; MFU = tokens/s x train FLOPs per token "
        f"(memlayers.report) / the card's bf16 dense peak. Slowest interval: the slowest "
        f"logged interval after the warm-up against that median (a stall's mark). Table "
        f"rows read: the share of a "
        f"memory table's rows read in the last usage window (on synthetic tokens the reads "
        f"collapse onto few rows, issue 10: kernels then read hot rows from L2).\n\n"
        f"{table(rows)}\n\n"
        + ab_summary(rows, labels)
        + "\n".join(checks)
        + f"\n\n<!-- bench_train {json.dumps({'card': card, 'date': date, 'rows': rows})} -->\n"
    )
    if ns.out:
        ns.out.write_text(text)
    print(text)
    return 1 if ns.strict and any("REGRESSION" in line for line in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
