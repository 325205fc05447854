"""One backward over all lookups of a shared table (memlayers/merged_grad.py) against
each lookup's own backward, summed."""

import pytest
import torch

from memlayers import build_model, get_preset
from memlayers.merged_grad import MergedValueGrad
from memlayers.ops.embedding_bag import embedding_bag

IMPLS = [pytest.param("torch", torch.float64, id="torch-fp64"),
         pytest.param("triton", torch.float32, id="triton-fp32")]  # fmt: skip


def _lookups(n_layers, n=50, d=12, b=9, k=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(n, d, generator=g, dtype=dtype)
    bags = []
    for i in range(n_layers):
        # Skewed: layer i favours a few rows, so the layers' rows overlap and repeat.
        idx = torch.randint(0, n if i % 2 else 7, (b, k), generator=g)
        w = torch.randn(b, k, generator=g, dtype=dtype).softmax(-1)
        gy = torch.randn(b, d, generator=g, dtype=dtype)
        bags.append((idx, w, gy))
    return table, bags


# Triton runs on CUDA tensors on a GPU machine (the interpreter takes CPU tensors in CI).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(table, bags, impl, merged, use=None):
    dev = TRITON_DEVICE if impl == "triton" else "cpu"
    bags = [(i.to(dev), w.to(dev), gy.to(dev)) for i, w, gy in bags]
    weight = table.to(dev).clone().requires_grad_()
    ws = [w.clone().requires_grad_() for _, w, _ in bags]
    total = 0
    for i, ((idx, _, gy), w) in enumerate(zip(bags, ws, strict=True)):
        if merged is not None:
            out = merged.lookup(weight, idx, w, impl)
        else:
            out = embedding_bag(weight, idx, w, impl=impl, sparse_grad=True)
        if use is None or i in use:
            total = total + (out * gy).sum()
    total.backward()
    return weight.grad.cpu(), [None if w.grad is None else w.grad.cpu() for w in ws]


@pytest.mark.parametrize("impl, dtype", IMPLS)
@pytest.mark.parametrize("n_layers", [1, 3])
def test_merged_equals_the_sum_of_each_lookups_gradient(impl, dtype, n_layers):
    table, bags = _lookups(n_layers, dtype=dtype)
    ref_grad, ref_dw = _run(table, bags, impl, None)
    grad, dw = _run(table, bags, impl, MergedValueGrad())
    assert grad.is_sparse and grad.is_coalesced()
    rows = grad.indices()[0]
    assert bool((rows[1:] > rows[:-1]).all())  # each row once, ascending
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {}
    torch.testing.assert_close(grad.to_dense(), ref_grad.to_dense(), **tol)
    for a, b in zip(dw, ref_dw, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_a_lookup_outside_the_loss_adds_nothing():
    table, bags = _lookups(3)
    ref_grad, _ = _run(table, bags, "torch", None, use={0, 2})
    grad, dw = _run(table, bags, "torch", MergedValueGrad(), use={0, 2})
    torch.testing.assert_close(grad.to_dense(), ref_grad.to_dense())
    assert dw[1] is None


def test_gradients_accumulate_over_backward_passes_and_no_grad_runs_plainly():
    table, bags = _lookups(2)
    weight = table.clone().requires_grad_()
    merged = MergedValueGrad()
    for _ in range(2):  # two micro-batches
        sum((merged.lookup(weight, i, w, "torch") * gy).sum() for i, w, gy in bags).backward()
    ref = table.clone().requires_grad_()
    for _ in range(2):
        sum((embedding_bag(ref, i, w, sparse_grad=True) * gy).sum() for i, w, gy in bags).backward()
    torch.testing.assert_close(weight.grad.to_dense(), ref.grad.to_dense())
    with torch.no_grad():
        out = merged.lookup(weight, bags[0][0], bags[0][1], "torch")
    torch.testing.assert_close(out, embedding_bag(table, bags[0][0], bags[0][1]))
    assert merged.pending == []


def test_memory_plus_model_gradients_match_the_unmerged_model():
    cfg = get_preset("tiny-memory+")
    cfg.vocab_size, cfg.n_layers, cfg.memory_layers = 64, 6, [1, 3, 5]
    models = [build_model(cfg, "cpu", seed=0).double()]
    assert models[0].memory_values.merged is not None  # three layers share the table
    cfg.memory.merge_grads = False  # the switch: one backward per lookup
    models.append(build_model(cfg, "cpu", seed=0).double())
    assert models[1].memory_values.merged is None
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for m in models:
        m.memory_values.sparse_grad = True
        m(x[:, :-1], targets=x[:, 1:]).backward()
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters(),
                                 strict=True):  # fmt: skip
        ga = a.grad.to_dense() if a.grad.is_sparse else a.grad
        gb = b.grad.to_dense() if b.grad.is_sparse else b.grad
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12, msg=name)


