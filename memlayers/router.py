"""ProductKeyRouter: the key search shared by the memory layer and PEER.

docs/method.md §1–§2. A token's query, split per head into two halves, is scored against
two sets of ``n_keys`` half keys; the exact top-k of the ``n_keys**2`` sums is found by
:func:`memlayers.ops.product_key_topk` and the softmax of the k scores weights the chosen
rows (memory) or experts (PEER). With qk-norm (Memory+) the query halves and the keys are
RMS-normalised, the query gets a learnable gain, and scores are scaled by 1/sqrt(half).

Two options against a memory that reads few of its rows (docs/usage.md): the queries can
be standardised over the batch before the key search (``query_batch_norm``), and
:func:`balance_loss` measures how unevenly the half keys are chosen, for an auxiliary loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlayers.ops.embedding_bag import resolve_impl
from memlayers.ops.product_keys import HALF_DTYPES, autocast_half, product_key_topk


def rms_halves(t: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise each half-key-sized vector along the last dim."""
    acc = torch.promote_types(t.dtype, torch.float32)  # fp32 at least, fp64 stays fp64
    return t * torch.rsqrt(t.to(acc).pow(2).mean(-1, keepdim=True) + eps).to(t.dtype)


class ProductKeyRouter(nn.Module):
    """``h [N, dim] -> (indices, weights)``, each ``[N, heads*topk]``: query projection →
    (batch norm) → qk-norm → product-key top-k → softmax per head (fp32 at least).

    ``query_batch_norm``: every query feature of every head is centred and scaled to unit
    variance over the batch's tokens, as the original product-key memory did with a
    BatchNorm on its queries (no affine: the qk-norm gain follows). In training the batch's
    own mean and variance are used (gradients flow through them) and ``query_mean`` /
    ``query_var`` (buffers ``[heads, k_dim]``, saved in the state dict) follow them with
    BatchNorm's ``momentum`` rule; in eval mode (validation, generation) those running
    statistics are used, so a token's query then depends on that token alone. In training
    a query depends on the rest of the batch, later positions included, as with any
    BatchNorm. Nothing is synchronised across processes: under data parallelism each rank
    normalises by its own micro-batch and keeps its own running statistics (a distributed
    checkpoint saves one rank's; training does not read them, so a resumed run trains on
    exactly), and memory parallelism (memlayers/parallel.py) gathers the rows and weights
    the search chose, after the queries were normalised on their own rank. Why: in the
    unigram phase of training the queries of all tokens turn towards one shared direction
    and the search reads a few rows for every token; removing the batch mean keeps them
    apart (docs/usage.md, studies 1 and 1b).
    """

    def __init__(
        self,
        dim: int,
        k_dim: int,
        *,
        n_keys: int,
        heads: int,
        topk: int,
        qk_norm: bool = True,
        norm_eps: float = 1e-6,
        query_bias: bool = False,
        query_dropout: float = 0.0,
        query_batch_norm: bool = False,
        momentum: float = 0.1,
        impl: str = "auto",
        search_precision: str = "fp32",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.k_dim, self.heads, self.topk, self.impl = k_dim, heads, topk, impl
        self.search_precision = search_precision  # product_key_topk's precision
        self.norm_eps, self.query_dropout, self.momentum = norm_eps, query_dropout, momentum
        self.query_batch_norm = query_batch_norm
        # Running statistics of the queries for eval mode ([H, k_dim] each), or None.
        mean = var = None
        if query_batch_norm:
            mean = torch.empty(heads, k_dim, device=device)
            var = torch.empty(heads, k_dim, device=device)
        self.register_buffer("query_mean", mean)
        self.register_buffer("query_var", var)
        self.query = nn.Linear(dim, heads * k_dim, bias=query_bias, device=device)
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, k_dim // 2, device=device))
        # qk-norm: both sides to unit RMS, a learnable query gain, scores scaled by
        # 1/sqrt(half) as in attention: each half's score has std ~1 at init (the sum
        # ~1.4, against ~0.6 without the norm at the default init).
        self.gain = nn.Parameter(torch.empty(heads, k_dim, device=device)) if qk_norm else None
        # Set only while a decode step runs (memlayers.decoding.DecodeStep): the normed
        # keys computed once for the whole generation, since nothing changes them there.
        # A plain attribute: not state, never saved.
        self.frozen_keys: torch.Tensor | None = None

    def init_weights(self, query_std: float) -> None:
        """Keys uniform in ``±1/sqrt(k_dim)``; the query truncated normal (±3 std) with
        ``query_std``; its bias zero; the gain one; running query statistics 0 and 1."""
        bound = self.k_dim**-0.5
        nn.init.uniform_(self.keys, -bound, bound)
        nn.init.trunc_normal_(self.query.weight, std=query_std, a=-3 * query_std, b=3 * query_std)
        if self.query.bias is not None:
            nn.init.zeros_(self.query.bias)
        if self.gain is not None:
            nn.init.ones_(self.gain)
        if self.query_batch_norm:
            with torch.no_grad():
                self.query_mean.zero_()
                self.query_var.fill_(1.0)

    def normed_query(self, h: torch.Tensor) -> torch.Tensor:
        """``h [N, dim]`` -> the queries the search scores, ``[N, H, k_dim]``: projection →
        batch norm (when on) → dropout → qk-norm (when on)."""
        half = self.k_dim // 2
        q = self.query(h).view(-1, self.heads, self.k_dim)  # [N, H, k_dim]
        if self.query_batch_norm:
            q = self.batch_norm(q)
        q = F.dropout(q, self.query_dropout, self.training)
        if self.gain is not None:
            q = rms_halves(q.view(-1, self.heads, 2, half), self.norm_eps)  # [N, H, 2, half]
            q = q.view(-1, self.heads, self.k_dim) * self.gain * half**-0.5
        return q

    def normed_keys(self) -> torch.Tensor:
        """The half keys the search scores, ``[H, 2, n_keys, half]`` (RMS-normed with qk-norm);
        :attr:`frozen_keys` instead while a decode step runs."""
        if self.frozen_keys is not None:
            return self.frozen_keys
        return rms_halves(self.keys, self.norm_eps) if self.gain is not None else self.keys

    def batch_norm(self, q: torch.Tensor) -> torch.Tensor:
        """``q [N, H, k_dim]`` standardised per head and feature (see the class docstring):
        batch statistics in training (fp32 at least), which also update the running ones."""
        acc = torch.promote_types(q.dtype, torch.float32)
        qf = q.to(acc)
        if self.training:
            n = q.shape[0]
            if n < 2:
                raise ValueError(
                    f"query_batch_norm needs at least 2 tokens per training batch to "
                    f"estimate a variance, got {n}"
                )
            mean = qf.mean(0)  # [H, k_dim]
            var = qf.var(0, unbiased=False)  # [H, k_dim]
            with torch.no_grad():  # BatchNorm's rule: the running variance is unbiased
                m = self.momentum
                self.query_mean.lerp_(mean.detach().to(self.query_mean.dtype), m)
                unbiased = var.detach() * (n / (n - 1))
                self.query_var.lerp_(unbiased.to(self.query_var.dtype), m)
        else:
            mean, var = self.query_mean.to(acc), self.query_var.to(acc)
        return ((qf - mean) * torch.rsqrt(var + self.norm_eps)).to(q.dtype)

    def search(
        self, q: torch.Tensor, keys: torch.Tensor, half_top: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Top-k rows and their softmax weights, ``[N, H*k]`` each, for ``q [N, H, k_dim]``
        scored against ``keys [H, 2, n_keys, half]``; with ``half_top`` also each half's
        top-k keys ``[N, H, 2, k]`` (:func:`memlayers.ops.product_key_topk`), for
        :func:`balance_loss`."""
        n = q.shape[0]
        out = product_key_topk(
            q, keys, self.topk, self.impl, half_top=half_top, precision=self.search_precision
        )
        scores, indices = out[0], out[1]  # [N, H, k]
        # Per head, over its k rows (scores are fp32 at least: product_key_topk).
        weights = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        return (indices.view(n, -1), weights.view(n, -1)) + tuple(out[2:])

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.search(self.normed_query(h), self.normed_keys())

    def extra_repr(self) -> str:
        s = f"heads={self.heads}, topk={self.topk}, k_dim={self.k_dim}"
        if self.query_batch_norm:
            s += f", query_batch_norm=True, momentum={self.momentum}"
        if self.search_precision != "fp32":
            s += f", search_precision={self.search_precision}"
        return s


# Tokens the balance loss looks at: its half-key scores are [tokens, H, 2, n_keys] fp32,
# 134 MB at 4 heads of 1,024 half keys, where a 134m step's 32,768 tokens would take 1 GB
# a layer (and as much again for the softmax's backward). 4,096 tokens at top-k 32 make
# 128 choices per half key on average, enough to tell the popular keys.
BALANCE_TOKENS = 4096


def balance_loss(
    q: torch.Tensor,
    keys: torch.Tensor,
    topk: int,
    impl: str = "auto",
    half_top: torch.Tensor | None = None,
) -> torch.Tensor:
    """How unevenly the half keys are chosen: a Switch-Transformer-style load-balancing
    loss (Fedus et al. 2021, eq. 4) on each head's two sets of half keys.

    ``q [N, H, k_dim]`` and ``keys [H, 2, n_keys, half]`` are the normed queries and keys
    the search scores (:meth:`ProductKeyRouter.normed_query`, :meth:`~ProductKeyRouter.
    normed_keys`). For every head and half, ``f_i`` is the share of the tokens' top-k
    half-key candidates that are key ``i`` (what the search reads rows from; counted, no
    gradient) and ``P_i`` the mean over tokens of the softmax of the half scores (the
    differentiable stand-in); the loss is ``n_keys · Σ_i f_i P_i``, averaged over heads and
    halves: 1 when choices and probabilities are uniform, up to ``n_keys`` when every token
    picks the same keys. Its gradient lowers the scores of the keys chosen most often, in
    proportion to how often: against the rich-get-richer concentration of reads
    (docs/usage.md). At most :data:`BALANCE_TOKENS` tokens (every ``ceil(N /
    BALANCE_TOKENS)``-th) are scored, in fp32; on CUDA under bf16/fp16 autocast, or with
    q and keys both bf16 (fp16), from products at that precision (fp32 sums), as the
    search scores them (:func:`memlayers.ops.product_key_topk`). ``half_top [N, H, 2,
    topk]``: each half's top-k keys as the search found them (``product_key_topk(...,
    half_top=True)``, for the same q and keys): ``f`` is then counted from them, with no
    ranking of its own (ties aside the same choices: the search ranks the same products,
    where summed in another order a near-tie may fall the other way). Without it each
    row's k-th score is found here (:func:`kth_half_scores`, on ``impl``)."""
    n_tok = q.shape[0]
    heads, _, n_keys, half = keys.shape
    # Integer ceil-division: Inductor's dynamic-shape codegen of this slice's backward
    # failed with math.ceil(n / B) (a float division; torch 2.11, H200: "vr must not be
    # None for symbol ps0") when a second batch shape made the compiled block dynamic.
    stride = max(1, -(-n_tok // BALANCE_TOKENS))
    q = q[::stride]  # [M, H, k_dim]
    if half_top is not None and half_top.shape != (n_tok, heads, 2, topk):
        raise ValueError(
            f"half_top must be [N={n_tok}, heads={heads}, 2, topk={topk}], got shape "
            f"{tuple(half_top.shape)}"
        )
    device = q.device.type
    low = autocast_half(device) if q.is_cuda else None
    if low is None and q.is_cuda and q.dtype in HALF_DTYPES and keys.dtype == q.dtype:
        # Half-precision inputs outside autocast (a bf16 model): their products are exact
        # in fp32 either way, so the tensor cores' fp32 sums score them as the search's
        # Triton path does, without an fp32 GEMM on the CUDA cores.
        low = q.dtype
    with torch.autocast(device, enabled=False):
        qh = q.view(-1, heads, 2, half)  # [M, H, 2, half]
        # Head- and half-major: each (head, half) is one [M, n_keys] block, as the search's
        # top-k kernel reads half scores.
        if low is None:
            s = torch.einsum("thsd,hsnd->hstn", qh.float(), keys.float())  # [H, 2, M, n_keys]
        else:
            # As the search scores under autocast: half-precision products, fp32 sums and
            # output (fp32 inputs took ~1 ms a layer on CUDA cores, H200: session 22).
            a = qh.to(low).permute(1, 2, 0, 3).reshape(heads * 2, -1, half)  # [H·2, M, half]
            b = keys.to(low).reshape(heads * 2, n_keys, half).transpose(1, 2)
            s = _HalfScores.apply(a, b).view(heads, 2, -1, n_keys)
        p = s.softmax(-1).mean(2)  # [H, 2, n_keys]
        with torch.no_grad():
            if half_top is None:
                kth = kth_half_scores(s, topk, impl)  # [H, 2, M, 1]
                chosen = (s >= kth).float()  # [H, 2, M, n_keys]: Σ = topk a row (ties aside)
            else:
                # The search's choices as a [H, 2, M, n_keys] mask (a plain scatter: no
                # atomics to contend on a popular key).
                top = half_top[::stride].permute(1, 2, 0, 3).long()  # [H, 2, M, topk]
                chosen = s.new_zeros(s.shape).scatter_(-1, top, 1.0)
            f = chosen.mean(2) / topk  # [H, 2, n_keys], Σ_i f_i = 1
        return n_keys * (f * p).sum(-1).mean()


class _HalfScores(torch.autograd.Function):
    """``a @ b`` (batched, half-precision inputs) summed and returned in fp32; the backward
    in the inputs' precision, as autocast's products. (``torch.bmm(..., out_dtype=)`` has no
    derivative: torch 2.11, H200, session 22.)"""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return torch.bmm(a, b, out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        grad = grad.to(a.dtype)
        da = torch.bmm(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        db = torch.bmm(a.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
        return da, db


# Whether impl="auto" finds the balance loss's k-th scores with the search's Triton top-k
# (half_kth) on a GPU. torch.topk took 1.1 ms a layer at 4,096 tokens on an H200 (3 of a
# 102 ms step: benchmarks/results/profile_134m_h200_20261203.md); with half_kth the same
# step took 98.3 against 101.7 ms in one call (profile_134m_h200_20261203b.md). False:
# torch.topk, the same values.
BALANCE_KTH_TRITON = True


def kth_half_scores(s: torch.Tensor, k: int, impl: str = "auto") -> torch.Tensor:
    """``[H, 2, M, 1]``: the k-th largest of each row of half scores ``s [H, 2, M, n]``.
    ``impl`` as the search's (:func:`memlayers.ops.product_key_topk`): ``"triton"`` runs
    the search's own per-half top-k (:func:`memlayers.ops.product_keys_triton.half_kth`),
    ``"torch"`` ``torch.topk``: the same values. ``"auto"`` takes Triton on a GPU when
    :data:`BALANCE_KTH_TRITON` is on."""
    triton = resolve_impl(impl, s.device) == "triton"
    if not (triton and (impl == "triton" or BALANCE_KTH_TRITON)):
        return s.topk(k, dim=-1).values[..., -1:]
    from memlayers.ops.product_keys_triton import half_kth

    heads, _, m, _ = s.shape
    kth = half_kth(s[:, 0], s[:, 1], k)  # [M·H, 2], row t·H + h
    return kth.view(m, heads, 2).permute(1, 2, 0).unsqueeze(-1)


# Names the router's parameters had when they lived on the layer itself (before
# router.py), kept so old state dicts and safetensors checkpoints still load.
_OLD_NAMES = {
    "query.weight": "router.query.weight",
    "query.bias": "router.query.bias",
    "keys": "router.keys",
    "query_norm": "router.gain",
}


def load_old_router_names(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """A load_state_dict pre-hook for a layer holding ``self.router``: renames the old
    parameter names in place. An old PEER state dict has no query gain (PEER had none):
    it gets ones, the gain's initial value, which is what that layer computed."""
    renamed = False
    for old, new in _OLD_NAMES.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
            renamed = True
    gain = module.router.gain
    if renamed and gain is not None and prefix + "router.gain" not in state_dict:
        state_dict[prefix + "router.gain"] = torch.ones_like(gain, device="cpu")
