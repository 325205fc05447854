"""The merged walk reading int8 output gradients (``MemoryConfig.grad_read="int8"``,
memlayers/merged_grad.py, memlayers/ops/read_copy.py): the walk over packed rows against
the lookup's PyTorch backward of the dequantized rows, long rows (the walk's pieces)
included; a shared table's gradient through the merged lookups, with and without the
int8 read copy, the score gradients untouched; and the settings' checks."""

import pytest
import torch

from memlayers.memory import MemoryConfig, MemoryValues, ProductKeyMemory
from memlayers.merged_grad import MergedValueGrad
from memlayers.ops.embedding_bag import embedding_bag, embedding_bag_grads
from memlayers.ops.quantized import dequantize_rows, quantize_rows
from memlayers.ops.read_copy import pack_rows, value_grad_packed

# Triton runs on CUDA tensors on a GPU machine (the interpreter takes CPU tensors in CI).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEVICES = {"torch": "cpu", "triton": TRITON_DEVICE}


def _lookups(n=40, b=9, k=6, d=24, seed=1, hot=0):
    """Bags into an ``n``-row table; ``hot`` more bags that all read row 5 (a row of more
    lookups than a walk program takes: its pieces are combined)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (b + hot, k), generator=g)
    idx[0, :3] = 7  # a repeated row in one bag
    idx[b:, 0] = 5
    w = torch.randn(b + hot, k, generator=g).softmax(-1)
    # Output gradient rows of very different sizes (each gets its own scale), one zero.
    gy = torch.randn(b + hot, d, generator=g) * torch.rand(b + hot, 1, generator=g).mul(3)
    gy[1] = 0
    return idx, w, gy


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d, hot", [(24, 0), (300, 0), (24, 300)], ids=["d24", "d300", "long"])
def test_the_walk_over_packed_rows_is_the_backward_of_the_dequantized_ones(impl, dtype, d, hot):
    dev = DEVICES[impl]
    table = torch.randn(40, d).to(dtype).to(dev)
    idx, w, gy = (t.to(dev) for t in _lookups(d=d, hot=hot))
    gy = gy.to(dtype)
    packed = pack_rows(gy, impl)
    ref_packed = quantize_rows(gy.cpu(), 8)  # the serving format's packing, the reference
    assert torch.equal(packed.data.cpu(), ref_packed.data)
    assert torch.equal(packed.scales.cpu(), ref_packed.scales)
    got = value_grad_packed(table, idx, w, packed, impl)
    want, _ = embedding_bag_grads(
        table.cpu().double(), idx.cpu(), w.cpu().double(), dequantize_rows(ref_packed).double(),
        True, False, "torch", True,
    )  # fmt: skip
    assert got.is_sparse and got.is_coalesced() and got.dtype == dtype
    assert torch.equal(got._indices().cpu(), want._indices())
    # fp32: the walk's fp32 sums in another order; bf16: the sums rounded to bf16 once.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(got._values().cpu().double(), want._values(), **tol)
    # And it is the float walk's gradient up to the packing's error: each output gradient
    # element within half its row's scale, times the sum of the row's lookup weights.
    flt, _ = embedding_bag_grads(table.cpu().double(), idx.cpu(), w.cpu().double(),
                                 gy.cpu().double(), True, False, "torch", True)  # fmt: skip
    bound = torch.zeros(40, dtype=torch.float64).index_add_(
        0, idx.cpu().reshape(-1),
        (w.cpu().double().abs() * ref_packed.scales.double() / 2).reshape(-1),
    )[flt._indices()[0]]  # fmt: skip
    err = (got._values().cpu().double() - flt._values()).abs().amax(1)
    slack = flt._values().abs().amax(1) * (1e-6 if dtype == torch.float32 else 8e-3)
    assert bool((err <= bound * 1.001 + slack).all())
    assert bool((err > 0).any())  # the packing does lose something: the bound is not vacuous


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("read", ["table", "int8"])
def test_a_shared_tables_merged_walk_reads_the_packed_output_gradients(impl, read):
    dev = DEVICES[impl]
    torch.manual_seed(0)
    values = MemoryValues(40, 24, dtype=torch.bfloat16, sparse_grad=True, merge_grads=True,
                          read=read, grad_read="int8").to(dev)  # fmt: skip
    assert values.grad_read == "int8" and "grad_read=int8" in repr(values)
    idx, w0, gy = (t.to(dev) for t in _lookups())
    gy = gy.to(torch.bfloat16)
    w = w0.clone().requires_grad_()
    out1 = values.lookup(idx, w, impl)
    out2 = values.lookup(idx.flip(0), w, impl)
    torch.autograd.backward([out1, out2], [gy, 2 * gy])
    # The table's gradient: the packed walk over both lookups' bags (each output
    # gradient packed as the flush packs it).
    both = torch.cat([gy, 2 * gy])
    want = value_grad_packed(
        values.weight.detach().cpu(),
        torch.cat([idx, idx.flip(0)]).cpu(),
        torch.cat([w0, w0]).cpu(),
        quantize_rows(both.cpu(), 8),
        "torch",
    )
    got = values.weight.grad
    assert got.is_sparse and got.dtype == torch.bfloat16
    assert torch.equal(got.coalesce()._indices().cpu(), want._indices())
    torch.testing.assert_close(got.coalesce()._values().cpu().float(), want._values().float(),
                               rtol=8e-3, atol=1e-5)  # fmt: skip
    # The score gradient takes the float output gradient, as with grad_read="float".
    ref = MemoryValues(40, 24, dtype=torch.bfloat16, sparse_grad=True, merge_grads=True,
                       read=read).to(dev)  # fmt: skip
    ref.load_state_dict(values.state_dict())
    rw = w0.clone().requires_grad_()
    torch.autograd.backward([ref.lookup(idx, rw, impl), ref.lookup(idx.flip(0), rw, impl)],
                            [gy, 2 * gy])  # fmt: skip
    assert torch.equal(w.grad, rw.grad)
    assert not torch.equal(got.to_dense(), ref.weight.grad.to_dense())  # it did pack


def test_the_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="grad_read must be one of"):
        MemoryConfig(grad_read="int4")
    with pytest.raises(ValueError, match="grad_read must be one of"):
        MergedValueGrad("bf16")
    with pytest.raises(ValueError, match="needs merge_grads=True"):
        MemoryValues(16, 8, grad_read="int8")
    cfg = MemoryConfig(n_keys=4, heads=1, topk=2, grad_read="int8")
    with pytest.raises(ValueError, match="makes its own table"):
        ProductKeyMemory(8, cfg)
    with pytest.raises(ValueError, match="walks 'float' output gradients"):
        ProductKeyMemory(8, cfg, MemoryValues(16, 8, merge_grads=True))
    ProductKeyMemory(8, cfg, MemoryValues(16, 8, merge_grads=True, grad_read="int8"))
    idx, w, gy = _lookups(n=16, d=8)
    with pytest.raises(ValueError, match=r"int8 rows \[B=9, D=8\]"):
        value_grad_packed(torch.randn(16, 8), idx, w, quantize_rows(gy[:4], 8), "torch")
    with pytest.raises(ValueError, match="int8 rows"):
        value_grad_packed(torch.randn(16, 8), idx, w, quantize_rows(gy, 4, 8), "torch")


def test_a_model_config_reaches_the_shared_table_and_a_dense_optimizer_is_refused():
    from memlayers import build_model, get_preset
    from memlayers.optim import OptimArgs, build_optimizer

    cfg = get_preset("tiny-memory+")
    cfg.vocab_size = 64
    cfg.memory.grad_read = "int8"
    model = build_model(cfg, "cpu", seed=0, sparse_values=True)
    assert model.memory_values.grad_read == "int8"
    build_optimizer(model, OptimArgs())  # sparse_adam: the merged walk runs
    dense = build_model(cfg, "cpu", seed=0, sparse_values=False)
    with pytest.raises(ValueError, match="grad_read=int8.*not 'adamw'"):
        build_optimizer(dense, OptimArgs(value_optimizer="adamw"))
    cfg.memory.grad_read = "float"
    assert build_model(cfg, "cpu", seed=0).memory_values.grad_read == "float"


def test_a_table_without_row_sparse_gradients_is_refused_at_its_training_lookup():
    # The merged walk runs for row-sparse gradients only: grad_read=int8 on a dense-gradient
    # table would do nothing, so its training lookup is refused; evaluation is not.
    values = MemoryValues(40, 24, merge_grads=True, grad_read="int8")
    idx, w, _ = _lookups()
    with pytest.raises(ValueError, match="grad_read='int8'.*sparse_grad=False"):
        values.lookup(idx, w, "torch")
    with torch.no_grad():
        values.lookup(idx, w, "torch")
    values.sparse_grad = True  # as memlayers.hf users set it for SparseValueAdam
    values.lookup(idx, w, "torch").sum().backward()
    assert values.weight.grad.is_sparse


def test_a_model_or_retrofit_with_one_memory_layer_is_refused_by_its_key():
    from memlayers import build_model, get_preset

    cfg = get_preset("tiny-memory+")
    cfg.vocab_size = 64
    cfg.memory_layers = cfg.memory_layers[:1]
    cfg.memory.grad_read = "int8"
    with pytest.raises(ValueError, match=r"model.memory.grad_read='int8'.*1 memory layer"):
        build_model(cfg, "cpu", seed=0, sparse_values=True)
    cfg.memory_layers = get_preset("tiny-memory+").memory_layers
    cfg.memory.merge_grads = False
    with pytest.raises(ValueError, match="merge_grads=False"):
        build_model(cfg, "cpu", seed=0, sparse_values=True)


def test_a_retrofit_passes_it_to_the_shared_table():
    pytest.importorskip("transformers")
    from test_hf import small_config, tiny_model

    from memlayers.hf import add_memory

    cfg = small_config()
    cfg.grad_read = "int8"
    model = add_memory(tiny_model(), [0, 2], cfg)
    assert model.model.memory_values.grad_read == "int8"
    with pytest.raises(ValueError, match=r"grad_read='int8'.*layers=\[1\]"):
        add_memory(tiny_model(), [1], cfg)


def test_lookups_without_grad_are_the_float_tables():
    # Evaluation: no backward, nothing packed; the output is the ordinary lookup's.
    values = MemoryValues(40, 24, sparse_grad=True, merge_grads=True, grad_read="int8")
    idx, w, _ = _lookups()
    with torch.no_grad():
        got = values.lookup(idx, w, "torch")
    torch.testing.assert_close(got, embedding_bag(values.weight.detach(), idx, w, impl="torch"))
