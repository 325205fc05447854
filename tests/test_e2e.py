"""End to end on the CPU in seconds: ``memlayers train`` (which evaluates at the end) →
``memlayers eval --qa`` → ``memlayers generate``, as the user runs them (subprocesses),
and ``memlayers compare`` of a dense and a Memory+ variant."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_eval import TINY_BIOS

from memlayers.cli import main as cli_main
from memlayers.compare import rate_str


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
    # EM over the one-hop questions: every attribute but the two-hop work city, by count
    attrs = doc["eval"]["tiny-dense"]["qa"]["bios-heldout"]["by_attribute"]
    one_hop = [s for a, s in attrs.items() if a != "work_city"]
    assert len(one_hop) == 5 and "work_city" in attrs
    want = sum(s["exact_match"] * s["n"] for s in one_hop) / sum(s["n"] for s in one_hop)
    assert dense["exact_match_1hop"] == pytest.approx(want)
    assert mem["total_params"] > dense["total_params"]  # the table adds parameters
    assert mem["flops_per_token"] < dense["flops_per_token"]  # ... and no FLOPs
    md = (out / "results.md").read_text()
    assert "memlayers compare tiny-dense" in md and "| tiny-dense |" in md and "EM 1-hop" in md
    assert (out / "compare.png").stat().st_size > 0
    assert (out / "curves.png").stat().st_size > 0  # each run's losses
    assert (out / "tiny-dense" / "eval" / "results.json").is_file()

    # --reuse keeps both finished runs; without it a variant retrains over its old run
    capsys.readouterr()
    assert cli_main(["compare", *variants, *shared, "--out", str(out), "--reuse"]) == 0
    assert capsys.readouterr().out.count(": reusing ") == 2
    assert cli_main(["compare", "tiny-dense", *shared, "--out", str(out)]) == 0
    assert "tiny-dense: training into" in capsys.readouterr().out

    # --reuse of a variant killed before its evaluation, or while training, goes on from
    # its checkpoint (the study's runs are cut at device time limits); one whose saved
    # config lacks a key today's has (trained before it existed) is trained again
    run = out / "tiny-dense"
    want = json.loads((run / "eval" / "results.json").read_text())["qa"]
    cmd = ["compare", "tiny-dense", *shared, "--out", str(out), "--reuse"]
    shutil.rmtree(run / "eval")
    assert cli_main(cmd) == 0
    assert "tiny-dense: evaluating " in capsys.readouterr().out
    assert json.loads((run / "eval" / "results.json").read_text())["qa"] == want
    shutil.rmtree(run / "eval")
    shutil.rmtree(run / "checkpoints" / "step_000008")
    assert cli_main(cmd) == 0
    assert f"tiny-dense: resuming {run} at step 4" in capsys.readouterr().out
    assert json.loads((run / "eval" / "results.json").read_text())["qa"] == want  # exact
    config = (run / "config.yaml").read_text()
    assert "  query_batch_norm: false\n" in config
    (run / "config.yaml").write_text(config.replace("  query_batch_norm: false\n", ""))
    assert cli_main(cmd) == 0
    assert "tiny-dense: training into" in capsys.readouterr().out

    assert cli_main(["compare", "tiny-dense:steps=3"]) == 1  # would change the budget
    assert "same for every variant" in capsys.readouterr().err


def _study_file(path, section: str) -> None:
    """A study YAML: ``section`` (the compare: block) and TINY_BIOS's shared keys."""
    model_keys = ("model.preset", "model.memory_layers", "model.memory.n_keys")
    shared = [o for o in TINY_BIOS if not o.startswith(model_keys)]
    nested: dict = {}
    for o in shared:
        key, value = o.split("=", 1)
        *parents, leaf = key.split(".")
        at = nested
        for p in parents:
            at = at.setdefault(p, {})
        at[leaf] = value
    body = "\n".join(_yaml_lines(nested, 0))
    path.write_text(section + body + "\n")


def _yaml_lines(d: dict, indent: int):
    for k, v in d.items():
        if isinstance(v, dict):
            yield " " * indent + f"{k}:"
            yield from _yaml_lines(v, indent + 2)
        else:
            yield " " * indent + f"{k}: {v}"


