"""A pretrained Llama-style model as a memlayers :class:`~memlayers.model.Transformer`,
with Memory+ added: what the trainer continues to pretrain (``model.hf=...``).

memlayers' decoder is Llama's (RMSNorm, half-split rotary embeddings, grouped-query
attention, SwiGLU): a pretrained ``LlamaForCausalLM`` (SmolLM2, Llama, TinyLlama, ...) maps
onto it weight for weight, the inverse of :mod:`memlayers.export`. Its memory blocks are
the ``memory_layers`` of the config, in one of two modes:

- ``replace``: the memory takes the block's feed-forward place (the paper; the pretrained
  MLP of those blocks is dropped);
- ``parallel``: the memory beside the pretrained MLP, ``mlp(x) + memory(x)`` on the same
  normed input (:class:`ParallelMemory`; :func:`memlayers.hf.add_memory`'s default).

Either way the memory's output projection starts at zero (:func:`silence_memory_outputs_`),
so in parallel mode the model computes the pretrained model's logits until training moves
it (tests/test_retrofit.py checks it against transformers).

Only ``model_type`` ``llama`` and ``mistral`` are read (:data:`RETROFIT_MODEL_TYPES`):
many other transformers configs have the same field names but other maths (Granite's
multipliers, SmolLM3's layers without rope, Helium's rotary layout, Qwen2's q/k/v biases,
which its config does not even record), so a look at the fields alone would load them
with wrong logits. Among those two, biases, rope scaling (Llama 3.1) and sliding-window
attention (Mistral 7B) have no counterpart here either: all are refused by
:func:`architecture_from_transformers`, which names :func:`memlayers.hf.add_memory` (Memory+
in any transformers model, its own architecture kept) for the rest.

Nothing here imports ``transformers``: the config is read by attribute and the weights
arrive as a state dict (:func:`memlayers.hf.load_transformers_model` loads them).
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.nn as nn

from memlayers.memory import MemoryConfig, MemoryValues, ProductKeyMemory
from memlayers.model import ModelConfig, SwiGLU, Transformer

MEMORY_MODES = ("replace", "parallel")


class ParallelMemory(ProductKeyMemory):
    """A memory layer with a dense SwiGLU beside it: ``mlp(x) + memory(x)``.

    Still a :class:`ProductKeyMemory` (its router, value lookup, usage counting, LoRA
    targets and reports are the memory's), with the block's pretrained feed-forward as
    ``mlp``: a retrofit keeps what the model knew and adds the memory's capacity."""

    def __init__(
        self,
        dim: int,
        config: MemoryConfig,
        values: MemoryValues | None = None,
        *,
        hidden_dim: int,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(dim, config, values, device=device)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.mlp = SwiGLU(dim, hidden_dim)
        self.mlp.init_weights(0.02, 0.02)

    def init_weights(self) -> None:
        """The memory's own rules, then the SwiGLU's truncated normal (std 0.02; a retrofit
        overwrites it with the pretrained MLP)."""
        super().init_weights()
        mlp = getattr(self, "mlp", None)  # absent while ProductKeyMemory.__init__ runs
        if mlp is not None:
            mlp.init_weights(0.02, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim) -> (..., dim)
        return self.mlp(x) + super().forward(x)


def check_memory_mode(mode: str) -> str:
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got memory_mode={mode!r}")
    return mode


def add_parallel_mlps_(model: Transformer) -> Transformer:
    """Give every memory block of ``model`` a SwiGLU beside its memory (in place, on the
    model's device: call it on the meta device before ``to_empty``, like the build). A
    block's own value table (``memory.share_values=false``) moves over as the model built
    it (``sparse_grad``, merged gradients, dtype), not a fresh default one: the optimizer
    checks the tables were built for it."""
    cfg = model.config
    device = next(model.parameters()).device
    for block in model.layers:
        mem = block.ffn
        if isinstance(mem, ProductKeyMemory) and not isinstance(mem, ParallelMemory):
            shared = mem.values if mem.owned_values is None else None
            block.ffn = ParallelMemory(
                cfg.dim, cfg.memory, shared, hidden_dim=cfg.hidden_dim, device=device
            )
            if shared is None:
                block.ffn.owned_values = mem.owned_values  # same place in the state dict
    return model


def build_model(
    config: ModelConfig,
    memory_mode: str = "replace",
    device: torch.device | str = "cpu",
    seed: int | None = None,
    sparse_values: bool = False,
) -> Transformer:
    """:func:`memlayers.model.build_model` with the memory blocks in ``memory_mode``:
    meta device, parallel MLPs added, allocate on ``device``, ``init_weights()``."""
    check_memory_mode(memory_mode)
    with torch.device("meta"):
        model = Transformer(config, sparse_values)
        if memory_mode == "parallel":
            add_parallel_mlps_(model)
    model.to_empty(device=device)
    if seed is not None:
        torch.manual_seed(seed)
    model.init_weights()
    return model


# ---- from transformers ---------------------------------------------------------------------

# The ModelConfig fields a pretrained model decides (model.hf): its architecture.
ARCHITECTURE_FIELDS = (
    "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "norm_eps",
    "rope_theta", "max_seq_len", "tie_embeddings",
)  # fmt: skip


# The transformers model types whose maths is memlayers' decoder given the checks below
# (tests/test_retrofit.py compares the logits of each); any other is refused.
RETROFIT_MODEL_TYPES = ("llama", "mistral")


def architecture_from_transformers(config) -> dict:
    """The :data:`ARCHITECTURE_FIELDS` of a transformers Llama or Mistral config (read by
    attribute); ``ValueError`` naming what has no memlayers counterpart: another
    ``model_type`` (:data:`RETROFIT_MODEL_TYPES`), biases, rope scaling, a sliding window,
    another activation or head size."""
    name = getattr(config, "model_type", None) or type(config).__name__
    if name not in RETROFIT_MODEL_TYPES:
        raise ValueError(
            f"model_type {name!r}: memlayers maps only {' and '.join(RETROFIT_MODEL_TYPES)} "
            f"models onto its decoder weight for weight (another architecture's maths "
            f"differs even where its config's fields look alike). For Memory+ in any "
            f"transformers causal LM, keeping its own architecture, use "
            f"memlayers.hf.add_memory(model, layers)"
        )
    hidden, heads = config.hidden_size, config.num_attention_heads
    refuse = {
        "attention_bias": getattr(config, "attention_bias", False),
        "mlp_bias": getattr(config, "mlp_bias", False),
        "sliding_window": getattr(config, "sliding_window", None),
    }
    bad = {k: v for k, v in refuse.items() if v}
    if getattr(config, "hidden_act", "silu") != "silu":
        bad["hidden_act"] = config.hidden_act
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if head_dim * heads != hidden:
        bad["head_dim"] = head_dim
    # transformers 5 keeps rope settings in rope_parameters, 4 in rope_theta / rope_scaling
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    scaling = getattr(config, "rope_scaling", None)
    if rope_type != "default" or (scaling and scaling.get("rope_type", "default") != "default"):
        bad["rope_type"] = rope_type if rope_type != "default" else scaling
    if bad:
        raise ValueError(
            f"{name}: {bad} has no counterpart in the memlayers decoder (Llama: no biases, "
            f"SwiGLU, plain rotary embeddings, full attention); memlayers.hf.add_memory "
            f"adds Memory+ to the transformers model as it is"
        )
    return dict(
        dim=hidden,
        n_layers=config.num_hidden_layers,
        n_heads=heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        vocab_size=config.vocab_size,
        ffn_hidden_dim=config.intermediate_size,
        norm_eps=float(config.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        max_seq_len=config.max_position_embeddings,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


# Llama's projection names for memlayers' (memlayers.export maps this way round; the
# pretrained weights come in through the inverses).
LLAMA_ATTENTION = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
LLAMA_SWIGLU = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_ATTENTION = {hf: ours for ours, hf in LLAMA_ATTENTION.items()}
_SWIGLU = {hf: ours for ours, hf in LLAMA_SWIGLU.items()}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


def state_from_transformers(
    state: dict[str, torch.Tensor], config: ModelConfig, memory_mode: str
) -> dict[str, torch.Tensor]:
    """A Llama state dict in memlayers names (:mod:`memlayers.export`'s mapping, inverted).
    A memory block's pretrained MLP goes beside the memory (``parallel``) or is dropped
    (``replace``); a tied head is the embedding. An unknown weight is an error."""
    kinds = config.block_kinds()
    out = {}
    for name, w in state.items():
        if name == "model.embed_tokens.weight":
            out["tok_embeddings.weight"] = w
        elif name == "model.norm.weight":
            out["norm.weight"] = w
        elif name == "lm_head.weight":
            if not config.tie_embeddings:
                out["output.weight"] = w
        elif (m := _LAYER.fullmatch(name)) is None:
            raise ValueError(f"pretrained weight {name!r} has no memlayers counterpart")
        else:
            i, rest = int(m.group(1)), m.group(2)
            layer = f"layers.{i}"
            module, _, leaf = rest.partition(".")
            if rest == "input_layernorm":
                out[f"{layer}.attention_norm.weight"] = w
            elif rest == "post_attention_layernorm":
                out[f"{layer}.ffn_norm.weight"] = w
            elif module == "self_attn" and leaf in _ATTENTION:
                out[f"{layer}.attention.{_ATTENTION[leaf]}.weight"] = w
            elif module == "mlp" and leaf in _SWIGLU:
                if kinds[i] == "dense":
                    out[f"{layer}.ffn.{_SWIGLU[leaf]}.weight"] = w
                elif memory_mode == "parallel":
                    out[f"{layer}.ffn.mlp.{_SWIGLU[leaf]}.weight"] = w
            else:
                raise ValueError(f"pretrained weight {name!r} has no memlayers counterpart")
    return out


@torch.no_grad()
def silence_memory_outputs_(model: nn.Module) -> None:
    """Zero every memory layer's output projection (``w2``, or ``out_proj`` without
    swilu): the memory adds exactly 0 until trained (:func:`memlayers.hf.silence_output_`
    on the transformers side; like LoRA's zero ``B``, the projection's own gradient is not
    zero, so the first step moves it)."""
    for m in model.modules():
        if isinstance(m, ProductKeyMemory):
            (m.w2 if m.config.swilu else m.out_proj).weight.zero_()


@torch.no_grad()
def load_pretrained_(
    model: Transformer, state: dict[str, torch.Tensor], memory_mode: str
) -> list[str]:
    """Copy a pretrained Llama's weights (transformers names) into ``model``, whose every
    other parameter must belong to a memory layer; then silence the memories. Returns the
    names left at their initialisation (the memory layers')."""
    mine = state_from_transformers(state, model.config, memory_mode)
    target = model.state_dict()
    extra = sorted(set(mine) - set(target))
    if extra:
        raise ValueError(f"pretrained weights do not fit the model: unexpected {extra[:5]}")
    for k, v in mine.items():
        if target[k].shape != v.shape:
            raise ValueError(f"{k}: model {tuple(target[k].shape)}, pretrained {tuple(v.shape)}")
        target[k].copy_(v)
    prefixes = [
        name + "."
        for name, m in model.named_modules()
        if isinstance(m, ProductKeyMemory | MemoryValues)
    ]
    memory = {  # every tensor of a memory layer (and its table) but a parallel MLP's
        k for k in target for p in prefixes if k.startswith(p) and not k.startswith(p + "mlp.")
    }
    missing = sorted(set(target) - set(mine) - memory)
    if missing:
        raise ValueError(f"the pretrained model lacks {missing[:5]} (not a Llama-style model?)")
    silence_memory_outputs_(model)
    return sorted(set(target) - set(mine))
