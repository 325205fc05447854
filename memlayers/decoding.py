"""Fast decoding: a KV cache of fixed shape, the decode step compiled and captured once.

:meth:`memlayers.model.Transformer.generate` decodes with a :class:`~memlayers.model.
KVCache` that grows a position per token: every step has new shapes, so at batch 1 a GPU
spends its time waiting for the host to launch a few hundred small kernels.
:func:`static_generate` gives the same tokens (greedy: tests/test_decoding.py) with

- a :class:`StaticKVCache`: buffers of ``max_len`` positions allocated up front, the
  position a device tensor, decode attention over all ``max_len`` keys with a mask
  (:func:`static_forward` and :func:`static_block`: the model's forward and blocks for
  this cache, the same modules and weights; tests/test_decoding.py checks their logits
  against the model's): every decode step has the same shapes and the same addresses,
  and none reads a number back to the host (the memory layer's lookup neither: its index
  checks are device-side asserts, :mod:`memlayers.ops.embedding_bag_triton`);
- ``compile``: each kind of block through ``torch.compile`` (inductor; ``fullgraph``
  when nothing in the model needs the host, so a host sync added later fails loudly);
- ``cuda_graph``: the step captured once in a CUDA graph and replayed per token (one
  launch instead of hundreds), with or without ``compile``;
- the product-key routers' qk-normed keys computed once per :class:`DecodeStep`, not
  once a token: nothing changes the keys while it decodes (3 MB read and written per
  134m memory layer and token otherwise).

Not captured: value tables offloaded with ``mode="gather"`` (:mod:`memlayers.offload`)
gather the rows read through the host, a sync per lookup (zero-copy offloaded tables are
read in place: captured like on-device ones); MoE blocks route top-1 with a data-dependent
``nonzero``. Both still decode with the static cache and ``compile`` (the step breaks
into graphs around them); ``cuda_graph`` refuses them, naming the reason.

Sampling (greedy, temperature, top-p) runs outside the graph, on the device, as in
:func:`memlayers.model.sample_next`; EOS is checked on the host every
:data:`EOS_CHECK_EVERY` tokens, not every token (tokens after a sequence's EOS are EOS,
and the result is cut where the eager loop would have stopped).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from memlayers.model import (
    Block,
    Transformer,
    apply_rope,
    check_sampling,
    check_token_ids,
    sample_next,
)
from memlayers.moe import MoE
from memlayers.router import ProductKeyRouter

# Host syncs to see whether every sequence emitted EOS: one per this many tokens.
EOS_CHECK_EVERY = 16
# A static cache's length is rounded up to a multiple of this (capped at max_seq_len),
# so prompts of similar length reuse one compiled step; the extra keys are masked.
CACHE_ROUND = 64
# Compiled versions of the decode step's block a process may keep, one per (block kind,
# batch size, cache length) of every model it decodes (dynamo keeps them per function,
# shared by all models). A 2048-position Memory+ model has 2 kinds x 32 cache lengths:
# 16 batch sizes at every length. Dynamo's default of 8 failed (fullgraph) on the 5th
# cache length; past this bound a fullgraph step still fails loudly (a model with a graph
# break decodes eagerly) rather than compiling without end.
RECOMPILE_LIMIT = 1024


class StaticKVCache:
    """Keys and values of every layer in zeroed buffers of fixed shape ``(B, n_kv_heads,
    max_len, head_dim)`` of ``dtype`` (what the attention produces: the autocast dtype
    under autocast); ``pos`` (the positions filled) is a 0-d int64 tensor on the device.
    Attention reads all ``max_len`` positions and masks the ones not yet written (zeros:
    a masked key must not multiply NaN garbage by a zero weight)."""

    def __init__(
        self, model: Transformer, batch: int, max_len: int, dtype: torch.dtype, device
    ) -> None:
        cfg = model.config
        self.max_len = max_len
        self.pos = torch.zeros((), dtype=torch.int64, device=device)
        self.key_pos = torch.arange(max_len, device=device)  # [max_len]
        shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.layers]


def kv_dtype(model: Transformer, device: torch.device) -> torch.dtype:
    """The dtype of the keys the model's attention computes here: the autocast dtype
    when autocast is on for the device, else the projection's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.layers[0].attention.wk.weight.dtype


