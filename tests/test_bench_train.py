"""The throughput benchmark's regression guard (benchmarks/bench_train.py)."""

import json

import pytest
import yaml
from benchmark_scripts import load


@pytest.fixture
def bench(tmp_path, monkeypatch):
    module = load("bench_train")
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    return module


def _write(path, rows, card="h100"):
    blob = json.dumps({"card": card, "date": "2026-01-01", "rows": rows})
    path.write_text(f"# old\n\n<!-- bench_train {blob} -->\n")


def test_a_fall_of_more_than_ten_percent_is_shouted(bench, tmp_path):
    _write(tmp_path / "train_h100_20260101.md", [{"preset": "a", "tokens_per_s": 100.0}])
    _write(tmp_path / "train_h100_20260301.md", [{"preset": "a", "tokens_per_s": 200.0}])
    _write(tmp_path / "train_h200_20260401.md", [{"preset": "a", "tokens_per_s": 1e9}])
    prev = bench.previous_result("h100", exclude=None)
    assert prev["a", (), None][0].name == "train_h100_20260301.md"  # the newest for this card only
    lines = bench.guard([{"preset": "a", "tokens_per_s": 170.0}], prev)
    assert any("REGRESSION" in x and "a at 0.85x" in x for x in lines)
    lines = bench.guard([{"preset": "a", "tokens_per_s": 190.0}], prev)
    assert not any("REGRESSION" in x for x in lines) and any("0.95x" in x for x in lines)


def test_each_preset_is_compared_with_its_own_newest_result(bench, tmp_path):
    # A later run of one preset does not hide the other's older result.
    _write(
        tmp_path / "train_h100_20260101.md",
        [{"preset": "a", "tokens_per_s": 100.0}, {"preset": "b", "tokens_per_s": 100.0}],
    )
    _write(tmp_path / "train_h100_20260301.md", [{"preset": "b", "tokens_per_s": 200.0}])
    prev = bench.previous_result("h100", exclude=None)
    assert {p: path.name for (p, _, _), (path, _) in prev.items()} == {
        "a": "train_h100_20260101.md",
        "b": "train_h100_20260301.md",
    }
    lines = bench.guard(
        [{"preset": "a", "tokens_per_s": 80.0}, {"preset": "b", "tokens_per_s": 190.0}], prev
    )
    assert any("REGRESSION" in x and "a at 0.80x" in x and "b at" not in x for x in lines)


def test_no_earlier_result_and_the_output_file_itself_are_not_compared(bench, tmp_path):
    out = tmp_path / "train_h100_20261128.md"
    _write(out, [{"preset": "a", "tokens_per_s": 1e9}])
    assert bench.previous_result("h100", exclude=out) == {}
    lines = bench.guard([{"preset": "a", "tokens_per_s": 1.0}], {})
    assert "no earlier result" in lines[1] and not any("REGRESSION" in x for x in lines)


def test_a_result_is_compared_only_with_one_of_the_same_overrides(bench, tmp_path):
    # Collapsed reads (or another dataset) against a spread synthetic run would be a false
    # alarm, or hide a real fall: each setting has its own baseline.
    collapsed = [*bench.COLLAPSED]
    _write(
        tmp_path / "train_h100_20260101.md",
        [{"preset": "a", "tokens_per_s": 100.0, "overrides": collapsed}],
    )
    _write(tmp_path / "train_h100_20260301.md", [{"preset": "a", "tokens_per_s": 200.0}])
    prev = bench.previous_result("h100", exclude=None)
    lines = bench.guard([{"preset": "a", "tokens_per_s": 95.0, "overrides": collapsed}], prev)
    assert any("0.95x" in x and "20260101" in x for x in lines)
    assert not any("REGRESSION" in x for x in lines)
    lines = bench.guard([{"preset": "a", "tokens_per_s": 95.0}], prev)
    assert any("REGRESSION" in x and "a at 0.47x" in x for x in lines)
    lines = bench.guard([{"preset": "a", "tokens_per_s": 95.0, "overrides": ["x=1"]}], prev)
    assert "no earlier result" in lines[1] and not any("REGRESSION" in x for x in lines)


def test_the_results_name_the_data(bench):
    ns = bench.argparse.Namespace(override=[], vocab=32000)
    assert bench.dataset(ns) == "synthetic tokens (vocabulary 32,000)"
    ns.override = [*bench.COLLAPSED, "data.dataset=bios"]
    assert bench.dataset(ns) == "bios data"


