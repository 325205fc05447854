"""Product-key top-k search (Lample et al. 2019; docs/method.md §1 "Product keys").

The full key set of a head is the Cartesian product of two half-key sets of ``n_keys``
rows each, so it has ``n_keys**2`` keys that are never materialised. The score of key
``(i1, i2)`` is ``q1 · K1[i1] + q2 · K2[i2]``. Any key of the global top-k has ``i1`` in
the top-k of the first half and ``i2`` in the top-k of the second (otherwise k keys
with the same ``i2`` and a better ``i1`` would beat it), so a second top-k over the
``k × k`` candidate sums is exact. Cost: ``O(n_keys · k_dim + k²)`` per head instead of
``O(n_keys² · k_dim)``.
"""

from __future__ import annotations

import torch

from memlayers.ops.embedding_bag import resolve_impl

HALF_DTYPES = (torch.bfloat16, torch.float16)
PRECISIONS = ("fp32", "bf16")


def autocast_half(device: str) -> torch.dtype | None:
    """The autocast dtype of ``device`` (``"cuda"``, ``"cpu"``) when autocast is on at
    bf16/fp16, else None: the precision the search's products take under it."""
    if not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if dtype in HALF_DTYPES else None


def check_product_key_inputs(query: torch.Tensor, keys: torch.Tensor, k: int) -> None:
    """Raise ``ValueError`` naming the offending value when shapes or ``k`` don't fit."""
    if keys.dim() != 4 or keys.shape[1] != 2:
        raise ValueError(
            f"keys must be [heads, 2, n_keys, k_dim // 2], got shape {tuple(keys.shape)}"
        )
    heads, _, n_keys, half = keys.shape
    if query.dim() < 2 or query.shape[-2] != heads or query.shape[-1] != 2 * half:
        raise ValueError(
            f"query must be [..., heads={heads}, k_dim={2 * half}] to match keys "
            f"{tuple(keys.shape)}, got shape {tuple(query.shape)}"
        )
    if not (1 <= k <= n_keys):
        raise ValueError(f"k must be in [1, n_keys={n_keys}], got k={k}")
    if not query.is_floating_point() or not keys.is_floating_point():
        raise ValueError(
            f"query and keys must be floating point, got {query.dtype} and {keys.dtype}"
        )
    if query.device != keys.device:
        raise ValueError(f"query is on {query.device} but keys are on {keys.device}")


def product_key_topk(
    query: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    impl: str = "auto",
    half_top: bool = False,
    precision: str = "fp32",
) -> tuple[torch.Tensor, ...]:
    """Exact top-k over the ``n_keys**2`` product keys of every head.

    Args:
        query: ``[..., heads, k_dim]``; the first half is scored against ``keys[:, 0]``,
            the second half against ``keys[:, 1]``.
        keys: ``[heads, 2, n_keys, k_dim // 2]``.
        k: how many keys to keep per head, ``1 <= k <= n_keys``.
        impl: ``"auto"`` (Triton on CUDA) | ``"torch"`` | ``"triton"``: the Triton path
            (:mod:`memlayers.ops.product_keys_triton`) runs the two top-k passes in one
            kernel; the half-key scores are matrix products either way. The Triton path
            scores in fp32: fp64 inputs (outside autocast) go to the PyTorch path under
            ``"auto"`` and are refused by ``"triton"``.
        half_top: also return each half's own top-k keys, the candidates' halves.
        precision: ``"fp32"`` (exact: half scores in fp32 at least) | ``"bf16"``: each
            half key's score rounded to bf16 before ranking (half the bytes written and
            ranked; keys within a bf16 step of each other may swap), the returned sums
            of the two rounded halves in fp32. The choice is then exact for the rounded
            scores, not the true ones: ``benchmarks/bench_memory_layer.py`` reports its
            recall against fp32.

    Returns:
        ``(scores, indices)``, both ``[..., heads, k]``, sorted by descending score, with
        ``index = i1 * n_keys + i2`` (int64). Scores are differentiable in query and keys.
        Among equal scores the two paths may pick different keys. With ``half_top`` a
        third, ``[..., heads, 2, k]`` int32: the top-k half keys of each half, descending
        (what :func:`memlayers.router.balance_loss` counts).
    """
    check_product_key_inputs(query, keys, k)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got precision={precision!r}")
    rank_bf16 = precision == "bf16"
    # Scores in fp32 at least, autocast or not: bf16 would quantise the top-k choice and
    # the softmax (a bf16 step is 0.0625 between 8 and 16). The PyTorch path widens its
    # inputs; the Triton path multiplies bf16/fp16 inputs with fp32 accumulation and fp32
    # output (the same products, on tensor cores), and under bf16/fp16 autocast it takes
    # its inputs at the autocast dtype, as autocast would for a matmul (fp32 keys and an
    # fp32 normed query included). Autocast is off inside either way.
    device = query.device.type
    half = autocast_half(device)
    with torch.autocast(device, enabled=False):
        if _search_impl(impl, query, keys, half) == "triton":
            from memlayers.ops.product_keys_triton import product_key_topk_triton

            if half is not None:
                query, keys = query.to(half), keys.to(half)
            return product_key_topk_triton(query, keys, k, half_top, rank_bf16)
        dtype = torch.promote_types(torch.promote_types(query.dtype, keys.dtype), torch.float32)
        return _product_key_topk_torch(query.to(dtype), keys.to(dtype), k, half_top, rank_bf16)


