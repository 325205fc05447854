"""ProductKeyMemory, MemoryValues and MemoryConfig on the CPU."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from memlayers import MemoryConfig, MemoryValues, ProductKeyMemory
from memlayers.model import ModelConfig, build_model
from memlayers.router import BALANCE_TOKENS, balance_loss

SMALL = dict(n_keys=6, heads=2, topk=3, k_dim=4, v_dim=6)


@pytest.mark.parametrize(
    "swilu,qk_norm,query_bias,batch_norm",
    [
        (True, True, False, False),
        (False, False, True, False),
        (True, False, True, False),
        (False, True, False, False),
        (True, True, False, True),  # gradients through the batch mean and variance too
    ],
    ids=["memory+", "plain", "swilu-only", "qknorm-only", "memory+-query-batch-norm"],
)
def test_gradcheck_whole_layer_float64(swilu, qk_norm, query_bias, batch_norm):
    torch.manual_seed(0)
    cfg = MemoryConfig(
        **SMALL, swilu=swilu, qk_norm=qk_norm, query_bias=query_bias, impl="torch",
        query_batch_norm=batch_norm,
    )  # fmt: skip
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


def test_value_dtype_bf16_builds_bf16_tables_that_an_fp32_model_reads():
    # Shared (Memory+) and owned tables follow model.memory.value_dtype, meta build too.
    mem = dict(n_keys=8, heads=2, topk=4, value_dtype="bf16")
    base = dict(dim=16, n_layers=3, n_heads=2, vocab_size=32, multiple_of=16)
    shared = build_model(ModelConfig(**base, memory_layers=[0, 2], memory=MemoryConfig(**mem)))
    assert shared.memory_values.weight.dtype == torch.bfloat16
    assert shared.memory_values.weight.std().item() == pytest.approx(16**-0.5, rel=0.2)
    owned = build_model(
        ModelConfig(**base, memory_layers=[1], memory=MemoryConfig(**mem, share_values=False))
    )
    assert owned.layers[1].ffn.values.weight.dtype == torch.bfloat16
    assert build_model(ModelConfig(**base, memory_layers=[1])).layers[1].ffn.values.dtype == (
        torch.float32
    )
    # Without swilu the rows meet a Linear: in fp32 they are widened to the input's dtype;
    # under autocast the bf16 rows go on as they are.
    layer = ProductKeyMemory(16, MemoryConfig(**mem, swilu=False, impl="torch"))
    seen = []
    layer.out_proj.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    x = torch.randn(3, 16)
    y = layer(x)
    y.square().sum().backward()
    assert y.dtype == torch.float32 and seen == [torch.float32]
    assert layer.values.weight.grad.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert seen[-1] == torch.bfloat16


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
        (dict(query_batch_norm="yes"), "query_batch_norm must be true or false, got 'yes'"),
        (dict(query_batch_norm_momentum=0.0), r"momentum must be in \(0, 1\], got 0.0"),
        (dict(query_batch_norm_momentum=1.5), "got 1.5"),
        (dict(balance_loss=-0.1), "balance_loss=-0.1"),
        (dict(balance_loss=float("inf")), "balance_loss=inf"),
        (dict(balance_loss=True), "balance_loss=True"),
        (dict(value_dtype="fp16"), "value_dtype must be one of .*got value_dtype='fp16'"),
        (dict(search_precision="fp16"), "search_precision must be one of .*'fp16'"),
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


# ---- against a collapsing memory: query_batch_norm, balance_loss (docs/usage.md) ----------

BN = dict(SMALL, impl="torch", query_batch_norm=True)


def _reference_lookup(layer, x, mean, var):
    """The memory's rows and weights written out: projection → standardise with ``mean``,
    ``var`` ``[H, k_dim]`` → qk-norm → every product key scored → top-k → softmax."""
    r, H, d, half = layer.router, layer.config.heads, layer.k_dim, layer.k_dim // 2
    q = (x.reshape(-1, layer.dim) @ r.query.weight.T).view(-1, H, d)  # [N, H, d]
    q = (q - mean) / torch.sqrt(var + layer.config.norm_eps)
    q = q.view(-1, H, 2, half)
    q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + layer.config.norm_eps)
    q = q.view(-1, H, d) * r.gain * half**-0.5
    k = r.keys / torch.sqrt(r.keys.pow(2).mean(-1, keepdim=True) + layer.config.norm_eps)
    s1 = torch.einsum("nhd,hkd->nhk", q[..., :half], k[:, 0])  # [N, H, n_keys]
    s2 = torch.einsum("nhd,hkd->nhk", q[..., half:], k[:, 1])
    full = (s1[..., :, None] + s2[..., None, :]).flatten(-2)  # [N, H, n_keys**2]
    scores, idx = full.topk(layer.config.topk, dim=-1)
    n = idx.shape[0]
    return idx.view(n, -1), scores.softmax(-1).view(n, -1)


def test_query_batch_norm_matches_a_written_out_reference_in_train_and_eval():
    torch.manual_seed(0)
    layer = ProductKeyMemory(8, MemoryConfig(**BN)).double()
    x = torch.randn(5, 7, 8, dtype=torch.float64) + 0.5  # a shared offset, as early queries
    q = (x.reshape(-1, 8) @ layer.router.query.weight.T).view(-1, 2, 4)  # [N, H, k_dim]
    idx, w = layer.lookup(x)  # training: the batch's statistics
    ref_idx, ref_w = _reference_lookup(layer, x, q.mean(0), q.var(0, unbiased=False))
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w)
    # BatchNorm's rule from (0, 1): running = 0.9 · init + 0.1 · batch, unbiased variance.
    mean, var = 0.1 * q.mean(0), 0.9 + 0.1 * q.var(0, unbiased=True)
    torch.testing.assert_close(layer.router.query_mean, mean.detach())
    torch.testing.assert_close(layer.router.query_var, var.detach())
    layer.eval()  # eval: the running statistics, which stay put
    for _ in range(2):
        idx, w = layer.lookup(x[:1, :1])  # one token: its query depends on it alone
        ref_idx, ref_w = _reference_lookup(layer, x[:1, :1], mean, var)
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(layer.router.query_mean, mean.detach())


def test_query_batch_norm_running_statistics_follow_the_batches():
    torch.manual_seed(1)
    layer = ProductKeyMemory(8, MemoryConfig(**BN, query_batch_norm_momentum=0.5))
    mean, var = torch.zeros(2, 4), torch.ones(2, 4)
    for step in range(3):
        x = torch.randn(6, 8) * (step + 1) + step
        q = layer.router.query(x).detach().view(-1, 2, 4)
        layer(x)
        mean, var = 0.5 * mean + 0.5 * q.mean(0), 0.5 * var + 0.5 * q.var(0)
    torch.testing.assert_close(layer.router.query_mean, mean)
    torch.testing.assert_close(layer.router.query_var, var)
    with pytest.raises(ValueError, match="at least 2 tokens.*got 1"):
        layer(torch.randn(1, 8))
    layer.eval()
    layer(torch.randn(1, 8))  # eval needs no batch


def test_query_batch_norm_state_dict_round_trip_and_meta_init():
    torch.manual_seed(3)
    cfg = MemoryConfig(**BN)
    src = ProductKeyMemory(8, cfg)
    for _ in range(2):
        src(torch.randn(4, 8) + 1)
    state = src.state_dict()
    assert {"router.query_mean", "router.query_var"} <= set(state)
    dst = ProductKeyMemory(8, cfg)
    dst.load_state_dict(state, strict=True)
    src.eval(), dst.eval()
    x = torch.randn(3, 8)
    assert torch.equal(src(x), dst(x))
    with pytest.raises(RuntimeError, match="query_mean"):  # a layer without it: strict load
        ProductKeyMemory(8, MemoryConfig(**SMALL, impl="torch")).load_state_dict(state)
    with torch.device("meta"):
        layer = ProductKeyMemory(8, cfg)
    layer.to_empty(device="cpu")
    layer.init_weights()
    assert torch.equal(layer.router.query_mean, torch.zeros(2, 4))
    assert torch.equal(layer.router.query_var, torch.ones(2, 4))


def test_query_batch_norm_per_layer_statistics_on_a_shared_table():
    torch.manual_seed(4)
    cfg = MemoryConfig(**BN)
    values = MemoryValues(cfg.n_rows, 6)
    a, b = (ProductKeyMemory(8, cfg, values=values) for _ in range(2))
    x = torch.randn(5, 8)
    b(a(x)).sum().backward()
    assert not torch.equal(a.router.query_mean, b.router.query_mean)  # each its own queries
    assert values.weight.grad.abs().sum() > 0


def _balance_reference(q, keys, topk):
    """n_keys · Σ_i f_i P_i per head and half, by loops over them."""
    heads, _, n_keys, half = keys.shape
    total = 0.0
    for h in range(heads):
        for s in range(2):
            scores = q[:, h, s * half : (s + 1) * half] @ keys[h, s].T  # [N, n_keys]
            chosen = torch.zeros(n_keys)
            for row in scores.topk(topk, dim=-1).indices:
                chosen[row] += 1
            f = chosen / chosen.sum()
            total = total + n_keys * (f * scores.softmax(-1).mean(0)).sum()
    return total / (2 * heads)


def test_balance_loss_matches_a_reference_and_punishes_concentration():
    torch.manual_seed(5)
    q, keys = torch.randn(64, 2, 8), torch.randn(2, 2, 16, 4)  # 16 half keys, top-3
    torch.testing.assert_close(balance_loss(q, keys, 3), _balance_reference(q, keys, 3))
    same = q[:1].expand(64, -1, -1)  # every token the same query: the same keys every time
    assert balance_loss(same, keys, 3) > 2 * balance_loss(q, keys, 3)
    big = torch.randn(3 * BALANCE_TOKENS // 2, 2, 8)  # above the cap: every 2nd token
    torch.testing.assert_close(balance_loss(big, keys, 3), _balance_reference(big[::2], keys, 3))


def test_balance_loss_by_the_triton_top_k_is_the_torch_one():
    # kth_half_scores by the search's Triton launches (interpreter on the CPU) finds the
    # same k-th scores as torch.topk: the same loss and the same gradient.
    from memlayers.router import kth_half_scores

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on a CPU
    torch.manual_seed(8)
    q = torch.randn(40, 2, 8, device=device, requires_grad=True)
    keys = torch.randn(2, 2, 16, 4, device=device)
    s = torch.randn(2, 2, 40, 16, device=device)
    torch.testing.assert_close(kth_half_scores(s, 3, "triton"), kth_half_scores(s, 3, "torch"),
                               rtol=0, atol=0)  # fmt: skip
    losses, grads = [], []
    for impl in ("triton", "torch"):
        loss = balance_loss(q, keys, 3, impl)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, q)[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    "impl, n",
    # The capped case on the Triton path only on a GPU (the interpreter takes minutes).
    [("torch", 40), ("torch", 3 * BALANCE_TOKENS // 2), ("triton", 40)]
    + ([("triton", 3 * BALANCE_TOKENS // 2)] if torch.cuda.is_available() else []),
)
def test_balance_loss_counts_the_search_choices(impl, n):
    # Given the search's own half top-k (what the memory layer passes), the loss counts
    # them instead of ranking again: the reference's value and gradient, on the tokens
    # the cap keeps.
    from memlayers.ops.product_keys import product_key_topk

    device = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(10)
    q = torch.randn(n, 2, 8, device=device, requires_grad=True)
    keys = torch.randn(2, 2, 16, 4, device=device)
    _, _, top = product_key_topk(q.detach(), keys, 3, impl=impl, half_top=True)
    assert top.shape == (n, 2, 2, 3) and top.dtype == torch.int32
    loss = balance_loss(q, keys, 3, half_top=top)
    ref = _balance_reference(q.detach().cpu()[:: 1 + (n > BALANCE_TOKENS)], keys.cpu(), 3)
    torch.testing.assert_close(loss.cpu(), ref)
    own = balance_loss(q, keys, 3, impl)  # ranking the scores itself: the same choices
    torch.testing.assert_close(loss, own, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(loss, q)[0], torch.autograd.grad(own, q)[0],
                               rtol=0, atol=0)  # fmt: skip
    with pytest.raises(ValueError, match=rf"half_top must be \[N={n}, heads=2, 2, topk=3\]"):
        balance_loss(q, keys, 3, half_top=top[..., :2])


def test_memory_layer_balance_loss_from_its_search():
    # The layer hands its search's half top-k to the loss: the loss of its own ranking.
    torch.manual_seed(11)
    cfg = MemoryConfig(n_keys=16, heads=2, topk=3, balance_loss=0.5, impl="torch")
    layer = ProductKeyMemory(16, cfg)
    x = torch.randn(2, 20, 16)
    layer(x)
    h = x.reshape(-1, 16)
    q, keys = layer.router.normed_query(h), layer.router.normed_keys()
    torch.testing.assert_close(layer.aux_loss, 0.5 * balance_loss(q, keys, 3), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (autocast)")
def test_balance_loss_under_autocast_scores_as_the_search():
    # Under bf16 autocast on CUDA the half scores are bf16 products with fp32 sums (as the
    # search's): the fp32 loss of the bf16-rounded inputs, its gradient, and compiled.
    torch.manual_seed(9)
    q = torch.randn(300, 2, 16, device="cuda", requires_grad=True)
    keys = torch.randn(2, 2, 64, 8, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        amp = balance_loss(q, keys, 4)
    qr, kr = (t.detach().bfloat16().float().requires_grad_() for t in (q, keys))
    ref = balance_loss(qr, kr, 4)
    assert amp.dtype == torch.float32
    torch.testing.assert_close(amp, ref, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(amp, (q, keys))
    want = torch.autograd.grad(ref, (qr, kr))
    for g, w in zip(got, want, strict=True):  # the backward's products are bf16 too
        torch.testing.assert_close(g, w, rtol=2e-2, atol=1e-2 * w.abs().max().item())

    def fn(q, keys):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return balance_loss(q, keys, 4)

    compiled = torch.compile(fn, fullgraph=True)(q, keys)
    torch.testing.assert_close(compiled, amp, rtol=1e-5, atol=1e-6)
    for g, w in zip(torch.autograd.grad(compiled, (q, keys)), got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_balance_loss_of_bf16_inputs_scores_as_the_search(monkeypatch):
    # A bf16 model outside autocast (bench_memory_layer's layer): bf16 products with fp32
    # sums, as the search's Triton path multiplies bf16 inputs, not an fp32 GEMM; the loss
    # of the same values in fp32.
    from memlayers import router

    calls = []
    apply = router._HalfScores.apply
    monkeypatch.setattr(router._HalfScores, "apply", lambda *a: calls.append(1) or apply(*a))
    torch.manual_seed(12)
    q = torch.randn(300, 2, 16, device="cuda").bfloat16().requires_grad_()
    keys = torch.randn(2, 2, 64, 8, device="cuda").bfloat16().requires_grad_()
    got = balance_loss(q, keys, 4)
    assert calls and got.dtype == torch.float32
    qr, kr = (t.detach().float().requires_grad_() for t in (q, keys))
    ref = balance_loss(qr, kr, 4)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for g, w in zip(torch.autograd.grad(got, (q, keys)), torch.autograd.grad(ref, (qr, kr)),
                    strict=True):  # fmt: skip
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w, rtol=2e-2, atol=1e-2 * w.abs().max().item())
    calls.clear()
    balance_loss(q.float(), keys, 4)  # mixed dtypes: fp32, as before
    assert not calls


def test_balance_loss_reaches_the_gradient_but_not_the_value_of_the_model_loss():
    torch.manual_seed(6)
    mem = dict(n_keys=8, heads=2, topk=4, impl="torch")
    cfg = ModelConfig(dim=16, n_layers=2, n_heads=2, vocab_size=32, memory_layers=[0, 1],
                      multiple_of=16, memory=MemoryConfig(**mem, balance_loss=0.5))  # fmt: skip
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, 32, (2, 8))
    loss = model(tokens, targets=tokens)
    layers = model.memory_layers()
    assert all(layer.aux_loss is None for layer in layers)  # taken by the loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # The same pass by hand: the value is the cross-entropy alone, the gradient the sum's.
    ce = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    aux = sum(layer.aux_loss for layer in layers)
    torch.testing.assert_close(loss, ce, rtol=1e-6, atol=0)
    (ce + aux).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)
    assert layers[0].router.keys.grad.abs().sum() > 0
    model.eval()  # no balance loss outside training
    model(tokens, targets=tokens)
    assert all(layer.aux_loss is None for layer in layers)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_and_balance_loss_compile_into_one_graph(training):
    cfg = MemoryConfig(n_keys=8, heads=2, topk=4, query_batch_norm=True, balance_loss=0.1)
    layer = ProductKeyMemory(16, cfg).train(training)
    x = torch.randn(3, 5, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    want = layer(x)
    want_aux = layer.aux_loss
    torch.testing.assert_close(compiled(x), want)
    if training:
        torch.testing.assert_close(layer.aux_loss, want_aux)
        (compiled(x).sum() + layer.aux_loss).backward()
        assert layer.router.query.weight.grad is not None
    else:
        assert layer.aux_loss is None


def test_compiled_blocks_give_the_eager_loss_and_gradients_with_both_options():
    # The trainer compiles block by block (parallel.compile_blocks): the balance loss set
    # on the layer inside a compiled block must still reach the model's loss.
    mem = MemoryConfig(n_keys=8, heads=2, topk=4, impl="torch", query_batch_norm=True,
                       balance_loss=0.5)  # fmt: skip
    cfg = ModelConfig(dim=16, n_layers=2, n_heads=2, vocab_size=32, memory_layers=[0, 1],
                      multiple_of=16, memory=mem)  # fmt: skip
    eager, compiled = build_model(cfg, seed=0), build_model(cfg, seed=0)
    for block in compiled.layers:
        block.compile(fullgraph=True, backend="aot_eager")
    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(7))
    for model in (eager, compiled):
        model(tokens, targets=tokens).backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    for a, b in zip(eager.memory_layers(), compiled.memory_layers(), strict=True):
        torch.testing.assert_close(b.router.query_mean, a.router.query_mean)


def _balance_model():
    mem = MemoryConfig(n_keys=8, heads=2, topk=4, impl="torch", balance_loss=0.5)
    cfg = ModelConfig(dim=16, n_layers=2, n_heads=2, vocab_size=32, memory_layers=[0, 1],
                      multiple_of=16, memory=mem)  # fmt: skip
    return build_model(cfg, seed=0)


def test_take_aux_loss_trains_the_balance_loss_from_the_logits():
    # A loop of one's own (logits, then its own cross-entropy) gets the balance loss with
    # model.take_aux_loss(): the gradient the targets path (the trainer's) gives.
    tokens = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(3))
    x, y = tokens[:, :-1], tokens[:, 1:]
    model = _balance_model()
    model(x, targets=y).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ce = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    aux = model.take_aux_loss()
    assert aux.dim() == 0 and aux > 0
    assert all(layer.aux_loss is None for layer in model.memory_layers())  # taken
    (ce + aux).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], msg=n)
    zero = model.take_aux_loss()  # taken once: nothing left
    assert zero.item() == 0 and zero.grad_fn is None
    # The layer's own: the weighted loss, then nothing.
    layer = model.memory_layers()[0]
    model(x)
    want = layer.aux_loss
    got = layer.take_aux_loss()
    assert got is want and got.grad_fn is not None
    assert layer.aux_loss is None and layer.take_aux_loss().item() == 0


def test_a_balance_loss_never_taken_warns_once():
    cfg = MemoryConfig(n_keys=8, heads=2, topk=4, impl="torch", balance_loss=0.5)
    layer = ProductKeyMemory(16, cfg)
    x = torch.randn(12, 16)
    layer(x).sum().backward()  # the balance loss left on the layer: it trains nothing
    with pytest.warns(UserWarning, match=r"balance_loss=0.5.*never taken.*take_aux_loss"):
        layer(x)
    with warnings.catch_warnings(record=True) as caught:
        # recorded, not raised: torch's own warnings (2.11's sparse-invariant note on a
        # GPU host) are not this test's
        warnings.simplefilter("always")
        layer(x)  # once per layer
        # Taken, or the layer in eval mode: no warning.
        fresh = ProductKeyMemory(16, cfg)
        for _ in range(2):
            (fresh(x).sum() + fresh.take_aux_loss()).backward()
        fresh.eval()(x)
        fresh.train()(x)
        # The model's targets path (the trainer's) takes them at every step.
        model = _balance_model()
        tokens = torch.randint(0, 32, (2, 9))
        for _ in range(2):
            model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
    assert not [w for w in caught if "never taken" in str(w.message)]


def test_a_passed_table_must_have_the_value_dtype_asked_for():
    # value_dtype="bf16" asks for a bf16 table: a passed fp32 one is refused, naming both
    # (it was silently used in fp32).
    cfg = MemoryConfig(n_keys=8, heads=1, topk=2, value_dtype="bf16", merge_grads=True)
    with pytest.raises(
        ValueError, match=r"value_dtype='bf16' \(torch.bfloat16\) .* is torch.float32"
    ):
        ProductKeyMemory(16, cfg, values=MemoryValues(64, 16, sparse_grad=True))
    table = MemoryValues(64, 16, dtype=torch.bfloat16)
    assert ProductKeyMemory(16, cfg, values=table).values.weight.dtype == torch.bfloat16
    # The default (fp32) is what a layer or model makes; a table made by hand in another
    # dtype is taken as it is (memlayers.hf builds the model's dtype).
    default = MemoryConfig(n_keys=8, heads=1, topk=2)
    assert ProductKeyMemory(16, default, values=table).values.dtype == torch.bfloat16


@pytest.mark.parametrize("heads,topk", [(4, 32), (4, 8), (1, 16)])
def test_bag_norm_at_init_is_near_sqrt_heads_over_topk(heads, topk):
    # docs/method.md §3: rows of norm ~1, a head's softmax nearly uniform at init, so a
    # bag's sum has a norm near sqrt(heads / topk) (0.35 at 4 x 32), not near one.
    torch.manual_seed(0)
    layer = ProductKeyMemory(128, MemoryConfig(n_keys=64, heads=heads, topk=topk, impl="torch"))
    indices, weights = layer.lookup(torch.randn(256, 128))
    norm = layer.values.lookup(indices, weights).norm(dim=-1).mean().item()
    bound = (heads / topk) ** 0.5
    assert bound * 0.9 < norm < bound * 1.25, (norm, bound)
