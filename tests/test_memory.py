"""ProductKeyMemory, MemoryValues and MemoryConfig on the CPU."""

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from memlayers import MemoryConfig, MemoryValues, ProductKeyMemory

SMALL = dict(n_keys=6, heads=2, topk=3, k_dim=4, v_dim=6)


@pytest.mark.parametrize(
    "swilu,qk_norm,query_bias",
    [(True, True, False), (False, False, True), (True, False, True), (False, True, False)],
    ids=["memory+", "plain", "swilu-only", "qknorm-only"],
)
def test_gradcheck_whole_layer_float64(swilu, qk_norm, query_bias):
    torch.manual_seed(0)
    cfg = MemoryConfig(**SMALL, swilu=swilu, qk_norm=qk_norm, query_bias=query_bias, impl="torch")
    layer = ProductKeyMemory(8, cfg).double()
    if query_bias:
        nn.init.normal_(layer.router.query.bias)  # non-zero, so its gradient is exercised
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    # Every parameter and the input; top-k selection is locally constant, so finite
    # differences see a smooth function almost surely on random inputs.
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


def test_shapes_and_every_parameter_gets_a_gradient():
    layer = ProductKeyMemory(16, MemoryConfig(n_keys=8, heads=2, topk=4))
    x = torch.randn(3, 5, 16)
    y = layer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert layer.k_dim == 8 and layer.v_dim == 16  # k_dim = dim/2, v_dim = dim


def test_three_layers_share_one_table():
    torch.manual_seed(1)
    cfg = MemoryConfig(n_keys=8, heads=2, topk=4, k_dim=8, v_dim=12, impl="torch")
    values = MemoryValues(cfg.n_rows, 12)

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.values = values  # the owner registers the table once
            self.layers = nn.ModuleList(ProductKeyMemory(16, cfg, values=values) for _ in range(3))

        def forward(self, x):
            return sum(layer(x) for layer in self.layers)

    model = Stack()
    tables = [p for p in model.parameters() if p.shape == values.weight.shape]
    assert len(tables) == 1 and tables[0] is values.weight
    assert sum(k.endswith("values.weight") for k in model.state_dict()) == 1
    assert all(layer.values is values for layer in model.layers)

    x = torch.randn(4, 16)
    model(x).sum().backward()
    total = values.weight.grad.clone()
    per_layer = []
    for layer in model.layers:
        values.weight.grad = None
        layer(x).sum().backward()
        assert values.weight.grad.abs().sum() > 0  # each layer reads the table
        per_layer.append(values.weight.grad.clone())
    torch.testing.assert_close(total, sum(per_layer))


def test_meta_build_then_init_weights_fills_everything():
    cfg = MemoryConfig(n_keys=8, heads=2, topk=4, query_bias=True)
    with torch.device("meta"):
        layer = ProductKeyMemory(16, cfg)
    assert all(p.is_meta for p in layer.parameters())
    layer.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*layer.parameters(), *layer.buffers()]:
            t.fill_(float("nan"))
    layer.init_weights()
    for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
        assert torch.isfinite(t).all(), f"{name} left uninitialised"
    bound = layer.k_dim**-0.5
    assert layer.router.keys.abs().max() <= bound and layer.router.keys.std() > bound / 4
    torch.testing.assert_close(
        layer.values.weight.std().item(), layer.v_dim**-0.5, rtol=0.1, atol=0
    )
    assert torch.equal(layer.router.query.bias, torch.zeros_like(layer.router.query.bias))


def test_sparse_grad_table():
    cfg = MemoryConfig(n_keys=16, heads=2, topk=4)
    values = MemoryValues(cfg.n_rows, 8, sparse_grad=True)
    layer = ProductKeyMemory(8, cfg, values=values)
    layer(torch.randn(3, 8)).sum().backward()
    assert values.weight.grad.is_sparse
    assert values.weight.grad._nnz() <= 3 * 2 * 4


def test_bf16_table():
    cfg = MemoryConfig(n_keys=8, heads=2, topk=4)
    values = MemoryValues(cfg.n_rows, 16, dtype=torch.bfloat16)
    layer = ProductKeyMemory(16, cfg, values=values)
    y = layer(torch.randn(2, 16))
    y.sum().backward()
    assert values.weight.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k_dim=7), "k_dim=7"),
        (dict(topk=9, n_keys=8), "topk=9 > n_keys=8"),
        (dict(n_keys=0), "n_keys=0"),
        (dict(heads=-1), "heads=-1"),
        (dict(topk=True), "topk=True"),
        (dict(n_keys=4.0), "n_keys=4.0"),
        (dict(v_dim=0), "v_dim=0"),
        (dict(impl="cuda"), "impl='cuda'"),
        (dict(query_dropout=1.0), "query_dropout=1.0"),
        (dict(input_dropout=-0.1), "input_dropout=-0.1"),
        (dict(norm_eps=0.0), "norm_eps=0.0"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryConfig(**{"n_keys": 8, "topk": 4, **kwargs})


def test_layer_errors():
    cfg = MemoryConfig(n_keys=8, heads=2, topk=4)
    with pytest.raises(ValueError, match="k_dim=1"):
        ProductKeyMemory(3, cfg)  # k_dim = dim // 2 = 1 is odd
    with pytest.raises(ValueError, match="dim=0"):
        ProductKeyMemory(0, cfg)
    with pytest.raises(ValueError, match="n_keys\\*\\*2=64"):
        ProductKeyMemory(16, cfg, values=MemoryValues(63, 16))
    with pytest.raises(ValueError, match="v_dim=16"):
        ProductKeyMemory(16, cfg, values=MemoryValues(64, 8))
    with pytest.raises(ValueError, match="MemoryValues"):
        ProductKeyMemory(16, cfg, values=nn.Embedding(64, 16))
    layer = ProductKeyMemory(16, cfg)
    with pytest.raises(ValueError, match="dim=16"):
        layer(torch.randn(2, 3, 15))
    with pytest.raises(ValueError, match="n_rows=0"):
        MemoryValues(0, 4)
    with pytest.raises(ValueError, match="floating point"):
        MemoryValues(4, 4, dtype=torch.int32)


def test_config_mutation_is_revalidated():
    cfg = MemoryConfig(n_keys=8, topk=4)
    cfg.topk = 100
    with pytest.raises(ValueError, match="topk=100"):
        ProductKeyMemory(16, cfg)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bf16_autocast_forward_backward(impl):
    # The default on GPU is bf16 autocast: scores stay fp32 (top-k and softmax are not
    # quantised), the output matches the fp32 layer to bf16 precision, gradients flow.
    torch.manual_seed(3)
    # Triton kernels need CUDA tensors where a GPU is present (the interpreter runs on CPU).
    dev = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    layer = ProductKeyMemory(16, MemoryConfig(n_keys=8, heads=2, topk=4, impl=impl)).to(dev)
    x = torch.randn(3, 5, 16).to(dev)
    ref = layer(x)
    with torch.autocast(dev, dtype=torch.bfloat16):
        idx, w = layer.lookup(x)
        y = layer(x)
    assert w.dtype == torch.float32
    # The query projection runs in bf16 under autocast, so a near-tie may flip; the rest
    # of the rows are those chosen in fp32.
    assert (idx == layer.lookup(x)[0]).float().mean() > 0.9
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)
    y.float().square().mean().backward()
    assert all(p.grad is not None for p in layer.parameters())
