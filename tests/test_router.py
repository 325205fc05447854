"""ProductKeyRouter: old state dicts (keys on the layer itself) still load, and the
optimizer leaves every router's keys and gain undecayed."""

import torch
import torch.nn as nn
from safetensors.torch import load_model, save_file

from memlayers import MemoryConfig, ProductKeyMemory
from memlayers.optim import _undecayed
from memlayers.peer import PEER, PEERConfig

# New name -> the name the parameter had before router.py.
OLD = {
    "router.query.weight": "query.weight",
    "router.query.bias": "query.bias",
    "router.keys": "keys",
    "router.gain": "query_norm",
}


def _old_names(state: dict, prefix: str = "", drop: tuple[str, ...] = ()) -> dict:
    out = {}
    for k, v in state.items():
        name = k[len(prefix) :]
        if name in drop:
            continue
        out[prefix + OLD.get(name, name)] = v.clone()
    return out


def test_memory_loads_old_names_strict():
    torch.manual_seed(0)
    cfg = MemoryConfig(n_keys=6, heads=2, topk=3, k_dim=4, query_bias=True, impl="torch")
    src = ProductKeyMemory(8, cfg)
    nn.init.normal_(src.router.gain)
    nn.init.normal_(src.router.query.bias)
    old = _old_names(src.state_dict())
    assert "keys" in old and "query_norm" in old and "router.keys" not in old
    dst = ProductKeyMemory(8, cfg)
    dst.load_state_dict(old, strict=True)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_nested_old_peer_safetensors_gets_unit_gain(tmp_path):
    """A PEER saved before it had a gain, inside a parent module, through safetensors."""
    torch.manual_seed(0)
    src = nn.Sequential(PEER(12, PEERConfig(n_keys=5, heads=2, topk=3, k_dim=8, impl="torch")))
    src[0].init_weights(0.3, 0.3)
    save_file(_old_names(src.state_dict(), "0.", drop=("router.gain",)), tmp_path / "m.st")
    dst = nn.Sequential(PEER(12, PEERConfig(n_keys=5, heads=2, topk=3, k_dim=8, impl="torch")))
    load_model(dst, str(tmp_path / "m.st"), strict=True)
    assert torch.equal(dst[0].router.gain, torch.ones_like(dst[0].router.gain))
    x = torch.randn(4, 12)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_new_names_load_unchanged():
    cfg = MemoryConfig(n_keys=6, heads=2, topk=3, k_dim=4)
    src, dst = ProductKeyMemory(8, cfg), ProductKeyMemory(8, cfg)
    dst.load_state_dict(src.state_dict(), strict=True)
    for (n, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_undecayed_is_every_routers_keys_and_gain():
    model = nn.ModuleList(
        [
            ProductKeyMemory(8, MemoryConfig(n_keys=6, heads=2, topk=3, k_dim=4)),
            PEER(12, PEERConfig(n_keys=5, heads=2, topk=3, k_dim=8)),
            PEER(12, PEERConfig(n_keys=5, heads=2, topk=3, k_dim=8, qk_norm=False)),
        ]
    )
    want = {id(model[0].router.keys), id(model[0].router.gain), id(model[1].router.keys)}
    want |= {id(model[1].router.gain), id(model[2].router.keys)}
    assert model[2].router.gain is None
    assert _undecayed(model) == want
