"""The int8 read copy of a value table (memlayers/ops/read_copy.py,
``MemoryConfig.value_read="int8"``): the packing kernel against the serving format's
reference, the lookup and both its gradients against a lookup of the dequantized rows
(straight through for the table), the copy kept current through optimizer steps and
in-place changes, and the config's checks."""

import pytest
import torch

from memlayers.memory import MemoryConfig, MemoryValues, ProductKeyMemory
from memlayers.merged_grad import MergedValueGrad, read_copy_lookup
from memlayers.ops.embedding_bag import embedding_bag
from memlayers.ops.quantized import (
    dequantize_rows,
    empty_quantized,
    quantize_rows,
    requantize_rows_torch,
)
from memlayers.ops.read_copy import requantize_rows_, score_grad_read
from memlayers.value_optim import SparseValueAdam, SparseValueSGD

# Triton runs on CUDA tensors on a GPU machine (the interpreter takes CPU tensors in CI).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEVICES = {"torch": "cpu", "triton": TRITON_DEVICE}


def _table(n=40, d=24, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    # Rows of very different sizes (each row gets its own scale), one all zero.
    w = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g).mul(4)
    w[3] = 0
    return w.to(dtype).to(device)


def _empty(n, d, device):
    t = empty_quantized(n, d, 8, None, device)
    t.data.fill_(99)
    t.scales.fill_(7.0)
    return t


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [1, 24, 300, 768])  # 768: whole 256-column tiles, as trained
def test_packing_is_the_serving_formats_bit_for_bit(impl, dtype, d):
    dev = DEVICES[impl]
    w = _table(d=d, dtype=dtype, device=dev)
    ref = quantize_rows(w.cpu(), 8)  # the serving format, on the CPU
    whole = _empty(40, d, dev)
    requantize_rows_(whole, w, None, impl)
    assert torch.equal(whole.data.cpu(), ref.data)
    assert torch.equal(whole.scales.cpu(), ref.scales)
    rows = torch.tensor([0, 3, 17, 39], device=dev)
    part = _empty(40, d, dev)
    requantize_rows_(part, w, rows, impl)
    assert torch.equal(part.data[rows].cpu(), ref.data[rows.cpu()])
    assert torch.equal(part.scales[rows].cpu(), ref.scales[rows.cpu()])
    others = torch.ones(40, dtype=torch.bool)
    others[rows.cpu()] = False
    assert bool((part.data.cpu()[others] == 99).all())  # rows not asked for: untouched
    assert bool((part.scales.cpu()[others] == 7.0).all())


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_packing_rounds_halves_to_even_against_the_stored_scale(impl):
    dev = DEVICES[impl]
    s = 2.0**-4  # absmax 127·s: the scale is exact in bf16
    w = torch.tensor([[127 * s, 2.5 * s, 3.5 * s, -2.5 * s, -0.5 * s, 0.5 * s]], device=dev)
    t = _empty(1, 6, dev)
    requantize_rows_(t, w, None, impl)
    assert t.data.cpu().tolist() == [[127, 2, 4, -2, 0, 0]]
    assert t.scales.cpu().float().item() == s
    requantize_rows_torch(ref := _empty(1, 6, "cpu"), w.cpu())
    assert torch.equal(ref.data, t.data.cpu())


