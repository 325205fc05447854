"""Continued pretraining of a pretrained transformers model (``model.hf=...``): a tiny random
Llama saved with a byte-level BPE tokenizer (no download) becomes a memlayers Transformer
with Memory+ beside its MLPs (logits unchanged), trains on bios text encoded with its
tokenizer, resumes exactly, evaluates, generates and finetunes like any run; the refusals.
"""

import json
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from memlayers import retrofit  # noqa: E402
from memlayers.cli import main as cli_main  # noqa: E402
from memlayers.config import load_config  # noqa: E402
from memlayers.data.tokenizer import BPETokenizer, load_tokenizer  # noqa: E402
from memlayers.eval import evaluate  # noqa: E402
from memlayers.finetune import FinetuneArgs, finetune  # noqa: E402
from memlayers.generate import generate  # noqa: E402
from memlayers.hf import add_memory, load_transformers_model  # noqa: E402
from memlayers.memory import MemoryConfig  # noqa: E402
from memlayers.model import ModelConfig  # noqa: E402
from memlayers.optim import OptimArgs, build_optimizer  # noqa: E402
from memlayers.run import load_run  # noqa: E402
from memlayers.train import train  # noqa: E402

TEXT = [
    "Ada Lovelace was born in London and studied mathematics with Augustus De Morgan.",
    "What is the birth city of Ada Lovelace? London",
    "The capital of France is Paris, and the capital of Japan is Tokyo.",
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM (4 layers, width 64) saved with a 300-token BPE."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = BPETokenizer.train(TEXT * 20, vocab_size=300, min_frequency=1)
    tok.save(out / "tokenizer.json")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=tok.vocab_size, max_position_embeddings=128,
        tie_word_embeddings=True, rope_theta=10000.0,
    )  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def _args(hf_dir, run_dir, *extra):
    return load_config(
        [],
        [
            f"model.hf={hf_dir}", "model.memory_layers=[1,3]", "model.memory.n_keys=8",
            "model.memory.heads=2", "model.memory.topk=4", "data.dataset=bios",
            "data.bios.n_people=20", "data.bios.exposures=2", "data.seq_len=32",
            "data.batch_size=4", "steps=6", "optim.warmup_steps=2", "optim.lr=1e-3",
            "eval_every=0", "eval_batches=2", "checkpoint.every=3", "checkpoint.keep=0",
            "final_eval=false", "logging.every=1", "logging.progress=false",
            "logging.tensorboard=false", "logging.plot=false", f"run_dir={run_dir}", *extra,
        ],
    )  # fmt: skip


@pytest.fixture(scope="module")
def hf_run(hf_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "retro"
    history = train(_args(hf_dir, run))
    return run, history


@pytest.mark.parametrize("mode", ["parallel", "replace"])
def test_logits_match_transformers_with_memory_added(hf_dir, mode):
    """Parallel: the pretrained model's logits (memory silent). Replace: those of the
    transformers model with memlayers.hf.add_memory in replace mode (its silent memory
    drops the MLP of those blocks, like ours)."""
    ref = load_transformers_model(str(hf_dir))
    arch = retrofit.architecture_from_transformers(ref.config)
    memory = MemoryConfig(n_keys=8, heads=2, topk=4)
    cfg = ModelConfig(**arch, memory_layers=[1, 3], memory=memory)
    model = retrofit.build_model(cfg, mode, seed=0)
    left = retrofit.load_pretrained_(model, ref.state_dict(), mode)
    assert left and all(".ffn." in k or k.startswith("memory_values") for k in left)
    if mode == "replace":
        add_memory(ref, [1, 3], memory, mode="replace")
    ids = torch.randint(0, arch["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = model.eval()(ids)
    # fp32; memlayers builds its rotary table in fp64, transformers in fp32: a few ulps
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_parallel_mode_with_own_tables_trains_with_the_sparse_optimizer():
    """memory_mode=parallel, share_values=false: each block's own table keeps the
    sparse_grad the model was built with (a fresh default table was refused by
    build_optimizer), and a step moves it."""
    memory = MemoryConfig(n_keys=8, heads=2, topk=4, share_values=False)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=40, max_seq_len=32,
                      memory_layers=[0, 1], memory=memory)  # fmt: skip
    model = retrofit.build_model(cfg, "parallel", "cpu", 0, True)
    tables = [m.values for m in model.memory_layers()]
    assert len(tables) == 2 and all(t.sparse_grad for t in tables)
    assert all(isinstance(m, retrofit.ParallelMemory) for m in model.memory_layers())
    opt = build_optimizer(model, OptimArgs())
    before = [t.weight.detach().clone() for t in tables]
    x = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    model(x, targets=x).backward()
    opt.step()
    assert all(not torch.equal(b, t.weight) for b, t in zip(before, tables, strict=True))


def test_train_uses_the_model_and_its_tokenizer(hf_dir, hf_run):
    run, history = hf_run
    args = load_config([run / "config.yaml"])
    assert args.model.hf == str(hf_dir) and args.model.preset is None
    assert (args.model.dim, args.model.n_layers, args.model.vocab_size) == (64, 4, 300)
    assert args.data.bios.tokenizer == f"hf:{hf_dir}"
    tok = load_tokenizer(run / "tokenizer.json")
    assert tok.vocab_size == 300 and tok.encode(TEXT[0]) == load_tokenizer(
        hf_dir / "tokenizer.json"
    ).encode(TEXT[0])
    meta = json.loads((run / "checkpoints" / "step_000006" / "meta.json").read_text())
    assert meta["model_config"]["memory_mode"] == "parallel"
    assert history[-1]["loss"] < history[0]["loss"]
    trained = load_run(run, "cpu")
    assert isinstance(trained.model.layers[1].ffn, retrofit.ParallelMemory)
    assert isinstance(trained.model.layers[0].ffn, type(trained.model.layers[2].ffn))


def test_resume_gives_the_losses_of_an_uninterrupted_run(hf_dir, hf_run, tmp_path):
    run, full = hf_run
    resumed = train(_args(hf_dir, tmp_path / "b"), resume=str(run / "checkpoints" / "step_000003"))
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[3:]]  # bitwise
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in full[3:]]


