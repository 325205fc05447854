"""The usage ablation's script (benchmarks/usage_ablation.py): its variants are valid
configs that train, and its report reads what the trainer logged."""

import argparse
import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from benchmark_scripts import load
from omegaconf import OmegaConf

from memlayers.config import load_config


@pytest.fixture(scope="module")
def ablation():
    return load("usage_ablation")


def test_a_variant_spec_names_its_overrides(ablation):
    name, overrides = ablation.parse_variant("bal10:seed=1")
    assert name == "bal10:seed=1"
    assert overrides == [*ablation.VARIANTS["bal10"], "seed=1"]
    with pytest.raises(SystemExit, match="unknown variant 'nope'"):
        ablation.parse_variant("nope")
    with pytest.raises(SystemExit, match="'seed' is not key=value"):
        ablation.parse_variant("base:seed")


def test_each_variant_resolves_to_its_settings(ablation):
    # Resolved (not trained) on the study's preset, where the levers are on by default:
    # every override of a variant is what its run gets, so OFF really turns them off.
    ns = argparse.Namespace(preset="134m-memory+", steps=2000, override=[])
    default = load_config([], ablation.common(ns)).model.memory
    assert default.query_batch_norm is True and default.balance_loss == 0.1
    for name, overrides in ablation.VARIANTS.items():
        cfg = OmegaConf.structured(load_config([], [*ablation.common(ns), *overrides]))
        for o in overrides:
            key = o.split("=", 1)[0]
            want = OmegaConf.select(OmegaConf.from_dotlist([o]), key)
            assert OmegaConf.select(cfg, key) == want, (name, o)
    base = load_config([], [*ablation.common(ns), *ablation.VARIANTS["base"]]).model.memory
    assert base.query_batch_norm is False and base.balance_loss == 0.0


def test_specs_are_checked_before_anything_runs(ablation, tmp_path):
    variants = ablation.plan(["base", "bal10:seed=1"], tmp_path)
    assert [(spec, folder) for spec, folder, _ in variants] == [
        ("base", "base"),
        ("bal10:seed=1", "bal10_seed=1"),  # ':' and '/' make no file names
    ]
    with pytest.raises(SystemExit, match="given more than once: bal10:seed=1"):
        ablation.plan(["bal10:seed=1", "base", "bal10:seed=1"], tmp_path)
    with pytest.raises(SystemExit, match="'base:a=b/c' and 'base:a=b_c' would share"):
        ablation.plan(["base:a=b/c", "base:a=b_c"], tmp_path)
    (tmp_path / "bal10_seed=1").mkdir()
    with pytest.raises(SystemExit, match=re.escape(f"already exist: {tmp_path / 'bal10_seed=1'} ")):
        ablation.plan(["base", "bal10:seed=1"], tmp_path)


class _Exited:
    def __init__(self, rc):
        self.returncode = rc

    def wait(self):
        return self.returncode


def test_a_failed_or_cut_variant_fails_the_run_naming_it(ablation, tmp_path, monkeypatch):
    record = {"step": 5, "usage/block_3/rows_used_pct": 50.0, "usage/block_3/gini_count": 0.5}
    exits = {"base": 0, "bal10_seed=1": 124, "bn": 1}

    def popen(cmd, stdout, stderr):
        folder = Path(cmd[-1].split("=", 1)[1])
        if folder.name != "bn":  # bn failed before its first log
            folder.mkdir()
            (folder / "metrics.jsonl").write_text(json.dumps(record) + "\n")
        return _Exited(exits[folder.name])

    monkeypatch.setattr(ablation.subprocess, "run", lambda cmd, stdout: _Exited(0))
    monkeypatch.setattr(ablation.subprocess, "Popen", popen)
    ns = argparse.Namespace(variants=["base", "bal10:seed=1", "bn"], out=tmp_path,
                            preset="tiny-memory+", steps=10, limit=60, override=[])  # fmt: skip
    with pytest.raises(SystemExit) as failed:
        ablation.run(ns)
    message = str(failed.value)
    assert message.startswith("error: 2 of 3 variants failed: bal10:seed=1 (exit 124 (time limit)")
    assert "bn (exit 1, " in message and "base (" not in message
    runs = ablation.read(tmp_path)  # labelled by their specs; bn listed with no records
    assert set(runs) == {"base", "bal10:seed=1", "bn"} and runs["bn"] == []