def _bags(n=40, b=9, k=6, d=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (b, k), generator=g)
    idx[0, :3] = 5  # a repeated row in one bag
    w = torch.randn(b, k, generator=g).softmax(-1)
    gy = torch.randn(b, d, generator=g)
    return idx, w, gy


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_score_gradient_of_the_copy_matches_the_dequantized_rows(impl):
    dev = DEVICES[impl]
    w = _table(device=dev)
    packed = quantize_rows(w, 8)
    idx, _, gy = (t.to(dev) for t in _bags())
    got = score_grad_read(packed, idx, gy, impl)
    want = torch.einsum("bkd,bd->bk", dequantize_rows(packed.__class__(*(
        t.cpu() if torch.is_tensor(t) else t for t in packed)))[idx.cpu()].double(),
        gy.cpu().double())  # fmt: skip
    assert got.dtype == torch.float32 and got.shape == idx.shape
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["dense", "sparse", "merged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lookup_reads_the_copy_with_straight_through_gradients(impl, mode, dtype):
    dev = DEVICES[impl]
    table = _table(device=dev, dtype=dtype)
    packed = quantize_rows(table, 8)
    deq = dequantize_rows(packed)  # fp32: exactly the rows the copy stands for
    idx, w0, gy = (t.to(dev) for t in _bags())
    gy = gy.to(dtype).float()  # a bf16 lookup's output gradient is bf16: the same numbers
    weight = table.clone().requires_grad_()
    w = w0.clone().requires_grad_()
    if mode == "merged":
        merged = MergedValueGrad()
        out = merged.lookup(weight, idx, w, impl, packed)
        out2 = merged.lookup(weight, idx.flip(0), w, impl, packed)  # two lookups, one walk
        ((out * gy).sum() + (out2 * gy).sum()).backward()
    else:
        out = read_copy_lookup(weight, packed, idx, w, impl, sparse_grad=mode == "sparse")
        (out * gy).sum().backward()
    # The reference: a lookup of the dequantized rows for the output and the score
    # gradient; the table's gradient as the float table's lookup gives it.
    ref_vals = deq.clone().requires_grad_()
    ref_w = w0.clone().requires_grad_()
    ref = embedding_bag(ref_vals, idx, ref_w, impl="torch")
    loss = (ref * gy).sum()
    if mode == "merged":
        loss = loss + (embedding_bag(ref_vals, idx.flip(0), ref_w, impl="torch") * gy).sum()
    loss.backward()
    assert out.dtype == table.dtype
    # A bf16 table's lookup gives bf16 sums (of fp32 sums) and a bf16 value gradient.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.float(), ref.detach(), **tol)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-5, atol=1e-5)
    grad = weight.grad
    assert grad.is_sparse == (mode != "dense") and grad.dtype == dtype
    torch.testing.assert_close(grad.to_dense().float(), ref_vals.grad, **tol)


def test_lookup_checks_its_inputs_by_name():
    table = _table()
    packed = quantize_rows(table, 8)
    idx, w, _ = _bags()
    with pytest.raises(ValueError, match="int64"):
        read_copy_lookup(table, packed, idx.int(), w)
    with pytest.raises(ValueError, match="weights must have the shape"):
        read_copy_lookup(table, packed, idx, w[:, :2])
    # A copy of another table: more rows (indices the table does not have would pass the
    # copy's range check), another width, another format.
    for other, message in [
        (quantize_rows(_table(n=50), 8), r"read copy is \[50, 24\] but the table is \[40, 24\]"),
        (quantize_rows(_table(d=12), 8), r"read copy is \[40, 12\]"),
        (quantize_rows(table, 4), "int8 with one scale a row, got bits=4"),
        (quantize_rows(table, 8, group=8), "got bits=8, group=8 for dim=24"),
    ]:
        with pytest.raises(ValueError, match=message):
            read_copy_lookup(table, other, idx, w)
        with pytest.raises(ValueError, match=message):
            MergedValueGrad().lookup(table.clone().requires_grad_(), idx, w, "torch", other)
    bad = idx.clone()
    bad[1, 1] = 40
    with pytest.raises(ValueError, match="index 40 is out of range"):
        read_copy_lookup(table, packed, bad, w)


def _layer(impl, read="int8", sparse=True, merge=False):
    """A layer and its table: its own (in its state_dict), or with ``merge`` one passed
    in with merged gradients (as a model's shared table)."""
    cfg = MemoryConfig(n_keys=8, heads=2, topk=3, impl=impl, value_read=read)
    torch.manual_seed(0)
    if merge:
        # A table passed in is not the layer's submodule: .to() below does not move it.
        values = MemoryValues(64, 16, sparse_grad=sparse, merge_grads=True, read=read)
        values.to(DEVICES[impl])
        layer = ProductKeyMemory(16, cfg, values)
    else:
        layer = ProductKeyMemory(16, cfg)
        values = layer.values
        values.sparse_grad = sparse
    return layer.to(DEVICES[impl]), values


def _copy_is_current(values):
    ref = quantize_rows(values.weight.detach(), 8)
    got = values.read_copy.packed
    return torch.equal(got.data, ref.data) and torch.equal(got.scales, ref.scales)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_the_row_optimizers_refresh_the_rows_they_step(impl, opt):
    layer, values = _layer(impl, merge=True)
    cls = SparseValueAdam if opt == "adam" else SparseValueSGD
    optim = cls([values.weight], lr=0.05, impl=impl)
    x = torch.randn(7, 16, device=DEVICES[impl])
    for _ in range(3):
        layer(x).square().sum().backward()
        stepped = values.weight.grad.coalesce().indices()[0]
        before = values.read_copy.packed.data.clone()
        optim.step()
        optim.zero_grad()
        assert _copy_is_current(values)
        # Only the stepped rows were packed again (the rest hold what they held).
        untouched = torch.ones(64, dtype=torch.bool, device=before.device)
        untouched[stepped] = False
        assert torch.equal(values.read_copy.packed.data[untouched], before[untouched])
        assert not torch.equal(values.read_copy.packed.data[stepped], before[stepped])


def test_any_other_change_of_the_table_is_seen_at_the_next_lookup():
    layer, values = _layer("torch", sparse=False)
    x = torch.randn(5, 16)
    layer(x).sum().backward()
    copy = values.read_copy.packed
    torch.optim.SGD([values.weight], lr=1.0).step()  # torch's own optimizer: not reported
    assert not _copy_is_current(values)
    with torch.no_grad():
        y = layer(x)
    assert _copy_is_current(values)
    with torch.no_grad():
        values.weight.mul_(2)  # an in-place change by hand
        torch.testing.assert_close(layer(x), 2 * y, rtol=1e-2, atol=1e-2)
    assert _copy_is_current(values)
    values.weight.data = values.weight.data.flip(0).contiguous()  # new storage
    with torch.no_grad():
        layer(x)
    assert (
        _copy_is_current(values) and values.read_copy.packed.data.data_ptr() == copy.data.data_ptr()
    )


def test_the_trainers_fused_adamw_on_a_dense_table_keeps_the_copy_current():
    # torch's fused AdamW moves no version counter: build_optimizer tells the copies.
    from memlayers import build_model, get_preset
    from memlayers.optim import OptimArgs, build_optimizer

    cfg = get_preset("tiny-memory+")
    cfg.vocab_size, cfg.memory.value_read, cfg.memory.impl = 64, "int8", "torch"
    model = build_model(cfg, "cpu", seed=0)
    values = model.memory_values
    weight = values.weight.detach().clone()
    opt = torch.optim.AdamW([weight.requires_grad_()], lr=0.1, fused=True)
    weight.grad = torch.randn_like(weight)
    version = weight._version
    opt.step()
    assert weight._version == version  # what the trainer's hook is there for
    args = OptimArgs(value_optimizer="adamw", warmup_steps=0)
    optim = build_optimizer(model, args, impl="torch")
    assert isinstance(optim.optimizers["adamw"], torch.optim.AdamW)
    with torch.no_grad():
        optim.optimizers["adamw"].defaults["fused"] = True
        for group in optim.optimizers["adamw"].param_groups:
            group["fused"], group["foreach"] = True, False
    x = torch.randint(0, 64, (2, 9))
    for _ in range(2):
        model(x[:, :-1], targets=x[:, 1:]).backward()
        optim.step()
        optim.zero_grad()
        with torch.no_grad():
            model(x[:, :-1])
        assert _copy_is_current(values)


def test_a_first_lookup_in_inference_mode_leaves_a_copy_training_can_refresh():
    layer, values = _layer("torch")
    x = torch.randn(5, 16)
    with torch.inference_mode():
        layer(x)  # an evaluation before training packs the copy
    assert not values.read_copy.packed.data.is_inference()
    optim = SparseValueSGD([values.weight], lr=0.05, impl="torch")
    layer(x).sum().backward()
    optim.step()
    assert _copy_is_current(values)


@pytest.mark.parametrize("change", ["cast-round-trip", "load"])
def test_a_move_or_a_load_forgets_the_copy(change):
    layer, values = _layer("torch")
    x = torch.randn(5, 16)
    with torch.no_grad():
        layer(x)
    if change == "load":
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        state["owned_values.weight"].mul_(-1)
        layer.load_state_dict(state)
    else:
        layer.bfloat16().float()  # new storage each time; an allocator may reuse an address
    assert values.read_copy.packed is None
    with torch.no_grad():
        layer(x)
    assert _copy_is_current(values)


def test_an_unreported_change_before_a_row_step_is_not_lost():
    layer, values = _layer("torch")
    optim = SparseValueSGD([values.weight], lr=0.05, impl="torch")
    x = torch.randn(5, 16)
    layer(x).sum().backward()
    with torch.no_grad():
        values.weight[60:].fill_(1.5)  # rows the step will not touch, changed by hand
    optim.step()
    assert _copy_is_current(values)


def test_the_copy_is_not_saved_and_is_rebuilt_after_a_load():
    layer, values = _layer("torch")
    x = torch.randn(5, 16)
    with torch.no_grad():
        y = layer(x)
    state = layer.state_dict()
    assert not any("read" in k or "qdata" in k for k in state)
    other, other_values = _layer("torch")
    with torch.no_grad():
        other_values.weight.zero_()
        other(x)  # a copy of the zero table
        other.load_state_dict(state)
        torch.testing.assert_close(other(x), y, rtol=0, atol=0)


def test_reads_are_those_of_the_dequantized_table_in_eval():
    layer, values = _layer("torch", read="int8", sparse=False)
    plain, plain_values = _layer("torch", read="table", sparse=False)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(6, 16)
    with torch.no_grad():
        plain_values.weight.copy_(dequantize_rows(quantize_rows(values.weight, 8)))
        torch.testing.assert_close(layer.eval()(x), plain.eval()(x), rtol=1e-6, atol=1e-6)


def test_quantize_for_serving_drops_the_copy():
    layer, values = _layer("torch", sparse=False)
    values.quantize_(8)
    assert values.read_copy is None and values.read == "table"
    with torch.no_grad():
        layer.eval()(torch.randn(3, 16))


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="value_read must be one of"):
        MemoryConfig(value_read="int4")
    with pytest.raises(ValueError, match="read must be one of"):
        MemoryValues(16, 4, read="fp8")
    cfg = MemoryConfig(n_keys=4, heads=1, topk=2, value_read="int8")
    with pytest.raises(ValueError, match="value_read='int8'.*reads 'table'"):
        ProductKeyMemory(8, cfg, MemoryValues(16, 8))


def test_a_model_config_reaches_the_shared_table():
    from memlayers import build_model, get_preset

    cfg = get_preset("tiny-memory+")
    cfg.vocab_size = 64
    cfg.memory.value_read = "int8"
    model = build_model(cfg, "cpu", seed=0)
    assert model.memory_values.read == "int8"
    assert "read=int8" in repr(model.memory_values)