def static_block(block: Block, h, cos, sin, k_buf, v_buf, where, mask) -> torch.Tensor:
    """One pre-norm :class:`memlayers.model.Block` on a static cache: ``h (B, T, dim)``
    at positions ``where [T]``, their keys and values written into ``k_buf, v_buf (B,
    nkv, max_len, hd)``, attention over all ``max_len`` keys under ``mask (T, max_len)``
    (None: a prefill from position 0, causal over its own T keys, as the model's forward
    does it). The projections, RoPE and grouping of :class:`memlayers.model.Attention`
    (tests/test_decoding.py checks the logits against the model's own forward). Every
    block of a kind compiles to one graph: no per-layer constant is read here."""
    attn = block.attention
    B, T, _ = h.shape
    nh, nkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    x = block.attention_norm(h)
    q = attn.wq(x).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
    k = attn.wk(x).view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
    v = attn.wv(x).view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_buf.index_copy_(2, where, k)
    v_buf.index_copy_(2, where, v)
    if mask is not None:
        k, v = k_buf, v_buf  # (B, nkv, S = max_len, hd)
    if nkv != nh:  # each kv head serves nh/nkv query heads: the model's repeat_interleave
        # written as an expand and one copy, plainly nothing to read back to the host
        S = k.shape[2]
        k = k[:, :, None].expand(B, nkv, nh // nkv, S, hd).reshape(B, nh, S, hd)
        v = v[:, :, None].expand(B, nkv, nh // nkv, S, hd).reshape(B, nh, S, hd)
    causal = mask is None and T > 1
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, nh, T, hd)
    h = h + attn.wo(y.transpose(1, 2).reshape(B, T, nh * hd))
    return h + block.ffn(block.ffn_norm(h))


def static_forward(
    model: Transformer,
    cache: StaticKVCache,
    tokens: torch.Tensor,
    block_fn=static_block,
    fresh: bool = False,
) -> torch.Tensor:
    """Logits ``(B, V)`` of the last of ``tokens (B, T)``, placed at ``cache.pos``, which
    advances by T: :meth:`memlayers.model.Transformer.forward` on a :class:`StaticKVCache`
    (``block_fn``: :func:`static_block`, or it compiled), no id check, no host sync.
    ``fresh``: the cache is empty (``pos`` is 0: the prefill), so attention is causal over
    the T new keys alone (the fused kernels' causal path) instead of masked over max_len."""
    B, T = tokens.shape
    where = cache.pos + torch.arange(T, device=tokens.device)  # [T] positions
    # (T, max_len): each query sees the keys up to its own position
    mask = None if fresh else cache.key_pos[None, :] <= where[:, None]
    cos, sin = model.rope_cos[where], model.rope_sin[where]  # (T, hd/2) each
    h = model.tok_embeddings(tokens)  # (B, T, dim)
    for block, k_buf, v_buf in zip(model.layers, cache.k, cache.v, strict=True):
        h = block_fn(block, h, cos, sin, k_buf, v_buf, where, mask)
    cache.pos.add_(T)
    h = model.norm(h[:, -1])  # (B, dim)
    weight = model.tok_embeddings.weight if model.output is None else model.output.weight
    return F.linear(h, weight)  # (B, V)


def graph_blockers(model: Transformer) -> list[str]:
    """Why the model's decode step cannot be captured in a CUDA graph (empty: it can)."""
    why = []
    offloaded = (getattr(m, "offloaded", None) for m in model.modules())
    if any(t is not None and t.mode == "gather" for t in offloaded):
        why.append(
            "its value tables are offloaded (memlayers.offload): each lookup gathers the "
            "rows read through the host, a sync per lookup"
        )
    if any(isinstance(m, MoE) for m in model.modules()):
        why.append("its MoE blocks route top-1 with a data-dependent nonzero (a host sync)")
    if any(getattr(m, "read_copy", None) is not None for m in model.modules()):
        why.append(
            "its value tables' lookups read an int8 copy (model.memory.value_read=int8), "
            "whose freshness the host checks before each lookup"
        )
    return why


def check_cuda_graph(model: Transformer, device: torch.device) -> None:
    """A ValueError naming the reason when the decode step cannot be captured."""
    blockers = graph_blockers(model)
    if blockers:
        raise ValueError(
            "the decode step cannot be captured in a CUDA graph: "
            + "; ".join(blockers)
            + ". Decode it with cuda_graph=False (compile still applies)"
        )
    if device.type != "cuda":
        raise ValueError(f"cuda_graph needs the model on a CUDA device, got {device}")


def _recompile_room():
    """Dynamo's recompile limits raised to :data:`RECOMPILE_LIMIT` while a decode step
    compiles (restored after: code compiled elsewhere in the process keeps its limits).
    Dynamo reads the limit when a call misses its function's compiled versions, so this
    admits :func:`static_block`'s versions alone. (The names of torch 2.4, kept since as
    aliases of ``recompile_limit`` and ``accumulated_recompile_limit``.)"""
    config = torch._dynamo.config
    return config.patch(
        cache_size_limit=max(RECOMPILE_LIMIT, config.cache_size_limit),
        accumulated_cache_size_limit=max(RECOMPILE_LIMIT, config.accumulated_cache_size_limit),
    )


def _no_autocast_cache():
    """Autocast as the caller set it, without its weight-cast cache: a graph must not hold
    casts cached outside it, which autocast frees when its region ends (PyTorch's CUDA
    graph notes: ``cache_enabled=False``)."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


class DecodeStep:
    """``step(tokens (B, 1)) -> logits (B, V)``: one decode step of ``model`` on
    ``cache`` (after its prefill, with room for one more position), advancing
    ``cache.pos`` on the device; compiled and/or captured in a CUDA graph, at
    construction. Replays overwrite the returned logits: read them first."""

    def __init__(
        self,
        model: Transformer,
        cache: StaticKVCache,
        batch: int,
        compile: bool = False,
        cuda_graph: bool = False,
    ) -> None:
        self.model, self.cache = model, cache
        self.block_fn = static_block
        # Every router's normed keys, once: held here, so a captured graph's reads of them
        # stay valid for the step's life (used by the calls below, _frozen_keys).
        self.routers = [m for m in model.modules() if isinstance(m, ProductKeyRouter)]
        with torch.no_grad():
            self.keys = [r.normed_keys().detach() for r in self.routers]
        if compile:
            # Block by block ("regional" compilation): the blocks of one kind share a
            # graph, so a 24-layer model compiles two graphs (dense, memory), not one
            # 24 blocks long; fullgraph when no block needs the host. Static shapes
            # (dynamic=False): every (kind, batch, cache length) compiles its own graph,
            # inductor's kernels specialised to it, the ones the tests check against the
            # eager loop (dynamic B and max_len would share a graph but change those
            # kernels, and batch 1 is specialised anyway); their number is bounded by
            # RECOMPILE_LIMIT, raised for this step's compilation alone.
            fullgraph = not graph_blockers(model)
            self.block_fn = torch.compile(static_block, fullgraph=fullgraph, dynamic=False)
        self.graph = None
        if cuda_graph:
            check_cuda_graph(model, cache.pos.device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.int64, device=cache.pos.device)
        if compile or cuda_graph:
            self._warm_up(cuda_graph)
        if cuda_graph:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), _no_autocast_cache(), self._frozen_keys():
                # captured: every replay advances pos
                self.logits = static_forward(model, cache, self.tokens, self.block_fn)

    @contextlib.contextmanager
    def _frozen_keys(self):
        """The routers read :attr:`keys` (their ``frozen_keys``) inside; reset after, so
        training or another forward of the model computes its keys as always."""
        for router, keys in zip(self.routers, self.keys, strict=True):
            router.frozen_keys = keys
        try:
            yield
        finally:
            for router in self.routers:
                router.frozen_keys = None

    def _warm_up(self, for_capture: bool) -> None:
        """One step, undone, so that compilation (inductor, Triton) and lazily built
        tables (the top-k's candidate pairs) happen here rather than in the first step
        or in the capture; before a capture on a side stream and under the capture's
        autocast (PyTorch's recipe). It writes K/V at ``pos``, which the first real step
        overwrites before reading them."""
        start = self.cache.pos.clone()
        side = torch.cuda.Stream() if for_capture else None
        if for_capture:
            side.wait_stream(torch.cuda.current_stream())
        stream = torch.cuda.stream(side) if for_capture else contextlib.nullcontext()
        no_cache = _no_autocast_cache() if for_capture else contextlib.nullcontext()
        with stream, no_cache, self._frozen_keys(), self._compiling():
            static_forward(self.model, self.cache, self.tokens, self.block_fn)
        if for_capture:
            torch.cuda.current_stream().wait_stream(side)
        self.cache.pos.copy_(start)

    def _compiling(self):
        """The raised recompile limits (:data:`RECOMPILE_LIMIT`) when the step is compiled,
        for the warm-up: the calls after it have its shapes and guards and never compile
        (a raised limit around each would cost ~40 us a token, config.patch's own price)."""
        return _recompile_room() if self.block_fn is not static_block else contextlib.nullcontext()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            with self._frozen_keys():
                return static_forward(self.model, self.cache, tokens, self.block_fn)
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


def cache_length(total: int, max_seq_len: int) -> int:
    """A static cache's length for ``total`` positions: rounded up to
    :data:`CACHE_ROUND`, at most ``max_seq_len``."""
    return min(max_seq_len, CACHE_ROUND * math.ceil(total / CACHE_ROUND))


@torch.no_grad()
def static_generate(
    model: Transformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    *,
    compile: bool = False,
    cuda_graph: bool = False,
) -> torch.Tensor:
    """:meth:`memlayers.model.Transformer.generate` (cached), decoding with a
    :class:`StaticKVCache` and a :class:`DecodeStep` (``compile``, ``cuda_graph``): the
    same arguments, the same tokens ``(B, T0 + n)``. Runs in eval mode and restores it."""
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be (B, T0) with T0 >= 1, got {tuple(prompt.shape)}")
    check_sampling(max_new_tokens, temperature, top_p)
    B, t0 = prompt.shape
    total = t0 + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt + max_new_tokens = {total} exceeds max_seq_len={model.config.max_seq_len}"
        )
    check_token_ids(prompt, model.config.vocab_size)  # the only ids not sampled here
    if cuda_graph:
        check_cuda_graph(model, prompt.device)
    was_training = model.training
    model.eval()
    try:
        max_len = cache_length(total, model.config.max_seq_len)
        cache = StaticKVCache(model, B, max_len, kv_dtype(model, prompt.device), prompt.device)
        out = prompt.new_empty(B, total)
        out[:, :t0] = prompt
        logits = static_forward(model, cache, prompt, fresh=True)  # (B, V): the prefill
        step = DecodeStep(model, cache, B, compile, cuda_graph) if max_new_tokens > 1 else None
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        n = max_new_tokens
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_p, generator)  # (B,)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out[:, t0 + i] = nxt
            if i + 1 == max_new_tokens:
                break
            if eos_id is not None and (i + 1) % EOS_CHECK_EVERY == 0 and bool(done.all()):
                n = i + 1
                break
            logits = step(nxt[:, None])
        out = out[:, : t0 + n]
        if eos_id is not None and n:
            # Where the eager loop stops: after the first token at which all rows are done.
            ended = (out[:, t0:] == eos_id).all(0)  # [n]: a row's EOS repeats to the end
            if bool(ended.any()):
                out = out[:, : t0 + int(ended.int().argmax()) + 1]
    finally:
        model.train(was_training)
    return out