def test_ratio_to_the_dense_twin(bench):
    rows = [
        {"preset": "134m-dense", "tokens_per_s": 200.0},
        {"preset": "134m-memory+", "tokens_per_s": 150.0},
        {"preset": "373m-moe", "tokens_per_s": 10.0},  # no twin measured: no ratio
    ]
    bench.add_ratios(rows)
    assert rows[1]["vs_dense"] == 0.75 and rows[0]["vs_dense"] == 1.0
    assert "vs_dense" not in rows[2]


def test_rows_read_is_the_last_usage_window(bench):
    records = [
        {"step": 5, "tok_per_s": 1.0, "usage/shared_table/rows_used_pct": 50.0},
        {"step": 10, "tok_per_s": 1.0, "usage/shared_table/rows_used_pct": 2.5},
        {"step": 10, "val_loss": 3.0},  # a later record without usage
    ]
    assert bench.rows_read_pct(records) == 2.5
    own = [{"usage/block_1/rows_used_pct": 10.0, "usage/block_3/rows_used_pct": 30.0}]
    assert bench.rows_read_pct(own) == 20.0  # per-layer tables: their mean
    assert bench.rows_read_pct([{"step": 1, "tok_per_s": 1.0}]) is None  # no memory
    row = {"preset": "m", "batch": "1x8", "tokens_per_s": 1.0, "mfu": 0.1, "peak_gib": 1.0}
    assert "| 2.5% |" in bench.table([dict(row, rows_read_pct=2.5)])
    assert bench.table([dict(row, rows_read_pct=None)]).endswith("| – |")


def test_the_slowest_interval_marks_a_stall(bench):
    row = {"preset": "m", "batch": "1x8", "tokens_per_s": 400.0, "mfu": 0.1, "peak_gib": 1.0}
    assert "| 0.38x of 4 |" in bench.table([dict(row, intervals=[400, 150, 410, 390])])
    assert "| 1.00x of 1 |" in bench.table([dict(row, intervals=[400])])
    retried = dict(row, intervals=[400, 200], alloc_retries=7)
    assert "| 0.50x of 2, 7 alloc retries |" in bench.table([retried])
    assert "| 1.0 |  | –" in bench.table([row])  # rows from before the column: blank


def test_ab_rows_pair_with_their_own_trees_dense_twin_and_summarise(bench):
    rows = [
        {"preset": "134m-dense@a#1", "tokens_per_s": 200.0},
        {"preset": "134m-memory+@a#1", "tokens_per_s": 150.0},
        {"preset": "134m-dense@b#1", "tokens_per_s": 100.0},
        {"preset": "134m-memory+@b#1", "tokens_per_s": 90.0},
        {"preset": "134m-memory+@a#2", "tokens_per_s": 170.0},
        {"preset": "134m-memory+@b#2", "error": "boom"},
    ]
    bench.add_ratios(rows)
    assert rows[1]["vs_dense"] == 0.75 and rows[3]["vs_dense"] == 0.9  # its own tree's twin
    assert "vs_dense" not in rows[4]  # no dense run in round 2
    text = bench.ab_summary(rows, ["a", "b"])
    assert "| 134m-memory+ | a | 2 | 160 | 1.000 |" in text  # median of 150 and 170
    assert "| 134m-memory+ | b | 1 | 90 | 0.562 |" in text  # the failed round left out
    assert "| 134m-dense | b | 1 | 100 | 0.500 |" in text
    assert bench.ab_summary(rows, []) == ""
    # A/B rows never match a plain preset's committed baseline.
    assert not any(r["preset"] in {"134m-dense", "134m-memory+"} for r in rows)


def test_trees_run_each_preset_from_each_tree_alternating(bench, tmp_path, monkeypatch):
    trees = []
    for name in ("old", "new"):
        tree = tmp_path / name
        (tree / "memlayers").mkdir(parents=True)
        (tree / "memlayers" / "__init__.py").write_text("")
        (tree / ".rev").write_text(f"rev-{name}\n")
        trees.append(tree)
    calls = []

    def fake_run(preset, ns, tmp, tree=None, tag=""):
        calls.append((preset, tree.name, tag))
        return {"preset": preset + tag, "tokens_per_s": 10.0 if tree.name == "old" else 9.0,
                "mfu": 0.1, "peak_gib": 1.0, "batch": "1x8"}  # fmt: skip

    monkeypatch.setattr(bench, "run_preset", fake_run)
    monkeypatch.setattr(bench, "card_name", lambda device: "cpu")
    argv = ["bench_train.py", "--presets", "p", "--trees", *map(str, trees), "--rounds", "2"]
    monkeypatch.setattr("sys.argv", argv)
    assert bench.main() == 0
    assert calls == [
        ("p", "old", "@rev-old#1"), ("p", "new", "@rev-new#1"),
        ("p", "old", "@rev-old#2"), ("p", "new", "@rev-new#2"),
    ]  # fmt: skip


