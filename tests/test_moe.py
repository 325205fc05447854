"""MoE: expert-choice routing in training (capacity, balance), top-1 at inference."""

import math

import pytest
import torch
import torch.nn.functional as F

from memlayers.moe import MoE, MoEConfig


def make(n_experts=4, cf=1.0, dim=16, hidden=24, seed=0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(dim, hidden, MoEConfig(n_experts=n_experts, capacity_factor=cf))
    moe.init_weights(0.2, 0.2)  # large enough that routing is not a near-tie
    return moe


def expert(moe: MoE, e: int, h: torch.Tensor) -> torch.Tensor:
    return (F.silu(h @ moe.w1[e]) * (h @ moe.w3[e])) @ moe.w2[e]


@pytest.mark.parametrize("n_tokens, n_experts, cf", [(24, 4, 1.0), (25, 4, 1.0), (16, 4, 2.0)])
def test_expert_choice_capacity_and_balance(n_tokens, n_experts, cf):
    moe = make(n_experts, cf)
    x = torch.randn(n_tokens, 16)
    _, idx = moe.expert_choice(x)
    capacity = math.ceil(cf * n_tokens / n_experts)
    assert moe.capacity(n_tokens) == capacity
    assert idx.shape == (n_experts, capacity)  # every expert used, exactly at capacity
    for e in range(n_experts):
        assert idx[e].unique().numel() == capacity  # no token twice in one expert
    if cf == 1.0 and n_tokens % n_experts == 0:
        assert idx.numel() == n_tokens


def test_expert_choice_picks_each_experts_top_tokens_and_matches_naive():
    moe = make()
    x = torch.randn(2, 6, 16)
    out, idx = moe.expert_choice(x)
    h = x.reshape(-1, 16)
    probs = moe.router(h).softmax(-1)  # [N, E]
    ref = torch.zeros_like(h)
    for e in range(4):
        chosen = probs[:, e].argsort(descending=True)[: moe.capacity(12)]
        assert set(chosen.tolist()) == set(idx[e].tolist())
        for t in chosen.tolist():
            ref[t] += probs[t, e] * expert(moe, e, h[t : t + 1])[0]
    torch.testing.assert_close(out, ref.view_as(x))


def test_top1_routing_matches_naive():
    moe = make()
    x = torch.randn(20, 16)
    out, chosen = moe.top1(x)
    probs = moe.router(x).softmax(-1)
    assert torch.equal(chosen, probs.argmax(-1))
    ref = torch.stack([probs[t, e] * expert(moe, e, x[t : t + 1])[0] for t, e in enumerate(chosen)])
    torch.testing.assert_close(out, ref)


def test_top1_is_per_token():
    moe = make()
    x = torch.randn(10, 16)
    whole, _ = moe.top1(x)
    alone = torch.cat([moe.top1(x[i : i + 1])[0] for i in range(10)])
    torch.testing.assert_close(whole, alone)


def test_forward_routes_by_mode():
    moe = make()
    x = torch.randn(12, 16)
    moe.train()
    torch.testing.assert_close(moe(x), moe.expert_choice(x)[0])
    moe.eval()
    torch.testing.assert_close(moe(x), moe.top1(x)[0])


def test_gradients_reach_every_expert():
    moe = make()
    moe(torch.randn(32, 16)).pow(2).sum().backward()
    for name in ("w1", "w2", "w3"):
        g = getattr(moe, name).grad
        assert all(g[e].abs().sum() > 0 for e in range(4)), name
    assert moe.router.weight.grad.abs().sum() > 0


def test_bad_config():
    with pytest.raises(ValueError, match="n_experts"):
        MoEConfig(n_experts=0).validate()
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEConfig(capacity_factor=0.0).validate()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(capacity_factor=math.inf), r"capacity_factor=inf"),  # passed, then overflowed
        (dict(capacity_factor=math.nan), r"capacity_factor=nan"),
        (dict(capacity_factor=True), r"capacity_factor=True"),
        (dict(hidden_dim=2.5), r"hidden_dim must be a positive int, got hidden_dim=2.5"),
        (dict(hidden_dim=0), r"hidden_dim=0"),
        (dict(n_experts=2.0), r"n_experts=2.0"),
    ],
)
def test_bad_config_names_the_field_and_value(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kw).validate()
    from memlayers.model import ModelConfig

    with pytest.raises(ValueError, match=match):  # through the model's config too
        ModelConfig(dim=8, n_layers=1, n_heads=2, ffn="moe", moe=MoEConfig(**kw))


@pytest.mark.parametrize("training", [True, False], ids=["expert-choice", "top-1"])
@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16)])
def test_no_tokens_give_zeros_of_the_input_shape(training, shape):
    # Was an AttributeError (top-1) and a top-k error (expert choice).
    moe = make().train(training)
    out = moe(torch.randn(shape))
    assert out.shape == shape
    with pytest.raises(ValueError, match=r"dim=16"):
        moe(torch.randn(2, 15))
