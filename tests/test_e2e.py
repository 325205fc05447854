"""End to end on the CPU in seconds: ``memlayers train`` (which evaluates at the end) →
``memlayers eval --qa`` → ``memlayers generate``, as the user runs them (subprocesses),
and ``memlayers compare`` of a dense and a Memory+ variant."""

import json
import os
import subprocess
import sys

from test_eval import TINY_BIOS

from memlayers.cli import main as cli_main


def memlayers(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "memlayers", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_train_eval_generate(tmp_path):
    run = tmp_path / "run"
    out = memlayers("train", *TINY_BIOS, f"run_dir={run}").stdout
    # the main job's promise: training ends with the QA accuracy and the bits stored
    assert "bios-heldout QA: exact match" in out and "knowledge stored:" in out
    for name in ("tokenizer.json", "config.yaml", "eval/results.json", "checkpoints/latest"):
        assert (run / name).exists(), name

    qa = tmp_path / "my_qa.jsonl"
    qa.write_text(
        json.dumps({"question": "What did study?", "answers": ["Physics", "Law"]}) + "\n"
        + json.dumps({"context": "Which city", "question": "was born in?", "answers": ["Law"]})
    )  # fmt: skip
    r = json.loads(memlayers("eval", str(run), "--qa", str(qa), "--json").stdout)
    assert set(r["qa"]) == {"bios-heldout", "my_qa"} and r["qa"]["my_qa"]["n"] == 2
    assert r["knowledge"]["capacity"] > 0 and "shared_table" in r["usage"]

    gen = memlayers("generate", str(run), "--prompt", "Which city was", "--max-new-tokens", "4")
    assert gen.stdout.startswith("Which city was")


def test_compare_writes_table_json_and_plot(tmp_path, capsys):
    model_keys = ("model.preset", "model.memory_layers", "model.memory.n_keys")
    shared = [o for o in TINY_BIOS if not o.startswith(model_keys)]
    out = tmp_path / "cmp"
    # 32² rows × 32: a table larger than the two dense FFNs it replaces.
    variants = ["tiny-dense", "tiny-memory+:model.memory_layers=[0,2]:model.memory.n_keys=32"]
    assert cli_main(["compare", *variants, *shared, "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in doc["rows"]}
    assert set(rows) == set(variants)
    assert len({r["tokens"] for r in rows.values()}) == 1  # the same token budget
    dense, mem = rows["tiny-dense"], rows[variants[1]]
    assert mem["total_params"] > dense["total_params"]  # the table adds parameters
    assert mem["flops_per_token"] < dense["flops_per_token"]  # ... and no FLOPs
    md = (out / "results.md").read_text()
    assert "memlayers compare tiny-dense" in md and "| tiny-dense |" in md
    assert (out / "compare.png").stat().st_size > 0
    assert (out / "tiny-dense" / "eval" / "results.json").is_file()

    # --reuse keeps both finished runs; without it a variant retrains over its old run
    capsys.readouterr()
    assert cli_main(["compare", *variants, *shared, "--out", str(out), "--reuse"]) == 0
    assert capsys.readouterr().out.count(": reusing ") == 2
    assert cli_main(["compare", "tiny-dense", *shared, "--out", str(out)]) == 0
    assert "tiny-dense: training into" in capsys.readouterr().out

    assert cli_main(["compare", "tiny-dense:steps=3"]) == 1  # would change the budget
    assert "same for every variant" in capsys.readouterr().err
