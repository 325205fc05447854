"""Evaluation: perplexity and batched greedy answers against one-by-one references, the
results file, bring-your-own QA, knowledge bits, memory usage and the error messages."""

import json
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memlayers.cli import main as cli_main
from memlayers.config import load_config
from memlayers.data.tokenizer import WordTokenizer
from memlayers.eval import (
    EvalError,
    _bytes_of,
    evaluate,
    greedy_answers,
    load_run,
    perplexity,
)
from memlayers.metrics import answer_nll, greedy_answer
from memlayers.train import train

# A ~30k-parameter Memory+ model on 30 bios people: training and eval take seconds.
TINY_BIOS = [
    "data.dataset=bios", "data.bios.n_people=30", "data.bios.exposures=4",
    "model.preset=tiny-memory+", "model.dim=32", "model.n_layers=3", "model.n_heads=2",
    "model.n_kv_heads=1", "model.memory_layers=[0,2]", "model.memory.n_keys=8",
    "model.memory.heads=2", "model.memory.topk=4", "model.max_seq_len=64",
    "data.seq_len=32", "data.batch_size=4", "steps=8", "optim.warmup_steps=2",
    "eval_every=0", "eval_batches=2", "checkpoint.every=4", "logging.progress=false",
    "logging.tensorboard=false", "logging.plot=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    train(load_config([], [*TINY_BIOS, f"run_dir={run}"]))
    return run


@pytest.fixture(scope="module")
def results(run_dir):
    return evaluate(run_dir, progress=False)


def test_results_file_and_sections(run_dir, results):
    on_disk = json.loads((run_dir / "eval" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert not list((run_dir / "eval").glob(".tmp-*"))  # written atomically
    assert set(results) >= {"perplexity", "qa", "knowledge", "usage", "params", "train_flops"}
    assert results["step"] == 8 and results["tokens_trained"] == 8 * 4 * 32
    qa = results["qa"]["bios-heldout"]
    assert qa["n"] == 15 * 6  # 15 held-out people × 6 questions (work city included)
    assert set(qa["by_attribute"]) == {
        "birth_date", "birth_city", "university", "major", "employer", "work_city",
    }  # fmt: skip
    assert 0 <= qa["exact_match"] <= qa["f1"] <= 1
    preds = (run_dir / "eval" / "bios-heldout.predictions.jsonl").read_text().splitlines()
    assert len(preds) == qa["n"] and "prediction" in json.loads(preds[0])


def test_an_older_checkpoint_keeps_the_runs_results(run_dir, results):
    older = evaluate(run_dir / "checkpoints" / "step_000004", max_qa=6, progress=False)
    assert older["step"] == 4
    assert older["results_path"] == str(run_dir / "eval" / "step_000004" / "results-max-qa-6.json")
    assert json.loads((run_dir / "eval" / "results.json").read_text())["step"] == 8


def test_a_partial_evaluation_keeps_the_runs_results(run_dir, results, tmp_path, capsys):
    main = (run_dir / "eval" / "results.json").read_bytes()
    preds = (run_dir / "eval" / "bios-heldout.predictions.jsonl").read_bytes()
    qa = tmp_path / "my qa.jsonl"
    qa.write_text(json.dumps({"question": "What did study?", "answers": ["Law"]}) + "\n")
    argv = ["eval", str(run_dir), "--qa", str(qa), "--no-builtin-qa", "--max-val-tokens", "64"]
    assert cli_main(argv) == 0
    what = "qa-my-qa_no-builtin-qa_val-tokens-64"
    assert f"eval/results-{what}.json" in capsys.readouterr().out
    partial = json.loads((run_dir / "eval" / f"results-{what}.json").read_text())
    assert set(partial["qa"]) == {"my qa"}
    assert (run_dir / "eval" / f"my qa.predictions-{what}.jsonl").is_file()
    evaluate(run_dir, max_qa=3, knowledge=False, progress=False)
    assert (run_dir / "eval" / "results-no-knowledge_max-qa-3.json").is_file()
    assert (run_dir / "eval" / "results.json").read_bytes() == main  # the run's own, kept
    assert (run_dir / "eval" / "bios-heldout.predictions.jsonl").read_bytes() == preds


def test_knowledge_and_flops(results):
    k, p = results["knowledge"], results["params"]
    assert k["capacity"] == pytest.approx(30 * math.log2(12 * 28 * 200 * 200 * 300 * 100 * 263))
    assert 0 <= k["bits"] <= k["capacity"]
    assert results["train_flops"] == p["train_flops_per_token"] * results["tokens_trained"]
    assert k["bits_per_active_param"] == pytest.approx(k["bits"] / p["active_per_token"])


def test_usage_of_every_memory_layer_and_the_shared_table(results):
    u = results["usage"]
    assert set(u) == {"block_0", "block_2", "shared_table"}
    for stats in u.values():
        assert 0 < stats["rows_used_pct"] <= 100
        assert 0 <= stats["kl_uniform"] <= stats["kl_max"] + 1e-9
        assert 0 <= stats["gini"] < 1
    # tokens seen, the same for the table as for each layer reading it (not summed)
    assert u["shared_table"]["lookups"] == u["block_0"]["lookups"] == u["block_2"]["lookups"]


def test_perplexity_matches_a_direct_computation(run_dir):
    run = load_run(run_dir)
    tokens = np.arange(200) % run.model.config.vocab_size
    got = perplexity(run.model, tokens, seq_len=16, batch_size=3, progress=False)
    seqs = torch.from_numpy(tokens[: 12 * 16 + 1]).long()
    x, y = seqs[:-1].view(12, 16), seqs[1:].view(12, 16)
    dev = next(run.model.parameters()).device  # the run's device: CUDA on a GPU machine
    want = F.cross_entropy(run.model(x.to(dev)).flatten(0, 1).cpu(), y.flatten()).item()
    assert got["tokens"] == 12 * 16
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(want), rel=1e-5)


def test_bits_per_byte_counts_decoded_bytes_and_one_per_eos():
    tok = WordTokenizer(["<|endoftext|>", "Hi", " there", "é"])
    ids = np.array([1, 2, 0, 3, 0, 1])  # "Hi there" EOS "é" EOS "Hi"
    assert _bytes_of(ids, tok) == len("Hi there") + 1 + 2 + 1 + len("Hi")


def test_batched_greedy_answers_equal_one_by_one(run_dir):
    run = load_run(run_dir)
    records = [
        {"question": q}
        for q in ("Which city was", "What did", "What is the birth date of", "Which")
    ]
    batched = greedy_answers(run.model, run.tokenizer, records, 6, batch_size=2, progress=False)
    for rec, got in zip(records, batched, strict=True):
        assert got == greedy_answer(run.model, run.tokenizer, rec["question"], max_new_tokens=6)


def test_bring_your_own_qa_takes_the_best_gold_answer(run_dir, tmp_path):
    run = load_run(run_dir)
    f = tmp_path / "mine.jsonl"
    rec = {"question": "Which city was born in?", "answers": ["Boston", "London"]}
    f.write_text(json.dumps(rec) + "\n\n" + json.dumps({**rec, "answers": ["London"]}) + "\n")
    with pytest.raises(EvalError, match="mine"):  # a word outside the closed vocabulary
        evaluate(run, qa=[f], builtin_qa=False, knowledge=False, progress=False, write=False)
    words = [w[1:] for w in run.tokenizer.tokens if w[:1] == " " and w[1:].isalpha()][:2]
    rec = {"question": "Which city was born in?", "answers": words}
    f.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "answers": words[:1]}) + "\n")
    r = evaluate(run, qa=[f], builtin_qa=False, knowledge=False, progress=False, write=False)
    assert list(r["qa"]) == ["mine"] and "knowledge" not in r
    each = [answer_nll(run.model, run.tokenizer, rec["question"], a)["nll"] for a in words]
    assert r["qa"]["mine"]["answer_nll"] == pytest.approx((min(each) + each[0]) / 2, rel=1e-5)


