"""benchmarks/read_precision_quality.py: the quantized reads it trains with."""

import pytest
import torch
from benchmark_scripts import load

from memlayers.ops import embedding_bag

rq = load("read_precision_quality")


@pytest.mark.parametrize("bits", [4, 8])
def test_rows_round_to_their_own_scale(bits):
    torch.manual_seed(0)
    v = torch.randn(6, 40) * torch.tensor([1e-3, 1e-1, 1, 3, 10, 0])[:, None]
    q = rq.quantize_rows(v, bits)
    levels = 2 ** (bits - 1) - 1
    scale = (v.abs().amax(1, keepdim=True) / levels).bfloat16().float()
    assert torch.equal(q[5], torch.zeros(40))  # a zero row stays zero
    err = (q - v).abs()
    assert (err[:5] <= scale[:5] * 0.5 * (1 + 1e-6) + 1e-3 * scale[:5]).all()
    steps = q[:5] / scale[:5]  # whole multiples of the row's scale, within the levels
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
    assert steps.abs().max() <= levels
    with pytest.raises(ValueError, match="bits must be in"):
        rq.quantize_rows(v, 1)


def test_patched_lookup_reads_quantized_rows_and_keeps_the_value_gradient():
    torch.manual_seed(1)
    table = torch.randn(12, 16, requires_grad=True)
    idx = torch.randint(0, 12, (5, 3))
    w = torch.rand(5, 3, requires_grad=True)
    gy = torch.randn(5, 16)
    plain = embedding_bag(table, idx, w, impl="torch", sparse_grad=True)
    g_plain = torch.autograd.grad(plain, (table, w), gy)
    restore = rq.patch_reads(8)
    try:
        got = embedding_bag(table, idx, w, impl="torch", sparse_grad=True)
        g_got = torch.autograd.grad(got, (table, w), gy)
    finally:
        restore()
    qt = rq.quantize_rows(table, 8).detach().requires_grad_()
    want = embedding_bag(qt, idx, w, impl="torch", sparse_grad=True)
    torch.testing.assert_close(got, want)  # the output reads the quantized rows
    assert not torch.allclose(got, plain)
    torch.testing.assert_close(g_got[1], torch.autograd.grad(want, w, gy)[0])  # so the score's
    torch.testing.assert_close(g_got[0].to_dense(), g_plain[0].to_dense())  # value grad as is
    # restored: the plain lookup again
    torch.testing.assert_close(embedding_bag(table, idx, w, impl="torch"), plain)
