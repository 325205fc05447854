"""The chunked linear cross-entropy against F.cross_entropy on full logits."""

import pytest
import torch
import torch.nn.functional as F

from memlayers.loss import linear_cross_entropy


def _reference(h, w, t, ignore_index=-100):
    logits = F.linear(h, w)  # under autocast: bf16, as the model's head gives
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, -2)
    return F.cross_entropy(logits, t.flatten(), ignore_index=ignore_index)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000], ids=["1", "odd", "64", "one-chunk"])
def test_value_and_grads_match_full_logits_float64(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 21, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (3, 21), generator=g)
    t[0, :5] = -100  # ignored positions
    loss = linear_cross_entropy(h, w, t, chunk=chunk)
    ref = _reference(h, w, t)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    gh, gw = torch.autograd.grad(loss * 2.5, (h, w))
    rh, rw = torch.autograd.grad(ref * 2.5, (h, w))
    torch.testing.assert_close(gh, rh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(9, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 6, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 11, (9,), generator=g)
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, t, chunk=4), (h, w))


def test_only_the_needed_gradient():
    h = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(10, 4)  # frozen head
    t = torch.randint(0, 10, (8,))
    linear_cross_entropy(h, w, t, chunk=3).backward()
    torch.testing.assert_close(h.grad, torch.autograd.grad(_reference(h, w, t), h)[0])
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t), _reference(h, w, t))


def test_bf16_autocast_matches_autocast_reference():
    # Under autocast both compute bf16 logits; the loss is the same function of them
    # (fp32 log-sum-exp), the gradients differ by bf16 rounding of the products.
    g = torch.Generator().manual_seed(2)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    w = (torch.randn(200, 32, generator=g) * 0.1).requires_grad_()
    t = torch.randint(0, 200, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk=16)
        ref = _reference(h, w, t)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    gh, gw = torch.autograd.grad(loss, (h, w))
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert gh.dtype == h.dtype and gw.dtype == w.dtype
    torch.testing.assert_close(gh, rh, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw, rw, rtol=2e-2, atol=2e-3)


def test_all_targets_ignored_gives_zero_not_nan():
    h = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(5, 3, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(h.grad).all()


@pytest.mark.parametrize(
    "h_shape, w_shape, t_shape, dtype, chunk, match",
    [
        ((4, 3), (5, 3), (5,), torch.int64, 8, "leading shape"),
        ((4, 3), (5, 2), (4,), torch.int64, 8, r"weight must be \[V, D=3\]"),
        ((4, 3), (5, 3), (4,), torch.int32, 8, "int64"),
        ((4, 3), (5, 3), (4,), torch.int64, 0, "chunk=0"),
    ],
    ids=["targets-shape", "weight-shape", "targets-dtype", "chunk"],
)
def test_bad_input_names_the_value(h_shape, w_shape, t_shape, dtype, chunk, match):
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(
            torch.randn(h_shape),
            torch.randn(w_shape),
            torch.zeros(t_shape, dtype=dtype),
            chunk=chunk,
        )


def test_chunk_grad_compiles_whole_and_matches_eager():
    # On CUDA the chunk's elementwise work runs through torch.compile: it must trace as
    # one graph (fullgraph) and give the eager numbers.
    from memlayers.loss import _chunk_grad

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # where the trainer compiles it
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 40, generator=g).to(torch.bfloat16).to(dev)
    t = torch.randint(0, 40, (6,), generator=g).to(dev)
    valid = torch.tensor([True, True, False, True, True, True], device=dev)
    compiled = torch.compile(_chunk_grad, dynamic=False, fullgraph=True)
    loss, p = compiled(logits, t, valid, torch.float32)
    ref_loss, ref_p = _chunk_grad(logits, t, valid, torch.float32)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(p.float(), ref_p.float(), rtol=0, atol=1e-2)  # bf16 rounding
    assert p.dtype == torch.bfloat16 and (p[2] == 0).all()
