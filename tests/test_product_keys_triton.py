"""The Triton product-key top-k against the PyTorch path: scores, indices and gradients.

Ties may resolve differently, so low-precision cases compare the sorted scores, check that
every returned index scores what is returned, and take gradients against a reference
built from the returned indices. Scores are fp32 whatever the inputs; low-precision
inputs are made so that every score is exact (on a GPU, bf16 inputs are multiplied on
tensor cores, the reference widens them first: scores agree to fp32 rounding). On a CPU
the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py); test_launch_variants also
runs the bf16 (narrow-key) ranking the op itself no longer uses.
"""

import pytest
import torch

from memlayers.ops.product_keys import _product_key_topk_torch, product_key_topk

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# (tokens, heads, n_keys, half key dim, k)
CASES = {
    "basic": (5, 2, 16, 8, 4),
    "non-pow2-keys-and-k": (3, 2, 20, 6, 5),
    "k-equals-n-keys": (4, 1, 32, 4, 32),
    "k-1": (2, 2, 8, 4, 1),
    # Long enough rows (>= 2 * TOPK_CAP keys) for the op to rank only the filtered keys.
    "filtered": (3, 2, 256, 4, 16),
}


def _inputs(t, h, nk, half, dtype, seed=0, exact=False):
    g = torch.Generator().manual_seed(seed)
    if exact:
        # Scores are multiples of 1/8 below 16 in magnitude: sums are exact in bf16/fp16.
        q = torch.randint(-2, 3, (t, h, 2 * half), generator=g).float()
        keys = torch.randint(-8, 9, (h, 2, nk, half), generator=g) / 8
    else:
        q = torch.randn(t, h, 2 * half, generator=g)
        keys = torch.randn(h, 2, nk, half, generator=g)
    return q.to(dtype).to(DEVICE), keys.to(dtype).to(DEVICE)


