"""``memlayers compare --rates / --seeds``: each variant at each learning rate or seed, the
table of each model at its best rate and of the means over seeds (no training here:
tests/test_e2e.py runs them)."""

import pytest

from memlayers.compare import (
    best_rates,
    check_rates,
    check_seeds,
    format_table,
    model_key,
    over_seeds,
    rate_str,
    run_name,
    split_run_name,
    with_rates,
)
from memlayers.config import load_config


@pytest.mark.parametrize(
    "x,s", [(5e-4, "5e-4"), (1e-3, "1e-3"), (2.5e-4, "2.5e-4"), (0.01, "1e-2"), (3.0, "3e0")]
)
def test_a_rate_is_written_as_a_label_writes_it(x, s):
    assert rate_str(x) == s
    assert float(s) == x


def test_rates_are_read_from_a_list_or_a_comma_string():
    assert check_rates("5e-4,1e-3") == [5e-4, 1e-3]
    assert check_rates([5e-4, "1e-3"]) == [5e-4, 1e-3]


@pytest.mark.parametrize(
    "rates,match",
    [
        ([], "must be a list of learning rates"),
        ("", "must be a list of learning rates"),
        ("fast", "'fast' is not a learning rate"),
        ([0], "0 is not a positive learning rate"),
        ([-1e-3], "-0.001 is not a positive learning rate"),
        ([True], "True is not a positive learning rate"),
        (["nan"], "'nan' is not a positive learning rate"),
        ([1e-3, "0.001"], "'0.001' is named twice"),
        (["1.23456789e-4"], r"more digits than a label keeps \(1.234568e-4\)"),
        (3e-4, "must be a list of learning rates"),
    ],
)
def test_bad_rates_are_refused_naming_the_value(rates, match):
    with pytest.raises(ValueError, match=match):
        check_rates(rates, "--rates")


def test_a_model_is_its_variant_without_the_rate():
    assert model_key("134m-dense:model.dim=1088:optim.lr=5e-4") == "134m-dense:model.dim=1088"
    assert model_key("134m-dense:optim.lr=5e-4") == "134m-dense"
    # the value tables' rate is part of the model's setting, not the rate swept
    assert model_key("tiny-memory+:optim.value_lr=1e-2") == "tiny-memory+:optim.value_lr=1e-2"


def test_each_variant_runs_at_each_rate_and_at_its_own_rate_stays_itself(tmp_path):
    own = load_config([], ["model.preset=tiny-dense"]).optim.lr
    got = with_rates(
        ["tiny-dense", "tiny-dense:optim.lr=1e-2", "tiny-memory+:model.dim=32"],
        [own, 5e-4, 1e-2],
        [],
        [],
    )
    assert got == [
        "tiny-dense",  # at its own rate: the same label, so its finished run is reused
        "tiny-dense:optim.lr=5e-4",
        "tiny-dense:optim.lr=1e-2",  # once, though also named
        "tiny-memory+:model.dim=32",
        "tiny-memory+:model.dim=32:optim.lr=5e-4",
        "tiny-memory+:model.dim=32:optim.lr=1e-2",
    ]
    # a shared override or YAML file sets the rate every variant has
    got = with_rates(["tiny-dense"], [1e-3, 5e-4], [], ["optim.lr=1e-3"])
    assert got == ["tiny-dense", "tiny-dense:optim.lr=5e-4"]
    yaml = tmp_path / "shared.yaml"
    yaml.write_text("optim:\n  lr: 5.0e-4\n")
    assert with_rates(["tiny-dense"], [1e-3, 5e-4], [str(yaml)], []) == [
        "tiny-dense:optim.lr=1e-3", "tiny-dense"
    ]  # fmt: skip


def test_one_model_at_one_rate_runs_once_however_its_label_is_written(capsys):
    # a named variant at a rate keeps its label (and its folder), written as it was
    got = with_rates(["tiny-dense", "tiny-dense:optim.lr=0.01"], [1e-2, 5e-4], [], [])
    assert got == ["tiny-dense:optim.lr=0.01", "tiny-dense:optim.lr=5e-4"]
    assert "tiny-dense:optim.lr=0.01 sets optim.lr itself" in capsys.readouterr().err
    # the same overrides in another order are the same model
    got = with_rates(
        ["tiny-dense:model.dim=32:model.n_heads=2", "tiny-dense:model.n_heads=2:model.dim=32"],
        [5e-4],
        [],
        [],
    )
    assert got == ["tiny-dense:model.dim=32:model.n_heads=2:optim.lr=5e-4"]