def test_a_backward_that_fails_midway_does_not_stop_later_ones():
    # A pass that raises after a lookup's backward ran never reaches its end-of-pass
    # callback: the next pass must still give the table its gradient (it used to wait on
    # the dead pass's callback for good, and keep its tensors).
    table, bags = _lookups(2)
    weight = table.clone().requires_grad_()
    merged = MergedValueGrad()

    def fail(_grad):
        raise RuntimeError("a hook failed")

    w0 = bags[0][1].clone().requires_grad_()
    w0_used = w0 * 1.0  # its gradient comes from the lookup's backward, then the hook fails
    w0_used.register_hook(fail)
    loss = (merged.lookup(weight, bags[0][0], w0_used, "torch") * bags[0][2]).sum()
    with pytest.raises(RuntimeError, match="a hook failed"):
        loss.backward()
    assert weight.grad is None and len(merged.pending) == 1  # handed over, never walked
    sum((merged.lookup(weight, i, w, "torch") * gy).sum() for i, w, gy in bags).backward()
    ref = table.clone().requires_grad_()
    sum((embedding_bag(ref, i, w, sparse_grad=True) * gy).sum() for i, w, gy in bags).backward()
    torch.testing.assert_close(weight.grad.to_dense(), ref.grad.to_dense())
    assert merged.pending == []


def test_autograd_grad_for_other_inputs_leaves_the_table_alone():
    # torch.autograd.grad(loss, [w]) and backward(inputs=[w]) accumulate into no leaf but
    # those asked for: the deferred table gradient must not appear in weight.grad.
    table, bags = _lookups(2)
    weight = table.clone().requires_grad_()
    merged = MergedValueGrad()
    ws = [w.clone().requires_grad_() for _, w, _ in bags]

    def loss():
        return sum(
            (merged.lookup(weight, i, w, "torch") * gy).sum()
            for (i, _, gy), w in zip(bags, ws, strict=True)
        )

    dws = torch.autograd.grad(loss(), ws)
    assert weight.grad is None and merged.pending == []
    ref = [w.clone().requires_grad_() for w in ws]
    ref_loss = sum(
        (embedding_bag(table, i, w) * gy).sum() for (i, _, gy), w in zip(bags, ref, strict=True)
    )
    for a, b in zip(dws, torch.autograd.grad(ref_loss, ref), strict=True):
        torch.testing.assert_close(a, b)
    loss().backward(inputs=ws)
    assert weight.grad is None and merged.pending == []


def test_autograd_grad_for_the_table_returns_its_gradient():
    # torch.autograd.grad(loss, [table]) asks for the table's gradient back: each lookup
    # returns its own (torch cannot say whether the pass accumulates into a leaf it was
    # asked for, so nothing is deferred), equal to the unmerged lookups' sum.
    table, bags = _lookups(3)
    weight = table.clone().requires_grad_()
    merged = MergedValueGrad()
    loss = sum((merged.lookup(weight, i, w, "torch") * gy).sum() for i, w, gy in bags)
    (grad,) = torch.autograd.grad(loss, [weight])
    ref = table.clone().requires_grad_()
    ref_loss = sum((embedding_bag(ref, i, w, sparse_grad=True) * gy).sum() for i, w, gy in bags)
    (want,) = torch.autograd.grad(ref_loss, [ref])
    torch.testing.assert_close(grad.to_dense(), want.to_dense())
    assert weight.grad is None and merged.pending == []
