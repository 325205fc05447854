"""PEER against a naive reference that scores every one of the n_keys² experts."""

import pytest
import torch
import torch.nn.functional as F

from memlayers.peer import PEER, PEERConfig


def naive_peer(layer: PEER, x: torch.Tensor) -> torch.Tensor:
    """Materialise all product keys, take the top-k per head, loop over the experts."""
    cfg, n, half = layer.config, layer.config.n_keys, layer.k_dim // 2
    rms = lambda t: t / (t.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        q = layer.router.query(x[t]).view(cfg.heads, 2, half)  # [H, 2, half]
        keys = layer.router.keys
        if cfg.qk_norm:
            gain = layer.router.gain.view(cfg.heads, 2, half)
            q, keys = rms(q) * gain * half**-0.5, rms(keys)
        for h in range(cfg.heads):
            # full key of expert i1 * n + i2 = (K1[i1], K2[i2])
            full = torch.cat(
                [keys[h, 0].repeat_interleave(n, 0), keys[h, 1].repeat(n, 1)], dim=1
            )  # [n*n, k_dim]
            scores = full @ q[h].reshape(-1)  # [n*n]
            top, idx = scores.topk(cfg.topk)
            g = top.softmax(-1)
            for gi, i in zip(g, idx.tolist(), strict=True):
                out[t] += gi * F.gelu(layer.down.weight[i] @ x[t]) * layer.up.weight[i]
    return out


@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk-norm", "no-norm"])
def test_matches_naive_reference_output_and_gradients(qk_norm):
    torch.manual_seed(0)
    layer = PEER(12, PEERConfig(n_keys=5, heads=2, topk=3, k_dim=8, qk_norm=qk_norm, impl="torch"))
    layer.init_weights(0.3, 0.3)
    if qk_norm:  # a gain away from its initial ones, so it is exercised
        torch.nn.init.uniform_(layer.router.gain, 0.5, 1.5)
    x = torch.randn(6, 12, requires_grad=True)
    out = layer(x)
    ref = naive_peer(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *layer.parameters()], grad_out)
    ref_grads = torch.autograd.grad(ref, [x, *layer.parameters()], grad_out)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


def test_shapes_and_leading_dims():
    layer = PEER(16, PEERConfig(n_keys=4, heads=2, topk=2))
    layer.init_weights(0.02, 0.02)
    x = torch.randn(2, 3, 16)
    assert layer(x).shape == (2, 3, 16)
    assert layer.config.n_experts == 16 and layer.k_dim == 8


def test_bad_config():
    with pytest.raises(ValueError, match="topk"):
        PEERConfig(n_keys=4, topk=5).validate()
    with pytest.raises(ValueError, match="k_dim"):
        PEERConfig(k_dim=7).resolved_k_dim(16)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(k_dim=4.0), r"k_dim must be a positive int, got k_dim=4.0"),  # was a TypeError
        (dict(k_dim=0), r"k_dim=0"),
        (dict(k_dim=5), r"k_dim must be even"),
        (dict(heads=2.0), r"heads=2.0"),
    ],
)
def test_bad_config_names_the_field_and_value(kw, match):
    cfg = {**dict(n_keys=8, heads=2, topk=2), **kw}
    with pytest.raises(ValueError, match=match):
        PEERConfig(**cfg).validate()
    with pytest.raises(ValueError, match=match):
        PEER(16, PEERConfig(**cfg))


@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16)])
def test_no_tokens_give_zeros_of_the_input_shape(shape):
    # Was "cannot reshape tensor of 0 elements".
    layer = PEER(16, PEERConfig(n_keys=8, heads=2, topk=2, impl="torch"))
    layer.init_weights(0.02, 0.02)
    out = layer(torch.randn(shape))
    assert out.shape == shape
    with pytest.raises(ValueError, match=r"dim=16"):
        layer(torch.randn(2, 15))
