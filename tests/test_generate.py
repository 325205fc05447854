"""Generation with a KV cache gives the tokens of rerunning the full sequence."""

import re

import pytest
import torch

from memlayers import MemoryConfig
from memlayers.model import KVCache, ModelConfig, build_model, sample_next
from memlayers.moe import MoEConfig
from memlayers.peer import PEERConfig

V = 48
KINDS = {
    "dense": {},
    "memory+": dict(memory_layers=[0, 2], memory=MemoryConfig(n_keys=8, heads=2, topk=4)),
    "moe": dict(ffn="moe", moe=MoEConfig(n_experts=3)),
    "peer": dict(peer_layers=[1], peer=PEERConfig(n_keys=4, heads=2, topk=2)),
}


def model_of(kind: str):
    cfg = ModelConfig(
        dim=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=V,
        multiple_of=16,
        max_seq_len=40,
        init_std=0.2,
        **KINDS[kind],
    )
    return build_model(cfg, seed=1)


@pytest.mark.parametrize("kind", list(KINDS))
def test_greedy_cache_equals_no_cache(kind):
    model = model_of(kind).train()
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(0))
    cached = model.generate(prompt, 20)
    full = model.generate(prompt, 20, use_cache=False)
    assert cached.shape == (2, 25)
    assert torch.equal(cached, full)
    assert torch.equal(cached[:, :5], prompt)
    assert model.training  # mode restored


def test_only_the_prompt_ids_are_checked(monkeypatch):
    # The id check reads back to the host; sampled ids are in range by construction, so
    # decoding checks the prompt once, not every new token.
    import memlayers.model as model_module

    seen = []
    check = model_module.check_token_ids
    monkeypatch.setattr(
        model_module, "check_token_ids", lambda t, v: (seen.append(t.shape), check(t, v))
    )
    model = model_of("memory+")
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(0))
    for use_cache in (True, False):
        seen.clear()
        model.generate(prompt, 6, use_cache=use_cache)
        assert seen == [(2, 5)]
    with pytest.raises(ValueError, match="48"):
        model.generate(torch.full((1, 3), V), 2)  # a bad prompt id is still caught


@pytest.mark.parametrize("kind", ["dense", "memory+"])
def test_sampling_cache_equals_no_cache(kind):
    model = model_of(kind)
    prompt = torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(0))
    a = model.generate(
        prompt, 16, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5)
    )
    b = model.generate(
        prompt,
        16,
        temperature=1.0,
        top_p=0.9,
        use_cache=False,
        generator=torch.Generator().manual_seed(5),
    )
    assert torch.equal(a, b)


def test_incremental_and_chunked_logits_match_full_sequence():
    model = model_of("memory+").eval()
    x = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(3, 12)
        parts = [model(x[:, :5], cache), model(x[:, 5:9], cache)]  # chunk after a prefix
        parts += [model(x[:, i : i + 1], cache) for i in range(9, 12)]  # one at a time
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == 12


def test_eos_stops_and_pads():
    model = model_of("dense")
    prompt = torch.randint(0, V, (2, 3))
    out = model.generate(prompt, 10)
    eos = int(out[0, 4])  # the second generated token of row 0 becomes "eos"
    stopped = model.generate(prompt, 10, eos_id=eos)
    first = (stopped[0, 3:] == eos).nonzero()[0].item()
    assert (stopped[0, 3 + first :] == eos).all()


def test_sample_next_top_p_and_errors():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_p=0.9, generator=g)) for _ in range(50)}
    assert draws == {1, 3}  # the nucleus holds the two likely tokens only
    assert int(sample_next(logits)) == 1
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be finite and >= 0.*got nan"):
        sample_next(logits, float("nan"))
    model = model_of("dense")
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), 20)


@pytest.mark.parametrize(
    "flag, value, kwarg, message",
    [
        ("--max-new-tokens", "-1", "max_new_tokens", "max_new_tokens must be >= 0, got -1"),
        ("-n", "0", None, "n .* must be >= 1, got 0"),
        ("--temperature", "nan", "temperature", "temperature .* got nan"),
        ("--temperature", "-0.5", "temperature", "temperature .* got -0.5"),
        ("--top-p", "1.5", "top_p", "top_p .* got 1.5"),
    ],
)
def test_bad_generate_settings_are_errors_naming_the_value(
    tmp_path, capsys, flag, value, kwarg, message
):
    from memlayers.cli import main as cli_main

    # checked before the run is loaded: no run is needed to see the error
    assert cli_main(["generate", str(tmp_path), "--prompt", "x", flag, value]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    if kwarg is not None:  # the library's generate checks the same
        kw = {"max_new_tokens": 2, kwarg: int(value) if kwarg == "max_new_tokens" else float(value)}
        with pytest.raises(ValueError, match=message):
            model_of("dense").generate(torch.zeros(1, 3, dtype=torch.long), **kw)
