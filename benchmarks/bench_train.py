"""Training throughput of the presets, through the real trainer, on one card: tokens/s,
MFU, ratio to the dense twin, peak memory — and a guard against regressions.

    python benchmarks/bench_train.py                                   # 134m, 373m x 4
    python benchmarks/bench_train.py --presets 134m-dense 134m-memory+ --steps 30
    python benchmarks/bench_train.py --out benchmarks/results/train_h100_20261128.md
    python benchmarks/bench_train.py --presets tiny-dense --device cpu --steps 6  # smoke

Each preset runs ``python -m memlayers train`` in its own process (synthetic tokens, no
evaluation, no checkpoint) so that what is timed is exactly what a user runs, and GPU
memory and compile caches don't leak between presets. Throughput is the median of the
trainer's logged tokens/s over the log intervals after ``--warmup`` steps (compilation
happens in the first steps); MFU and peak memory come from the same records.

The guard: the newest committed ``benchmarks/results/train_<card>_*.md`` for the same card
is read, and every preset measured in both prints its ratio to that result; a fall of more
than 10% is printed as a REGRESSION banner (and ``--strict`` makes it the exit status).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = [f"{s}-{v}" for s in ("134m", "373m") for v in ("dense", "memory+", "moe", "peer")]
TOLERANCE = 0.9  # a preset slower than 90% of its last committed result is a regression


def card_name(device: str) -> str:
    """``h100`` / ``h200`` / ... from the CUDA device name; ``cpu`` on the CPU."""
    if device == "cpu":
        return "cpu"
    import torch

    name = torch.cuda.get_device_name().lower()
    found = re.search(r"\b([a-z]\d{2,3})\b", name)
    return found.group(1) if found else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def run_preset(preset: str, ns: argparse.Namespace, tmp: Path) -> dict:
    run_dir = tmp / re.sub(r"[^a-z0-9]+", "-", preset)
    cmd = [
        sys.executable, "-m", "memlayers", "train",
        f"model.preset={preset}", "data.dataset=synthetic",
        f"data.batch_size={ns.batch}", f"data.seq_len={ns.seq_len}", f"steps={ns.steps}",
        f"logging.every={ns.every}", f"device={ns.device}", f"compile={ns.compile}",
        "eval_every=0", "eval_batches=0", "final_eval=false", "checkpoint.enabled=false",
        f"data.synthetic.vocab_size={ns.vocab}",
        "logging.progress=false", "logging.tensorboard=false", "logging.plot=false",
        f"run_dir={run_dir}", *ns.override,
    ]  # fmt: skip
    print(f"[{preset}] {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ns.timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"preset": preset, "error": " | ".join(tail)}
    records = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    steady = [r for r in records if "tok_per_s" in r and r["step"] > ns.warmup]
    if not steady:
        return {"preset": preset, "error": f"no log records after step {ns.warmup}"}
    return {
        "preset": preset,
        "tokens_per_s": statistics.median(r["tok_per_s"] for r in steady),
        "mfu": statistics.median(r.get("mfu", 0.0) for r in steady),
        "peak_gib": max(r.get("peak_mem_gib", 0.0) for r in steady),
        "batch": f"{ns.batch}x{ns.seq_len}",
        "rows_read_pct": rows_read_pct(records),
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


def add_ratios(rows: list[dict]) -> None:
    """``vs_dense``: tokens/s over the dense twin's (same size) measured in this run."""
    speed = {r["preset"]: r.get("tokens_per_s") for r in rows}
    for r in rows:
        twin = speed.get(r["preset"].rsplit("-", 1)[0] + "-dense")
        if r.get("tokens_per_s") and twin:
            r["vs_dense"] = r["tokens_per_s"] / twin


def previous_result(card: str, exclude: Path | None) -> dict[str, tuple[Path, dict]]:
    """Per preset, its newest committed result on ``card``: ``{preset: (path, row)}`` (a
    run of a few presets does not hide the others' older results)."""
    files = sorted(RESULTS.glob(f"train_{card}_*.md"))
    files = [f for f in files if exclude is None or f.resolve() != exclude.resolve()]
    found: dict[str, tuple[Path, dict]] = {}
    for path in reversed(files):
        blob = re.search(r"<!-- bench_train (.*) -->", path.read_text())
        for row in json.loads(blob.group(1))["rows"] if blob else []:
            found.setdefault(row["preset"], (path, row))
    return found


def guard(rows: list[dict], previous: dict[str, tuple[Path, dict]]) -> list[str]:
    """Lines comparing this run with each preset's ``previous`` result; regressions are
    shouted."""
    lines, bad = ["guard: against the newest committed result of each preset"], []
    for r in rows:
        path, old = previous.get(r["preset"], (None, {}))
        then = old.get("tokens_per_s")
        if not (r.get("tokens_per_s") and then):
            lines.append(f"  {r['preset']:<14} no earlier result on this card")
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
        lines += [banner, f"REGRESSION: slower by more than 10%: {', '.join(bad)}", banner]
    return lines


def table(rows: list[dict]) -> str:
    out = [
        "| preset | micro-batch | tokens/s | MFU | vs dense twin | peak GiB | table rows read |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['preset']} | | failed: {r['error'][:120]} | | | | |")
            continue
        ratio = f"{r['vs_dense']:.2f}" if "vs_dense" in r else ""
        read = r.get("rows_read_pct")
        read = "–" if read is None else f"{read:.1f}%"
        out.append(
            f"| {r['preset']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% "
            f"| {ratio} | {r['peak_gib']:.1f} | {read} |"
        )
    return "\n".join(out)


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
    p.add_argument("--out", type=Path, help="write the markdown results here")
    p.add_argument("--strict", action="store_true", help="exit 1 on a regression")
    ns = p.parse_args()

    card = card_name(ns.device)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_preset(preset, ns, Path(tmp)) for preset in ns.presets]
    add_ratios(rows)
    checks = guard(rows, previous_result(card, ns.out))
    date = datetime.date.today().isoformat()
    text = (
        f"# Training throughput, {card.upper()}, {date}\n\n"
        f"`python benchmarks/bench_train.py {' '.join(sys.argv[1:])}`: synthetic tokens, "
        f"bf16 autocast, compile={ns.compile}, {ns.steps} steps, median of the logged "
        f"tokens/s after step {ns.warmup}; MFU = tokens/s x train FLOPs per token "
        f"(memlayers.report) / the card's bf16 dense peak. Table rows read: the share of a "
        f"memory table's rows read in the last usage window (on synthetic tokens the reads "
        f"collapse onto few rows, issue 10: kernels then read hot rows from L2).\n\n"
        f"{table(rows)}\n\n"
        + "\n".join(checks)
        + f"\n\n<!-- bench_train {json.dumps({'card': card, 'date': date, 'rows': rows})} -->\n"
    )
    if ns.out:
        ns.out.write_text(text)
    print(text)
    return 1 if ns.strict and any("REGRESSION" in line for line in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