def test_a_tree_without_memlayers_is_refused_naming_it(bench, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["bench_train.py", "--trees", str(tmp_path)])
    with pytest.raises(SystemExit, match=f"--trees {tmp_path} holds no memlayers"):
        bench.main()


def test_a_result_is_compared_only_with_one_of_the_same_micro_batch(bench, tmp_path):
    _write(tmp_path / "train_h100_20260101.md", [
        {"preset": "a", "batch": "32x1024", "tokens_per_s": 200.0},
        {"preset": "a", "error": "boom"},  # a failed run's row has no batch: no baseline
    ])  # fmt: skip
    prev = bench.previous_result("h100", exclude=None)
    lines = bench.guard([{"preset": "a", "batch": "8x1024", "tokens_per_s": 50.0}], prev)
    assert "no earlier result" in lines[1] and not any("REGRESSION" in x for x in lines)
    lines = bench.guard([{"preset": "a", "batch": "32x1024", "tokens_per_s": 50.0}], prev)
    assert any("REGRESSION" in x and "a at 0.25x" in x for x in lines)


def _settings(**changed):
    base = {"model.dim": 768, "model.memory.balance_loss": 0.1, "data.batch_size": 32}
    return {**base, **{k.replace("__", "."): v for k, v in changed.items()}}


def test_a_changed_setting_is_not_compared_and_is_named(bench, tmp_path):
    # Same preset and overrides, but another resolved setting that changes the work (as
    # the memory+ presets' usage levers did when they became defaults): a ratio would
    # measure the change, not a regression.
    old = {"preset": "a", "tokens_per_s": 200.0, "settings": _settings()}
    _write(tmp_path / "train_h100_20260101.md", [old])
    prev = bench.previous_result("h100", exclude=None)
    now = {"preset": "a", "tokens_per_s": 50.0}
    lines = bench.guard([dict(now, settings=_settings(model__memory__balance_loss=0.0))], prev)
    assert any(
        "not compared: train_h100_20260101.md ran other settings: "
        "model.memory.balance_loss 0.1 -> 0.0" in x
        for x in lines
    )
    assert not any("REGRESSION" in x for x in lines)
    lines = bench.guard([dict(now, settings=_settings(data__batch_size=8))], prev)
    assert any("not compared" in x and "data.batch_size 32 -> 8" in x for x in lines)
    # A setting only one row records (a new config field) does not block the comparison.
    lines = bench.guard([dict(now, settings=_settings(model__memory__new=1))], prev)
    assert any("REGRESSION" in x and "a at 0.25x" in x for x in lines)


def test_at_most_a_few_changed_settings_are_named(bench):
    old = {"settings": {f"k{i}": i for i in range(5)}}
    new = {"settings": {f"k{i}": i + 1 for i in range(5)}}
    assert bench.changed_settings(new, old) == "k0 0 -> 1, k1 1 -> 2, k2 2 -> 3 and 2 more"
    old = {"settings": {"model.memory.query_batch_norm": True, "dtype": "auto"}}
    new = {"settings": {"model.memory.query_batch_norm": False, "dtype": "bf16"}}
    assert bench.changed_settings(new, old) == (
        "dtype auto -> bf16, model.memory.query_batch_norm true -> false"
    )


def test_results_without_settings_are_compared_as_before(bench, tmp_path):
    # Older results record no settings, or the short-lived "config" hash: both are compared
    # by preset, overrides and micro-batch alone.
    _write(tmp_path / "train_h100_20260101.md", [
        {"preset": "a", "tokens_per_s": 200.0},
        {"preset": "b", "tokens_per_s": 200.0, "config": "aaaaaaaaaaaa"},
    ])  # fmt: skip
    prev = bench.previous_result("h100", exclude=None)
    rows = [{"preset": p, "tokens_per_s": 50.0, "settings": _settings()} for p in "ab"]
    lines = bench.guard(rows, prev)
    assert any("REGRESSION" in x and "a at 0.25x" in x and "b at 0.25x" in x for x in lines)