def test_clear_errors(run_dir, tmp_path, capsys):
    assert cli_main(["eval", str(tmp_path / "missing")]) == 1
    assert "no such run directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert cli_main(["eval", str(empty)]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q?", "answers": ["a"]}\n{"question": "q?"}\n')
    assert cli_main(["eval", str(run_dir), "--qa", str(bad)]) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err
    bad.write_text("not json\n")
    assert cli_main(["eval", str(run_dir), "--qa", str(bad)]) == 1
    assert "bad.jsonl:1: invalid JSON" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kw, name",
    [({"max_qa": -1}, "max_qa"), ({"max_qa": 0}, "max_qa"), ({"batch_size": 0}, "batch_size"),
     ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_val_tokens": -100}, "max_val_tokens"),
     ({"max_qa": 2.5}, "max_qa")],
)  # fmt: skip
def test_bad_counts_are_refused_naming_them_before_the_run_loads(tmp_path, kw, name):
    # (max_qa=-1 kept all but the last record, max_val_tokens=-100 nearly all tokens,
    # batch_size=0 failed inside range())
    with pytest.raises(EvalError, match=f"{name} must be an integer >= 1, got"):
        evaluate(tmp_path / "no-run", progress=False, **kw)


def test_qa_sets_that_share_a_name_are_refused(tmp_path, capsys):
    rec = json.dumps({"question": "Where?", "answers": ["here"]}) + "\n"
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "q.jsonl").write_text(rec)
    (tmp_path / "bios-heldout.jsonl").write_text(rec)
    run = tmp_path / "no-run"  # refused before the run is looked for
    with pytest.raises(EvalError, match="two QA sets named 'q'"):
        evaluate(run, qa=[tmp_path / "a" / "q.jsonl", tmp_path / "b" / "q.jsonl"], progress=False)
    with pytest.raises(EvalError, match="'bios-heldout' is the name of a dataset's own"):
        evaluate(run, qa=[tmp_path / "bios-heldout.jsonl"], progress=False)
    assert cli_main(["eval", str(run), "--max-qa", "-1"]) == 1
    assert "max_qa must be an integer >= 1, got -1" in capsys.readouterr().err


def test_the_knowledge_probes_go_in_larger_batches_on_a_gpu_only():
    from memlayers.eval import PROBE_BATCH_GPU, probe_batch_size

    cpu = torch.nn.Linear(2, 2)
    assert probe_batch_size(cpu, 64) == 64

    class OnGpu(torch.nn.Module):  # a module whose parameters say cuda (no GPU needed)
        def parameters(self, recurse=True):
            yield types.SimpleNamespace(device=torch.device("cuda", 0))

    assert probe_batch_size(OnGpu(), 64) == 64 * PROBE_BATCH_GPU
    assert probe_batch_size(torch.nn.Module(), 64) == 64  # no parameters: as given
