"""A Llama-style decoder whose feed-forward blocks are chosen by config.

RMSNorm, rotary position embeddings, grouped-query attention through
``scaled_dot_product_attention``, SwiGLU feed-forward, tied or untied embeddings. Each
block's feed-forward is one of (docs/method.md §4):

- ``dense``: SwiGLU;
- ``memory``: a :class:`~memlayers.memory.ProductKeyMemory`; with
  ``memory.share_values`` all memory blocks read one :class:`MemoryValues` table that the
  model registers once as ``memory_values`` (Memory+);
- ``moe``: experts, expert-choice routing in training, top-1 at inference
  (:mod:`memlayers.moe`);
- ``peer``: product keys retrieving rank-1 experts (:mod:`memlayers.peer`).

Build on the meta device, then allocate and fill (torchtitan style)::

    model = build_model(ModelConfig(...), device="cuda", seed=0)

``init_weights()`` fills every parameter and buffer, so a meta build never leaves garbage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlayers.loss import linear_cross_entropy
from memlayers.memory import (
    MemoryConfig,
    MemoryValues,
    ProductKeyMemory,
    _positive_int,
    _positive_number,
    merges_grads,
    with_aux_losses,
)
from memlayers.moe import MoE, MoEConfig
from memlayers.peer import PEER, PEERConfig

FFN_KINDS = ("dense", "memory", "moe", "peer")


@dataclass
class ModelConfig:
    """Shape of the transformer and where its memory / expert blocks go."""

    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads (no grouping)
    vocab_size: int = 32000  # the trainer replaces it with the dataset's vocabulary
    ffn_hidden_dim: int | None = None  # None: 8/3 * dim (x ffn_dim_multiplier), rounded up
    ffn_dim_multiplier: float | None = None
    multiple_of: int = 256  # the FFN hidden size is rounded up to a multiple of this
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02
    ffn: str = "dense"  # kind of every block not listed below: dense | memory | moe | peer
    memory_layers: list[int] = field(default_factory=list)  # blocks whose FFN is a memory
    peer_layers: list[int] = field(default_factory=list)  # blocks whose FFN is a PEER layer
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    peer: PEERConfig = field(default_factory=PEERConfig)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size: Llama's ``8/3 · dim`` rule unless ``ffn_hidden_dim`` is set."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def block_kinds(self) -> list[str]:
        """The feed-forward kind of every block, e.g. ``['dense', 'memory', ...]``."""
        kinds = [self.ffn] * self.n_layers
        for i in self.memory_layers:
            kinds[i] = "memory"
        for i in self.peer_layers:
            kinds[i] = "peer"
        return kinds

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and its value for invalid settings."""
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {name}={v!r}")
        if self.dim % self.n_heads:
            raise ValueError(
                f"dim must be divisible by n_heads, got dim={self.dim}, n_heads={self.n_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = dim / n_heads must be even for RoPE, got "
                f"{self.head_dim} (dim={self.dim}, n_heads={self.n_heads})"
            )
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ValueError(
                f"n_heads must be a multiple of n_kv_heads, got n_heads="
                f"{self.n_heads}, n_kv_heads={self.n_kv_heads}"
            )
        if self.ffn_hidden_dim is not None:
            _positive_int("ffn_hidden_dim", self.ffn_hidden_dim)
        _positive_number("ffn_dim_multiplier", self.ffn_dim_multiplier, allow_none=True)
        for name in ("norm_eps", "rope_theta", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {name}={getattr(self, name)!r}")
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn must be one of {FFN_KINDS}, got ffn={self.ffn!r}")
        for name in ("memory_layers", "peer_layers"):
            layers = list(getattr(self, name))
            bad = [i for i in layers if not 0 <= i < self.n_layers]
            if bad or len(set(layers)) != len(layers):
                raise ValueError(
                    f"{name} must hold distinct block indices in "
                    f"[0, n_layers={self.n_layers}), got {name}={layers}"
                )
        both = set(self.memory_layers) & set(self.peer_layers)
        if both:
            raise ValueError(f"blocks {sorted(both)} are in both memory_layers and peer_layers")
        kinds = self.block_kinds()
        if "memory" in kinds:
            self.memory.validate()
            self.memory.resolved_dims(self.dim)
        if "moe" in kinds:
            self.moe.validate()
        if "peer" in kinds:
            self.peer.validate()
            self.peer.resolved_k_dim(self.dim)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Inverse of :meth:`to_dict` (nested configs rebuilt; extra keys are errors)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {unknown}")
        d = dict(d)
        for key, sub in (("memory", MemoryConfig), ("moe", MoEConfig), ("peer", PEERConfig)):
            if isinstance(d.get(key), dict):
                d[key] = sub(**d[key])
        return cls(**d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 sums of squares lose the small components.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, ...]:
    """``(cos, sin)``, each ``[max_seq_len, head_dim / 2]`` fp32."""
    freqs = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), freqs)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[i], x[i + hd/2])`` of ``x (B, h, T, hd)`` by position angles."""
    half = x.shape[-1] // 2
    x1, x2 = x.float()[..., :half], x.float()[..., half:]  # (B, h, T, hd/2) each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


class KVCache:
    """Keys and values of every layer for incremental decoding.

    Buffers ``(B, n_kv_heads, max_len, head_dim)`` are allocated on the first write, in
    the dtype the attention produces (so autocast works). ``pos`` is the number of
    positions filled; :meth:`Transformer.forward` advances it after all layers ran.
    """

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.max_len, self.pos = max_len, 0
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write ``k, v (B, h, T, hd)`` at ``pos``; return all keys and values so far."""
        B, h, T, hd = k.shape
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, got {self.pos + T}")
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(B, h, self.max_len, hd)
            self.v[layer] = v.new_empty(B, h, self.max_len, hd)
        self.k[layer][:, :, self.pos : self.pos + T] = k
        self.v[layer][:, :, self.pos : self.pos + T] = v
        end = self.pos + T
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, h, pos+T, hd)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def init_weights(self, init_std: float, out_std: float) -> None:
        for w in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(w.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std, a=-3 * out_std, b=3 * out_std)

    def forward(self, x, cos, sin, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer_id, k, v)  # (B, nkv, start+T, hd)
        if self.n_kv_heads != self.n_heads:  # grouped-query: each kv head serves n_rep q heads
            n_rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(n_rep, dim=1)  # (B, nh, S, hd)
            v = v.repeat_interleave(n_rep, dim=1)
        mask, causal = None, T > 1
        if start > 0 and T > 1:  # a chunk after cached positions: query i sees keys <= start+i
            pos_q = torch.arange(start, start + T, device=x.device)
            mask = pos_q[:, None] >= torch.arange(start + T, device=x.device)[None, :]  # (T, S)
            causal = False
        elif start > 0:  # one new token sees every cached key
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh*hd)
        return self.wo(y)


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``: the dense Llama feed-forward."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def init_weights(self, init_std: float, out_std: float) -> None:
        for w in (self.w1, self.w3):
            nn.init.trunc_normal_(w.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        nn.init.trunc_normal_(self.w2.weight, std=out_std, a=-3 * out_std, b=3 * out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``."""

    def __init__(
        self, cfg: ModelConfig, layer_id: int, kind: str, values: MemoryValues | None
    ) -> None:
        super().__init__()
        self.kind = kind
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if kind == "dense":
            self.ffn = SwiGLU(cfg.dim, cfg.hidden_dim)
        elif kind == "memory":
            self.ffn = ProductKeyMemory(cfg.dim, cfg.memory, values)
        elif kind == "moe":
            self.ffn = MoE(cfg.dim, cfg.hidden_dim, cfg.moe)
        else:
            self.ffn = PEER(cfg.dim, cfg.peer)

    def init_weights(self, init_std: float, out_std: float) -> None:
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attention.init_weights(init_std, out_std)
        if isinstance(self.ffn, ProductKeyMemory):
            self.ffn.init_weights()  # the memory layer's own rules (memory.py)
        else:
            self.ffn.init_weights(init_std, out_std)

    def forward(self, x, cos, sin, cache: KVCache | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache)
        return h + self.ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    """``tokens (B, T) int64 -> logits (B, T, vocab_size)``."""

    def __init__(self, config: ModelConfig, sparse_values: bool = False) -> None:
        """``sparse_values``: value tables return row-sparse (COO) gradients, for the lazy
        row-wise value optimizer (:func:`memlayers.optim.uses_sparse_values`)."""
        super().__init__()
        config.validate()
        self.config = cfg = config
        kinds = cfg.block_kinds()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # One value pool for every memory block (Memory+); registered here, once, so that
        # state_dict and the optimizer see a single table (memory.py does not register it).
        self.memory_values = None
        if "memory" in kinds and cfg.memory.share_values:
            _, v_dim = cfg.memory.resolved_dims(cfg.dim)
            shared_by = kinds.count("memory")
            merge = merges_grads(cfg.memory, shared_by, "model.memory.",
                                 f"this model has {shared_by} memory layer(s)")  # fmt: skip
            self.memory_values = MemoryValues(
                cfg.memory.n_rows, v_dim, dtype=cfg.memory.table_dtype, merge_grads=merge,
                read=cfg.memory.value_read, grad_read=cfg.memory.grad_read,
            )  # fmt: skip
        self.layers = nn.ModuleList(
            Block(cfg, i, kind, self.memory_values) for i, kind in enumerate(kinds)
        )
        for m in self.modules():
            if isinstance(m, MemoryValues):
                m.sparse_grad = sparse_values
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied: the head reuses tok_embeddings.weight in forward (no second module holding
        # the same Parameter, which a meta build's to_empty() would silently untie).
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", torch.empty_like(cos), persistent=False)
        self.register_buffer("rope_sin", torch.empty_like(sin), persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fill every parameter and buffer (call after ``to_empty``).

        Linear weights: truncated normal ``init_std``; the projections that write into the
        residual stream (``wo``, ``w2``) use ``init_std / sqrt(2 n_layers)`` so the residual
        variance does not grow with depth (GPT-2). Memory layers use their own rules.
        """
        cfg = self.config
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=cfg.init_std)
        if self.memory_values is not None:
            self.memory_values.init_weights()
        for layer in self.layers:
            layer.init_weights(cfg.init_std, out_std)
        self.norm.init_weights()
        if self.output is not None:
            std = cfg.init_std
            nn.init.trunc_normal_(self.output.weight, std=std, a=-3 * std, b=3 * std)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def memory_layers(self) -> list[ProductKeyMemory]:
        return [b.ffn for b in self.layers if isinstance(b.ffn, ProductKeyMemory)]

    def take_aux_loss(self) -> torch.Tensor:
        """The memory layers' auxiliary losses of the last training forward (``balance_loss``
        > 0), summed and handed over once (:meth:`ProductKeyMemory.take_aux_loss`): for a
        loop that computes its own loss from the logits, ``loss = F.cross_entropy(...) +
        model.take_aux_loss()`` before ``backward`` (else the balance loss trains nothing).
        ``forward(tokens, targets=...)`` adds them itself. A 0-d fp32 tensor; 0 when there
        are none."""
        total = torch.zeros((), device=self.tok_embeddings.weight.device)
        for layer in self.memory_layers():
            total = total + layer.take_aux_loss()
        return total

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        *,
        targets: torch.Tensor | None = None,
        check_ids: bool = True,
    ) -> torch.Tensor:
        """``tokens (B, T)`` -> logits ``(B, T, vocab)``; with ``targets (B, T)`` the mean
        next-token cross-entropy instead (fp32 scalar), computed chunk by chunk with the
        head (:func:`memlayers.loss.linear_cross_entropy`): no logits tensor is built; its
        gradient also carries the memory layers' auxiliary losses, if any
        (:func:`memlayers.memory.with_aux_losses`; the value is the cross-entropy alone).
        The logits (no ``targets``) carry no auxiliary loss: a training loop of one's own
        adds :meth:`take_aux_loss` to its loss. ``check_ids=False`` skips the id range
        check (a host sync) for ids known to be in range: :meth:`generate`'s sampled
        tokens."""
        B, T = tokens.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {start + T} positions exceeds max_seq_len={self.config.max_seq_len}"
            )
        # The id check reads two numbers back to the host. Training on CUDA skips it: a
        # sync per micro-batch would stall the step's queued kernels, and the trainer's ids
        # come from the dataset whose tokenizer set vocab_size (a bad one still stops the
        # run, through the embedding's device-side assert).
        if check_ids and tokens.numel() and not (self.training and tokens.is_cuda):
            check_token_ids(tokens, self.config.vocab_size)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        cos = self.rope_cos[start : start + T]  # (T, hd/2)
        sin = self.rope_sin[start : start + T]
        # The blocks run even with no tokens: under torchrun every rank must join each
        # block's collectives (FSDP's gathers, a column-sharded table's lookups), so a
        # rank with an empty batch cannot skip them. Each block passes 0 tokens through
        # (a memory, MoE or PEER layer returns zeros, or looks up 0 bags when sharded).
        for layer in self.layers:
            h = layer(h, cos, sin, cache)
        h = self.norm(h)
        if cache is not None:
            cache.pos += T
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        if targets is not None:
            return with_aux_losses(linear_cross_entropy(h, weight, targets), self.memory_layers())
        return F.linear(h, weight)  # (B, T, vocab)

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        eos_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue ``prompt (B, T0)``; returns ``(B, T0 + n)`` tokens, ``n <= max_new_tokens``.

        ``temperature=0`` is greedy. With a KV cache each new token costs one position;
        without, the whole sequence is rerun (the reference the cache is tested against).
        Runs in eval mode (MoE blocks route top-1, per token) and restores the mode.
        Sequences that emitted ``eos_id`` keep emitting it; generation stops when all did.
        """
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(f"prompt must be (B, T0) with T0 >= 1, got {tuple(prompt.shape)}")
        check_sampling(max_new_tokens, temperature, top_p)
        total = prompt.shape[1] + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(
                f"prompt + max_new_tokens = {total} exceeds max_seq_len={self.config.max_seq_len}"
            )
        was_training = self.training
        self.eval()
        try:
            tokens = prompt
            cache = KVCache(len(self.layers), total) if use_cache else None
            logits = self(prompt, cache)[:, -1]  # (B, vocab)
            done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
            for i in range(max_new_tokens):
                nxt = sample_next(logits, temperature, top_p, generator)  # (B,)
                if eos_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                    done |= nxt == eos_id
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                if i + 1 == max_new_tokens or bool(done.all()):
                    break
                # Sampled ids are in range: no id check (a host sync per token on a GPU).
                if use_cache:
                    logits = self(nxt[:, None], cache, check_ids=False)[:, -1]
                else:
                    logits = self(tokens, check_ids=False)[:, -1]
        finally:
            self.train(was_training)
        return tokens


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """``max_new_tokens >= 0``, ``temperature`` finite and >= 0 (0: greedy), ``0 < top_p <=
    1``; a ValueError naming the value otherwise. Each test is written to fail on NaN."""
    if not max_new_tokens >= 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be finite and >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def check_token_ids(tokens: torch.Tensor, vocab_size: int) -> None:
    """Every id in ``[0, vocab_size)``, or a ValueError naming an offending id (instead of
    the embedding's "index out of range in self", or a device-side assert on CUDA)."""
    lo, hi = torch.stack(torch.aminmax(tokens)).tolist()  # one host sync
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"token id {lo if lo < 0 else hi} is outside the vocabulary: ids must be in "
            f"[0, {vocab_size}) (vocab_size={vocab_size})"
        )


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of ``logits (B, V)``: greedy, or sampled from the top-p nucleus."""
    check_sampling(0, temperature, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = (logits.float() / temperature).softmax(dim=-1)  # (B, V)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already hold top_p of the mass;
        # the first token is always kept.
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def build_model(
    config: ModelConfig,
    device: torch.device | str = "cpu",
    seed: int | None = None,
    sparse_values: bool = False,
) -> Transformer:
    """Build on the meta device, allocate on ``device``, fill with ``init_weights()``.

    With ``seed`` the weights depend only on the seed and the device type.
    ``sparse_values``: see :class:`Transformer`.
    """
    with torch.device("meta"):
        model = Transformer(config, sparse_values)
    model.to_empty(device=device)
    if seed is not None:
        torch.manual_seed(seed)
    model.init_weights()
    return model


@torch.no_grad()
def restrict_vocab_(model: Transformer, vocab_size: int) -> Transformer:
    """``model`` with its embedding and output head cut to their first ``vocab_size``
    rows, in place, for decoding (views of the same weights, no gradient); returns it.

    A pretrained model's embedding is often padded past its tokenizer (to a multiple of
    64 or 128 rows): the padded ids, which no text encodes to and the tokenizer cannot
    decode, would be candidates in greedy decoding and sampling. Cut, the logits are the
    model's over ids < ``vocab_size`` alone, as if the padded ones were masked to -inf;
    the model's config says ``vocab_size``, so the id checks refuse a padded id too."""
    cfg = model.config
    if vocab_size > cfg.vocab_size:
        raise ValueError(f"vocab_size={vocab_size} exceeds the model's {cfg.vocab_size}")
    if vocab_size == cfg.vocab_size:
        return model
    emb = model.tok_embeddings
    emb.weight = torch.nn.Parameter(emb.weight.detach()[:vocab_size], requires_grad=False)
    emb.num_embeddings = vocab_size
    if model.output is not None:  # an untied head (a tied one is the embedding, cut above)
        head = model.output
        head.weight = torch.nn.Parameter(head.weight.detach()[:vocab_size], requires_grad=False)
        head.out_features = vocab_size
    model.config = dataclasses.replace(cfg, vocab_size=vocab_size)
    return model


@contextlib.contextmanager
def restricted_vocab(model: Transformer, vocab_size: int) -> Iterator[Transformer]:
    """:func:`restrict_vocab_` for the ``with`` block only: the embedding, head and config
    are put back after it (greedy QA answers and lm-eval's free text decode through it,
    while losses keep the model's whole vocabulary)."""
    emb, head, cfg = model.tok_embeddings, model.output, model.config
    saved = (emb.weight, emb.num_embeddings, head.weight if head is not None else None)
    restrict_vocab_(model, vocab_size)
    try:
        yield model
    finally:
        emb.weight, emb.num_embeddings = saved[0], saved[1]
        if head is not None:
            head.weight, head.out_features = saved[2], cfg.vocab_size
        model.config = cfg