def _config(run, cfg):
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def test_settings_leave_out_what_does_not_change_the_work(bench, tmp_path):
    model = {"dim": 8, "n_layers": 2, "ffn": "dense", "memory_layers": [], "peer_layers": [],
             "init_std": 0.02, "memory": {"n_keys": 16, "balance_loss": 0.1},
             "moe": {"n_experts": 4}, "peer": {"n_keys": 8}}  # fmt: skip
    dense = _config(tmp_path / "dense", {
        "run_dir": "/somewhere", "steps": 5, "seed": 3, "dtype": "bf16", "model": model,
        "optim": {"lr": 1e-3, "warmup_steps": 20, "value_optimizer": "sparse_adam",
                  "grad_clip": 1.0},
        "data": {"dataset": "synthetic", "batch_size": 4, "seq_len": 16, "seed": 0,
                 "synthetic": {"vocab_size": 64, "seed": 1}, "bios": {"n_people": 10}},
        "logging": {"every": 5, "usage": True, "plot": True},
        "parallel": {"mp": 1, "fsdp": True}, "checkpoint": {"enabled": False},
    })  # fmt: skip
    assert bench.throughput_settings(dense) == {
        "dtype": "bf16", "model.dim": 8, "model.n_layers": 2, "model.ffn": "dense",
        "model.memory_layers": [], "model.peer_layers": [], "data.dataset": "synthetic",
        "data.batch_size": 4, "data.seq_len": 16, "data.synthetic.vocab_size": 64,
        "logging.every": 5, "parallel.mp": 1, "parallel.fsdp": True,
    }  # fmt: skip
    # A memory model: its memory section and value optimizer, not the MoE or PEER ones.
    memory = _config(tmp_path / "memory", {
        "model": dict(model, memory_layers=[1], memory={"n_keys": 16, "norm_eps": 1e-6}),
        "optim": {"lr": 1e-3, "value_lr": 1e-3, "value_optimizer": "sparse_adam_bf16",
                  "value_master": True},
    })  # fmt: skip
    assert bench.throughput_settings(memory) == {
        "model.dim": 8, "model.n_layers": 2, "model.ffn": "dense", "model.memory_layers": [1],
        "model.peer_layers": [], "model.memory.n_keys": 16,
        "optim.value_optimizer": "sparse_adam_bf16", "optim.value_master": True,
    }  # fmt: skip
    # Every block a MoE one: its section, no dense FFN's.
    moe = _config(tmp_path / "moe", {"model": dict(model, ffn="moe")})
    assert bench.throughput_settings(moe)["model.moe.n_experts"] == 4
    assert bench.throughput_settings(tmp_path / "missing") is None


def test_a_changed_learning_rate_is_still_compared(bench, tmp_path):
    # Optimizer hyperparameters, the run's length and seeds change no step's work: the
    # guard still compares (they once made the config hash differ, skipping it).
    def row(folder, tokens_per_s, **optim):
        run = _config(tmp_path / folder, {
            "steps": 40, "seed": 0, "model": {"dim": 8, "n_layers": 2, "memory_layers": [1],
                                              "memory": {"n_keys": 16, "balance_loss": 0.1}},
            "optim": {"lr": 1e-3, "warmup_steps": 20, "grad_clip": 1.0, **optim},
        })  # fmt: skip
        return {"preset": "a", "tokens_per_s": tokens_per_s,
                "settings": bench.throughput_settings(run)}  # fmt: skip

    _write(tmp_path / "train_h100_20260101.md", [row("old", 200.0)])
    prev = bench.previous_result("h100", exclude=None)
    new = row("new", 50.0, lr=3e-3, warmup_steps=50, grad_clip=0.0, schedule="linear")
    lines = bench.guard([new], prev)
    assert any("REGRESSION" in x and "a at 0.25x" in x for x in lines)
    assert not any("not compared" in x for x in lines)


def test_settings_of_a_real_run(bench, tmp_path):
    # The trainer's own config.yaml, of the command the benchmark runs (tiny, on the CPU).
    from memlayers.config import load_config
    from memlayers.train import train

    ns = bench.argparse.Namespace(
        batch=2, seq_len=16, steps=1, every=1, device="cpu", compile="false", vocab=64,
        override=["optim.lr=1e-4"],
    )  # fmt: skip
    run = tmp_path / "run"
    train(load_config([], bench.train_overrides("tiny-memory+", ns, run)))
    got = bench.throughput_settings(run)
    assert got["model.dim"] == 128 and got["model.vocab_size"] == 64
    assert got["data.batch_size"] == 2 and got["data.seq_len"] == 16
    assert got["model.memory.n_keys"] == 128 and got["model.memory.balance_loss"] == 0.0
    assert got["compile"] is False and got["logging.usage"] is True
    assert "optim.value_optimizer" in got and "parallel.mp" in got
    assert not any(
        k.startswith(("model.moe.", "model.peer.", "data.bios", "checkpoint.")) for k in got
    )
    assert not {"optim.lr", "steps", "run_dir", "seed", "data.seed", "device"} & got.keys()