def _search_impl(impl: str, query: torch.Tensor, keys: torch.Tensor, half) -> str:
    """``impl`` resolved for these inputs: the Triton kernels rank fp32 scores, so fp64
    inputs (not cast by autocast, ``half``) take the PyTorch path under ``"auto"`` and are
    refused by ``"triton"`` (its scores would be fp32 ones labelled fp64, and a near-tie
    could pick other rows than the PyTorch path's)."""
    resolved = resolve_impl(impl, query.device)
    dtype = torch.promote_types(query.dtype, keys.dtype)
    if resolved != "triton" or half is not None or dtype != torch.float64:
        return resolved
    if impl == "auto":
        return "torch"
    raise ValueError(
        f"impl='triton' scores in fp32 and takes fp16, bf16 or fp32 inputs, got query "
        f"{query.dtype} and keys {keys.dtype}: use impl='torch' (or 'auto') for float64"
    )


def _product_key_topk_torch(
    query: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    half_top: bool = False,
    rank_bf16: bool = False,
) -> tuple[torch.Tensor, ...]:
    """The PyTorch path and reference: three ``torch.topk`` passes (``rank_bf16``: the
    half scores rounded to bf16 first, the rest in their dtype)."""
    n_keys, half = keys.shape[2], keys.shape[3]
    dtype = torch.promote_types(query.dtype, keys.dtype)
    q = query.to(dtype)
    kk = keys.to(dtype)
    q1, q2 = q[..., :half], q[..., half:]  # [..., H, half] each
    # Scores of every half key: [..., H, n_keys]. einsum keeps the leading dims free.
    s1 = torch.einsum("...hd,hnd->...hn", q1, kk[:, 0])
    s2 = torch.einsum("...hd,hnd->...hn", q2, kk[:, 1])
    if rank_bf16:
        s1, s2 = s1.bfloat16().to(dtype), s2.bfloat16().to(dtype)
    v1, i1 = s1.topk(k, dim=-1)  # [..., H, k]
    v2, i2 = s2.topk(k, dim=-1)  # [..., H, k]
    cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)  # [..., H, k*k]
    scores, flat = cand.topk(k, dim=-1)  # [..., H, k], sorted descending
    idx1 = i1.gather(-1, flat // k)
    idx2 = i2.gather(-1, flat % k)
    if half_top:
        return scores, idx1 * n_keys + idx2, torch.stack([i1, i2], -2).to(torch.int32)
    return scores, idx1 * n_keys + idx2


def product_key_topk_bruteforce(
    query: torch.Tensor, keys: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: score all ``n_keys**2`` keys explicitly, then one top-k (tests only)."""
    check_product_key_inputs(query, keys, k)
    half = keys.shape[3]
    s1 = torch.einsum("...hd,hnd->...hn", query[..., :half], keys[:, 0])
    s2 = torch.einsum("...hd,hnd->...hn", query[..., half:], keys[:, 1])
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # [..., H, n_keys**2]
    return full.topk(k, dim=-1)
