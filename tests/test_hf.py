"""memlayers.hf: Memory+ in tiny random Hugging Face models (Llama, Qwen2; no download).

Checked against the untouched model: parallel mode leaves the logits unchanged at step 0,
save/load round trips give the same logits, cached greedy generation equals uncached,
torch.compile equals eager.
"""

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from memlayers import MemoryConfig, SparseValueAdam  # noqa: E402
from memlayers.hf import (  # noqa: E402
    MemoryMLP,
    add_memory,
    load_pretrained_with_memory,
    memory_parameters,
)

VOCAB = 128


def tiny_model(arch: str = "llama", hidden: int = 64, layers: int = 3):
    torch.manual_seed(0)
    common = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    return model.eval()


def small_config() -> MemoryConfig:
    return MemoryConfig(n_keys=16, heads=2, topk=4, k_dim=32, v_dim=64)


def wake_memory_(model) -> None:
    """Make the memory branch contribute: perturb every parameter (silenced W2 included)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_parallel_leaves_logits_unchanged(arch):
    model = tiny_model(arch)
    ids = tokens()
    with torch.no_grad():
        before = model(ids).logits
        add_memory(model, [0, 2], small_config())
        after = model(ids).logits
    # The memory adds an exact 0 (zero W2), so this is equal in fp32 to the last bit;
    # the tolerance only guards against a reordered sum in a future transformers.
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    assert isinstance(model.model.layers[0].mlp, MemoryMLP)
    assert not isinstance(model.model.layers[1].mlp, MemoryMLP)


def test_shared_table_and_default_config():
    model = add_memory(tiny_model(), [0, 1, 2])
    table = model.model.memory_values
    mems = [model.model.layers[i].mlp.memory for i in range(3)]
    assert all(m.values is table for m in mems)
    assert (table.n_rows, table.v_dim) == (256**2, 64)  # default n_keys, v_dim = hidden
    assert mems[0].k_dim == 32 and mems[0].config.swilu and mems[0].config.qk_norm
    names = [n for n, _ in model.named_parameters() if "memory_values" in n]
    assert names == ["model.memory_values.weight"]  # registered once, not per layer


def test_replace_drops_mlp_and_trains():
    model = add_memory(tiny_model(), [1], small_config(), mode="replace")
    block = model.model.layers[1].mlp
    assert block.mlp is None
    assert all("layers.1.mlp.gate_proj" not in n for n, _ in model.named_parameters())
    loss = model(tokens(), labels=tokens()).loss
    loss.backward()
    # Zero W2 blocks gradients to what is behind it at step 0, but not W2's own.
    assert block.memory.w2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["parallel", "replace"])
def test_save_load_round_trip(tmp_path, mode):
    model = add_memory(tiny_model(), [0, 2], small_config(), mode=mode)
    wake_memory_(model)
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)

    loaded = load_pretrained_with_memory(tmp_path).eval()
    assert loaded.config.memlayers["mode"] == mode
    assert loaded.config.architectures == ["LlamaForCausalLM"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=0, rtol=0)
    # The table lives in the model's safetensors, once.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert [k for k in keys if "memory_values" in k] == ["model.memory_values.weight"]


def test_load_without_memory_settings_fails(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no 'memlayers' entry"):
        load_pretrained_with_memory(tmp_path)


@pytest.mark.parametrize("mode", ["parallel", "replace"])
def test_generate_with_kv_cache(mode):
    model = add_memory(tiny_model(), [0, 2], small_config(), mode=mode)
    wake_memory_(model)
    prompt = tokens(1, 5)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, **kw)
    uncached = model.generate(prompt, use_cache=False, **kw)
    assert cached.shape == (1, 13)
    assert torch.equal(cached, uncached)


def test_torch_compile_forward():
    model = add_memory(tiny_model(layers=2), [1], small_config())
    wake_memory_(model)
    ids = tokens()
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model)(ids).logits
    # fp32; Inductor reorders sums (CPU C++ kernels): a few ulps of the logits.
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_memory_parameters_partition():
    model = add_memory(tiny_model(), [0, 2], small_config())
    groups = memory_parameters(model)
    assert groups["values"] == [model.model.memory_values.weight]
    everything = [p for g in groups.values() for p in g]
    assert len(everything) == len({id(p) for p in everything})
    assert {id(p) for p in everything} == {id(p) for p in model.parameters()}
    mem = model.model.layers[0].mlp.memory
    assert any(p is mem.router.keys for p in groups["memory"])
    assert any(p is model.model.embed_tokens.weight for p in groups["base"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param(dict(layers=[3]), r"out of range: \[3\].*3 decoder layers", id="out-of-range"),
        pytest.param(dict(layers=[-1]), r"out of range: \[-1\]", id="negative"),
        pytest.param(dict(layers=[0, 2, 0]), r"duplicate layers: \[0\]", id="duplicate"),
        pytest.param(dict(layers=[]), "at least one", id="empty"),
        pytest.param(dict(layers=1), "list of layer indices", id="int-not-list"),
        pytest.param(dict(layers=[0], mode="serial"), "mode must be one of", id="mode"),
        pytest.param(dict(layers=[0], config={"n_keys": 16}), "MemoryConfig", id="config-type"),
    ],
)
def test_invalid_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        add_memory(tiny_model(), **kwargs)


def test_config_that_does_not_fit():
    # hidden 6: the default k_dim = 3 cannot split into two half keys.
    model = tiny_model(hidden=8)
    model.config.hidden_size = 6
    with pytest.raises(ValueError, match="does not fit hidden_size=6.*k_dim"):
        add_memory(model, [0])


def test_not_a_decoder_model_and_twice():
    with pytest.raises(ValueError, match=r"model.model.layers\[i\].mlp; Linear"):
        add_memory(torch.nn.Linear(4, 4), [0])
    model = add_memory(tiny_model(), [0], small_config())
    with pytest.raises(ValueError, match="already has memory"):
        add_memory(model, [1], small_config())


def test_core_does_not_import_transformers():
    code = "import sys, memlayers; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_transformers_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now raises
    with pytest.raises(ImportError, match=r"pip install 'memlayers\[hf\]'"):
        load_pretrained_with_memory(tmp_path)


def test_train_memory_only_with_sparse_values():
    """A trainer's use of memory_parameters: base frozen, AdamW on the memory layers,
    SparseValueAdam on the row-sparse table; the loss falls, the base stays put."""
    model = add_memory(tiny_model(), [0, 2], small_config()).train()
    groups = memory_parameters(model)
    for p in groups["base"]:
        p.requires_grad_(False)
    base_before = [p.clone() for p in groups["base"]]
    model.model.memory_values.sparse_grad = True
    opt = torch.optim.AdamW(groups["memory"], lr=1e-2)
    value_opt = SparseValueAdam(groups["values"], lr=1e-2)
    ids = tokens(4, 16)
    losses = []
    for _ in range(10):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        value_opt.zero_grad()
        loss.backward()
        opt.step()
        value_opt.step()
        losses.append(loss.item())
    assert model.model.memory_values.weight.grad.is_sparse
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(torch.equal(a, b) for a, b in zip(base_before, groups["base"], strict=True))


def test_bf16_model():
    """The memory takes the model's dtype when added, and runs in it."""
    model = add_memory(tiny_model().to(torch.bfloat16), [0], small_config())
    assert model.model.memory_values.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.memory.w1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(tokens()).logits).all()


def test_a_ggufs_tokenizer_cache_key_follows_the_file_not_only_its_path(tmp_path):
    # Another model's GGUF copied over the same path must not reuse the first's tokenizer.
    import os

    from memlayers.hf import _digest

    f = tmp_path / "model.gguf"
    f.write_bytes(b"first model")
    key = _digest(f)
    assert _digest(f) == key  # the same file: the same cached tokenizer
    f.write_bytes(b"another, longer model")
    second = _digest(f)
    assert second != key
    st = f.stat()
    f.write_bytes(b"another, longer modem")  # same size: the modification time tells
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert _digest(f) != second
