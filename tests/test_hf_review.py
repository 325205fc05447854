"""model.hf, export and the CLI around them: which transformers models a retrofit reads,
a padded embedding, a directory with memory layers, refusals before ``--overwrite``
deletes anything, ``ffn`` / PEER blocks with a pretrained model, missing extras on the
command line, an ``ffn="memory"`` export and the loading hint. Tiny random models saved
with a byte-level BPE tokenizer (no download), CPU.
"""

import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_retrofit import _args as retrofit_args  # noqa: E402

from memlayers import retrofit  # noqa: E402
from memlayers.cli import main as cli_main  # noqa: E402
from memlayers.data.tokenizer import BPETokenizer  # noqa: E402
from memlayers.export import to_transformers  # noqa: E402
from memlayers.generate import generate  # noqa: E402
from memlayers.hf import add_memory  # noqa: E402
from memlayers.memory import MemoryConfig  # noqa: E402
from memlayers.model import ModelConfig, build_model  # noqa: E402
from memlayers.run import RunError, load_run  # noqa: E402
from memlayers.train import train  # noqa: E402

TEXT = [
    "Ada Lovelace was born in London and studied mathematics with Augustus De Morgan.",
    "What is the birth city of Ada Lovelace? London",
    "The capital of France is Paris, and the capital of Japan is Tokyo.",
]
N_TOKENS = 300  # the tokenizer's
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128,
)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    tok = BPETokenizer.train(TEXT * 20, vocab_size=N_TOKENS, min_frequency=1)
    assert tok.vocab_size == N_TOKENS
    return tok


