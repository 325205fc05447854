"""Train several variants on the same data, token budget and seed; tabulate and plot them.

    memlayers compare tiny-dense tiny-memory+                     # the main job's data
    memlayers compare tiny-dense tiny-memory tiny-memory+ tiny-moe tiny-peer --out runs/cmp
    memlayers compare tiny-dense tiny-memory+:optim.value_lr=1e-2 steps=300   # per-variant
    memlayers compare tiny-dense tiny-memory+ configs/x.yaml data.bios.n_people=500
    memlayers compare tiny-dense tiny-memory+ --reuse             # keep finished runs
    memlayers compare configs/study_134m.yaml --reuse             # a study file (below)
    memlayers compare configs/study_134m.yaml --reuse --jobs 2    # 2 variants at once

Positional items: ``PRESET[:key=value[:key=value…]]`` is a variant (a model preset and
overrides for it alone: model or optimizer keys, never data, steps, batch or seed, so
every variant sees the same tokens); ``*.yaml`` files and ``key=value`` overrides apply to
every variant. Each variant trains into ``OUT/<variant>/`` (a normal run directory; a run
already there is replaced, unless ``--reuse`` finds it finished with the same config) and is
evaluated with :func:`memlayers.eval.evaluate`. Written into ``OUT`` (default
``runs/compare``)::

    results.md     the table, the exact command, the machine and date
    results.json   one row per variant (the summary) plus each full eval result
    compare.png    exact match / answer NLL / bits stored against active parameters per
                   token and training FLOPs
    curves.png     each run's training and validation loss against step (a run that
                   leaves a loss plateau late ends lower in the table: look here first)

(The two figures need matplotlib: ``pip install 'memlayers[plot]'``.)

A study file is a config YAML with a ``compare:`` section (:func:`read_study`): its
``variants`` (a list of the positional variants above), and optionally ``out`` (the output
directory, unless ``--out`` is given), ``max_qa`` (the evaluations answer the first N
questions of each QA set), ``rates`` and ``seeds`` (below). ``memlayers train`` ignores
the section; the rest of the file is the variants' shared config. One command then runs a
whole study, and ``--reuse`` lets it grow over several sessions (configs/study_134m.yaml);
variants named on the command line run instead of the study's (a few at a time), into the
same directory. The positional items come before the ``--`` options.

Learning rates: how fast a model learns facts can hinge on its rate (at 134m on bios a
dense model with twice the FLOPs answered 0.4%, 4.2% or 65.3% of the held-out questions at
2e-3, 1e-3 or 5e-4; Memory+ 83% at either of two: benchmarks/results/
study_134m_h200_20261204b.md), so a fair comparison gives every model its best.
``--rates 5e-4,1e-3`` (or ``rates:`` in a study) runs each variant at each rate
(``V:optim.lr=5e-4``; the variant itself where the rate is the one it has already, so its
finished run is reused), and whenever a model ran at more than one rate the results add a
table of each model at its best rate (by held-out exact match, else validation loss).

Seeds: ``--seeds 0,1,2`` (or ``seeds:``) runs each variant at each ``seed`` (the weights'
initialization and dropout; the data and its order stay the same): at the config's own
seed into ``OUT/<variant>`` as always, at another into ``OUT/seed<k>/<variant>``. The
results add the mean over seeds of each variant (exact match and bits with their range),
the plot shows the means with a bar over the seeds' range, and with rates the best rate is
the best mean.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import re
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from memlayers.config import (
    STUDY_SECTION,
    TrainArgs,
    _read_yaml,
    config_changes,
    load_config,
    with_vocab,
)
from memlayers.data.bios.world import DERIVED
from memlayers.files import write_atomic
from memlayers.logger import pyplot, read_metrics
from memlayers.report import si

# Variant overrides may not change what the variants are compared on.
SHARED_KEYS = ("data.", "steps", "grad_accum", "seed", "run_dir", "device", "dtype")
STUDY_KEYS = ("variants", "out", "max_qa", "rates", "seeds")  # a study file's compare: section
LR_KEY = "optim.lr"  # the override a rate variant adds
SEEDS_TITLE = "Over seeds (the mean, and the lowest-highest of exact match and bits):"
BEST_TITLE = (
    "Each model at its best learning rate (by held-out exact match, else validation loss; "
    "chosen on the numbers reported, so one seed's best flatters the model a little):"
)


def read_study(path: str | Path) -> dict:
    """The ``compare:`` section of a config YAML, checked: ``{"variants": [...], "out":
    str | None, "max_qa": int | None, "rates": [float, ...] | None, "seeds": [int, ...] |
    None}``; ``{}`` for a file without one."""
    section = _read_yaml(path).get(STUDY_SECTION)
    if section is None:
        return {}
    if not isinstance(section, DictConfig):
        raise ValueError(f"{path}: compare: must map {', '.join(STUDY_KEYS)} to values")
    study = OmegaConf.to_container(section)
    unknown = sorted(set(study) - set(STUDY_KEYS))
    if unknown:
        raise ValueError(f"{path}: compare: has no key {unknown[0]!r} (it takes {STUDY_KEYS})")
    variants = study.get("variants")
    if not (isinstance(variants, list) and variants and all(isinstance(v, str) for v in variants)):
        raise ValueError(f"{path}: compare.variants must be a list of variants, got {variants!r}")
    for v in variants:
        parse_variant(v)
    out, max_qa = study.get("out"), study.get("max_qa")
    if out is not None and not isinstance(out, str):
        raise ValueError(f"{path}: compare.out must be a directory name, got {out!r}")
    if max_qa is not None and (isinstance(max_qa, bool) or not isinstance(max_qa, int)
                               or max_qa < 1):  # fmt: skip
        raise ValueError(f"{path}: compare.max_qa must be a positive int, got {max_qa!r}")
    rates, seeds = study.get("rates"), study.get("seeds")
    if rates is not None:
        rates = check_rates(rates, f"{path}: compare.rates")
    if seeds is not None:
        seeds = check_seeds(seeds, f"{path}: compare.seeds")
    return {"variants": variants, "out": out, "max_qa": max_qa, "rates": rates, "seeds": seeds}


def check_rates(rates, what: str = "rates") -> list[float]:
    """A non-empty list of distinct positive learning rates (numbers or numeric strings),
    each one a variant label can write exactly (:func:`rate_str`)."""
    if isinstance(rates, str):
        rates = [r for r in rates.split(",") if r.strip()]
    if not isinstance(rates, (list, tuple)) or not rates:
        raise ValueError(f"{what} must be a list of learning rates, got {rates!r}")
    out = []
    for r in rates:
        try:
            x = float(r)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: {r!r} is not a learning rate") from None
        if isinstance(r, bool) or not x > 0 or x != x or x == float("inf"):
            raise ValueError(f"{what}: {r!r} is not a positive learning rate")
        if float(rate_str(x)) != x:  # a label keeps 7 significant digits
            raise ValueError(f"{what}: {r!r} has more digits than a label keeps ({rate_str(x)})")
        if x in out:
            raise ValueError(f"{what}: {r!r} is named twice")
        out.append(x)
    return out


def rate_str(x: float) -> str:
    """``5e-4``, ``1e-3``, ``2.5e-4``: a rate as a variant label writes it."""
    mantissa, exp = f"{x:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exp)}"


def _split_rate(spec: str) -> tuple[str, list[str], float | None]:
    """A variant's preset, its overrides but the rate, and the rate its label sets."""
    preset, own = parse_variant(spec)
    rest = [o for o in own if o.split("=", 1)[0] != LR_KEY]
    rate = [float(o.split("=", 1)[1]) for o in own if o.split("=", 1)[0] == LR_KEY]
    return preset, rest, (rate[-1] if rate else None)