def test_a_variant_named_twice_is_refused_before_the_rates_merge_it(tmp_path):
    from memlayers.compare import compare

    with pytest.raises(ValueError, match="'tiny-dense' is named twice"):
        compare(["tiny-dense", "tiny-dense"], out=tmp_path, rates=[1e-2])


def _row(variant, lr, em=None, val=1.0):
    r = {"variant": variant, "lr": lr, "val_loss": val, "total_params": 1e6,
         "active_params": 1e6, "train_flops": 1e12}  # fmt: skip
    if em is not None:
        r["exact_match"] = em
    return r


def test_the_best_rate_of_each_model_that_ran_at_several():
    rows = [
        _row("d", 1e-3, 0.49, 0.72),
        _row("d:optim.lr=5e-4", 5e-4, 0.17, 0.94),
        _row("w:optim.lr=5e-4", 5e-4, 0.65, 0.64),
        _row("w", 1e-3, 0.04, 1.08),
        _row("w:optim.lr=2e-3", 2e-3, 0.004, 1.62),
        _row("m", 1e-3, 0.31),  # one rate: no best-of row
        _row("t", 1e-3, 0.50, 0.60),  # equal exact match: the lower loss
        _row("t:optim.lr=5e-4", 5e-4, 0.50, 0.55),
    ]
    best = {r["variant"]: r for r in best_rates(rows)}
    assert set(best) == {"d", "w", "t"}
    assert (best["d"]["lr"], best["d"]["rates"]) == (1e-3, "5e-4, 1e-3")
    assert (best["w"]["lr"], best["w"]["rates"]) == (5e-4, "5e-4, 1e-3, 2e-3")
    assert best["t"]["lr"] == 5e-4
    table = format_table(list(best.values()))
    assert "| lr | of rates |" in table and "| w | 5e-4 | 5e-4, 1e-3, 2e-3 |" in table
    assert {r["chosen_by"] for r in best.values()} == {"exact match"}
    assert "best by" not in table
    # without questions (no bios QA) in a row of the model: the lowest validation loss
    nq = [_row("x", 1e-3, 0.9, val=2.0), _row("x:optim.lr=5e-4", 5e-4, val=1.5)]
    (b,) = best_rates(nq)
    assert (b["lr"], b["chosen_by"]) == (5e-4, "validation loss")
    assert "| best by |" in format_table([b])
    # one model, its overrides in another order
    two = [_row("p:a=1:b=2", 1e-3, 0.2), _row("p:b=2:a=1:optim.lr=5e-4", 5e-4, 0.3)]
    (b,) = best_rates(two)
    assert (b["variant"], b["lr"], b["rates"]) == ("p:a=1:b=2", 5e-4, "5e-4, 1e-3")


def test_the_lr_column_only_when_the_rows_differ_in_rate():
    assert "| lr |" not in format_table([_row("a", 1e-3), _row("b", 1e-3)])
    assert "| a | 1e-3 |" in format_table([_row("a", 1e-3), _row("b", 5e-4)])


def test_seeds_are_read_from_a_list_or_a_comma_string():
    assert check_seeds("0, 1,2") == [0, 1, 2]
    assert check_seeds([3, "4"]) == [3, 4]


@pytest.mark.parametrize(
    "seeds,match",
    [
        ([], "must be a list of seeds"),
        (1, "must be a list of seeds"),
        ("0,-1", "'-1' is not a seed"),
        ([0, -1], "-1 is not a seed"),  # a study file's list: ints
        ([1.5], "1.5 is not a seed"),
        ([True], "True is not a seed"),
        ([0, "0"], "'0' is named twice"),
    ],
)
def test_bad_seeds_are_refused_naming_the_value(seeds, match):
    with pytest.raises(ValueError, match=match):
        check_seeds(seeds, "--seeds")