def _gather_scores(q, keys, index):
    """Scores of given product keys, differentiable: the gradient reference."""
    nk, half = keys.shape[2], keys.shape[3]
    s1 = torch.einsum("...hd,hnd->...hn", q[..., :half], keys[:, 0])
    s2 = torch.einsum("...hd,hnd->...hn", q[..., half:], keys[:, 1])
    return s1.gather(-1, index // nk) + s2.gather(-1, index % nk)


def _check(q, keys, k, exact_indices):
    qa, ka = q.clone().requires_grad_(), keys.clone().requires_grad_()
    scores, index = product_key_topk(qa, ka, k, impl="triton")
    # Scores are fp32 at least whatever the inputs (product_keys.py: no bf16 top-k), so
    # the references score in that dtype too.
    sd = torch.promote_types(q.dtype, torch.float32)
    assert scores.dtype == sd
    ref_scores, ref_index = _product_key_topk_torch(q.to(sd), keys.to(sd), k)
    assert index.dtype == torch.int64
    assert scores.shape == index.shape == (*q.shape[:-1], k)
    # Same scores, descending; indices equal where no ties can interfere (fp32). On a GPU,
    # bf16/fp16 inputs are multiplied on tensor cores with fp32 accumulation, the
    # reference widens them first: the same products, summed in another order.
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        same = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
    else:
        same = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0)  # noqa: E731
    same(scores, ref_scores)
    if exact_indices:
        assert torch.equal(index, ref_index)
    # Every index scores what is returned (half scores and their sum in the score dtype,
    # as both paths compute them).
    same(_gather_scores(q.to(sd), keys.to(sd), index), scores)
    assert (index.unsqueeze(-1) != index.unsqueeze(-2)).sum() == index.numel() * (k - 1)
    # Each half's own top-k, as the balance loss counts them: the keys of the half scores'
    # top-k values (the values compared: ties may pick other keys of the same score).
    _, _, top = product_key_topk(q, keys, k, impl="triton", half_top=True)
    assert top.shape == (*q.shape[:-1], 2, k) and top.dtype == torch.int32
    half = keys.shape[3]
    for i in range(2):
        s = torch.einsum("...hd,hnd->...hn", q[..., i * half : (i + 1) * half].to(sd),
                         keys[:, i].to(sd))  # fmt: skip
        same(s.gather(-1, top[..., i, :].long()), s.topk(k, dim=-1).values)
    grad = torch.randn(scores.shape, generator=torch.Generator().manual_seed(1)).to(scores)
    dq, dk = torch.autograd.grad(scores, (qa, ka), grad)
    qr, kr = q.clone().requires_grad_(), keys.clone().requires_grad_()
    rdq, rdk = torch.autograd.grad(_gather_scores(qr.to(sd), kr.to(sd), index), (qr, kr), grad)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[q.dtype]
    torch.testing.assert_close(dq, rdq, rtol=tol, atol=tol * rdq.abs().max().item())
    torch.testing.assert_close(dk, rdk, rtol=tol, atol=tol * rdk.abs().max().item())


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fp32_matches_torch_exactly(case):
    t, h, nk, half, k = CASES[case]
    q, keys = _inputs(t, h, nk, half, torch.float32)
    _check(q, keys, k, exact_indices=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_half_precision(case, dtype):
    t, h, nk, half, k = CASES[case]
    q, keys = _inputs(t, h, nk, half, dtype, exact=True)
    _check(q, keys, k, exact_indices=False)


def test_launch_variants():
    # Several rows per program with a partial last program, and int64 keys for bf16.
    from memlayers.ops.product_keys_triton import topk_launch

    q, keys = _inputs(7, 1, 16, 4, torch.bfloat16, exact=True)
    s1 = torch.einsum("thd,hnd->thn", q[..., :4], keys[:, 0]).reshape(-1, 16)
    s2 = torch.einsum("thd,hnd->thn", q[..., 4:], keys[:, 1]).reshape(-1, 16)
    ref = topk_launch(s1, s2, 4, rows=1)
    for kwargs in (dict(rows=4), dict(rows=2, narrow=False), dict(num_warps=4)):
        assert torch.equal(topk_launch(s1, s2, 4, **kwargs)[0], ref[0])


def _half_scores_with_ties(heads, tokens, nk, seed):
    g = torch.Generator().manual_seed(seed)
    s1, s2 = (torch.randn(heads, tokens, nk, generator=g) for _ in range(2))
    s1[0, 0] = torch.randint(0, 3, (nk,), generator=g).float()  # ties: > cap keys kept
    s2[-1, -1] = 1.5  # one constant row
    s1[0, 1, 5] = float("nan")  # a NaN row ranks all its keys (no crash, no garbage)
    # More NaNs than k (and fewer than the cap), both signs: NaN is never the bound.
    s1[1, 0, [0, 7, 13, 21, 30]] = float("nan")
    s1[1, 0, [33, 40, 45, 49]] = -float("nan")
    s2[0, 2] = torch.randint(0, 20, (nk,), generator=g).float()  # a few ties in every group
    s2[1, 3, : nk // 2] = -float("inf")
    return s1.to(DEVICE), s2.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nk,k", [(64, 4), (50, 3), (96, 8), (64, 1)])
def test_filter_ranks_the_same_keys(nk, k, dtype):
    # The filter (group bound + compaction, then a small top-k) against ranking every key:
    # the same keys, bit for bit, including rows that fall back (ties, NaN). bf16 half
    # scores rank narrow keys (fp32 scratch).
    from memlayers.ops.product_keys_triton import topk_launch

    s1, s2 = (s.to(dtype) for s in _half_scores_with_ties(2, 5, nk, seed=nk + k))
    for rows in (1, 2):
        full = topk_launch(s1, s2, k, rows=rows, filter_keys=False)
        # Both halves in one launch (two scratches) and one launch per half (one shared).
        for both in (True, False):
            fast = topk_launch(s1, s2, k, rows=rows, cap=16, both_halves=both)
            for a, b in zip(fast, full, strict=True):
                assert torch.equal(a.nan_to_num(), b.nan_to_num())
    # And both are the top-k of the k×k sums of each half's top-k (the PyTorch path),
    # where no NaN is involved.
    v1, _ = s1.topk(k, -1)
    v2, _ = s2.topk(k, -1)
    ref = (v1[..., :, None] + v2[..., None, :]).flatten(-2).topk(k, -1).values
    ref = ref.transpose(0, 1).reshape(-1, k)
    finite = ~ref.isnan().any(-1)
    if dtype == torch.float32:
        assert torch.equal(full[0][finite], ref[finite])
    else:
        # Sums rounded to bf16 in the kernel may differ in the last bit from torch's (the
        # interpreter's conversion truncates); the op never rounds them: its bf16 option
        # keeps bf16 halves and fp32 sums (wide candidate keys), checked here.
        wide = topk_launch(s1, s2, k, out_dtype=torch.float32)[0]
        v1, v2 = v1.float(), v2.float()
        ref = (v1[..., :, None] + v2[..., None, :]).flatten(-2).topk(k, -1).values
        ref = ref.transpose(0, 1).reshape(-1, k)
        assert wide.dtype == torch.float32
        assert torch.equal(wide[finite], ref[finite])


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bf16_ranking_matches_its_reference(case):
    # precision="bf16": half scores rounded to bf16, ranked, summed in fp32. The Triton
    # path against the PyTorch path's rounding (ties are common after rounding: compare
    # the scores, and that every index scores what is returned), gradients as for fp32.
    t, h, nk, half, k = CASES[case]
    q, keys = _inputs(t, h, nk, half, torch.float32, seed=3)
    qa, ka = q.clone().requires_grad_(), keys.clone().requires_grad_()
    scores, index, top = product_key_topk(qa, ka, k, impl="triton", half_top=True,
                                          precision="bf16")  # fmt: skip
    ref_scores, _, ref_top = _product_key_topk_torch(q, keys, k, True, rank_bf16=True)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0)
    s1 = torch.einsum("...hd,hnd->...hn", q[..., :half], keys[:, 0]).bfloat16().float()
    s2 = torch.einsum("...hd,hnd->...hn", q[..., half:], keys[:, 1]).bfloat16().float()
    picked = s1.gather(-1, index // nk) + s2.gather(-1, index % nk)
    torch.testing.assert_close(picked, scores, rtol=0, atol=0)
    assert (index.unsqueeze(-1) != index.unsqueeze(-2)).sum() == index.numel() * (k - 1)
    for i, s in enumerate((s1, s2)):
        torch.testing.assert_close(s.gather(-1, top[..., i, :].long()), s.topk(k, -1).values)
    # Rounding is not the identity: the scores differ from fp32's somewhere.
    exact, _ = product_key_topk(q, keys, k, impl="torch")
    assert not torch.equal(exact, scores)
    grad = torch.randn(scores.shape, generator=torch.Generator().manual_seed(1)).to(scores)
    dq, dk = torch.autograd.grad(scores, (qa, ka), grad)
    qr, kr = q.clone().requires_grad_(), keys.clone().requires_grad_()
    rdq, rdk = torch.autograd.grad(_gather_scores(qr, kr, index), (qr, kr), grad)
    torch.testing.assert_close(dq, rdq, rtol=1e-5, atol=1e-5 * rdq.abs().max().item())
    torch.testing.assert_close(dk, rdk, rtol=1e-5, atol=1e-5 * rdk.abs().max().item())


def test_bf16_ranking_recall():
    # The rounded ranking finds most of the exact top-k (random queries and keys; what a
    # trained model gets is measured by benchmarks/bench_memory_layer.py).
    q, keys = _inputs(64, 2, 64, 16, torch.float32, seed=4)
    _, exact = product_key_topk(q, keys, 8, impl="torch")
    _, approx = product_key_topk(q, keys, 8, impl="torch", precision="bf16")
    hits = (approx.unsqueeze(-1) == exact.unsqueeze(-2)).any(-1).float().mean().item()
    assert 0.9 <= hits < 1.0
    with pytest.raises(ValueError, match="precision must be one of .*'fp8'"):
        product_key_topk(q, keys, 8, precision="fp8")


def test_candidate_pairs_are_the_ones_that_can_win():
    # Pair (a, b) of two descending lists is beaten or tied by the (a+1)(b+1) - 1 pairs
    # above and left of it: only (a+1)(b+1) <= k can be among the k best. Check the claim
    # on lists where every pair's sum is distinct, and the table's count (119 at k = 32).
    from memlayers.ops.product_keys_triton import candidate_pairs

    for k in (1, 3, 8, 32):
        kp = 1 << (k - 1).bit_length()
        pairs = candidate_pairs(k, torch.device("cpu"))
        assert torch.equal(pairs, pairs.sort().values)
        g = torch.Generator().manual_seed(k)
        for _ in range(20):
            v1 = torch.rand(k, generator=g, dtype=torch.float64).sort(descending=True).values
            v2 = torch.rand(k, generator=g, dtype=torch.float64).sort(descending=True).values
            best = (v1[:, None] + v2[None, :]).flatten().topk(k).indices
            best = (best // k) * kp + best % k
            assert set(best.tolist()) <= set(pairs.tolist())
    assert len(candidate_pairs(32, torch.device("cpu"))) == 119


def test_empty_and_mixed_dtypes():
    q, keys = _inputs(0, 2, 16, 4, torch.float32)
    scores, index = product_key_topk(q, keys, 3, impl="triton")
    assert scores.shape == index.shape == (0, 2, 3)
    # bf16 queries against fp32 keys: promoted to fp32, as the PyTorch path does.
    q, keys = _inputs(3, 2, 16, 4, torch.float32, seed=2)
    scores, index = product_key_topk(q.bfloat16(), keys, 3, impl="triton")
    ref_scores, ref_index = _product_key_topk_torch(q.bfloat16(), keys, 3)
    assert scores.dtype == torch.float32
    assert torch.equal(scores, ref_scores) and torch.equal(index, ref_index)


def test_torch_compile_fullgraph():
    q, keys = _inputs(4, 2, 16, 4, torch.float32, seed=3)

    def loss(q, keys):
        scores, _ = product_key_topk(q, keys, 4, impl="triton")
        return scores.softmax(-1).pow(2).sum()

    compiled = torch.compile(loss, fullgraph=True)
    grads = []
    for fn in (loss, compiled):
        qa, ka = q.clone().requires_grad_(), keys.clone().requires_grad_()
        fn(qa, ka).backward()
        grads.append((qa.grad, ka.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_paper_shape(dtype):
    # 512 tokens × 4 heads over 1024² keys, k_dim 512, top-32; random (not exact) inputs:
    # on a GPU the kernel rounds candidate sums as PyTorch does.
    q, keys = _inputs(512, 4, 1024, 256, dtype, seed=4)
    _check(q, keys, 32, exact_indices=dtype == torch.float32)


def test_autocast_scores_at_the_autocast_dtype():
    # Under bf16 autocast the Triton path takes q and keys at bf16, as autocast would for
    # a matmul (fp32 parameters included), and still returns fp32 scores.
    q, keys = _inputs(6, 2, 16, 8, torch.float32, seed=7)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        scores, index = product_key_topk(q, keys, 4, impl="triton")
    ref_scores, ref_index = product_key_topk(q.bfloat16(), keys.bfloat16(), 4, impl="triton")
    full_scores, _ = product_key_topk(q, keys, 4, impl="triton")
    assert scores.dtype == torch.float32
    assert torch.equal(scores, ref_scores) and torch.equal(index, ref_index)
    assert not torch.equal(scores, full_scores)  # the inputs were rounded: it shows


@pytest.mark.parametrize("t,h,nk,half", [(1, 4, 50, 24), (5, 2, 130, 80), (17, 1, 16, 8)])
def test_few_rows_scores_match_the_products(t, h, nk, half):
    # The decode-sized scoring kernel (both halves, one launch) against the per-half
    # products in fp32: the same numbers up to summation order (bf16 products are exact).
    from memlayers.ops.product_keys_triton import few_scores

    q, keys = _inputs(t, h, nk, half, torch.bfloat16, seed=t + nk)
    s1, s2 = few_scores(q, keys)
    assert s1.dtype == s2.dtype == torch.float32
    assert s1.shape == s2.shape == (h, t, nk)
    q32, k32 = q.float(), keys.float()
    for i, s in enumerate((s1, s2)):
        ref = torch.einsum("thd,hnd->htn", q32[..., i * half : (i + 1) * half], k32[:, i])
        torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: the kernel serves bf16 on CUDA")
def test_few_rows_scores_pick_the_same_keys(monkeypatch):
    # The search with the decode-sized scoring (the default for fewer rows than SMs)
    # against the cuBLAS products: the same sorted scores to fp32 rounding, and every pick
    # scoring what is returned, so a pick that differs from the cuBLAS path's can only be a
    # near-tie.
    import memlayers.ops.product_keys_triton as pkt

    q, keys = _inputs(8, 4, 1024, 96, torch.bfloat16, seed=3)
    monkeypatch.setattr(pkt, "SCORES_FEW", False)
    ref_scores, _ = product_key_topk(q, keys, 32, impl="triton")
    monkeypatch.setattr(pkt, "SCORES_FEW", True)
    scores, index = product_key_topk(q, keys, 32, impl="triton")
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-4)
    exact = _gather_scores(q.float(), keys.float(), index)
    torch.testing.assert_close(exact, scores, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "shape,k",
    [((2, 5, 16), 4), ((3, 4, 20), 5), ((1, 3, 32), 32), ((2, 2, 8), 1), ((2, 3, 300), 16)],
    ids=["basic", "non-pow2", "k-equals-n", "k-1", "filtered"],
)
def test_half_kth_is_torch_topks_kth_value(shape, k):
    # The balance loss's k-th score per row by the search's per-half top-k launches: the
    # same value as torch.topk's, with ties (scores on a coarse grid) and rows long enough
    # to be filtered.
    from memlayers.ops.product_keys_triton import half_kth

    g = torch.Generator().manual_seed(k)
    s1, s2 = (
        (torch.randint(-6, 7, shape, generator=g) / 4).to(DEVICE) for _ in range(2)
    )  # fmt: skip
    heads, tokens, _ = shape
    got = half_kth(s1, s2, k)
    assert got.shape == (tokens * heads, 2) and got.dtype == torch.float32
    for half, s in enumerate((s1, s2)):
        want = s.topk(k, dim=-1).values[..., -1]  # [H, T]
        torch.testing.assert_close(got[:, half].view(tokens, heads).T, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="k must be in"):
        half_kth(s1, s2, shape[-1] + 1)


def test_float64_is_refused_by_triton_and_routed_to_torch_by_auto(monkeypatch):
    # The kernels rank fp32 scores: fp64 inputs came back as fp32 scores labelled fp64,
    # and near-ties could pick other rows than the PyTorch path.
    import memlayers.ops.product_keys as pk
    from memlayers.ops.product_keys_triton import product_key_topk_triton

    q, keys = _inputs(3, 2, 16, 4, torch.float64)
    with pytest.raises(ValueError, match=r"impl='triton' .* got query torch.float64"):
        product_key_topk(q, keys, 4, impl="triton")
    with pytest.raises(ValueError, match=r"fp16, bf16 or fp32 inputs, got query torch.float64"):
        product_key_topk_triton(q, keys, 4)
    with pytest.raises(ValueError, match=r"keys torch.float64"):  # the common dtype counts
        product_key_topk(q.float(), keys, 4, impl="triton")
    # "auto" as on a GPU (Triton for every other dtype): fp64 takes the PyTorch path.
    resolve = pk.resolve_impl

    def as_on_a_gpu(impl, device):
        return "triton" if impl == "auto" else resolve(impl, device)

    monkeypatch.setattr(pk, "resolve_impl", as_on_a_gpu)
    got = product_key_topk(q, keys, 4, impl="auto")
    want = product_key_topk(q, keys, 4, impl="torch")
    assert got[0].dtype == torch.float64
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
