"""A memlayers run as a Hugging Face transformers model directory (Llama + Memory+).

    memlayers export runs/tiny-memory-plus hf/tiny-memory-plus

    model = memlayers.hf.load_pretrained_with_memory("hf/tiny-memory-plus")  # memory blocks
    model = transformers.AutoModelForCausalLM.from_pretrained("hf/tiny-dense")  # dense only
    tok = transformers.AutoTokenizer.from_pretrained("hf/tiny-memory-plus")

memlayers' decoder is Llama's (RMSNorm, half-split rotary embeddings, grouped-query
attention, SwiGLU), so a dense block maps onto ``LlamaDecoderLayer`` weight for weight
(``wq/wk/wv/wo`` -> ``q/k/v/o_proj``, ``w1/w3/w2`` -> ``gate/up/down_proj``), and a memory
block onto :func:`memlayers.hf.add_memory` in ``replace`` mode (``parallel`` for a
retrofit's :class:`~memlayers.retrofit.ParallelMemory`, its SwiGLU beside it): the same
:class:`~memlayers.memory.ProductKeyMemory` class and state, the one value table as
``model.memory_values``. The exported model computes the run's logits (fp32 rounding:
transformers builds its rotary table in fp32, memlayers in fp64). MoE and PEER blocks,
per-layer value tables (``memory.share_values=false``) and quantized tables have no such
counterpart and are refused.

The tokenizer is written as a ``PreTrainedTokenizerFast`` that puts an EOS before every
text (``tokenizer(text)``), as memlayers does: documents start after one in the packed
training stream. Its EOS token (the tokenizer's own: ``<|endoftext|>``, or a pretrained
BPE's ``</s>`` / ``<|end_of_text|>``) is also its BOS and padding, and so are the ids in
``config.json`` and ``generation_config.json`` (where ``generate()`` stops). Byte-level BPE
and the closed word vocabulary (bios) convert exactly; a SentencePiece run's ``.model`` is
copied as ``tokenizer.model`` for ``LlamaTokenizer``.

The directory is written into a hidden temporary sibling and renamed into place (a
failure leaves no half export; ``--overwrite`` replaces an older export whole).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn as nn

from memlayers.files import atomic_dir
from memlayers.finetune import _check_out
from memlayers.hf import _transformers, add_memory
from memlayers.memory import MemoryValues
from memlayers.model import Transformer
from memlayers.retrofit import LLAMA_ATTENTION as _ATTENTION
from memlayers.retrofit import LLAMA_SWIGLU as _SWIGLU
from memlayers.retrofit import ParallelMemory
from memlayers.run import Run, load_run


def memory_blocks(config) -> list[int]:
    """The indices of the memory blocks: ``memory_layers``, or every block of an
    ``ffn="memory"`` model (the block kinds decide, not the list)."""
    return [i for i, kind in enumerate(config.block_kinds()) if kind == "memory"]


def _check_exportable(model: Transformer) -> None:
    cfg = model.config
    other = sorted(set(cfg.block_kinds()) - {"dense", "memory"})
    if other:
        raise ValueError(f"{other} blocks have no transformers counterpart: dense and memory only")
    if memory_blocks(cfg) and not cfg.memory.share_values:
        raise ValueError("per-layer value tables (memory.share_values=false) are not exportable")
    for m in model.modules():
        if isinstance(m, MemoryValues) and (
            m.bits is not None or getattr(m, "offloaded", None) is not None
        ):
            raise ValueError("quantized or offloaded value tables: export the float run")


def _hf_name(name: str, kinds: list[str]) -> str:
    """The transformers name of the memlayers parameter ``name``."""
    parts = name.split(".")
    if name == "tok_embeddings.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    if name == "memory_values.weight":
        return "model.memory_values.weight"
    i, module, rest = parts[1], parts[2], parts[3:]
    layer = f"model.layers.{i}"
    if module == "attention_norm":
        return f"{layer}.input_layernorm.weight"
    if module == "ffn_norm":
        return f"{layer}.post_attention_layernorm.weight"
    if module == "attention":
        return f"{layer}.self_attn.{_ATTENTION[rest[0]]}.weight"
    if kinds[int(i)] == "memory" and rest[0] == "mlp":  # a parallel block's SwiGLU
        return f"{layer}.mlp.mlp.{_SWIGLU[rest[1]]}.weight"
    if kinds[int(i)] == "memory":
        return f"{layer}.mlp.memory." + ".".join(rest)
    return f"{layer}.mlp.{_SWIGLU[rest[0]]}.weight"


@torch.no_grad()
def to_transformers(model: Transformer, eos_id: int | None = None) -> nn.Module:
    """A ``LlamaForCausalLM`` (with Memory+ where ``model`` has memory blocks) holding
    copies of ``model``'s weights, on its device and dtype, in eval mode.

    ``eos_id``: the run's EOS, which is also its BOS and padding (memlayers' convention: a
    document starts after an EOS), in the config and so in its generation config, where
    ``generate()`` reads where to stop. Without it the three are None, never Llama's
    defaults (BOS 1, EOS 2), which would stop generation at whatever token 2 is."""
    transformers = _transformers()
    _check_exportable(model)
    cfg = model.config
    kinds = cfg.block_kinds()
    ref = next(model.parameters())
    config = transformers.LlamaConfig(
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    with torch.device(ref.device):
        hf = transformers.LlamaForCausalLM(config).to(ref.dtype)
    if memory_blocks(cfg):
        parallel = any(isinstance(m, ParallelMemory) for m in model.modules())
        mode = "parallel" if parallel else "replace"
        add_memory(hf, memory_blocks(cfg), cfg.memory, mode=mode)
    state = {_hf_name(k, kinds): v for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    target = hf.state_dict()
    missing, extra = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    if missing or extra:  # a layout this function does not know: never a partial copy
        raise ValueError(f"export does not fit: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in state.items():
        if target[k].shape != v.shape:
            raise ValueError(f"{k}: transformers {tuple(target[k].shape)}, run {tuple(v.shape)}")
        target[k].copy_(v)
    return hf.eval()


def byte_level_alphabet() -> list[str]:
    """The printable character byte-level pre-tokenizers (GPT-2's convention, which the
    ``tokenizers`` ByteLevel pre-tokenizer follows) stand in for each byte ``0..255``: a
    printable Latin-1 byte is itself, every other byte the next code point from 256 on,
    in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    keep, extra, out = set(printable), 0, []
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def tokenizer_to_transformers(tok):
    """A ``PreTrainedTokenizerFast`` encoding like ``tok`` (BPE, word vocabulary or bytes), with
    an EOS before every text when special tokens are added."""
    transformers = _transformers()
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as FastTokenizer

    from memlayers.data.datasets import ByteTokenizer
    from memlayers.data.tokenizer import _WORD_PIECE, EOS, BPETokenizer, WordTokenizer

    if isinstance(tok, ByteTokenizer):
        # Byte ids 0..255: byte-level BPE with no merges (every byte its own token), the
        # pre-tokenizer's printable stand-in for byte b at id b; EOS the special id 256.
        alphabet = byte_level_alphabet()
        fast = FastTokenizer(models.BPE({alphabet[b]: b for b in range(256)}, []))
        fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        fast.decoder = decoders.ByteLevel()
        fast.add_special_tokens([EOS])
        if fast.token_to_id(EOS) != tok.eos_id:
            raise AssertionError(f"EOS became id {fast.token_to_id(EOS)}, not {tok.eos_id}")
    elif isinstance(tok, BPETokenizer):
        fast = FastTokenizer.from_str(tok.tok.to_str())  # a copy
    elif isinstance(tok, WordTokenizer):
        fast = FastTokenizer(models.WordLevel({t: i for i, t in enumerate(tok.tokens)}))
        fast.pre_tokenizer = pre_tokenizers.Split(Regex(_WORD_PIECE.pattern), "isolated")
        fast.decoder = decoders.Fuse()  # pieces carry their own spaces
    else:
        raise ValueError(f"no transformers tokenizer for {type(tok).__name__}")
    # The tokenizer's own EOS string ("</s>", "<|end_of_text|>" in pretrained BPEs): under
    # another name transformers would add it as a new token, past the vocabulary.
    eos = tok.eos_id
    name = fast.id_to_token(eos)
    fast.post_processor = processors.TemplateProcessing(
        single=f"{name} $A", pair=f"{name} $A {name} $B", special_tokens=[(name, eos)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=fast, eos_token=name, bos_token=name, pad_token=name
    )


def export_run(run: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the run's model (``run``: a run directory or checkpoint) and tokenizer to
    ``out`` with ``save_pretrained``; returns ``out``.

    ``out`` must not overlap the run, nor be a non-empty directory without ``overwrite``
    (checked before anything loads). The export is written into a hidden temporary sibling
    directory and renamed into place: a failure leaves no half export, and ``overwrite``
    replaces the directory whole (no file of an older export stays)."""
    out = Path(out)
    _check_out(Run.of(run).root, out, overwrite, name="OUT")
    trained = load_run(run, "cpu")
    tok = trained.tokenizer
    hf = to_transformers(trained.model, tok.eos_id if tok is not None else None)
    with atomic_dir(out) as tmp:
        hf.save_pretrained(tmp)
        if tok is not None and getattr(tok, "kind", None) == "sentencepiece":
            shutil.copyfile(tok.path, tmp / "tokenizer.model")
        elif tok is not None:
            tokenizer_to_transformers(tok).save_pretrained(tmp)
    return out