def test_a_run_at_another_seed_is_named_apart_and_back():
    assert run_name("134m-dense", 0, 0) == "134m-dense"
    assert run_name("134m-dense:optim.lr=5e-4", 2, 0) == "134m-dense:optim.lr=5e-4@seed2"
    assert split_run_name("134m-dense:optim.lr=5e-4@seed2") == ("134m-dense:optim.lr=5e-4", 2)
    assert split_run_name("134m-dense") == ("134m-dense", None)


def test_the_mean_over_seeds_of_each_variant_with_the_range():
    rows = [
        {**_row("d", 1e-3, 0.40, 0.70), "seed": 0, "bits": 100.0, "train_seconds": None},
        {**_row("m", 1e-3, 0.80, 0.50), "seed": 0, "bits": 300.0},
        {**_row("d", 1e-3, 0.60, 0.80), "seed": 1, "bits": 200.0, "train_seconds": 10.0},
        {**_row("m", 1e-3, 0.90, 0.40), "seed": 1, "bits": 400.0},
    ]
    means = {r["variant"]: r for r in over_seeds(rows)}
    d = means["d"]
    assert d["exact_match"] == pytest.approx(0.5) and d["val_loss"] == pytest.approx(0.75)
    assert (d["exact_match_min"], d["exact_match_max"]) == (0.40, 0.60)
    assert (d["bits"], d["bits_min"], d["bits_max"]) == (150.0, 100.0, 200.0)
    assert "train_seconds" not in d  # one seed's time unknown: no mean
    assert d["seeds"] == "0, 1" and "seed" not in d
    table = format_table(list(means.values()))
    assert "| seeds |" in table and "50.0% (40.0%-60.0%)" in table and "150 (100-200)" in table
    assert "| seed |" in format_table(rows)  # the runs' own table names each run's seed
    # with rates, the best rate is the best mean
    rows += [
        {**_row("d:optim.lr=5e-4", 5e-4, 0.70, 0.6), "seed": 0, "bits": 1.0},
        {**_row("d:optim.lr=5e-4", 5e-4, 0.20, 0.9), "seed": 1, "bits": 1.0},
    ]  # a better seed 0 (0.70 > 0.40), a worse mean (0.45 < 0.50)
    (best,) = best_rates(over_seeds(rows))
    assert (best["variant"], best["lr"], best["exact_match"]) == ("d", 1e-3, pytest.approx(0.5))


def test_the_figure_of_means_draws_each_variants_seed_range():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.collections import LineCollection

    from memlayers.compare import figure

    extra = {"active_params": 1e6, "train_flops": 1e12, "tokens": 100, "answer_nll_per_token": 1.0}
    rows = [
        {**_row("d", 1e-3, 0.40, 0.7), **extra, "seed": 0, "bits": 100.0},
        {**_row("d", 1e-3, 0.60, 0.8), **extra, "seed": 1, "bits": 200.0},
        {**_row("m", 1e-3, 0.80, 0.5), **extra, "train_flops": 2e12, "seed": 0, "bits": 300.0},
    ]  # m has one seed: a point without a bar

    def bars(fig, ylabel):
        """Each vertical bar's (lowest, highest) on the panels with this y label."""
        out = []
        for ax in fig.axes:
            if ax.get_ylabel() == ylabel:
                for c in ax.collections:
                    if isinstance(c, LineCollection):
                        out += [tuple(sorted(seg[:, 1])) for seg in c.get_segments()]
        return out

    fig = figure(over_seeds(rows))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["1  d", "2  m"]
    assert bars(fig, "held-out QA exact match") == [(0.40, 0.60)] * 2  # both x axes
    assert bars(fig, "knowledge stored (bits)") == [(100.0, 200.0)] * 2
    assert bars(fig, "answer NLL (nats/token)") == []  # no range kept for it
    assert "mean over seeds" in fig._suptitle.get_text()
    fig = figure(rows)  # the runs themselves: no bars, no such title
    assert bars(fig, "held-out QA exact match") == [] and "seeds" not in fig._suptitle.get_text()
    # three equal seeds: their mean rounds past them (0.1 * 3 / 3), the bar is still drawn
    same = [{**_row("e", 1e-3, 0.1), **extra, "seed": s, "bits": 1.0} for s in (0, 1, 2)]
    (mean,) = over_seeds(same)
    assert mean["exact_match"] > mean["exact_match_max"]  # the case: 0.10000000000000002
    fig = figure([mean])
    assert bars(fig, "held-out QA exact match") == [(pytest.approx(0.1),) * 2] * 2


