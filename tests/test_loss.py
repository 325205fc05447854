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


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_weight_gradient_sum_adds_into_fp32(device):
    # accumulate_mm_: acc += a @ b with bf16 a, b and an fp32 acc. On CUDA one GEMM adds
    # into the fp32 sum (addmm's out_dtype); elsewhere the product, then an add.
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (addmm with an fp32 out_dtype is CUDA-only)")
    from memlayers.loss import accumulate_mm_

    g = torch.Generator().manual_seed(5)
    a = torch.randn(48, 64, generator=g).bfloat16().to(device)
    b = torch.randn(64, 40, generator=g).bfloat16().to(device)
    start = torch.randn(48, 40, generator=g).to(device) * 100
    acc = start.clone()
    accumulate_mm_(acc, a, b)
    assert acc.dtype == torch.float32
    exact = start.double() + a.double() @ b.double()
    # The product rounded to bf16 before the add would be ~2**-9 off relative to it; the
    # fp32 sum is far closer on CUDA (fp32 accumulation, no bf16 round trip).
    err = (acc.double() - exact).abs().max().item()
    prod = (a.double() @ b.double()).abs().max().item()
    if device == "cuda":  # fp32 rounding of the sum (the old bf16 product: ~prod * 2**-9)
        bound = 1e-5 * (start.abs().max().item() + prod)
    else:  # the bf16 product's rounding, half a bf16 step
        bound = prod * 2**-8
    assert err < bound, err


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the trainer's path)"
)
def test_cuda_autocast_matches_the_fp32_reference():
    g = torch.Generator().manual_seed(6)
    h = torch.randn(300, 64, generator=g).cuda().requires_grad_()
    w = (torch.randn(500, 64, generator=g) * 0.1).cuda().requires_grad_()
    t = torch.randint(0, 500, (300,), generator=g).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, chunk=64)  # 5 chunks summed into W's gradient
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = _reference(h, w, t)  # fp32 logits
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gh, rh, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw, rw, rtol=2e-2, atol=2e-3)


def test_bench_loss_times_every_variant_and_restores_the_sum(tmp_path):
    # benchmarks/bench_loss.py --smoke: a row per chunk and way of summing, the unchunked
    # reference, each within rounding of the first (the product-then-add rows within a
    # bf16 product's: on a GPU they round each chunk's product, ~2e-3); the
    # product-then-add variant is put back after its rows (the library's sum again).
    from benchmark_scripts import load

    from memlayers import loss

    bench = load("bench_loss")
    shipped = loss.accumulate_mm_
    out = tmp_path / "loss.md"
    bench.main(["--smoke", "--out", str(out)])
    assert loss.accumulate_mm_ is shipped
    rows = [line for line in out.read_text().splitlines() if line.startswith("| chunk")]
    assert len(rows) == 4 and "unchunked" in out.read_text()
    for row in rows:
        diffs = [float(x.split()[-1]) for x in row.split("first: ")[1].split(" |")[0].split(", ")]
        assert max(diffs) < (1e-2 if "then add" in row else 1e-5), row
