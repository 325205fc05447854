"""ProductKeyRouter: the key search shared by the memory layer and PEER.

docs/method.md §1–§2. A token's query, split per head into two halves, is scored against
two sets of ``n_keys`` half keys; the exact top-k of the ``n_keys**2`` sums is found by
:func:`memlayers.ops.product_key_topk` and the softmax of the k scores weights the chosen
rows (memory) or experts (PEER). With qk-norm (Memory+) the query halves and the keys are
RMS-normalised, the query gets a learnable gain, and scores are scaled by 1/sqrt(half).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlayers.ops.product_keys import product_key_topk


def rms_halves(t: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise each half-key-sized vector along the last dim."""
    acc = torch.promote_types(t.dtype, torch.float32)  # fp32 at least, fp64 stays fp64
    return t * torch.rsqrt(t.to(acc).pow(2).mean(-1, keepdim=True) + eps).to(t.dtype)


class ProductKeyRouter(nn.Module):
    """``h [N, dim] -> (indices, weights)``, each ``[N, heads*topk]``: query projection →
    qk-norm → product-key top-k → softmax per head (fp32 at least)."""

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
        impl: str = "auto",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.k_dim, self.heads, self.topk, self.impl = k_dim, heads, topk, impl
        self.norm_eps, self.query_dropout = norm_eps, query_dropout
        self.query = nn.Linear(dim, heads * k_dim, bias=query_bias, device=device)
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, k_dim // 2, device=device))
        # qk-norm: both sides to unit RMS, a learnable query gain, scores scaled by
        # 1/sqrt(half) as in attention: each half's score has std ~1 at init (the sum
        # ~1.4, against ~0.6 without the norm at the default init).
        self.gain = nn.Parameter(torch.empty(heads, k_dim, device=device)) if qk_norm else None

    def init_weights(self, query_std: float) -> None:
        """Keys uniform in ``±1/sqrt(k_dim)``; the query truncated normal (±3 std) with
        ``query_std``; its bias zero; the gain one."""
        bound = self.k_dim**-0.5
        nn.init.uniform_(self.keys, -bound, bound)
        nn.init.trunc_normal_(self.query.weight, std=query_std, a=-3 * query_std, b=3 * query_std)
        if self.query.bias is not None:
            nn.init.zeros_(self.query.bias)
        if self.gain is not None:
            nn.init.ones_(self.gain)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, half = h.shape[0], self.k_dim // 2
        q = self.query(h).view(-1, self.heads, self.k_dim)  # [N, H, k_dim]
        q = F.dropout(q, self.query_dropout, self.training)
        keys = self.keys  # [H, 2, n_keys, half]
        if self.gain is not None:
            q = rms_halves(q.view(-1, self.heads, 2, half), self.norm_eps)  # [N, H, 2, half]
            q = q.view(-1, self.heads, self.k_dim) * self.gain * half**-0.5
            keys = rms_halves(keys, self.norm_eps)
        scores, indices = product_key_topk(q, keys, self.topk, impl=self.impl)  # [N, H, k]
        # Per head, over its k rows (scores are fp32 at least: product_key_topk).
        weights = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        return indices.view(n, -1), weights.view(n, -1)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, topk={self.topk}, k_dim={self.k_dim}"


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