def model_key(spec: str) -> str:
    """A variant without its learning rate: the model it trains (``"134m-dense:model.dim=
    1088:optim.lr=5e-4"`` -> ``"134m-dense:model.dim=1088"``)."""
    preset, rest, _ = _split_rate(spec)
    return ":".join([preset, *rest])


def _same_model(spec: str) -> tuple[str, tuple[str, ...]]:
    """What makes two variants the same model, whatever the order of their overrides."""
    preset, rest, _ = _split_rate(spec)
    return preset, tuple(sorted(rest))


def with_rates(
    variants: list[str], rates: list[float], yamls: list[str], overrides: list[str]
) -> list[str]:
    """Each variant at each rate (see the module docstring), in order, once each (one
    model at one rate, however its label is written): a variant that sets its own rate
    stays as it is (a note says so); at the rate a variant already has, the variant itself
    (its run folder and finished runs stay the same)."""
    own = {v: _split_rate(v)[2] for v in variants}
    named = {(_same_model(v), r): v for v, r in own.items() if r is not None}
    out: dict[tuple, str] = {}
    for v in variants:
        if own[v] is not None:
            print(f"note: {v} sets {LR_KEY} itself: it runs at that rate only", file=sys.stderr)
            out.setdefault((_same_model(v), own[v]), v)
            continue
        preset, over = parse_variant(v)
        have = load_config(yamls, [*overrides, f"model.preset={preset}", *over]).optim.lr
        for r in rates:
            key = (_same_model(v), r)  # a variant named at this rate keeps its label
            out.setdefault(key, named.get(key, v if r == have else f"{v}:{LR_KEY}={rate_str(r)}"))
    return list(out.values())