def _save_llama(out, tok, vocab_size=N_TOKENS, with_tokenizer=True, memory=False):
    """A tiny random LlamaForCausalLM in ``out`` (tied embeddings), with ``tok`` as its
    tokenizer.json; ``memory``: Memory+ added in blocks 1 and 3 before saving."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**TINY, vocab_size=vocab_size, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    if memory:
        add_memory(model, [1, 3], MemoryConfig(n_keys=8, heads=2, topk=4))
    model.save_pretrained(out)
    if with_tokenizer:
        tok.save(out / "tokenizer.json")
    return model


def _args(hf_dir, run_dir, *extra):
    """test_retrofit's tiny retrofit run, 2 steps."""
    return retrofit_args(hf_dir, run_dir, "steps=2", "optim.warmup_steps=0",
                         "checkpoint.every=2", "device=cpu", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("llama")
    _save_llama(out, tokenizer)
    return out


# ---- which transformers models a retrofit reads ----------------------------------------------


def _config(name: str, **extra):
    cls = getattr(transformers, f"{name}Config", None)
    if cls is None:  # an architecture newer than the installed transformers
        pytest.skip(f"transformers {transformers.__version__} has no {name}Config")
    return cls(**TINY, vocab_size=128, **extra)


@pytest.mark.parametrize(
    "name, model_type",
    [
        ("Qwen2", "qwen2"),  # unmodified: its config has no attention_bias, its q/k/v do
        ("Granite", "granite"),  # embedding / residual / logits multipliers
        ("SmolLM3", "smollm3"),  # layers without rope
        ("Helium", "helium"),  # interleaved rotary halves
        ("Ernie4_5", "ernie4_5"),
    ],
)
def test_other_llama_like_architectures_are_refused_by_type(name, model_type):
    with pytest.raises(ValueError, match=rf"model_type '{model_type}'.*memlayers.hf.add_memory"):
        retrofit.architecture_from_transformers(_config(name))


@pytest.mark.parametrize("name", ["GPT2", "StableLm", "Cohere", "Olmo"])
def test_non_llama_configs_are_a_value_error_not_an_attribute_error(name):
    cls = getattr(transformers, f"{name}Config")
    cfg = cls(n_embd=64, n_layer=2, n_head=4) if name == "GPT2" else cls(**TINY)
    with pytest.raises(ValueError, match=rf"model_type '{cfg.model_type}'"):
        retrofit.architecture_from_transformers(cfg)


def test_mistral_is_read_only_without_a_sliding_window():
    with pytest.raises(ValueError, match="sliding_window"):
        retrofit.architecture_from_transformers(_config("Mistral"))  # 4096 by default
    torch.manual_seed(0)
    ref = transformers.MistralForCausalLM(_config("Mistral", sliding_window=None)).eval()
    arch = retrofit.architecture_from_transformers(ref.config)
    cfg = ModelConfig(**arch, memory_layers=[1], memory=MemoryConfig(n_keys=8, heads=2, topk=4))
    model = retrofit.build_model(cfg, "parallel", seed=0)
    retrofit.load_pretrained_(model, ref.state_dict(), "parallel")
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # fp32; the rotary tables' fp64-vs-fp32 rounding
        torch.testing.assert_close(model.eval()(ids), ref(ids).logits, atol=2e-5, rtol=1e-5)


# ---- a padded embedding (more rows than the tokenizer has tokens) ----------------------------

PADDED = 320


@pytest.fixture(scope="module")
def padded_run(tmp_path_factory, tokenizer):
    """A run of a model with 320 embedding rows and a 300-token tokenizer, whose padded
    rows dominate every logit (±100 along single coordinates: for any normed hidden state
    some padded id beats every real one), trained 2 steps at a negligible learning rate."""
    out = tmp_path_factory.mktemp("padded")
    model = _save_llama(out, tokenizer, vocab_size=PADDED)
    with torch.no_grad():
        rows = model.model.embed_tokens.weight[N_TOKENS:]  # (20, 64)
        rows.zero_()
        for j in range(PADDED - N_TOKENS):
            rows[j, j // 2] = 100.0 if j % 2 == 0 else -100.0
    model.save_pretrained(out)
    run = tmp_path_factory.mktemp("runs") / "padded"
    train(_args(out, run, "optim.lr=1e-12", "optim.value_lr=1e-12", "optim.memory_lr=1e-12"))
    return run


def test_a_padded_embedding_run_loads(padded_run):
    trained = load_run(padded_run, "cpu")  # refused before: 300 tokens != 320 rows
    assert trained.model.config.vocab_size == PADDED
    assert trained.tokenizer.vocab_size == N_TOKENS


def test_a_smaller_tokenizer_is_still_refused_outside_a_pretrained_run(padded_run, tmp_path):
    """Only a model.hf run has rows past its tokenizer; any other run's vocab_size is its
    tokenizer's, so a smaller one is another run's."""
    run = tmp_path / "copy"
    shutil.copytree(padded_run, run)
    config = run / "config.yaml"
    config.write_text(re.sub(r"(?m)^  hf: .*$", "  hf: null", config.read_text()))
    with pytest.raises(RunError, match="the tokenizer has 300 tokens but the model's vocab"):
        load_run(run, "cpu")


def test_generate_never_emits_a_padded_id(padded_run, tokenizer):
    model = load_run(padded_run, "cpu").model
    prompt = [tokenizer.eos_id] + tokenizer.encode("The capital of")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        assert int(model(ids)[0, -1].argmax()) >= N_TOKENS  # unmasked, a padded id wins
        for _ in range(6):  # greedy over the tokenizer's ids alone
            logits = model(ids)[0, -1]
            logits[N_TOKENS:] = -torch.inf
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    new = ids[0, len(prompt) :].tolist()
    new = new[: new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new
    expected = tokenizer.decode(new)
    assert generate(padded_run, "The capital of", max_new_tokens=6, device="cpu") == [expected]


def test_restrict_vocab_keeps_the_logits_of_the_tokenizers_ids(padded_run):
    from memlayers.run import restrict_vocab_

    full = load_run(padded_run, "cpu").model
    cut = restrict_vocab_(load_run(padded_run, "cpu").model, N_TOKENS)
    ids = torch.randint(0, N_TOKENS, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(cut(ids), full(ids)[..., :N_TOKENS], atol=0, rtol=0)
    assert cut.config.vocab_size == N_TOKENS
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cut(torch.tensor([[N_TOKENS]]))


def test_qa_answers_and_lm_eval_never_decode_a_padded_id(padded_run, tokenizer):
    """Eval's greedy QA answers and lm-eval's free text decode over the tokenizer's ids
    (a padded id, which wins unmasked here, decodes to nothing), and the model is the
    whole-vocabulary one again afterwards (losses compare with training's)."""
    from memlayers.eval.knowledge import greedy_answers
    from memlayers.model import restricted_vocab

    run = load_run(padded_run, "cpu")
    model = run.model
    ids = torch.tensor([[tokenizer.eos_id] + tokenizer.encode("The capital of")])
    with torch.no_grad():
        before = model(ids)
        assert int(before[0, -1].argmax()) >= N_TOKENS  # unmasked, a padded id wins
    expected = generate(padded_run, "The capital of", max_new_tokens=6, device="cpu")[0]
    got = greedy_answers(model, tokenizer, [{"question": "The capital of"}], max_new_tokens=6,
                         progress=False)  # fmt: skip
    assert got == [expected.split("\n")[0].strip()]
    with restricted_vocab(model, N_TOKENS) as cut:
        assert cut.config.vocab_size == N_TOKENS
    assert model.config.vocab_size == PADDED and model.tok_embeddings.weight.shape[0] == PADDED
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=0, rtol=0)

    lm_eval = pytest.importorskip("lm_eval")
    del lm_eval
    from memlayers.lm_eval_adapter import MemlayersLM

    lm = MemlayersLM(run=str(padded_run), device="cpu")
    text = lm._greedy([tokenizer.eos_id] + tokenizer.encode("The capital of"), 6, [])
    assert text == expected


# ---- a directory with memory layers ----------------------------------------------------------


def test_a_directory_with_memory_layers_is_refused(tmp_path, tokenizer):
    """An export (or add_memory + save_pretrained) would load as the plain Llama: memory
    dropped, those blocks' MLPs new."""
    src = tmp_path / "with-memory"
    _save_llama(src, tokenizer, memory=True)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"has memory layers.*load_pretrained_with_memory"):
        train(_args(src, run))
    assert not run.exists()


# ---- refusals come before --overwrite deletes the run there ----------------------------------


def _old_run(run_dir):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("steps: 7\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "checkpoints" / "step_000001").mkdir(parents=True)


@pytest.mark.parametrize(
    "case, match",
    [
        ("word-tokenizer", r"leave data.bios.tokenizer at 'hf:.*' \(it is 'word'\)"),
        ("text-dataset", r"data.dataset='text' has no tokenizer option"),
        ("no-tokenizer-json", "has no tokenizer.json"),
        ("tokenizer-too-big", "the data's tokenizer has 300 tokens, the model 256"),
    ],
)
def test_refusals_leave_the_old_run_in_place_with_overwrite(
    case, match, hf_dir, tokenizer, tmp_path
):
    src, extra = hf_dir, []
    if case == "word-tokenizer":
        extra = ["data.bios.tokenizer=word"]
    elif case == "text-dataset":
        (tmp_path / "a.txt").write_text(" ".join(TEXT) * 20)
        extra = ["data.dataset=text", f"data.path={tmp_path / 'a.txt'}"]
    elif case == "no-tokenizer-json":
        src = tmp_path / "no-tok"
        _save_llama(src, tokenizer, with_tokenizer=False)
    else:
        src = tmp_path / "small"
        _save_llama(src, tokenizer, vocab_size=256)
    run = tmp_path / "run"
    _old_run(run)
    with pytest.raises(ValueError, match=match) as e:
        train(_args(src, run, *extra), overwrite=True)
    assert "data.text.tokenizer" not in str(e.value)  # data.text has no such option
    assert (run / "config.yaml").read_text() == "steps: 7\n"
    assert (run / "metrics.jsonl").is_file() and (run / "checkpoints" / "step_000001").is_dir()


def test_overwrite_still_replaces_the_old_run(hf_dir, tmp_path):
    run = tmp_path / "run"
    _old_run(run)
    train(_args(hf_dir, run, "steps=1", "checkpoint.every=1"), overwrite=True)
    assert "steps: 1" in (run / "config.yaml").read_text()
    assert (run / "checkpoints" / "step_000001" / "meta.json").is_file()  # the new run's


# ---- ffn kinds and PEER blocks with model.hf ---------------------------------------------------


@pytest.mark.parametrize(
    "extra, named",
    [
        ("model.ffn=moe", "model.ffn='moe'"),
        ("model.ffn=memory", "model.ffn='memory'"),
        ("model.ffn=peer", "model.ffn='peer'"),
        ("model.peer_layers=[0]", "model.peer_layers=[0]"),
    ],
)
def test_block_kinds_without_pretrained_weights_are_refused(hf_dir, tmp_path, extra, named):
    with pytest.raises(ValueError, match=rf"{re.escape(named)}.*no weights"):
        _args(hf_dir, tmp_path / "r", extra)


# ---- the command line: missing extras, the export's loading hint ------------------------------


def test_missing_transformers_is_one_error_line(hf_dir, padded_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now raises
    rc = cli_main(["train", f"model.hf={hf_dir}", f"run_dir={tmp_path / 'r'}", "data.seq_len=32"])
    assert rc == 1 and "pip install 'memlayers[hf]'" in capsys.readouterr().err
    assert cli_main(["export", str(padded_run), str(tmp_path / "hf")]) == 1
    assert "pip install 'memlayers[hf]'" in capsys.readouterr().err


def test_an_internal_import_error_points_to_debug(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ImportError("cannot import name 'nothing' from 'memlayers.model'")

    monkeypatch.setattr("memlayers.train.train", broken)
    assert cli_main(["train", "steps=1", "final_eval=false"]) == 1
    err = capsys.readouterr().err
    assert "cannot import name 'nothing'" in err and "--debug" in err


def test_export_names_the_loader_a_memory_run_needs(padded_run, tmp_path, capsys):
    assert cli_main(["export", str(padded_run), str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "load: memlayers.hf.load_pretrained_with_memory" in out
    assert "or AutoModelForCausalLM" not in out


def test_export_of_a_dense_model_names_auto_model(tmp_path, monkeypatch, capsys):
    def export_run(run, out, overwrite=False):  # what a dense run's export writes
        out = Path(out)
        out.mkdir()
        (out / "config.json").write_text('{"model_type": "llama"}')
        return out

    monkeypatch.setattr("memlayers.export.export_run", export_run)
    assert cli_main(["export", "runs/x", str(tmp_path / "hf")]) == 0
    assert "load: transformers.AutoModelForCausalLM" in capsys.readouterr().out


# ---- export of an ffn="memory" model (every block a memory) -----------------------------------


def test_export_takes_the_memory_blocks_from_the_block_kinds():
    memory = MemoryConfig(n_keys=8, heads=2, topk=4)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=100, max_seq_len=64,
                      ffn="memory", memory=memory)  # fmt: skip
    assert cfg.memory_layers == [] and cfg.block_kinds() == ["memory", "memory"]
    model = build_model(cfg, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(2))
    hf = to_transformers(model.eval(), eos_id=0)
    assert hf.config.memlayers["layers"] == [0, 1]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=2e-5, rtol=1e-5)
    own = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=100, max_seq_len=64,
                      ffn="memory", memory=MemoryConfig(n_keys=8, heads=2, topk=4,
                                                        share_values=False))  # fmt: skip
    with pytest.raises(ValueError, match="per-layer value tables"):
        to_transformers(build_model(own, seed=0))
