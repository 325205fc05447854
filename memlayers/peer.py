"""PEER: a mixture of a million tiny experts (He 2024), the paper's second baseline.

Product keys (as in the memory layer) select, per head, the top-k of ``n_keys**2``
experts. Expert ``i`` is rank one: a down vector ``u_i`` and an up vector ``v_i``, both
``[dim]``, computing ``gelu(u_i · x) v_i``. With ``g`` the softmax of the k selected scores
of a head, the output is ``Σ_heads Σ_i g_i gelu(u_i · x) v_i`` — a feed-forward whose
hidden units are chosen per token. The up half is exactly a weighted embedding bag
(weights ``g_i gelu(u_i · x)``), so it reuses :func:`memlayers.ops.embedding_bag`.

The paper's baseline uses 768 half-keys, so ``2 · 768² · dim`` parameters slightly
exceed the 1024² · dim of a memory layer (docs/method.md §4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlayers.memory import _positive_int, no_tokens_output
from memlayers.ops.embedding_bag import IMPLS, embedding_bag
from memlayers.router import ProductKeyRouter, load_old_router_names


@dataclass
class PEERConfig:
    """A PEER layer: ``n_keys**2`` rank-one experts shared by ``heads`` heads, each head
    with its own ``2 × n_keys`` product half-keys of width ``k_dim / 2`` (``k_dim`` None:
    half the model width) and its own top-``topk`` choice, so a token uses ``heads · topk``
    experts. ``qk_norm`` RMS-normalises the query and key halves with a learnable query gain
    (as Memory+), ``norm_eps`` is that normalisation's epsilon, and ``impl`` picks the
    kernels of the top-k search and the embedding bag (auto | torch | triton). The
    paper-size ``peer`` presets put one layer in the middle block with 768 half-keys
    (589,824 experts), 8 heads and top-16, ``k_dim`` None; ``tiny-peer`` uses 64
    half-keys, 4 heads and top-8."""

    n_keys: int = 768  # half keys per head; n_keys**2 experts
    heads: int = 8
    topk: int = 16  # experts per head and token
    k_dim: int | None = None  # query / key dim; None: half the model dim
    qk_norm: bool = True  # RMS-normalise query and key halves, learnable query gain (Memory+)
    norm_eps: float = 1e-6  # epsilon of the qk normalisation
    impl: str = "auto"  # kernels (product-key top-k, embedding bag): auto | torch | triton

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and its value for invalid settings."""
        for name in ("n_keys", "heads", "topk"):
            _positive_int(name, getattr(self, name))
        if self.k_dim is not None:
            _positive_int("k_dim", self.k_dim)
            if self.k_dim % 2:
                raise ValueError(
                    f"k_dim must be even (it splits into two half keys), got k_dim={self.k_dim}"
                )
        if self.topk > self.n_keys:
            raise ValueError(f"topk must be <= n_keys, got topk={self.topk} > n_keys={self.n_keys}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got impl={self.impl!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got norm_eps={self.norm_eps!r}")

    def resolved_k_dim(self, dim: int) -> int:
        """The query / key width for a model of width ``dim``, validated."""
        _positive_int("dim", dim)
        k_dim = self.k_dim if self.k_dim is not None else dim // 2
        if k_dim < 2 or k_dim % 2:
            raise ValueError(f"k_dim must be even and >= 2, got k_dim={k_dim} (dim={dim})")
        return k_dim

    @property
    def n_experts(self) -> int:
        return self.n_keys**2


class PEER(nn.Module):
    """``(..., dim) -> (..., dim)``, ``heads · topk`` rank-1 experts per token."""

    def __init__(self, dim: int, config: PEERConfig) -> None:
        super().__init__()
        config.validate()
        self.dim, self.config = dim, config
        self.k_dim = k_dim = config.resolved_k_dim(dim)
        h, n = config.heads, config.n_keys
        self.router = ProductKeyRouter(
            dim,
            k_dim,
            n_keys=n,
            heads=h,
            topk=config.topk,
            qk_norm=config.qk_norm,
            norm_eps=config.norm_eps,
            impl=config.impl,
        )
        self.register_load_state_dict_pre_hook(load_old_router_names)
        self.down = nn.Embedding(n * n, dim)  # u_i
        self.up = nn.Embedding(n * n, dim)  # v_i

    def init_weights(self, init_std: float, out_std: float) -> None:
        """The router as memory.py's (query std ``init_std``); ``u ~ N(0, 1/dim)`` so that
        ``u · x`` is ~N(0, 1) for a unit-RMS input; ``v`` with the residual-output std."""
        self.router.init_weights(init_std)
        nn.init.normal_(self.down.weight, std=self.dim**-0.5)
        nn.init.normal_(self.up.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected input [..., dim={self.dim}], got {tuple(x.shape)}")
        if x.numel() == 0:  # no tokens: the router's reshapes to [N, -1] need N > 0
            return no_tokens_output(x, self.parameters())
        h = x.reshape(-1, self.dim)  # [N, dim]
        idx, g = self.router(h)  # [N, H*k] each: experts, softmax per head
        u = F.embedding(idx, self.down.weight)  # [N, H*k, dim]
        a = F.gelu(torch.einsum("nkd,nd->nk", u, h.to(u.dtype)).float())  # [N, H*k]
        out = embedding_bag(self.up.weight, idx, g * a, impl=self.config.impl)  # [N, dim]
        return out.view(*x.shape[:-1], self.dim).to(x.dtype)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={self.dim}, n_experts={c.n_experts}, heads={c.heads}, topk={c.topk}, "
            f"k_dim={self.k_dim}"
        )
