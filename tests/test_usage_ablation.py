"""The usage ablation's script (benchmarks/usage_ablation.py): its variants are valid
configs that train, and its report reads what the trainer logged."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "usage_ablation.py"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("usage_ablation", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_variant_spec_names_its_overrides(ablation):
    name, overrides = ablation.parse_variant("bal10:seed=1")
    assert name == "bal10:seed=1"
    assert overrides == [*ablation.VARIANTS["bal10"], "seed=1"]
    with pytest.raises(SystemExit, match="unknown variant 'nope'"):
        ablation.parse_variant("nope")
    with pytest.raises(SystemExit, match="'seed' is not key=value"):
        ablation.parse_variant("base:seed")


def test_variants_train_and_the_report_reads_them(ablation, tmp_path, monkeypatch):
    # A tiny Memory+ model, two variants at once, as the GPU study runs them.
    out = tmp_path / "runs"
    small = ["data.bios.n_people=200", "data.bios.exposures=2", "data.batch_size=4",
             "data.seq_len=64", "logging.every=5", "eval_every=10", "eval_batches=1"]  # fmt: skip
    cmd = [sys.executable, str(_PATH), "run", "base", "bal10:seed=1", "--out", str(out),
           "--preset", "tiny-memory+", "--steps", "10", "--limit", "300",
           "--override", *small]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "base: exit 0" in done.stdout and "bal10:seed=1: exit 0" in done.stdout
    config = (out / "bal10:seed=1" / "config.yaml").read_text()
    assert "balance_loss: 0.1" in config and "query_batch_norm: true" in config
    assert "balance_loss: 0.0" in (out / "base" / "config.yaml").read_text()

    md = tmp_path / "report.md"
    md.write_text("prose kept\n<!-- table -->\nold table\n")
    argv = ["usage_ablation.py", "report", str(out), "--md", str(md), "--keep-head"]
    monkeypatch.setattr(sys, "argv", argv)
    ablation.main()
    text = md.read_text()
    assert text.startswith("prose kept\n<!-- table -->\n") and "old table" not in text
    rows = [line for line in text.splitlines() if line.startswith(("| base", "| bal10"))]
    assert len(rows) == 2 and all("| 10 |" in r for r in rows)  # both reached step 10
    curves = json.loads(md.with_suffix(".json").read_text())
    assert set(curves) == {"base", "bal10:seed=1"}
    steps = curves["base"]["step"]
    assert steps[-1] == 10 and "shared_table" in curves["base"]["used"]
    used = curves["bal10:seed=1"]["used"]
    assert all(0 <= x <= 100 for ys in used.values() for x in ys)
    assert [s for s, _ in curves["base"]["val"]] == [10]
