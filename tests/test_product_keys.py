"""product_key_topk must return exactly the top-k of the full n_keys**2 key set."""

import pytest
import torch

from memlayers.ops import product_key_topk
from memlayers.ops.product_keys import product_key_topk_bruteforce


def _check_against_bruteforce(q, keys, k):
    n_keys = keys.shape[2]
    scores, idx = product_key_topk(q, keys, k)
    ref_scores, _ = product_key_topk_bruteforce(q, keys, k)
    assert scores.shape == idx.shape == (*q.shape[:-1], k)
    assert idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < n_keys**2
    # Same k best scores (sorted descending), whatever the ties.
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-5)
    assert (scores[..., :-1] >= scores[..., 1:]).all()
    # Each returned index really has the returned score, and no index repeats.
    half = keys.shape[-1]
    s1 = torch.einsum("...hd,hnd->...hn", q[..., :half], keys[:, 0])
    s2 = torch.einsum("...hd,hnd->...hn", q[..., half:], keys[:, 1])
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)
    torch.testing.assert_close(full.gather(-1, idx), scores, rtol=0, atol=1e-5)
    srt = idx.sort(-1).values
    assert (srt[..., 1:] != srt[..., :-1]).all()
    return scores, idx


@pytest.mark.parametrize(
    "shape,heads,n_keys,k_dim,k",
    [
        ((7,), 1, 8, 4, 3),
        ((3, 5), 4, 16, 8, 5),
        ((2, 3), 2, 10, 6, 10),  # k = n_keys
        ((4,), 3, 32, 16, 1),
    ],
    ids=["one-head", "batched-4-heads", "k-equals-n_keys", "k-1"],
)
def test_matches_bruteforce_random(shape, heads, n_keys, k_dim, k):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(*shape, heads, k_dim, generator=g, dtype=torch.float64)
    keys = torch.randn(heads, 2, n_keys, k_dim // 2, generator=g, dtype=torch.float64)
    _, idx = _check_against_bruteforce(q, keys, k)
    # No ties with random float64 data: the index sets must agree exactly.
    _, ref_idx = product_key_topk_bruteforce(q, keys, k)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)


def test_negative_scores():
    g = torch.Generator().manual_seed(1)
    q = -torch.rand(6, 2, 8, generator=g, dtype=torch.float64) - 1
    keys = torch.rand(2, 2, 12, 4, generator=g, dtype=torch.float64) + 0.5
    scores, _ = _check_against_bruteforce(q, keys, 7)
    assert (scores < 0).all()


def test_ties():
    # Integer-valued keys and queries produce many exact ties in both halves and sums.
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-1, 2, (20, 2, 4), generator=g).double()
    keys = torch.randint(-1, 2, (2, 2, 9, 2), generator=g).double()
    _check_against_bruteforce(q, keys, 9)
    all_equal_q = torch.ones(3, 1, 4, dtype=torch.float64)
    all_equal_k = torch.ones(1, 2, 5, 2, dtype=torch.float64)
    _check_against_bruteforce(all_equal_q, all_equal_k, 5)


def test_index_layout_is_i1_times_n_keys_plus_i2():
    # One dominant half key in each half: the best index is i1 * n_keys + i2.
    n_keys = 6
    keys = torch.zeros(1, 2, n_keys, 2)
    keys[0, 0, 4] = torch.tensor([5.0, 5.0])
    keys[0, 1, 1] = torch.tensor([3.0, 3.0])
    q = torch.ones(1, 1, 4)
    _, idx = product_key_topk(q, keys, 1)
    assert int(idx) == 4 * n_keys + 1


def test_gradients_flow_to_query_and_keys():
    q = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 2, 10, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: product_key_topk(a, b, 4)[0], (q, keys))


@pytest.mark.parametrize(
    "q_shape,k_shape,k,match",
    [
        ((3, 2, 8), (2, 3, 10, 4), 2, "keys must be"),
        ((3, 2, 8), (2, 2, 10), 2, "keys must be"),
        ((3, 4, 8), (2, 2, 10, 4), 2, "heads=2"),
        ((3, 2, 6), (2, 2, 10, 4), 2, "k_dim=8"),
        ((3, 2, 8), (2, 2, 10, 4), 11, "k=11"),
        ((3, 2, 8), (2, 2, 10, 4), 0, "k=0"),
    ],
)
def test_bad_inputs(q_shape, k_shape, k, match):
    with pytest.raises(ValueError, match=match):
        product_key_topk(torch.randn(q_shape), torch.randn(k_shape), k)
