"""Memory+ retrofitted into a pretrained Hugging Face model (Llama, Qwen2, Mistral, SmolLM).

Any causal LM whose decoder layers are ``model.model.layers[i]`` with an ``.mlp`` works:
the listed layers' MLP is wrapped in a :class:`MemoryMLP` that either replaces it with a
:class:`~memlayers.memory.ProductKeyMemory` (``mode="replace"``) or adds the memory as a
parallel branch on the MLP's input, ``mlp(x) + memory(x)`` (``mode="parallel"``). All the
memory layers read one :class:`~memlayers.memory.MemoryValues` table (Memory+), registered
once on the base model as ``model.model.memory_values``.

The memory's output projection starts at zero (:func:`silence_output_`): in parallel mode
the retrofitted model computes exactly what the pretrained one did until training moves it.

    model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    tok = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    add_memory(model, layers=[8, 16, 24])          # in place; logits unchanged
    model.save_pretrained("smollm2-memory")        # settings in config.json
    tok.save_pretrained("smollm2-memory")          # beside it (memlayers lm-eval --hf)
    model = load_pretrained_with_memory("smollm2-memory")

Only this module touches ``transformers``, and only inside the functions that need it:
``import memlayers`` never imports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import torch
import torch.nn as nn

from memlayers.memory import MemoryConfig, MemoryValues, ProductKeyMemory, merges_grads

MODES = ("parallel", "replace")
CONFIG_KEY = "memlayers"  # model.config.memlayers: what load_pretrained_with_memory rebuilds
SETTINGS_VERSION = 1


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "memlayers.hf needs Hugging Face transformers: pip install 'memlayers[hf]'"
        ) from e
    return transformers


# ---- a pretrained model by name, file or directory (model.hf) -------------------------------


def resolve_pretrained(spec: str, cache=None) -> tuple[Path, str | None]:
    """``(directory, gguf file name or None)`` of ``model.hf=spec``: a pinned name
    (:data:`memlayers.data.corpus.PRETRAINED`, fetched into the cache), a ``.gguf`` file,
    or a transformers model directory (with ``config.json``)."""
    from memlayers.data.corpus import PRETRAINED, fetch_pretrained

    if spec in PRETRAINED:
        f = fetch_pretrained(spec, cache)
        return f.parent, f.name
    p = Path(spec).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return p.parent, p.name
    if p.is_dir() and (p / "config.json").is_file():
        return p, None
    raise ValueError(
        f"model.hf={spec!r}: not a pinned model ({', '.join(sorted(PRETRAINED))}), an "
        f"existing .gguf file or a transformers model directory with config.json"
    )


def _gguf_kwargs(gguf: str | None) -> dict:
    if gguf is None:
        return {}
    try:
        import gguf as _  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError as e:
        raise ImportError(
            f"{gguf}: reading a GGUF file needs the gguf package: pip install 'memlayers[hf]'"
        ) from e
    return {"gguf_file": gguf}


def transformers_config(spec: str, cache=None):
    """The transformers config of ``model.hf=spec`` (no weights loaded); a model saved with
    memory layers is refused (:func:`check_no_memory`)."""
    transformers = _transformers()
    path, gguf = resolve_pretrained(spec, cache)
    config = transformers.AutoConfig.from_pretrained(path, **_gguf_kwargs(gguf))
    check_no_memory(config, spec)
    return config


def check_no_memory(config, spec: str) -> None:
    """``model.hf`` must name a model without memory layers: ``AutoModelForCausalLM`` loads
    a directory written by ``memlayers export`` (or ``add_memory`` + ``save_pretrained``,
    its config's ``memlayers`` entry) as the plain architecture, dropping the memory
    weights and initialising the memory blocks' MLPs afresh, without an error."""
    if getattr(config, CONFIG_KEY, None) is not None:
        raise ValueError(
            f"model.hf={spec!r} has memory layers (its config.json has a '{CONFIG_KEY}' "
            f"entry: written by memlayers export or hf.add_memory + save_pretrained), which "
            f"a retrofit would drop, re-initialising those blocks' MLPs. Continue training "
            f"from the memlayers run it came from (memlayers train --resume, or "
            f"--resume-from CHECKPOINT), or load it with "
            f"memlayers.hf.load_pretrained_with_memory"
        )


def load_transformers_model(spec: str, cache=None) -> nn.Module:
    """The pretrained causal LM of ``model.hf=spec`` in fp32 on the CPU (a GGUF file is
    dequantised: ~20 s for SmolLM2-135M on 2 CPU cores); one saved with memory layers is
    refused before its weights load (:func:`check_no_memory`)."""
    transformers = _transformers()
    config = transformers_config(spec, cache)  # the check, on the config alone
    path, gguf = resolve_pretrained(spec, cache)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=torch.float32, **_gguf_kwargs(gguf)
    )  # the config read once: a GGUF's is parsed from the file's metadata
    return model.eval()