def test_the_curves_figure_draws_each_runs_losses_a_colour_per_variant_a_style_per_seed(
    tmp_path, capsys
):
    pytest.importorskip("matplotlib")
    import json

    import matplotlib

    matplotlib.use("Agg")
    from memlayers.compare import curves_figure, plot_curves

    def run(name, losses, vals, cut=False):
        d = tmp_path / name
        d.mkdir()
        recs = [{"step": 10 * (i + 1), "loss": x} for i, x in enumerate(losses)]
        recs += [{"step": 10 * len(losses), "val_loss": v} for v in vals]
        text = "".join(json.dumps(r) + "\n" for r in recs)
        (d / "metrics.jsonl").write_text(text + ('{"step": 9' if cut else ""))
        return d

    runs = [
        ("x", 0, tmp_path / "reused-without-metrics"),  # no lines, and still number 1
        ("d", 0, run("d0", [3.0, 2.0, 1.0], [1.1])),
        ("m", 0, run("m0", [3.0, 1.5, 0.5], [0.6])),
        ("d", 1, run("d1", [3.0, 2.5, 2.0], [2.1], cut=True)),  # killed mid-line: skipped
        ("m", 1, tmp_path / "never-trained"),  # no metrics: no line
    ]
    fig = curves_figure(runs)
    # numbered as compare.png numbers the same rows
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["1  x", "2  d", "3  m"]
    assert "d1/metrics.jsonl: skipped its last line" in capsys.readouterr().err
    train_ax, val_ax = fig.axes[:2]
    lines = {(ln.get_color(), ln.get_linestyle()): ln for ln in train_ax.get_lines()}
    assert len(train_ax.get_lines()) == 3 and len(val_ax.get_lines()) == 3
    (d0,) = [ln for ln in train_ax.get_lines() if list(ln.get_ydata()) == [3.0, 2.0, 1.0]]
    (d1,) = [ln for ln in train_ax.get_lines() if list(ln.get_ydata()) == [3.0, 2.5, 2.0]]
    (m0,) = [ln for ln in train_ax.get_lines() if list(ln.get_ydata()) == [3.0, 1.5, 0.5]]
    assert d0.get_color() == d1.get_color() != m0.get_color()  # a colour per variant
    assert d0.get_linestyle() == m0.get_linestyle() != d1.get_linestyle()  # a style per seed
    assert (d0.get_linestyle(), d1.get_linestyle()) == ("-", "--")  # as the title says
    assert "seeds 0 '-', 1 '--'" in fig._suptitle.get_text()
    assert list(d0.get_xdata()) == [10, 20, 30] and len(lines) == 3
    assert sorted(ln.get_ydata()[0] for ln in val_ax.get_lines()) == [0.6, 1.1, 2.1]
    assert curves_figure([("m", 1, tmp_path / "never-trained")]) is None
    bad = run("bad", [3.0, 2.0], [])
    (bad / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        curves_figure([("b", 0, bad)])
    capsys.readouterr()
    assert plot_curves([("b", 0, bad)], tmp_path / "curves.png") is None  # compare goes on
    assert "no curves.png: " in capsys.readouterr().err
    assert not (tmp_path / "curves.png").exists()


def test_without_matplotlib_each_figure_is_a_note_and_nothing_else(tmp_path, monkeypatch, capsys):
    """matplotlib is an extra: compare's figures are skipped with one note each naming the
    file and the extra, and the logger's go to its messages (memlayers.logger.pyplot)."""
    import sys

    from memlayers.compare import plot, plot_curves
    from memlayers.logger import pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    rows = [{**_row("m", 1e-3, 0.5), "bits": 1.0}]
    assert plot(rows, tmp_path / "compare.png") is None
    assert plot_curves([("m", 0, tmp_path)], tmp_path / "curves.png") is None
    err = capsys.readouterr().err.splitlines()
    want = "matplotlib is not installed: no {} (pip install 'memlayers[plot]')"
    assert err == [want.format("compare.png"), want.format("curves.png")]
    notes = []
    assert pyplot("loss.png", notes.append) is None
    assert notes == [want.format("loss.png")] and capsys.readouterr().err == ""
    assert list(tmp_path.iterdir()) == []