def test_the_report_lists_runs_without_metrics_and_skips_a_cut_last_line(
    ablation, tmp_path, capsys
):
    def logged(step, used, gini):
        return {"step": step, "loss": 3.0, "usage/block_3/rows_used_pct": used,
                "usage/block_3/gini_count": gini}  # fmt: skip

    lines = [logged(10, 40.0, 0.5), {"step": 10, "val_loss": 2.5}, logged(20, 60.0, 0.4)]
    text = "\n".join(map(json.dumps, lines))
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "metrics.jsonl").write_text(text + '\n{"step": 30, "lo')
    (tmp_path / "bal10_seed=1.log").write_text("Traceback ...\n")  # died before its dir
    (tmp_path / "variants.json").write_text('{"bal10_seed=1": "bal10:seed=1"}')
    ablation.report(argparse.Namespace(folder=tmp_path, md=None, keep_head=False))
    out = capsys.readouterr()
    assert "skipped its last line" in out.err
    assert "| base | 20 | 60.0 (block_3) |" in out.out
    assert "| 2.5000 (10) |" in out.out  # the validation loss and its step
    assert "| bal10:seed=1 | – | no metrics.jsonl" in out.out
    assert "no metrics: bal10:seed=1" in out.out
    (tmp_path / "base" / "metrics.jsonl").write_text("{oops\n" + text)
    with pytest.raises(SystemExit, match="metrics.jsonl: line 1 is not JSON"):
        ablation.read(tmp_path)


def test_variants_train_and_the_report_reads_them(ablation, tmp_path, monkeypatch, capsys):
    # A tiny Memory+ model, two variants at once, as the GPU study runs them, into a folder
    # an earlier call left its warm-up run in (replaced, not refused). In this process:
    # memlayers is imported already; the runs are subprocesses all the same.
    out = tmp_path / "runs"
    (out / "_warm").mkdir(parents=True)
    (out / "_warm" / "config.yaml").write_text("steps: 1\n")
    (out / "_warm" / "metrics.jsonl").write_text('{"step": 1}\n')
    small = ["data.bios.n_people=200", "data.bios.exposures=2", "data.batch_size=4",
             "data.seq_len=64", "logging.every=5", "eval_every=10", "eval_batches=1",
             "device=cpu"]  # fmt: skip
    argv = ["usage_ablation.py", "run", "base", "bal10:seed=1", "--out", str(out),
            "--preset", "tiny-memory+", "--steps", "10", "--limit", "300",
            "--override", *small]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    ablation.main()  # no SystemExit: every variant finished
    printed = capsys.readouterr().out
    assert "base: exit 0" in printed and "bal10:seed=1: exit 0" in printed
    assert (out / "bal10_seed=1.log").is_file()
    config = yaml.safe_load((out / "bal10_seed=1" / "config.yaml").read_text())
    assert config["model"]["memory"]["balance_loss"] == 0.1 and config["seed"] == 1
    assert config["model"]["memory"]["query_batch_norm"] is True
    config = yaml.safe_load((out / "base" / "config.yaml").read_text())
    assert config["model"]["memory"]["query_batch_norm"] is False

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
    assert set(curves) == {"base", "bal10:seed=1"}  # labelled by their specs
    steps = curves["base"]["step"]
    assert steps[-1] == 10 and "shared_table" in curves["base"]["used"]
    used = curves["bal10:seed=1"]["used"]
    assert all(0 <= x <= 100 for ys in used.values() for x in ys)
    assert [s for s, _ in curves["base"]["val"]] == [10]