def test_a_study_file_runs_its_variants_into_its_directory(tmp_path, capsys, monkeypatch):
    from memlayers.config import load_config

    monkeypatch.chdir(tmp_path)
    study = tmp_path / "study.yaml"
    _study_file(study, (
        "compare:\n  variants:\n    - tiny-dense\n"
        "    - tiny-memory+:model.memory_layers=[0,2]:model.memory.n_keys=8\n"
        "  out: runs/study\n  max_qa: 3\n"
    ))  # fmt: skip
    # training reads the file without the section
    assert load_config([study], ["model.preset=tiny-dense"]).steps == 8
    assert cli_main(["compare", str(study)]) == 0
    doc = json.loads((tmp_path / "runs/study/results.json").read_text())
    assert [r["variant"] for r in doc["rows"]] == [
        "tiny-dense", "tiny-memory+:model.memory_layers=[0,2]:model.memory.n_keys=8"
    ]  # fmt: skip
    assert all(r["qa_n"] == 3 for r in doc["rows"])  # max_qa
    assert "first 3 questions" in (tmp_path / "runs/study/results.md").read_text()
    # --reuse finds both (their max_qa results) from each run's config.yaml and eval
    # results alone (what a study spread over device calls brings back); a variant named
    # on the command line runs instead of the study's, into the study's directory
    for run in (p for p in (tmp_path / "runs/study").iterdir() if p.is_dir()):
        for p in run.iterdir():
            if p.name not in ("config.yaml", "eval"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    capsys.readouterr()
    assert cli_main(["compare", str(study), "--reuse"]) == 0
    assert capsys.readouterr().out.count(": reusing ") == 2
    assert cli_main(["compare", "tiny-dense", str(study), "--reuse"]) == 0
    doc = json.loads((tmp_path / "runs/study/results.json").read_text())
    assert [r["variant"] for r in doc["rows"]] == ["tiny-dense"]


def test_jobs_train_variants_in_processes_of_their_own_and_name_the_one_that_failed(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    study = tmp_path / "study.yaml"
    # the second variant fails only once it trains (a weight past max_weight at its first
    # step): in its own process, after the first has started
    _study_file(study, (
        "compare:\n  variants: [tiny-dense, 'tiny-dense:max_weight=1e-9']\n"
        "  out: runs/jobs\n  max_qa: 3\n"
    ))  # fmt: skip
    assert cli_main(["compare", str(study), "--jobs", "2"]) == 1
    captured = capsys.readouterr()
    assert "1 variant(s) failed: tiny-dense:max_weight=1e-9 (exit 1" in captured.err
    assert "in its own process" in captured.out
    out = tmp_path / "runs/jobs"
    log = (out / "tiny-dense_max_weight=1e-9.log").read_text()
    assert log.startswith(sys.executable) and "error: weights diverged" in log
    assert "its log ends:" in captured.out and "error: weights diverged" in captured.out
    assert "training into" in (out / "tiny-dense.log").read_text()
    doc = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in doc["rows"]] == ["tiny-dense"]  # the one that finished
    assert doc["command"].endswith("--jobs=2")
    # what a process trained is reused: nothing is started again
    assert cli_main(["compare", "tiny-dense", str(study), "--reuse", "--jobs", "2"]) == 0
    captured = capsys.readouterr().out
    assert "tiny-dense: reusing" in captured and "its own process" not in captured
    assert cli_main(["compare", "tiny-dense", str(study), "--jobs", "0"]) == 1
    assert "jobs must be a positive int, got 0" in capsys.readouterr().err


def test_rates_run_each_variant_at_each_rate_and_name_each_models_best(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    study = tmp_path / "study.yaml"
    # tiny-dense trains at 3e-3 (TrainArgs' default rate): that rate is the variant itself
    _study_file(study, (
        "compare:\n  variants: [tiny-dense]\n  out: runs/rates\n  max_qa: 3\n"
        "  rates: [3.0e-3, 1.0e-2]\n"
    ))  # fmt: skip
    assert cli_main(["compare", str(study), "--jobs", "2"]) == 0
    out = tmp_path / "runs/rates"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "tiny-dense", "tiny-dense_optim.lr=1e-2"
    ]  # fmt: skip
    # each process trains its one variant (a study's rates do not multiply it again)
    for log in ("tiny-dense.log", "tiny-dense_optim.lr=1e-2.log"):
        assert (out / log).read_text().count("training into") == 1, log
    doc = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["lr"]) for r in doc["rows"]] == [
        ("tiny-dense", 3e-3), ("tiny-dense:optim.lr=1e-2", 1e-2)
    ]  # fmt: skip
    by_em = max(doc["rows"], key=lambda r: (r["exact_match"], -r["val_loss"]))
    (best,) = doc["best_rates"]
    assert (best["variant"], best["lr"], best["rates"]) == ("tiny-dense", by_em["lr"], "3e-3, 1e-2")
    md = (out / "results.md").read_text()
    assert "Each model at its best learning rate" in md
    assert f"| tiny-dense | {rate_str(by_em['lr'])} | 3e-3, 1e-2 |" in md
    # --rates on the command line instead of the study's; both runs are reused
    capsys.readouterr()
    assert cli_main(["compare", str(study), "--rates", "1e-2", "--reuse"]) == 0
    captured = capsys.readouterr().out
    assert "tiny-dense:optim.lr=1e-2: reusing" in captured and "tiny-dense: reusing" not in captured
    assert cli_main(["compare", str(study), "--rates", "fast"]) == 1
    assert "--rates: 'fast' is not a learning rate" in capsys.readouterr().err