def check_seeds(seeds, what: str = "seeds") -> list[int]:
    """A non-empty list of distinct non-negative int seeds (or a comma string of them)."""
    if isinstance(seeds, str):
        seeds = [x.strip() for x in seeds.split(",") if x.strip()]
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise ValueError(f"{what} must be a list of seeds, got {seeds!r}")
    out = []
    for x in seeds:
        if isinstance(x, bool) or not (
            (isinstance(x, int) and x >= 0) or (isinstance(x, str) and x.isdigit())
        ):
            raise ValueError(f"{what}: {x!r} is not a seed (a non-negative int)")
        if int(x) in out:
            raise ValueError(f"{what}: {x!r} is named twice")
        out.append(int(x))
    return out


SEED_MARK = "@seed"  # "134m-dense@seed1": a variant at a seed other than the config's


def run_name(variant: str, seed: int, base_seed: int) -> str:
    """How a run is named in logs, failures and results.json's ``eval``: the variant, or
    the variant at another seed (trained into ``OUT/seed<k>/<variant>``)."""
    return variant if seed == base_seed else f"{variant}{SEED_MARK}{seed}"


def split_run_name(name: str) -> tuple[str, int | None]:
    variant, mark, seed = name.rpartition(SEED_MARK)
    return (variant, int(seed)) if mark and seed.isdigit() else (name, None)


MEAN_KEYS = ("val_loss", "exact_match", "exact_match_1hop", "f1", "answer_nll",
             "answer_nll_per_token", "bits", "bits_per_param", "bits_per_active_param",
             "bits_per_flop", "train_seconds")  # fmt: skip
RANGE_KEYS = ("exact_match", "bits")  # shown as mean (min-max) over seeds


