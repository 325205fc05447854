"""The throughput benchmark's regression guard (benchmarks/bench_train.py)."""

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


@pytest.fixture
def bench(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_train", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
    assert prev["a", ()][0].name == "train_h100_20260301.md"  # the newest for this card only
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
    assert {p: path.name for (p, _), (path, _) in prev.items()} == {
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


def test_a_changed_default_is_not_compared_as_a_regression(bench, tmp_path):
    # Same preset, no overrides, but the preset's resolved config changed (as the memory+
    # presets' usage levers did): a ratio between them would measure the change, not a
    # regression. A result without a fingerprint (older files) is compared as before.
    _write(tmp_path / "train_h100_20260101.md", [{"preset": "a", "tokens_per_s": 200.0}])
    _write(tmp_path / "train_h100_20260301.md", [{"preset": "b", "tokens_per_s": 200.0,
                                                   "config": "aaaaaaaaaaaa"}])  # fmt: skip
    prev = bench.previous_result("h100", exclude=None)
    lines = bench.guard([{"preset": "b", "tokens_per_s": 50.0, "config": "bbbbbbbbbbbb"}], prev)
    assert any("not compared" in x and "aaaaaaaaaaaa -> bbbbbbbbbbbb" in x for x in lines)
    assert not any("REGRESSION" in x for x in lines)
    lines = bench.guard([{"preset": "b", "tokens_per_s": 50.0, "config": "aaaaaaaaaaaa"}], prev)
    assert any("REGRESSION" in x for x in lines)
    lines = bench.guard([{"preset": "a", "tokens_per_s": 50.0, "config": "bbbbbbbbbbbb"}], prev)
    assert any("REGRESSION" in x and "a at 0.25x" in x for x in lines)


def test_the_fingerprint_follows_the_resolved_config_not_the_run_dir(bench, tmp_path):
    def fingerprint(folder, balance):
        run = tmp_path / folder
        run.mkdir()
        (run / "config.yaml").write_text(
            f"run_dir: {run}\nsteps: 5\nmodel:\n  dim: 8\n  memory:\n"
            f"    balance_loss: {balance}\noptim:\n  lr: 0.001\n"
        )
        return bench.config_fingerprint(run)

    first = fingerprint("one", 0.1)
    assert len(first) == 12 and first == fingerprint("two", 0.1)  # steps, run_dir: ignored
    assert first != fingerprint("three", 0.0)
    assert bench.config_fingerprint(tmp_path / "missing") is None
