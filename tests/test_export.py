"""memlayers.export: a run as a transformers model directory, checked against the run.

The exported model's logits equal the memlayers model's (fp32 rounding), loaded with
plain transformers (dense) or memlayers.hf (Memory+); greedy generation agrees; the
exported tokenizer encodes like the run's (EOS first); unsupported models are refused.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_eval import TINY_BIOS  # noqa: E402

from memlayers import MemoryConfig  # noqa: E402
from memlayers.cli import main as cli_main  # noqa: E402
from memlayers.config import load_config  # noqa: E402
from memlayers.data.datasets import ByteTokenizer  # noqa: E402
from memlayers.data.tokenizer import BPETokenizer  # noqa: E402
from memlayers.export import export_run, to_transformers, tokenizer_to_transformers  # noqa: E402
from memlayers.hf import load_pretrained_with_memory  # noqa: E402
from memlayers.model import ModelConfig, build_model  # noqa: E402
from memlayers.moe import MoEConfig  # noqa: E402
from memlayers.run import load_run  # noqa: E402
from memlayers.train import train  # noqa: E402

# fp32 logits of the same weights; transformers' rotary table is computed in fp32,
# memlayers' in fp64 then rounded: differences of a few ulps (6e-7 measured).
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    train(load_config([], [*TINY_BIOS, f"run_dir={run}"]))
    return run


def tokens(vocab: int, batch: int = 2, length: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def test_exported_run_matches_logits_and_tokenizer(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli_main(["export", str(run_dir), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    run = load_run(run_dir, "cpu")
    hf = load_pretrained_with_memory(out).eval()
    x = tokens(run.model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, run.model(x), **TOL)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Which city was born in? On October 12, 1950."
    assert tok(text)["input_ids"] == [run.tokenizer.eos_id, *run.tokenizer.encode(text)]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert cli_main(["export", str(run_dir), str(out)]) == 1  # not empty: refused
    assert "--overwrite" in capsys.readouterr().err


def test_exported_generation_config_stops_at_the_runs_eos(run_dir, tmp_path):
    """generate() reads EOS from generation_config.json: the run's (Llama's default 2
    would stop at whatever token 2 is), also BOS and padding, as the tokenizer has them."""
    out = export_run(run_dir, tmp_path / "hf")
    eos = load_run(run_dir, "cpu").tokenizer.eos_id
    assert eos != 2
    hf = load_pretrained_with_memory(out)
    gen = transformers.GenerationConfig.from_pretrained(out)
    for c in (gen, hf.generation_config, hf.config):
        assert (c.eos_token_id, c.bos_token_id, c.pad_token_id) == (eos, eos, eos)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (eos, eos, eos)


def test_export_replaces_out_whole_and_refuses_the_run_dir(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.bin").write_text("an older export's file")
    with pytest.raises(ValueError, match="--overwrite"):
        export_run(run_dir, out)
    export_run(run_dir, out, overwrite=True)
    assert not (out / "stale.bin").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary left
    with pytest.raises(ValueError, match="overlaps the source run"):
        export_run(run_dir, run_dir / "hf")
    assert not (run_dir / "hf").exists()

    def fail(tok):
        raise RuntimeError("disk full")

    # a failure midway: the export that was there stays whole, no half export, no temporary
    monkeypatch.setattr("memlayers.export.tokenizer_to_transformers", fail)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(run_dir, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_dense_model_loads_with_plain_transformers(tmp_path):
    cfg = ModelConfig(
        dim=48, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=97, multiple_of=16,
        max_seq_len=64, rope_theta=5e5, norm_eps=1e-6, tie_embeddings=True, init_std=0.2,
    )  # fmt: skip
    model = build_model(cfg, seed=0).eval()
    to_transformers(model).save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = tokens(97)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), **TOL)
        prompt = x[:, :5]
        ours = model.generate(prompt, 20)
        theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("value_dtype", ["fp32", "bf16"])
def test_untied_memory_plus_model(tmp_path, value_dtype):
    cfg = ModelConfig(
        dim=32, n_layers=4, n_heads=4, n_kv_heads=4, vocab_size=50, multiple_of=16,
        max_seq_len=32, init_std=0.2, memory_layers=[1, 3],
        memory=MemoryConfig(n_keys=8, heads=2, topk=4, value_dtype=value_dtype),
    )  # fmt: skip
    model = build_model(cfg, seed=1).eval()
    with torch.no_grad():  # wake the memory: its output projection starts at zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf = to_transformers(model)
    x = tokens(50, length=20)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), **TOL)
        hf.save_pretrained(tmp_path)
        back = load_pretrained_with_memory(tmp_path).eval()
        torch.testing.assert_close(back(x).logits, model(x), **TOL)
    # A bf16 table stays bf16 (in an fp32 model): the same numbers, the same lookups.
    for m in (hf, back):
        assert m.model.memory_values.weight.dtype == model.memory_values.weight.dtype


def test_bpe_tokenizer_encodes_like_the_run():
    texts = ["The capital of France is Paris.", "Ünïcode  spaces\tand\nnewlines 123"] * 5
    tok = BPETokenizer.train(texts, vocab_size=300, min_frequency=1)
    fast = tokenizer_to_transformers(tok)
    for t in [*texts[:2], "unseen words: zebra!"]:
        assert fast(t)["input_ids"] == [tok.eos_id, *tok.encode(t)]
        assert fast.decode(fast(t, add_special_tokens=False)["input_ids"]) == t


@pytest.mark.parametrize("name", ["</s>", "<|end_of_text|>"])
def test_bpe_tokenizer_keeps_its_own_eos_name(name):
    """A pretrained BPE whose EOS is not <|endoftext|> (Llama 2's, Llama 3's): the exported
    tokenizer's EOS is that token, not a new one past the vocabulary."""
    from tokenizers import Tokenizer, models

    vocab = {name: 0, "<s>": 1, **{c: i + 2 for i, c in enumerate("abcdefghij ")}}
    fast = Tokenizer(models.BPE(vocab, []))
    fast.add_special_tokens([name, "<s>"])
    tok = BPETokenizer(fast)
    hf = tokenizer_to_transformers(tok)
    assert (hf.eos_token, hf.eos_token_id, hf.pad_token_id) == (name, tok.eos_id, tok.eos_id)
    assert len(hf) == tok.vocab_size
    assert hf("abc")["input_ids"] == [tok.eos_id, *tok.encode("abc")]