def over_seeds(rows: list[dict]) -> list[dict]:
    """One row per variant (and rate): the mean over its seeds of each metric every seed
    has, ``<key>_min`` / ``<key>_max`` of exact match and bits, and ``seeds`` (which)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["variant"], []).append(r)
    out = []
    for rs in groups.values():
        row = {k: v for k, v in rs[0].items() if k != "seed"}
        for k in MEAN_KEYS:
            row.pop(k, None)
            vals = [r.get(k) for r in rs]
            if all(isinstance(v, (int, float)) for v in vals):
                row[k] = sum(vals) / len(vals)
                if k in RANGE_KEYS and len(vals) > 1:
                    row[f"{k}_min"], row[f"{k}_max"] = min(vals), max(vals)
        row["seeds"] = ", ".join(str(r["seed"]) for r in rs)
        out.append(row)
    return out


def best_rates(rows: list[dict]) -> list[dict]:
    """One row per model that ran at more than one rate: the best, with ``rates`` (every
    rate it ran at) and ``chosen_by`` added: the highest held-out exact match (ties: the
    lower validation loss), or the lowest validation loss where a row has no QA."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_same_model(r["variant"]), []).append(r)
    best = []
    for rs in groups.values():
        if len({r.get("lr") for r in rs}) < 2:
            continue
        if all("exact_match" in r for r in rs):
            top = max(rs, key=lambda r: (r["exact_match"], -r["val_loss"]))
            by = "exact match"
        else:
            top = min(rs, key=lambda r: r["val_loss"])
            by = "validation loss"
        rates = ", ".join(rate_str(x) for x in sorted(r["lr"] for r in rs))
        best.append({**top, "variant": model_key(rs[0]["variant"]), "rates": rates,
                     "chosen_by": by})  # fmt: skip
    return best


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``"tiny-memory+:optim.value_lr=1e-2"`` -> ``("tiny-memory+", ["optim.value_lr=1e-2"])``."""
    preset, *overrides = spec.split(":")
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"variant {spec!r}: {o!r} is not a key=value override")
        if o.split("=", 1)[0].startswith(SHARED_KEYS):
            raise ValueError(
                f"variant {spec!r}: {o.split('=')[0]} must be the same for every variant; "
                f"pass it as a global key=value instead"
            )
    return preset, overrides


def slug(label: str) -> str:
    """A directory name for a variant label."""
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", label)


def variant_args(spec: str, yamls: list[str], overrides: list[str], out: Path) -> TrainArgs:
    preset, own = parse_variant(spec)
    return load_config(
        yamls, [*overrides, f"model.preset={preset}", *own, f"run_dir={out / slug(spec)}"]
    )


def _same_config(args: TrainArgs) -> bool:
    """Whether ``args.run_dir`` holds a run whose saved ``config.yaml`` is ``args`` key for
    key as written (no preset or default filled in: a run saved before a field existed
    did not train with today's default of it), the vocabulary being the data's. An
    unreadable file is not the same config."""
    path = Path(args.run_dir) / "config.yaml"
    if not path.is_file():
        return False
    try:
        vocab = OmegaConf.load(path).model.vocab_size
        return not config_changes(path, with_vocab(args, vocab))
    except Exception:  # a truncated or foreign file: this run is retrained, not reused
        return False


def _finished(args: TrainArgs, max_qa: int | None = None) -> dict | None:
    """The eval results (of the same ``max_qa``) of an identical finished run in
    ``args.run_dir``, else None."""
    from memlayers.eval import MAX_NEW_TOKENS, MAX_VAL_TOKENS, partial_name

    run = Path(args.run_dir)
    what = partial_name([], True, True, max_qa, MAX_VAL_TOKENS, MAX_NEW_TOKENS)
    path = run / "eval" / (f"results-{what}.json" if what else "results.json")
    if not path.is_file() or not _same_config(args):
        return None
    results = json.loads(path.read_text())
    return results if results.get("step") == args.steps else None


def _resumable(args: TrainArgs) -> int | None:
    """The step of the newest verified checkpoint of an identical run in ``args.run_dir``
    (one killed while training or evaluating: ``--reuse`` goes on from there rather than
    training it again), else None."""
    from memlayers.checkpoint import CheckpointError, newest_verified

    if not _same_config(args):
        return None
    try:
        _, meta, _ = newest_verified(args.run_dir)
    except CheckpointError:
        return None
    return int(meta["step"])


def summary_row(label: str, r: dict) -> dict:
    """The numbers of one variant that go into the table and the plot."""
    p = r["params"]
    row = {
        "variant": label,
        "preset": r["preset"],
        "total_params": p["total"],
        "non_embedding_params": p["non_embedding"],
        "active_params": p["active_per_token"],
        "flops_per_token": p["flops_per_token"],
        "train_flops": r["train_flops"],
        "tokens": r["tokens_trained"],
        "val_loss": r["perplexity"]["loss"],
        # from the checkpoint's progress; None for runs older than that record
        "train_seconds": r.get("train_seconds"),
    }
    qa = next(iter(r.get("qa", {}).values()), None)
    if qa is not None:
        row.update(
            qa_set=next(iter(r["qa"])),
            qa_n=qa["n"],
            exact_match=qa["exact_match"],
            f1=qa["f1"],
            answer_nll=qa["answer_nll"],
            answer_nll_per_token=qa["answer_nll_per_token"],
        )
        # bios asks one two-hop question (work city: person -> employer -> city) that
        # models answer ~1% of the time without chain of thought (memlayers.data.bios),
        # which caps EM at 5/6: the one-hop questions' EM beside it.
        attrs = qa.get("by_attribute", {})
        one_hop = {a: s for a, s in attrs.items() if a not in DERIVED}
        if 0 < len(one_hop) < len(attrs):
            n = sum(s["n"] for s in one_hop.values())
            row["exact_match_1hop"] = sum(s["exact_match"] * s["n"] for s in one_hop.values()) / n
    if "knowledge" in r:
        k = r["knowledge"]
        row.update(
            bits=k["bits"],
            capacity_bits=k["capacity"],
            bits_per_param=k["bits_per_param"],
            bits_per_active_param=k["bits_per_active_param"],
            bits_per_flop=k["bits_per_flop"],
        )
    return row


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the summary rows ("–" where a metric does not apply)."""
    cols = [("variant", lambda r: r["variant"])]
    if len({r.get("lr") for r in rows}) > 1 or any("rates" in r for r in rows):
        cols.append(("lr", lambda r: rate_str(r["lr"])))
    if any("rates" in r for r in rows):
        cols.append(("of rates", lambda r: r["rates"]))
    if any(r.get("chosen_by", "exact match") != "exact match" for r in rows):
        cols.append(("best by", lambda r: r["chosen_by"]))
    if len({r.get("seed") for r in rows}) > 1:
        cols.append(("seed", lambda r: str(r["seed"])))
    if any("seeds" in r for r in rows):
        cols.append(("seeds", lambda r: r["seeds"]))

    def spread(r, key, fmt) -> str:  # "mean (min-max)" over seeds
        if f"{key}_min" not in r:
            return fmt(r[key])
        return f"{fmt(r[key])} ({fmt(r[key + '_min'])}-{fmt(r[key + '_max'])})"

    def pct(x):
        return f"{100 * x:.1f}%"

    def count(x):
        return f"{x:,.0f}"

    cols += [
        ("params", lambda r: si(r["total_params"], "M")),
        ("active/token", lambda r: si(r["active_params"], "M")),
        ("train FLOPs", lambda r: f"{r['train_flops']:.3g}"),
        ("val loss", lambda r: f"{r['val_loss']:.4f}"),
        ("QA EM", lambda r: spread(r, "exact_match", pct)),
        ("EM 1-hop", lambda r: f"{100 * r['exact_match_1hop']:.1f}%"),
        ("QA F1", lambda r: f"{100 * r['f1']:.1f}%"),
        ("answer NLL/token", lambda r: f"{r['answer_nll_per_token']:.3f}"),
        ("bits stored", lambda r: spread(r, "bits", count)),
        ("bits/active param", lambda r: f"{r['bits_per_active_param']:.4f}"),
        ("train time", lambda r: f"{r['train_seconds']:.0f} s"),
    ]

    def cell(fn, r) -> str:
        try:
            return fn(r)
        except (KeyError, TypeError):  # metric absent (no QA, no bios) or time unknown
            return "–"

    lines = ["| " + " | ".join(name for name, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(fn, r) for _, fn in cols) + " |" for r in rows]
    return "\n".join(lines)


def _save(fig, path: Path) -> Path | None:
    """Save ``fig`` (None: nothing to plot) at ``path`` and close it."""
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot(rows: list[dict], path: Path) -> Path | None:
    """Exact match, answer NLL and bits stored against active parameters and FLOPs, saved
    at ``path`` (:func:`figure`); None without matplotlib or anything to plot."""
    return _save(figure(rows), path) if pyplot(path.name) else None


def plot_curves(runs: list[tuple[str, int, str | Path]], path: Path) -> Path | None:
    """Each run's training and validation loss against step, saved at ``path``
    (:func:`curves_figure`); None without matplotlib or any metrics, or (with a note) when
    a metrics file is unreadable: the table is written already and stays the result."""
    if not pyplot(path.name):
        return None
    try:
        return _save(curves_figure(runs), path)
    except ValueError as e:
        print(f"no {path.name}: {e}", file=sys.stderr)
        return None


def _styles(n: int) -> list[dict]:
    """A colour and marker for each of ``n`` numbered variants (both figures alike)."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [{"color": cmap(i % cmap.N), "marker": "osD^v<>pP*X"[i % 11]} for i in range(n)]


def _legend_size(names: list[str]) -> tuple[int, float]:
    """Columns and inches of the numbered legend :func:`_legend_below` draws."""
    ncol = 1 if max(len(name) for name in names) > 45 else 2
    return ncol, 0.19 * (-(-len(names) // ncol)) + 0.15


def _legend_below(fig, names: list[str], styles: list[dict], lines: bool) -> None:
    """The variants, numbered, in a legend under the panels: a study's labels
    ("134m-dense:model.dim=1088:model.n_heads=16:optim.lr=5e-4") written beside the points
    squeezed the axes to slivers."""
    import matplotlib.pyplot as plt

    kw = {"linestyle": "-"} if lines else {"linestyle": "", "markersize": 6}
    handles = [plt.Line2D([], [], **kw, **st) for st in styles]
    labels = [f"{n + 1}  {name}" for n, name in enumerate(names)]
    ncol = _legend_size(names)[0]
    fig.legend(handles, labels, loc="lower left", ncol=ncol, fontsize=8, frameon=False)


SEED_LINES = ("-", "--", ":", "-.")


def curves_figure(runs: list[tuple[str, int, str | Path]]):
    """Training loss (the logged window's mean) and validation loss against step for each
    ``(variant, seed, run_dir)``, read from the run's metrics.jsonl: a colour per variant,
    numbered as in compare.png, a line style per seed. Where the final table's rows come
    from: at a fixed token budget a run still on a loss plateau, or just off it, looks
    like a weaker model (docs/usage.md, the headline study's round 3). None when no run
    has metrics."""
    import matplotlib.pyplot as plt

    files = {(v, s): Path(d) / "metrics.jsonl" for v, s, d in runs}
    records = {k: read_metrics(f) for k, f in files.items() if f.is_file()}
    if not any(records.values()):
        return None
    # numbered over every run given, as compare.png numbers them: a run without metrics
    # loses its lines, not the others' numbers
    names = list(dict.fromkeys(v for v, _, _ in runs))
    seeds = list(dict.fromkeys(s for _, s, _ in runs))
    styles = _styles(len(names))
    legend_in = _legend_size(names)[1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2 + legend_in), squeeze=False)
    for (v, s), recs in records.items():
        st = styles[names.index(v)]
        dash = SEED_LINES[seeds.index(s) % len(SEED_LINES)]
        for ax, key in zip(axes[0], ("loss", "val_loss"), strict=True):
            pts = [(r["step"], r[key]) for r in recs if key in r and "step" in r]
            if pts:
                marker = st["marker"] if key == "val_loss" else None
                ax.plot(*zip(*pts, strict=True), dash, color=st["color"], marker=marker,
                        markersize=4, lw=1.2)  # fmt: skip
    for ax, title in zip(axes[0], ("training loss", "validation loss"), strict=True):
        ax.set_yscale("log")  # the plateau and the fall after it, both visible
        ax.set_xlabel("step")
        ax.set_ylabel(f"{title} (nats/token)")
        ax.grid(alpha=0.3, which="both")
    _legend_below(fig, names, styles, lines=True)
    title = "loss during training"
    if len(seeds) > 1:
        title += "; seeds " + ", ".join(f"{k} {SEED_LINES[i % len(SEED_LINES)]!r}"
                                        for i, k in enumerate(seeds))  # fmt: skip
    fig.suptitle(title)
    fig.tight_layout(rect=(0, legend_in / (4.2 + legend_in), 1, 1))
    return fig


def figure(rows: list[dict]):
    """The figure :func:`plot` saves: a point per row; a row that is a mean over seeds
    (:func:`over_seeds`) gets a bar from its lowest to its highest seed where it has them
    (exact match, bits), since two seeds' means alone can suggest a gap their spread
    covers. None when no row has any of the metrics."""
    import matplotlib.pyplot as plt

    metrics = [
        ("exact_match", "held-out QA exact match"),
        ("answer_nll_per_token", "answer NLL (nats/token)"),
        ("bits", "knowledge stored (bits)"),
    ]
    metrics = [(k, t) for k, t in metrics if any(k in r for r in rows)]
    if not metrics:
        return None
    xs = [("active_params", "active parameters per token"), ("train_flops", "training FLOPs")]
    names = [r["variant"] for r in rows]
    styles = _styles(len(rows))
    legend_in = _legend_size(names)[1]
    height = 3.2 * len(metrics)
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, height + legend_in), squeeze=False)
    for i, (key, title) in enumerate(metrics):
        for j, (xkey, xlabel) in enumerate(xs):
            ax = axes[i][j]
            for n, r in enumerate(rows):
                if key in r:
                    ax.scatter(r[xkey], r[key], s=40, **styles[n])
                    if f"{key}_min" in r:
                        # clamped: a mean of equal seeds can round past them (1e-17)
                        lo, hi = r[key] - r[f"{key}_min"], r[f"{key}_max"] - r[key]
                        spread = [[max(lo, 0.0)], [max(hi, 0.0)]]
                        ax.errorbar(r[xkey], r[key], yerr=spread, fmt="none", capsize=4,
                                    elinewidth=1, ecolor=styles[n]["color"])  # fmt: skip
                    ax.annotate(str(n + 1), (r[xkey], r[key]), fontsize=8,
                                xytext=(4, 3), textcoords="offset points")  # fmt: skip
            lo, hi = min(r[xkey] for r in rows), max(r[xkey] for r in rows)
            if hi > 10 * lo:  # a log axis only where the variants span decades
                ax.set_xscale("log")
            else:
                ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
            ax.margins(x=0.12, y=0.08)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(title)
            ax.grid(alpha=0.3)
    _legend_below(fig, names, styles, lines=False)
    title = f"same data, {rows[0]['tokens']:,} training tokens per variant"
    if any("seeds" in r for r in rows):
        title += "; mean over seeds, bars from the lowest to the highest"
    fig.suptitle(title)
    fig.tight_layout(rect=(0, legend_in / (height + legend_in), 1, 1))
    return fig


def machine() -> str:
    """The card, or the CPU model and the threads torch uses."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {torch.get_num_threads()} threads"


class CompareError(ValueError):
    """Variants that failed in their own processes (``jobs`` > 1): the table has the rest."""


def run_jobs(
    todo: list[tuple[str, TrainArgs]],
    yamls: list[str],
    overrides: list[str],
    reuse: bool,
    jobs: int,
) -> dict[str, str]:
    """Train and evaluate each ``(name, args)`` of ``todo`` in a ``memlayers compare``
    process of its own, ``jobs`` at once (``name``: a variant, or :func:`run_name`'s
    variant at another seed, which trains with ``seed=`` into ``args.run_dir``'s folder).
    On one GPU they share it: two or three 134m runs train at about the throughput of one
    (H200, 2026-12-04), and what is gained is each one's start, compilation and evaluation
    overlapping the others' training. Each process logs to ``OUT/<variant>.log`` (or
    ``OUT/seed<k>/<variant>.log``; its command first, unbuffered, so a process
    killed at a time limit leaves its last lines). Returns ``{variant: why}`` for those
    that failed. Stopped (Ctrl-C, SIGTERM, an error here), it stops the processes too."""
    import os
    import shlex
    import signal
    import subprocess
    import time

    def stop(signum, frame):  # SIGTERM's default would leave the processes training
        raise SystemExit(128 + signum)

    waiting, running, failed = list(todo), {}, {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                label, args = waiting.pop(0)
                variant, seed = split_run_name(label)
                where = Path(args.run_dir).parent  # out, or out/seed<k>
                where.mkdir(parents=True, exist_ok=True)
                log = where / f"{slug(variant)}.log"
                again = ["--reuse"] if reuse else []
                at = [] if seed is None else [f"seed={seed}"]
                cmd = [sys.executable, "-m", "memlayers", "compare", variant, *yamls, *overrides,
                       *at, "--out", str(where), "--no-table", *again]  # fmt: skip
                with open(log, "w") as f:
                    f.write(shlex.join(cmd) + "\n")
                    f.flush()
                    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
                running[label] = (proc, log)
                print(f"== {label}: training into {args.run_dir} in its own process (log {log})")
            time.sleep(0.2)
            for label, (proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[label]
                rc = proc.returncode
                if rc == 0:
                    print(f"== {label}: done")
                    continue
                how = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
                failed[label] = f"{how}, log {log}"
                tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-5:]
                print(f"== {label}: FAILED ({failed[label]}); its log ends:")
                print("\n".join(f"   {line}" for line in tail))
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc, _ in running.values():
            proc.terminate()
        for proc, _ in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return failed


def compare(
    variants: list[str],
    yamls: list[str] = (),
    overrides: list[str] = (),
    out: str | Path = "runs/compare",
    reuse: bool = False,
    command: str | None = None,
    max_qa: int | None = None,
    jobs: int = 1,
    table: bool = True,
    rates: list[float] | None = None,
    seeds: list[int] | None = None,
) -> list[dict]:
    """Train and evaluate every variant; write ``results.md/json``, ``compare.png`` and
    ``curves.png``.
    ``max_qa``: the evaluations answer the first N questions of each QA set. ``rates``:
    each variant at each learning rate (:func:`with_rates`). ``seeds``: each variant at
    each ``seed`` (the initialization; the data and its order stay), the config's own into
    ``OUT/<variant>``, another into ``OUT/seed<k>/<variant>``, and a table of the means
    over seeds. ``jobs`` > 1: the runs still to train run in processes of their own, that
    many at once (:func:`run_jobs`); the table then has those that finished, and a
    :class:`CompareError` names the rest. ``table=False``: no results files (one such
    process's own variant)."""
    from memlayers.eval import evaluate, format_results
    from memlayers.train import train

    if not variants:
        raise ValueError("name at least one variant (a model preset), e.g. tiny-dense")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    twice = sorted({v for v in variants if variants.count(v) > 1})
    if twice:
        raise ValueError(f"variant {twice[0]!r} is named twice (one run directory each)")
    if rates is not None:
        variants = with_rates(list(variants), check_rates(rates), list(yamls), list(overrides))
    folders = [slug(v) for v in variants]
    clash = sorted({v for v, f in zip(variants, folders, strict=True) if folders.count(f) > 1})
    if clash:
        raise ValueError(f"variants {clash} would train into one folder ({slug(clash[0])})")
    out = Path(out)
    base_seed = variant_args(variants[0], list(yamls), list(overrides), out).seed  # shared
    seeds = [base_seed] if seeds is None else check_seeds(seeds)
    runs = []  # (name, variant, seed, args): each variant at each seed
    for s in seeds:
        at, where = ([], out) if s == base_seed else ([f"seed={s}"], out / f"seed{s}")
        for v in variants:
            args = variant_args(v, list(yamls), [*overrides, *at], where)
            runs.append((run_name(v, s, base_seed), v, s, args))
    failed: dict[str, str] = {}
    if jobs > 1:
        todo = [(name, a) for name, _, _, a in runs
                if not (reuse and _finished(a, max_qa) is not None)]  # fmt: skip
        failed = run_jobs(todo, list(yamls), list(overrides), reuse, jobs)
        for name, args in todo:  # a process that exits 0 has left its results
            if name not in failed and _finished(args, max_qa) is None:
                failed[name] = f"exit 0 but no evaluation of step {args.steps} in {args.run_dir}"
        reuse = True  # what the processes trained is there now
    rows, full = [], {}
    for name, label, seed, args in runs:
        if name in failed:
            continue
        results = _finished(args, max_qa) if reuse else None
        if results is not None:
            print(f"== {name}: reusing {args.run_dir}")
        else:
            step = _resumable(args) if reuse else None
            if step is None:
                print(f"== {name}: training into {args.run_dir}")
                train(args, overwrite=True)  # out/<variant> is compare's own: retrain over it
            elif step < args.steps:
                print(f"== {name}: resuming {args.run_dir} at step {step}")
                train(args, resume="latest")
            else:
                print(f"== {name}: evaluating {args.run_dir} (trained, not evaluated)")
            results = evaluate(args.run_dir, device=args.device, max_qa=max_qa,
                               progress=args.logging.progress)  # fmt: skip
        print(format_results(results))
        rows.append({**summary_row(label, results), "lr": args.optim.lr, "seed": seed})
        full[name] = results
    if failed and not (table and rows):
        raise CompareError(_failures(failed))
    if not table:
        return rows
    out.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    means = over_seeds(rows) if len({r["seed"] for r in rows}) > 1 else None
    best = best_rates(means or rows)
    doc = {"command": command, "machine": machine(), "date": date, "rows": rows, "eval": full}
    if means:
        doc["over_seeds"] = means
    if best:
        doc["best_rates"] = best
    write_atomic(out / "results.json", json.dumps(doc, indent=2) + "\n")
    same = "data" if means else "data, seed"
    md = [
        f"# compare: {', '.join(variants)}",
        "",
        f"Command: `{command}`" if command else "",
        f"Machine: {machine()}; date {date}. Every variant: the same {same} and "
        f"{rows[0]['tokens']:,} training tokens"
        + (f"; QA on the first {max_qa} questions of each set." if max_qa else "."),
        "",
        format_table(rows),
        "",
    ]
    tables = [(SEEDS_TITLE, means), (BEST_TITLE, best)]
    for title, t in tables:
        if t:
            md += [title, "", format_table(t), ""]
    write_atomic(out / "results.md", "\n".join(md))
    pngs = [plot(means or rows, out / "compare.png")]
    done = {(r["variant"], r["seed"]) for r in rows}
    pngs.append(plot_curves([(v, s, a.run_dir) for _, v, s, a in runs if (v, s) in done],
                            out / "curves.png"))  # fmt: skip
    print(format_table(rows))
    for title, t in tables:
        if t:
            print(f"\n{title}\n{format_table(t)}")
    written = [out / "results.md", out / "results.json", *(p for p in pngs if p)]
    print("wrote " + ", ".join(str(p) for p in written))
    if failed:
        raise CompareError(_failures(failed) + f" (the table has the other {len(rows)})")
    return rows


def _failures(failed: dict[str, str]) -> str:
    return f"{len(failed)} variant(s) failed: " + "; ".join(f"{v} ({w})" for v, w in failed.items())
