"""benchmarks/read_precision_quality.py: the quantized reads it trains with."""

import torch
from benchmark_scripts import load

from memlayers import merged_grad
from memlayers.ops import embedding_bag
from memlayers.ops.quantized import dequantize_rows, quantize_rows

rq = load("read_precision_quality")


def test_read_copy_is_the_serving_formats_rows():
    torch.manual_seed(0)
    v = torch.randn(6, 40).bfloat16()
    for bits, group in ((8, None), (4, None), (4, 8)):
        got = rq.read_copy(v, bits, group)
        assert got.dtype == torch.bfloat16
        want = dequantize_rows(quantize_rows(v, bits, group))
        torch.testing.assert_close(got, want.bfloat16(), rtol=0, atol=0)
        assert not torch.equal(got, v)


def test_patched_lookup_reads_quantized_rows_and_keeps_the_value_gradient():
    torch.manual_seed(1)
    table = torch.randn(12, 16, requires_grad=True)
    idx = torch.randint(0, 12, (5, 3))
    w = torch.rand(5, 3, requires_grad=True)
    gy = torch.randn(5, 16)
    plain = embedding_bag(table, idx, w, impl="torch", sparse_grad=True)
    g_plain = torch.autograd.grad(plain, (table, w), gy)
    original = merged_grad.embedding_bag_grads
    restore = rq.patch_reads(8)
    try:
        got = embedding_bag(table, idx, w, impl="torch", sparse_grad=True)
        g_got = torch.autograd.grad(got, (table, w), gy)
        # the shared table's merged backward reads the quantized rows for its scores too
        _, dw = merged_grad.embedding_bag_grads(table.detach(), idx, w.detach(), gy, impl="torch")
        _, dw_want = original(qt := rq.read_copy(table, 8).detach(), idx, w.detach(), gy,
                              impl="torch")  # fmt: skip
        torch.testing.assert_close(dw, dw_want, rtol=0, atol=0)
    finally:
        restore()
    assert merged_grad.embedding_bag_grads is original
    qt.requires_grad_()
    want = embedding_bag(qt, idx, w, impl="torch", sparse_grad=True)
    torch.testing.assert_close(got, want)  # the output reads the quantized rows
    assert not torch.allclose(got, plain)
    torch.testing.assert_close(g_got[1], torch.autograd.grad(want, w, gy)[0])  # so the score's
    torch.testing.assert_close(g_got[0].to_dense(), g_plain[0].to_dense())  # value grad as is
    # restored: the plain lookup again
    torch.testing.assert_close(embedding_bag(table, idx, w, impl="torch"), plain)


def test_a_group_the_format_refuses_stops_before_any_run(capsys):
    import pytest

    with pytest.raises(SystemExit):
        rq.main(["--bits", "4", "--group", "3", "--", "steps=1"])
    assert "4-bit groups must be even" in capsys.readouterr().err


def test_patched_value_gradients_read_the_output_gradient_packed():
    torch.manual_seed(2)
    table = torch.randn(12, 16)
    idx = torch.randint(0, 12, (5, 3))
    w = torch.rand(5, 3)
    gy = torch.randn(5, 16)
    packed_gy = rq.read_copy(gy, 8)
    assert not torch.equal(packed_gy, gy)
    want_v, _ = merged_grad.embedding_bag_grads(table, idx, w, packed_gy, impl="torch")
    _, want_w = merged_grad.embedding_bag_grads(table, idx, w, gy, impl="torch")
    original = merged_grad.embedding_bag_grads
    restore = rq.patch_grads(8)
    try:
        # the merged walk and a lookup's own backward (both gradients in one call)
        gv, dw = merged_grad.embedding_bag_grads(table, idx, w, gy, impl="torch")
        t = table.clone().requires_grad_()
        wt = w.clone().requires_grad_()
        own = torch.autograd.grad(embedding_bag(t, idx, wt, impl="torch", sparse_grad=True),
                                  (t, wt), gy)  # fmt: skip
    finally:
        restore()
    assert merged_grad.embedding_bag_grads is original
    for v, s in ((gv, dw), own):
        torch.testing.assert_close(v.to_dense(), want_v.to_dense(), rtol=0, atol=0)
        torch.testing.assert_close(s, want_w, rtol=0, atol=0)
    t = table.clone().requires_grad_()
    plain = torch.autograd.grad(embedding_bag(t, idx, w, impl="torch", sparse_grad=True), t, gy)
    assert not torch.equal(plain[0].to_dense(), want_v.to_dense())  # restored: plain again