def test_byte_tokenizer_encodes_like_the_run():
    # data.dataset=text runs: UTF-8 bytes as ids, EOS 256 (export failed on them before).
    tok = ByteTokenizer()
    fast = tokenizer_to_transformers(tok)
    every_byte = bytes(range(256)).decode("latin-1")
    for t in ["The capital of France is Paris.", "Ünïcode  spaces\tand\nnewlines 123 ✓"]:
        assert fast(t)["input_ids"] == [tok.eos_id, *tok.encode(t)]
        assert fast.decode(fast(t, add_special_tokens=False)["input_ids"]) == t
    ids = fast(every_byte, add_special_tokens=False)["input_ids"]
    assert ids == tok.encode(every_byte)  # each of the 256 bytes at its own id


def test_unsupported_models_are_refused():
    moe = ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=40, ffn="moe",
                      moe=MoEConfig(n_experts=2), multiple_of=16)  # fmt: skip
    with pytest.raises(ValueError, match="moe"):
        to_transformers(build_model(moe, seed=0))
    memory = MemoryConfig(n_keys=8, heads=2, topk=4, share_values=False)
    own = ModelConfig(
        dim=32, n_layers=2, n_heads=4, vocab_size=40, memory_layers=[0], memory=memory
    )
    with pytest.raises(ValueError, match="share_values"):
        to_transformers(build_model(own, seed=0))


def test_missing_run_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="no-such-run"):
        export_run(tmp_path / "no-such-run", tmp_path / "out")
