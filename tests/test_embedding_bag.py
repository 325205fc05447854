"""The PyTorch embedding-bag path against torch.nn.functional.embedding_bag."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from memlayers.ops import embedding_bag

CASES = {
    "basic": (50, 16, 8, 6),
    "odd-dim": (37, 13, 5, 7),
    "many-duplicates": (3, 24, 10, 32),
    "single-row": (1, 8, 4, 5),
    "one-per-bag": (20, 9, 11, 1),
}


def _inputs(n, d, b, k, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, d, generator=g, dtype=dtype)
    indices = torch.randint(0, n, (b, k), generator=g)
    weights = torch.randn(b, k, generator=g, dtype=dtype)
    return values, indices, weights


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_functional_embedding_bag(case):
    values, indices, weights = _inputs(*CASES[case])
    v1, w1 = values.clone().requires_grad_(), weights.clone().requires_grad_()
    v2, w2 = values.clone().requires_grad_(), weights.clone().requires_grad_()
    out = embedding_bag(v1, indices, w1, impl="torch")
    ref = F.embedding_bag(indices, v2, per_sample_weights=w2, mode="sum")
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(v1.grad, v2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


def test_gradcheck_float64():
    values, indices, weights = _inputs(*CASES["many-duplicates"])
    values.requires_grad_()
    weights.requires_grad_()
    torch.autograd.gradcheck(lambda v, w: embedding_bag(v, indices, w), (values, weights))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_tables_accumulate_in_fp32(dtype):
    # Low-precision tables must give fp32-accurate sums of their rows, and a score
    # gradient (PyTorch's own backward lacks it for bf16). The fp32 weights are not
    # rounded to the table dtype first (the PyTorch path did, before 2026-12-05): what's
    # left is the final rounding of the output.
    values, indices, weights = _inputs(64, 40, 16, 32, dtype=torch.float32, seed=3)
    vh = values.to(dtype).requires_grad_()
    wh = weights.clone().requires_grad_()
    out = embedding_bag(vh, indices, wh)
    ref = F.embedding_bag(
        indices, vh.detach().double(), per_sample_weights=weights.double(), mode="sum"
    )
    assert out.dtype == dtype
    # Only the final rounding to the table dtype: <= 2^-8 relative for bf16.
    torch.testing.assert_close(out.double(), ref, rtol=8e-3, atol=1e-3)
    grad = torch.randn(out.shape, dtype=dtype)
    out.backward(grad)
    ref_w = torch.einsum("bkd,bd->bk", vh.detach().double()[indices], grad.double())
    torch.testing.assert_close(wh.grad.double(), ref_w, rtol=1e-5, atol=1e-5)
    assert vh.grad.dtype == dtype


def test_sparse_grad_equals_dense_grad():
    values, indices, weights = _inputs(400, 6, 9, 12, seed=4)
    vs = values.clone().requires_grad_()
    vd = values.clone().requires_grad_()
    embedding_bag(vs, indices, weights, sparse_grad=True).sum().backward()
    embedding_bag(vd, indices, weights).sum().backward()
    assert vs.grad.is_sparse
    # Only the rows read, each once: untouched rows cost nothing.
    assert vs.grad._nnz() == indices.unique().numel() < values.shape[0]
    assert torch.equal(vs.grad.coalesce().indices()[0], indices.unique())
    torch.testing.assert_close(vs.grad.to_dense(), vd.grad)


def test_empty_batch():
    values, _, _ = _inputs(10, 4, 1, 1)
    values.requires_grad_()
    indices = torch.empty(0, 3, dtype=torch.int64)
    weights = torch.empty(0, 3, dtype=torch.float64, requires_grad=True)
    out = embedding_bag(values, indices, weights)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert torch.equal(values.grad, torch.zeros_like(values))


def test_chunked_backward_matches(monkeypatch):
    # Force many small chunks through the backward loop. (import_module: the package
    # re-exports the function under the module's name.)
    eb = importlib.import_module("memlayers.ops.embedding_bag")
    monkeypatch.setattr(eb, "_CHUNK_ELEMENTS", 64)
    values, indices, weights = _inputs(30, 8, 13, 5, seed=5)
    v1, w1 = values.clone().requires_grad_(), weights.clone().requires_grad_()
    ref = F.embedding_bag(indices, values, per_sample_weights=weights, mode="sum")
    embedding_bag(v1, indices, w1).backward(torch.ones_like(ref))
    ref_v = torch.zeros_like(values).index_add_(
        0, indices.reshape(-1), weights.reshape(-1, 1).expand(-1, 8)
    )
    torch.testing.assert_close(v1.grad, ref_v)
    torch.testing.assert_close(w1.grad, values[indices].sum(-1))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda v, i, w: (v[0], i, w), "values must be \\[N, D\\]"),
        (lambda v, i, w: (v.long(), i, w), "values must be floating"),
        (lambda v, i, w: (v, i[0], w[0]), "indices must be \\[B, K\\]"),
        (lambda v, i, w: (v, i.int(), w), "int64"),
        (lambda v, i, w: (v, i, w[:, :2]), "weights must have the shape"),
        (lambda v, i, w: (v, i, w.long()), "weights must be floating"),
    ],
    ids=["values-1d", "values-int", "indices-1d", "indices-int32", "weights-shape", "weights-int"],
)
def test_bad_inputs(mutate, match):
    v, i, w = _inputs(10, 4, 3, 5)
    with pytest.raises(ValueError, match=match):
        embedding_bag(*mutate(v, i, w))


def test_bad_impl():
    v, i, w = _inputs(10, 4, 3, 5)
    with pytest.raises(ValueError, match="impl must be one of"):
        embedding_bag(v, i, w, impl="cuda")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    v, i, w = _inputs(10, 4, 3, 5)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        embedding_bag(v, i, w, impl="triton")