def test_eval_generate_and_finetune_the_run(hf_run, tmp_path):
    run, _ = hf_run
    results = evaluate(run, max_qa=8, max_val_tokens=200, progress=False, knowledge=False)
    assert results["qa"] and results["perplexity"]["tokens"] > 0
    assert "shared_table" in results["usage"]
    text = generate(run, "Who is", max_new_tokens=4, device="cpu")
    assert isinstance(text[0], str)
    data = tmp_path / "new.txt"
    data.write_text("\n".join(TEXT) + "\n")
    for method in ("sparse-memory", "lora"):
        sparse = dict(top_t=10, background_batches=2) if method == "sparse-memory" else {}
        args = FinetuneArgs(method=method, steps=2, **sparse)
        r = finetune(run, data, args, out=tmp_path / method)
        assert len(r.record["losses"]) == 2
        assert load_run(r.out, "cpu").step == 8


def test_errors_are_clear(hf_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"model.hf='/no/such': not a pinned model \(smollm2\)"):
        train(_args("/no/such", tmp_path / "x"))
    with pytest.raises(ValueError, match=r"memory_layers .*\[0, n_layers=4\).*\[1, 9\]"):
        train(_args(hf_dir, tmp_path / "y", "model.memory_layers=[1,9]"))
    with pytest.raises(ValueError, match="model.preset='tiny-dense' names another"):
        _args(hf_dir, tmp_path / "z", "model.preset=tiny-dense")
    with pytest.raises(ValueError, match=r"own tokenizer.*data.bios.tokenizer.*'word'"):
        train(_args(hf_dir, tmp_path / "w", "data.bios.tokenizer=word"))
    with pytest.raises(ValueError, match="model.dim=32, but the pretrained model"):
        train(_args(hf_dir, tmp_path / "v", "model.dim=32"))
    rc = cli_main(["train", f"model.hf={tmp_path}", f"run_dir={tmp_path / 'u'}"])
    assert rc == 1 and "not a pinned model" in capsys.readouterr().err


def test_missing_transformers_names_the_extra(hf_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now raises
    with pytest.raises(ImportError, match=r"pip install 'memlayers\[hf\]'"):
        train(_args(hf_dir, tmp_path / "x"))


def test_qwen2_is_refused():
    """Unmodified: Qwen2's config records no attention_bias (its q/k/v projections have
    biases all the same), so the model type refuses it, naming hf.add_memory."""
    cfg = transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    with pytest.raises(ValueError, match="model_type 'qwen2'.*memlayers.hf.add_memory"):
        retrofit.architecture_from_transformers(cfg)


def test_llama_biases_are_refused():
    cfg = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=2, attention_bias=True
    )
    with pytest.raises(ValueError, match="attention_bias.*no counterpart"):
        retrofit.architecture_from_transformers(cfg)


def test_export_gives_a_transformers_model_with_the_run_logits(hf_run, tmp_path):
    """A parallel-memory run exports to add_memory(mode="parallel"): the same logits."""
    from memlayers.export import export_run
    from memlayers.hf import load_pretrained_with_memory

    run, _ = hf_run
    out = export_run(run, tmp_path / "hf")
    model = load_pretrained_with_memory(out).eval()
    assert model.config.memlayers["mode"] == "parallel"
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = load_run(run, "cpu").model(ids)
        torch.testing.assert_close(model(ids).logits, expected, atol=2e-5, rtol=1e-5)
