"""lm-evaluation-harness adapter: log-likelihoods against a direct computation (batched,
unbatched, truncated, rolling), a local multiple-choice task through simple_evaluate,
greedy generation with stop strings, a retrofitted HF model, and the error messages."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from test_eval import TINY_BIOS  # noqa: E402

from memlayers.cli import main as cli_main  # noqa: E402
from memlayers.config import load_config  # noqa: E402
from memlayers.lm_eval_adapter import MemlayersLM, evaluate_tasks  # noqa: E402
from memlayers.train import train  # noqa: E402

TASK = "memlayers_tiny_mc"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("lm_eval") / "run"
    train(load_config([], [*TINY_BIOS, f"run_dir={run}"]))
    return run


@pytest.fixture(scope="module")
def lm(run_dir):
    return MemlayersLM(run=str(run_dir), device="cpu", batch_size=3)


@pytest.fixture(scope="module")
def words(lm):
    """Capitalised words of the bios vocabulary, without their leading space."""
    return [t[1:] for t in lm.tok.tokens if t[:1] == " " and t[1:2].isupper()][:40]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, words):
    """A 12-question, 4-choice task in bios words: a YAML config beside a jsonl file."""
    d = tmp_path_factory.mktemp("tasks")
    docs = [
        {"question": f"Which city was {words[i]} born in?", "choices": words[i + 1 : i + 5],
         "answer": i % 4}
        for i in range(12)
    ]  # fmt: skip
    (d / "tiny.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    config = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(d / "tiny.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (d / "tiny.yaml").write_text(yaml.safe_dump(config))
    return d, docs


def ll_requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def direct_loglikelihood(lm, context: str, continuation: str) -> float:
    """Sum of log-softmax of the model's logits over the continuation's tokens, after an
    EOS, keeping the last max_seq_len inputs (the reference the adapter is held to)."""
    n = len(context) - len(context.rstrip(" "))  # the harness moves trailing spaces over
    context, continuation = context[: len(context) - n], context[len(context) - n :] + continuation
    ctx = lm.tok.encode(context)
    cont = lm.tok.encode(context + continuation)[len(ctx) :]
    whole = ([lm.tok.eos_id, *ctx] + cont)[-(lm.max_length + 1) :]
    with torch.no_grad():
        logits = lm.model(torch.tensor([whole[:-1]]))[0].double()  # (T, V)
    logp = logits.log_softmax(-1)[-len(cont) :]
    return float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())


def test_loglikelihood_equals_direct_computation_batched_or_not(run_dir, lm, words):
    long_ctx = "Which" + " city was born in" * 30  # 121 tokens: truncated from the left
    pairs = [
        ("Which city was", f" {words[0]}"),
        (f"Which city was {words[1]} born", f" in {words[2]}?"),
        ("Which", " city was born in?"),
        (long_ctx, f" {words[3]} {words[4]}"),
        ("Which city was born", f" {words[5]} {words[6]}"),
        ("Which city was ", f"{words[7]}"),  # trailing space moves to the continuation
        ("Which city", " was"),
    ]
    assert len(lm.tok.encode(long_ctx)) > lm.max_length
    batched = lm.loglikelihood(ll_requests(pairs), disable_tqdm=True)
    one = MemlayersLM(run=str(run_dir), device="cpu", batch_size=1)
    unbatched = one.loglikelihood(ll_requests(pairs), disable_tqdm=True)
    for (ctx, cont), (ll, _), (ll1, _) in zip(pairs, batched, unbatched, strict=True):
        ref = direct_loglikelihood(lm, ctx, cont)
        assert ll == pytest.approx(ref, rel=1e-5, abs=1e-4)  # fp32 logits, summed
        assert ll == pytest.approx(ll1, rel=1e-5, abs=1e-4)
    assert [g for _, g in batched] == [g for _, g in unbatched]


def test_empty_context_and_rolling_loglikelihood(lm, words):
    text = "".join(f"Which city was {w} born in?" for w in words[:24])  # > 2 max_seq_len
    ids = lm.tok.encode(text)
    L = lm.max_length
    assert len(ids) > 2 * L
    # Reference: chunks of L predicted tokens, each with as much context as fits.
    full = [lm.tok.eos_id, *ids]
    ref = 0.0
    for s in range(0, len(ids), L):
        e = min(s + L, len(ids))
        inp = full[max(0, e - L) : e]
        with torch.no_grad():
            logp = lm.model(torch.tensor([inp]))[0].double().log_softmax(-1)  # (len, V)
        tgt = torch.tensor(full[max(0, e - L) + 1 : e + 1])
        ref += float(logp.gather(-1, tgt[:, None])[-(e - s) :].sum())
    short = f"Which city was {words[0]} born in?"
    rolled = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([text, short])],
        disable_tqdm=True,
    )
    assert rolled[0] == pytest.approx(ref, rel=1e-5)
    (empty_ctx, _), = lm.loglikelihood(ll_requests([("", short)]), disable_tqdm=True)  # fmt: skip
    assert rolled[1] == pytest.approx(empty_ctx, rel=1e-5)
    assert rolled[1] == pytest.approx(direct_loglikelihood(lm, "", short), rel=1e-5)


def test_simple_evaluate_on_a_local_task(run_dir, lm, task_dir):
    d, docs = task_dir
    results = evaluate_tasks(str(run_dir), [TASK], include_path=str(d), device="cpu",
                             batch_size=4, bootstrap_iters=0)  # fmt: skip
    acc = results["results"][TASK]["acc,none"]
    # The same accuracy from the adapter's own scores, one request per choice.
    pairs = [(doc["question"], f" {c}") for doc in docs for c in doc["choices"]]
    scores = [ll for ll, _ in lm.loglikelihood(ll_requests(pairs), disable_tqdm=True)]
    picks = [max(range(4), key=lambda j, k=k: scores[4 * k + j]) for k in range(len(docs))]
    expected = sum(p == doc["answer"] for p, doc in zip(picks, docs, strict=True)) / len(docs)
    assert acc == pytest.approx(expected)
    assert results["config"]["memlayers_run"] == str(run_dir)
    assert results["config"]["memlayers_step"] == 8


def test_generate_until_stops_at_the_stop_string(run_dir):
    gen = MemlayersLM(run=str(run_dir), device="cpu")
    torch.manual_seed(0)
    gen.model.init_weights()  # random weights: long outputs, EOS almost never (1 / vocab)
    context = "Which city was"

    def until(stops, n=12):
        req = Instance("generate_until", {}, (context, {"until": stops, "max_gen_toks": n}), 0)
        return gen.generate_until([req], disable_tqdm=True)[0]

    full = until([])
    # Reference: the model's own greedy generate (KV cache), decoded.
    ids = [gen.tok.eos_id, *gen.tok.encode(context)]
    out = gen.model.generate(torch.tensor([ids]), 12, eos_id=gen.tok.eos_id)[0, len(ids) :]
    new = out.tolist()
    new = new[: new.index(gen.tok.eos_id)] if gen.tok.eos_id in new else new
    assert full == gen.tok.decode(new)
    assert len(new) >= 6
    stop = gen.tok.decode(new[4:5])
    calls = []
    hook = gen.model.register_forward_hook(lambda *_: calls.append(1))
    cut = until([stop])
    hook.remove()
    assert len(calls) <= 5  # the prompt, then one token at a time: stopped at the 5th
    assert cut == full.split(stop, 1)[0]
    assert len(cut) < len(full) and stop not in cut
    assert until(["no such stop"], n=3) == gen.tok.decode(new[:3])  # max_gen_toks


def test_sampling_and_bad_batch_size_are_refused(lm):
    req = Instance("generate_until", {}, ("Which", {"until": [], "do_sample": True}), 0)
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([req], disable_tqdm=True)
    with pytest.raises(ValueError, match="batch_size"):
        MemlayersLM(run="unused", batch_size="auto")


def test_missing_run_names_the_path(tmp_path, capsys, task_dir):
    missing = tmp_path / "no-such-run"
    with pytest.raises(ValueError, match=str(missing)):
        MemlayersLM(run=str(missing))
    d, _ = task_dir
    assert cli_main(["lm-eval", str(missing), "--tasks", TASK, "--include-path", str(d)]) == 1
    assert str(missing) in capsys.readouterr().err


def test_unknown_task_is_a_clear_error(run_dir, capsys):
    assert cli_main(["lm-eval", str(run_dir), "--tasks", "no_such_task_xyz"]) == 1
    err = capsys.readouterr().err
    assert "no_such_task_xyz" in err and "--include-path" in err


def test_cli_prints_the_table_and_writes_results(run_dir, task_dir, tmp_path, capsys):
    d, _ = task_dir
    out = tmp_path / "res.json"
    argv = ["lm-eval", str(run_dir), "--tasks", TASK, "--include-path", str(d),
            "--limit", "4", "--device", "cpu", "--output", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    assert TASK in capsys.readouterr().out
    assert 0 <= json.loads(out.read_text())["results"][TASK]["acc,none"] <= 1


def test_core_does_not_import_lm_eval():
    code = "import sys, memlayers, memlayers.cli; sys.exit('lm_eval' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_task_manager_sees_the_local_task(task_dir):
    d, _ = task_dir
    assert TASK in TaskManager(include_path=str(d)).all_tasks


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, task_dir):
    """A tiny random Llama with Memory+ (awake: its output projection is not zero), saved
    with a word-level tokenizer of the task's words: what ``memlayers-hf`` loads."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from memlayers import MemoryConfig
    from memlayers.hf import add_memory

    _, docs = task_dir
    words = sorted({w for d in docs for w in d["question"].replace("?", " ?").split()}
                   | {c for d in docs for c in d["choices"]})  # fmt: skip
    vocab = {w: i for i, w in enumerate(["<eos>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>"
    )
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    add_memory(model, [1], MemoryConfig(n_keys=16, heads=2, topk=4, k_dim=32, v_dim=64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("hf") / "tiny-llama-memory"
    model.save_pretrained(d)
    fast.save_pretrained(d)
    return d, model, fast


def test_retrofitted_hf_model_keeps_its_memory(hf_dir, task_dir):
    from lm_eval.api.registry import get_model

    d, model, fast = hf_dir
    lm = get_model("memlayers-hf")(pretrained=str(d), device="cpu", batch_size=2)
    pairs = [(doc["question"], f" {c}") for doc in task_dir[1][:3] for c in doc["choices"]]
    got = [ll for ll, _ in lm.loglikelihood(ll_requests(pairs), disable_tqdm=True)]
    for (ctx, cont), ll in zip(pairs, got, strict=True):
        ids = fast(ctx + cont)["input_ids"]
        n = len(ids) - len(fast(ctx)["input_ids"])
        with torch.no_grad():
            logp = model(torch.tensor([ids[:-1]])).logits[0].double().log_softmax(-1)
        ref = float(logp[-n:].gather(-1, torch.tensor(ids[-n:])[:, None]).sum())
        assert ll == pytest.approx(ref, rel=1e-5, abs=1e-4)
    results = evaluate_tasks(str(d), [TASK], hf=True, include_path=str(task_dir[0]),
                             device="cpu", batch_size=4, bootstrap_iters=0)  # fmt: skip
    assert 0 <= results["results"][TASK]["acc,none"] <= 1


def test_hf_model_saved_without_its_tokenizer(hf_dir, task_dir, run_dir, tmp_path, capsys):
    """save_pretrained of a model writes no tokenizer: refused naming the directory and
    --tokenizer (not the harness's sentencepiece error), and --tokenizer DIR reaches HFLM."""
    from lm_eval.api.registry import get_model

    d, model, _ = hf_dir
    bare = tmp_path / "bare"
    model.save_pretrained(bare)  # the model alone
    capsys.readouterr()  # its progress bar
    argv = ["lm-eval", str(bare), "--hf", "--tasks", TASK, "--include-path", str(task_dir[0]),
            "--device", "cpu", "--limit", "2", "--batch-size", "4"]  # fmt: skip
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert f"{bare} has no tokenizer" in err and "--tokenizer DIR" in err
    assert err.count("\n") == 1
    with pytest.raises(ValueError, match="has no tokenizer"):
        get_model("memlayers-hf")(pretrained=str(bare), device="cpu")
    out = tmp_path / "results" / "r.json"
    assert cli_main([*argv, "--tokenizer", str(d), "--output", str(out)]) == 0
    assert 0 <= json.loads(out.read_text())["results"][TASK]["acc,none"] <= 1
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # written whole, no temporary
    assert cli_main(["lm-eval", str(run_dir), "--tasks", TASK, "--tokenizer", str(d)]) == 1
    assert "--tokenizer" in capsys.readouterr().err


def test_missing_harness_names_the_extra():
    code = (
        "import sys; sys.modules['lm_eval'] = None; from memlayers.cli import main; "
        "sys.exit(main(['lm-eval', 'runs/x', '--tasks', 'arc_easy']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1
    assert "pip install 'memlayers[eval]'" in r.stderr
