"""Defects a review of memlayers/ops found (session 32), each with the case that failed
before its fix. Triton runs in the interpreter on the CPU (conftest), on CUDA tensors on
a GPU machine."""

import pytest
import torch

from memlayers.ops import embedding_bag, product_key_topk
from memlayers.ops.offloaded import HostTable
from memlayers.ops.row_adam import row_adam_step_, row_sgd_step_, stochastic_round_bf16

IMPLS = ["torch", "triton"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _dev(impl):
    return DEV if impl == "triton" else "cpu"


# fp32 NaN with the bits a GPU gives every NaN that arithmetic makes: its stochastic
# rounding carried into the sign bit (-0.0).
GPU_NAN = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)


def test_stochastic_rounding_keeps_nan():
    x = torch.cat([GPU_NAN, torch.tensor([1.0, float("inf"), -float("inf")])])
    for noise in (0, 0xFFFF, 0x8000):
        out = stochastic_round_bf16(x, torch.full((4,), noise, dtype=torch.int64))
        assert out[0].isnan() and out[1] == 1 and out[2] == float("inf")
        assert out[3] == -float("inf")


@pytest.mark.parametrize("impl", IMPLS)
def test_a_nan_gradient_leaves_nan_in_a_bf16_table_and_moments(impl):
    dev = _dev(impl)
    g = torch.tensor([[GPU_NAN.item(), 1.0, 1.0, 1.0]], device=dev)
    rows = torch.tensor([1], device=dev)
    p = torch.ones(2, 4, dtype=torch.bfloat16, device=dev)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    row_adam_step_(p, rows, g, m, v, 1, 0.1, 0.9, 0.999, 1e-8, 0.0, impl=impl)
    assert p[1, 0].isnan() and m[1, 0].isnan() and v[1, 0].isnan()
    assert not p[1, 1:].isnan().any() and (p[0] == 1).all()
    p = torch.ones(2, 4, dtype=torch.bfloat16, device=dev)
    row_sgd_step_(p, rows, g, 1, 0.1, impl=impl)
    assert p[1, 0].isnan()


def _adam(impl, rows, steps=1, d=3, rowwise_v=False):
    dev = _dev(impl)
    p, m = torch.ones(8, d, device=dev), torch.zeros(8, d, device=dev)
    v = torch.zeros(8, device=dev) if rowwise_v else torch.zeros(8, d, device=dev)
    g = torch.ones(rows.numel(), d, device=dev)
    row_adam_step_(p, rows.to(dev), g, m, v, steps, 0.1, 0.9, 0.999, 1e-8, 0.0, impl=impl,
                   rowwise_v=rowwise_v)  # fmt: skip
    return p.cpu()


@pytest.mark.parametrize("impl", IMPLS)
def test_row_steps_refuse_strided_and_repeated_rows_and_step_zero(impl):
    # Strided rows: the kernels read rows_ptr + u (the Triton path updated [0, 2, 7] for
    # rows [0, 2, 4]); repeated rows: the paths kept one gradient or raced.
    strided = torch.tensor([0, 7, 2, 7, 4], device=_dev(impl))[::2]  # (.to() would copy)
    with pytest.raises(ValueError, match="rows, grad and optimizer state must be contiguous"):
        _adam(impl, strided)
    dev = _dev(impl)
    if dev == "cpu":  # on CUDA a device-side assert (test_row_adam_checks, in a child)
        with pytest.raises(ValueError, match="row 1 appears more than once"):
            _adam(impl, torch.tensor([1, 3, 1]))
        with pytest.raises(ValueError, match="appears more than once"):
            row_sgd_step_(torch.ones(4, 2), torch.tensor([2, 2]), torch.ones(2, 2), 1, 0.1,
                          impl=impl)  # fmt: skip
    with pytest.raises(ValueError, match="step must be an int >= 1"):
        _adam(impl, torch.tensor([1]), steps=0)
    # Distinct, contiguous rows in any order are fine and equal on both paths.
    torch.testing.assert_close(
        _adam(impl, torch.tensor([4, 0, 2])), _adam("torch", torch.tensor([0, 2, 4]))
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the "
                    "interpreter does not specialize D = 1 to a constant")  # fmt: skip
def test_rowwise_adam_kernel_compiles_for_one_column():
    rows = torch.tensor([0, 3])
    torch.testing.assert_close(
        _adam("triton", rows, d=1, rowwise_v=True), _adam("torch", rows, d=1, rowwise_v=True)
    )


def test_triton_search_keeps_nan_scores_as_torch_topk_does():
    torch.manual_seed(0)
    keys = torch.randn(1, 2, 8, 2)
    keys[0, 0, 5, 0] = float("nan")
    q = torch.randn(1, 1, 4)
    for impl, dev in (("torch", "cpu"), ("triton", DEV)):
        scores, _ = product_key_topk(q.to(dev), keys.to(dev), 3, impl=impl)
        assert scores.isnan().all(), impl  # before: the Triton path ranked NaN sums last


@pytest.mark.parametrize("impl", IMPLS)
def test_lookup_of_a_half_table_takes_fp32_weights_unrounded(impl):
    dev = _dev(impl)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 8, generator=g).to(torch.bfloat16)
    idx = torch.randint(0, 50, (64, 4), generator=g)
    w = torch.rand(64, 4, generator=g)
    exact = (table.double()[idx] * w.double()[..., None]).sum(1).to(torch.bfloat16)
    out = embedding_bag(table.to(dev), idx.to(dev), w.to(dev), impl=impl).cpu()
    if impl == "torch":  # before: the weights rounded to bf16 first, 32% of outputs off
        assert (out != exact).float().mean() < 0.02
    else:  # fp32 sums rounded once (the interpreter's bf16 cast is not to nearest)
        torch.testing.assert_close(out.float(), exact.float(), rtol=2**-7, atol=0)
    # fp16 table 1e-3 times weight 1e5 = 100: the fp16-rounded weight overflowed to inf.
    big = embedding_bag(torch.full((2, 3), 1e-3, dtype=torch.float16, device=dev),
                        torch.zeros(1, 1, dtype=torch.long, device=dev),
                        torch.tensor([[1e5]], device=dev), impl=impl)  # fmt: skip
    assert torch.isfinite(big).all() and abs(float(big[0, 0]) - 100.0) < 0.1


def test_torch_lookup_of_an_empty_row_width():
    table = torch.randn(5, 0, requires_grad=True)
    w = torch.rand(3, 2, requires_grad=True)
    out = embedding_bag(table, torch.randint(0, 5, (3, 2)), w, impl="torch")
    assert out.shape == (3, 0)
    out.sum().backward()
    assert w.grad.shape == (3, 2) and (w.grad == 0).all()


def test_host_table_gather_with_a_cache_checks_unsorted_rows():
    table = torch.arange(40.0).view(10, 4)
    host = HostTable((table,))
    host.cache_rows_(torch.tensor([0]), "cpu")
    # Before: only rows[0] and rows[-1] were checked; -1 was clamped to cached row 0.
    with pytest.raises(ValueError, match="index -1 is out of range"):
        host.gather(torch.tensor([5, -1, 7]))
    torch.testing.assert_close(host.gather(torch.tensor([7, 0, 5]))[0], table[[7, 0, 5]])