def test_seeds_run_each_variant_at_each_seed_and_tabulate_the_means(tmp_path, capsys, monkeypatch):
    from memlayers.config import load_config

    monkeypatch.chdir(tmp_path)
    study = tmp_path / "study.yaml"
    _study_file(study, (
        "compare:\n  variants: [tiny-dense]\n  out: runs/seeds\n  max_qa: 3\n"
        "  seeds: [0, 1]\n"
    ))  # fmt: skip
    assert cli_main(["compare", str(study), "--jobs", "2"]) == 0
    out = tmp_path / "runs/seeds"
    # the config's own seed (0) where it always trains, seed 1 beside it, each run once
    assert load_config([out / "tiny-dense/config.yaml"]).seed == 0
    assert load_config([out / "seed1/tiny-dense/config.yaml"]).seed == 1
    for log in (out / "tiny-dense.log", out / "seed1/tiny-dense.log"):
        assert log.read_text().count("training into") == 1, log
    doc = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in doc["rows"]] == [
        ("tiny-dense", 0),
        ("tiny-dense", 1),
    ]
    assert set(doc["eval"]) == {"tiny-dense", "tiny-dense@seed1"}
    # two inits of one model on the same data: not the same weights, the same tokens
    a, b = doc["rows"]
    assert a["val_loss"] != b["val_loss"] and a["tokens"] == b["tokens"]
    (mean,) = doc["over_seeds"]
    assert mean["val_loss"] == pytest.approx((a["val_loss"] + b["val_loss"]) / 2)
    assert mean["seeds"] == "0, 1"
    md = (out / "results.md").read_text()
    assert "Over seeds" in md and "same data and" in md
    # both reused; a seed 1 at the command line alone runs it as its own comparison
    capsys.readouterr()
    assert cli_main(["compare", str(study), "--reuse"]) == 0
    assert capsys.readouterr().out.count(": reusing ") == 2
    assert cli_main(["compare", str(study), "--seeds", "1", "--reuse"]) == 0
    assert "tiny-dense@seed1: reusing" in capsys.readouterr().out
    assert cli_main(["compare", str(study), "--seeds", "0,0"]) == 1
    assert "--seeds: '0' is named twice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "section,match",
    [
        ("compare:\n  variants: tiny-dense\n", "compare.variants must be a list"),
        ("compare:\n  variants: [tiny-dense]\n  outdir: x\n", "has no key 'outdir'"),
        ("compare:\n  variants: [tiny-dense]\n  max_qa: 0\n", "max_qa must be a positive"),
        ("compare:\n  variants: [tiny-dense]\n  rates: [0]\n", "rates: 0 is not a positive"),
        ("compare:\n  variants: [tiny-dense]\n  seeds: [a]\n", "seeds: 'a' is not a seed"),
        ("compare:\n  variants: ['tiny-dense:steps=3']\n", "same for every variant"),
        ("compare:\n  variants: [tiny-dense, tiny-dense]\n", "named twice"),
        (
            "compare:\n  variants: ['tiny-dense:optim.lr=1e-3', 'tiny-dense;optim.lr=1e-3']\n",
            "would train into one folder (tiny-dense_optim.lr=1e-3)",
        ),
    ],
    ids=[
        "not-a-list",
        "unknown-key",
        "max-qa",
        "rates",
        "seeds",
        "shared-key",
        "twice",
        "one-folder",
    ],
)
def test_a_bad_study_file_is_refused_naming_the_key(tmp_path, capsys, section, match):
    study = tmp_path / "study.yaml"
    _study_file(study, section)
    assert cli_main(["compare", str(study), "--out", str(tmp_path / "o")]) == 1
    assert match in capsys.readouterr().err
