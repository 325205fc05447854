"""Mixture of SwiGLU experts: the paper's MoE baseline (docs/method.md §4).

Every expert is a full-size SwiGLU FFN. In training, routing is *expert choice* (Zhou et
al. 2022): the router gives each token a softmax over experts, then every expert takes the
``capacity`` tokens that score it highest, so the load is balanced by construction and no
auxiliary loss is needed. A token's output is the gate-weighted sum over the experts that
picked it (zero, one or several). Expert choice looks at every token of the batch at once
(including later positions), so at inference the paper routes *top-1*: each token goes
to its highest-probability expert, weighted by that probability — causal and per token,
which also makes KV-cache generation exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlayers.memory import _positive_int, _positive_number, no_tokens_output


@dataclass
class MoEConfig:
    """A mixture-of-experts feed-forward block: ``n_experts`` SwiGLU experts of hidden size
    ``hidden_dim`` each (None: the model's dense FFN hidden size, so every expert is a
    full-size FFN). In training, expert choice: each expert takes the
    ``ceil(capacity_factor · N / n_experts)`` highest-scoring of the batch's N tokens (at
    least 1, at most N), so at 1.0 the experts take about N token slots in all and a token
    may get zero, one or several; in eval mode each token goes to its top-1 expert and
    ``capacity_factor`` plays no part. The paper-size ``moe`` presets replace every FFN
    with 16 / 8 / 6 / 4 experts (134m / 373m / 720m / 1.3b: ``presets.MOE_EXPERTS``, so the
    parameters slightly exceed the memory model's), ``tiny-moe`` with 4; all presets keep
    ``capacity_factor=1.0`` and ``hidden_dim=None``."""

    n_experts: int = 4  # paper: 16 / 8 / 6 / 4 for 134M / 373M / 720M / 1.3B
    capacity_factor: float = 1.0  # expert choice: each expert takes cf * tokens / n_experts
    hidden_dim: int | None = None  # None: the dense FFN's hidden size

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and its value for invalid settings."""
        _positive_int("n_experts", self.n_experts)
        _positive_number("capacity_factor", self.capacity_factor)
        if self.hidden_dim is not None:
            _positive_int("hidden_dim", self.hidden_dim)


class MoE(nn.Module):
    """``(..., dim) -> (..., dim)``: expert choice when training, top-1 in eval mode."""

    def __init__(self, dim: int, hidden_dim: int, config: MoEConfig) -> None:
        super().__init__()
        config.validate()
        self.dim, self.config = dim, config
        self.hidden_dim = config.hidden_dim or hidden_dim
        E, H = config.n_experts, self.hidden_dim
        self.router = nn.Linear(dim, E, bias=False)
        # Expert weights stacked so the expert-choice path is three batched matmuls.
        self.w1 = nn.Parameter(torch.empty(E, dim, H))  # gate projection
        self.w3 = nn.Parameter(torch.empty(E, dim, H))  # up projection
        self.w2 = nn.Parameter(torch.empty(E, H, dim))  # down projection

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, std=init_std)
        for w, std in ((self.w1, init_std), (self.w3, init_std), (self.w2, out_std)):
            nn.init.trunc_normal_(w, std=std, a=-3 * std, b=3 * std)

    def capacity(self, n_tokens: int) -> int:
        """Tokens per expert under expert choice: ``ceil(cf · N / E)``, at most ``N``."""
        c = math.ceil(self.config.capacity_factor * n_tokens / self.config.n_experts)
        return max(1, min(n_tokens, c))

    def router_probs(self, h: torch.Tensor) -> torch.Tensor:
        return self.router(h).float().softmax(dim=-1)  # [N, E]

    def expert_choice(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out like x, chosen token indices [E, C])``."""
        h = x.reshape(-1, self.dim)  # [N, dim]
        probs = self.router_probs(h)  # [N, E]
        gates, idx = probs.t().topk(self.capacity(h.shape[0]), dim=-1)  # [E, C] each
        xe = h[idx]  # [E, C, dim]
        ye = torch.bmm(F.silu(torch.bmm(xe, self.w1)) * torch.bmm(xe, self.w3), self.w2)
        ye = ye * gates.unsqueeze(-1).to(ye.dtype)  # [E, C, dim]
        out = ye.new_zeros(h.shape[0], self.dim)
        out.index_add_(0, idx.reshape(-1), ye.reshape(-1, self.dim))  # [N, dim]
        return out.view(*x.shape[:-1], self.dim).to(x.dtype), idx

    def top1(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out like x, expert of every token [N])``."""
        h = x.reshape(-1, self.dim)  # [N, dim]
        gate, expert = self.router_probs(h).max(dim=-1)  # [N] each
        out = None
        for e in range(self.config.n_experts):
            sel = (expert == e).nonzero().squeeze(1)  # [n_e]
            if sel.numel() == 0:
                continue
            he = h[sel]  # [n_e, dim]
            ye = (F.silu(he @ self.w1[e]) * (he @ self.w3[e])) @ self.w2[e]  # [n_e, dim]
            ye = ye * gate[sel, None].to(ye.dtype)
            if out is None:
                out = ye.new_zeros(h.shape[0], self.dim)
            out = out.index_add(0, sel, ye)
        return out.view(*x.shape[:-1], self.dim).to(x.dtype), expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected input [..., dim={self.dim}], got {tuple(x.shape)}")
        if x.numel() == 0:  # no tokens: no expert has any to take (as ProductKeyMemory)
            return no_tokens_output(x, self.parameters())
        return self.expert_choice(x)[0] if self.training else self.top1(x)[0]

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, n_experts={c.n_experts}, "
            f"capacity_factor={c.capacity_factor}"
        )