def tokenizer_file(spec: str, cache=None) -> Path:
    """A ``tokenizers`` JSON file of the tokenizer of ``model.hf=spec``: the directory's
    own ``tokenizer.json``, or the GGUF's tokenizer written once into
    ``<cache>/models/<name>/tokenizer.json`` (memlayers' ``BPETokenizer`` reads it)."""
    from memlayers.data.corpus import PRETRAINED, cache_dir

    path, gguf = resolve_pretrained(spec, cache)
    if gguf is None:
        own = path / "tokenizer.json"
        if not own.is_file():
            raise ValueError(
                f"model.hf={spec!r}: {path} has no tokenizer.json (a fast tokenizer's file)"
            )
        return own
    key = spec if spec in PRETRAINED else f"{Path(gguf).stem}-{_digest(path / gguf)}"
    out = cache_dir(cache) / "models" / key / "tokenizer.json"
    if not out.is_file():
        tok = _transformers().AutoTokenizer.from_pretrained(path, **_gguf_kwargs(gguf))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp-{os.getpid()}")
        tok.backend_tokenizer.save(str(tmp))
        os.replace(tmp, out)
    return out


def _digest(path: Path) -> str:
    """A key of the file at ``path``: its resolved path, size and modification time, so
    another model's GGUF copied to the same path gets a tokenizer of its own (hashing a
    GGUF's contents would read ~100 MB to GBs at every start)."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class MemoryMLP(nn.Module):
    """A decoder layer's feed-forward with memory: ``memory(x)`` or ``mlp(x) + memory(x)``.

    Sits where the layer's ``.mlp`` was, so the decoder layer's own residual and norm wrap
    it unchanged; the memory reads the same normed input as the MLP (docs/method.md §1: the
    memory layer takes an FFN's place in the block).
    """

    def __init__(self, memory: ProductKeyMemory, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.memory = memory
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, hidden) -> (B, T, hidden)
        y = self.memory(x)
        return y if self.mlp is None else self.mlp(x) + y


@torch.no_grad()
def silence_output_(memory: ProductKeyMemory) -> None:
    """Zero the memory's output projection (``W2``, or ``W_out`` without swilu).

    The layer then outputs exactly zero, so adding it beside a pretrained MLP changes no
    logit; like LoRA's zero ``B``, the gradient of the projection itself is not zero
    (it sees ``y ⊙ silu(x W1)``), so training moves it off zero at the first step.
    """
    proj = memory.w2 if memory.config.swilu else memory.out_proj
    proj.weight.zero_()


def default_memory_config(hidden_size: int, n_keys: int = 256, **overrides) -> MemoryConfig:
    """Memory+ for a model of width ``hidden_size``: ``k_dim = hidden/2``, ``v_dim = hidden``,
    swilu gating and qk-norm; ``n_keys**2`` value rows (default 65,536)."""
    fields = dict(n_keys=n_keys, k_dim=hidden_size // 2, v_dim=hidden_size)
    fields.update(overrides)
    return MemoryConfig(**fields)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(b, "mlp") for b in layers):
        raise ValueError(
            f"add_memory needs a Llama-like causal LM with decoder layers at "
            f"model.model.layers[i].mlp; {type(model).__name__} has none"
        )
    return layers


def _check_layers(layers, n_layers: int) -> list[int]:
    if isinstance(layers, int) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in layers
    ):
        raise ValueError(f"layers must be a list of layer indices, got layers={layers!r}")
    layers = list(layers)
    if not layers:
        raise ValueError("layers must name at least one decoder layer, got layers=[]")
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(
            f"layer index out of range: {bad} (the model has {n_layers} decoder layers, "
            f"0..{n_layers - 1})"
        )
    dupes = sorted({i for i in layers if layers.count(i) > 1})
    if dupes:
        raise ValueError(f"duplicate layers: {dupes} in layers={layers}")
    return layers


def add_memory(
    model: nn.Module,
    layers,
    config: MemoryConfig | None = None,
    mode: str = "parallel",
) -> nn.Module:
    """Add Memory+ to decoder ``layers`` of a Hugging Face causal LM, in place; returns it.

    ``config``: a :class:`MemoryConfig` (default :func:`default_memory_config` of the
    model's hidden size). One value table serves every listed layer; each layer gets its
    own keys, query and gating. The memory is built on the model's device and dtype (with
    ``config.value_dtype="bf16"`` the value table is bf16 whatever the model's), and
    the settings are recorded in ``model.config.memlayers`` so ``save_pretrained`` keeps
    them (:func:`load_pretrained_with_memory` reads them back).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
    blocks = _decoder_layers(model)
    layers = _check_layers(layers, len(blocks))
    if getattr(model.model, "memory_values", None) is not None:
        raise ValueError(f"{type(model).__name__} already has memory layers (add_memory once)")
    hidden = model.config.hidden_size
    if config is not None and not isinstance(config, MemoryConfig):
        raise ValueError(f"config must be a MemoryConfig, got {type(config).__name__}")
    try:
        config = default_memory_config(hidden) if config is None else config
        config.validate()
        _, v_dim = config.resolved_dims(hidden)
    except ValueError as e:
        raise ValueError(f"memory config does not fit hidden_size={hidden}: {e}") from e

    ref = next(model.parameters())  # the model's device and dtype (meta while loading)
    merge = merges_grads(config, len(layers), "config ", f"layers={list(layers)}")
    values = MemoryValues(
        config.n_rows,
        v_dim,
        merge_grads=merge,
        device=ref.device,
        read=config.value_read,
        grad_read=config.grad_read,
    )
    # value_dtype=bf16 keeps a bf16 table in a model of any dtype (an exported run's);
    # fp32, the default, takes the model's.
    table_dtype = torch.bfloat16 if config.value_dtype == "bf16" else ref.dtype
    model.model.memory_values = values.to(table_dtype)  # registered once, by the model
    for i in layers:
        memory = ProductKeyMemory(hidden, config, values, device=ref.device).to(ref.dtype)
        silence_output_(memory)
        mlp = blocks[i].mlp if mode == "parallel" else None
        blocks[i].mlp = MemoryMLP(memory, mlp)
    settings = dict(version=SETTINGS_VERSION, layers=layers, mode=mode)
    setattr(model.config, CONFIG_KEY, settings | {"config": dataclasses.asdict(config)})
    return model


def memory_settings(config) -> dict:
    """``{"layers", "config", "mode"}`` for :func:`add_memory`, from a model config that
    :func:`add_memory` wrote (``config.memlayers``); ``ValueError`` if there is none."""
    settings = getattr(config, CONFIG_KEY, None)
    if not isinstance(settings, dict):
        raise ValueError(
            f"the model config has no '{CONFIG_KEY}' entry: it was not saved after add_memory"
        )
    if settings.get("version") != SETTINGS_VERSION:
        raise ValueError(
            f"{CONFIG_KEY} settings version {settings.get('version')!r}, this memlayers "
            f"reads version {SETTINGS_VERSION}"
        )
    return dict(
        layers=list(settings["layers"]),
        config=MemoryConfig(**settings["config"]),
        mode=settings["mode"],
    )


def load_pretrained_with_memory(path, **kwargs) -> nn.Module:
    """``from_pretrained`` for a model saved after :func:`add_memory`.

    The memory is added while the model is built (a subclass of the stored architecture
    whose ``__init__`` ends with ``add_memory``), so Hugging Face's own loader fills every
    weight, memory and value table included, with its sharding, dtype and device options
    (``kwargs`` go to ``from_pretrained``). The value table is one tensor in the model's
    safetensors (``model.memory_values.weight``).
    """
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(path)
    settings = memory_settings(config)
    base = transformers.AutoModelForCausalLM._model_mapping[type(config)]

    class WithMemory(base):
        def __init__(self, config, *args, **kw):
            super().__init__(config, *args, **kw)
            add_memory(self, **settings)

    # save_pretrained writes the class name as the architecture: keep the stored one.
    WithMemory.__name__ = WithMemory.__qualname__ = base.__name__
    return WithMemory.from_pretrained(path, config=config, **kwargs)


def memory_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """``{"values": [...], "memory": [...], "base": [...]}``, each parameter once.

    ``values``: the value tables (their own learning rate, docs/method.md §4: 1e-3 without decay,
    or a row-sparse optimizer: set ``table.sparse_grad = True`` on each
    :class:`MemoryValues` and step them with :class:`memlayers.SparseValueAdam`);
    ``memory``: the rest of the memory layers (keys, query, qk-norm gain, gating);
    ``base``: the pretrained model's own parameters (often frozen while retrofitting).
    """
    values = {id(m.weight): m.weight for m in model.modules() if isinstance(m, MemoryValues)}
    memory = {
        id(p): p
        for m in model.modules()
        if isinstance(m, ProductKeyMemory)
        for p in m.parameters()
        if id(p) not in values
    }
    base = [p for p in model.parameters() if id(p) not in values and id(p) not in memory]
    return {"values": list(values.values()), "memory": list(memory.values()), "base": base}
