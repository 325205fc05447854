"""Named model configurations: the paper's sizes in every variant, and tiny CPU models.

Names are ``<size>-<variant>``: sizes ``134m 373m 720m 1.3b`` (the paper's Llama-style
base models, docs/method.md §3) and ``tiny`` (about 2M parameters, ~10k tokens/s on 2 CPU
cores); variants:

| variant   | feed-forward blocks                                                       |
|-----------|---------------------------------------------------------------------------|
| dense     | SwiGLU everywhere                                                         |
| memory    | one memory layer in the middle block (Lample et al. 2019 style: no swilu, |
|           | k_dim 512 = Lample's query size; qk-norm kept as the stabiliser)          |
| memory+   | 3 memory layers sharing one value table, swilu, k_dim = dim/2, placed by  |
|           | :func:`memory_plus_layers` (24 layers -> blocks 4, 12, 20)                |
| moe       | every FFN becomes 16 / 8 / 6 / 4 experts (134m / 373m / 720m / 1.3b)       |
| peer      | one PEER layer (768 half-keys) in the middle block                        |

Paper-size memories: 1024 half-keys (1,048,576 values), 4 heads, top-32, v_dim = dim,
and a bf16 value table (``value_dtype="bf16"``; the value optimizer keeps its fp32 master
copy, ``optim.value_master``, split into the table and an int16 remainder a value,
``optim.value_master_split``): mixed precision as autocast does it for every other
weight, and half the bytes of each row the lookups read. 134m-memory+ with the reads
spread over the table: 90.6 against 98.6 ms a step with an fp32 table (H200,
benchmarks/results/profile_134m_h200_20261203b.md). Tiny presets keep fp32 tables (a
CPU gains nothing from bf16 rows).
Names are nominal: ``memlayers.report`` prints the exact counts (720m is dim 1536 × 24
layers with untied 32k embeddings: 778M parameters). ``vocab_size`` is 32000 here; a
training config leaves it out (``ModelArgs.vocab_size`` stays None until the trainer
fills it from the dataset's tokenizer).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from memlayers.memory import MemoryConfig
from memlayers.model import ModelConfig
from memlayers.moe import MoEConfig
from memlayers.peer import PEERConfig

# Base shapes (dim, layers, heads) of the paper's models.
PAPER_SIZES = {
    "134m": dict(dim=768, n_layers=12, n_heads=12),
    "373m": dict(dim=1024, n_layers=24, n_heads=16),
    "720m": dict(dim=1536, n_layers=24, n_heads=12),
    "1.3b": dict(dim=2048, n_layers=22, n_heads=16),
}
# MoE baseline: experts per FFN so its parameters slightly exceed the memory model's.
MOE_EXPERTS = {"134m": 16, "373m": 8, "720m": 6, "1.3b": 4}
VARIANTS = ("dense", "memory", "memory+", "moe", "peer")


def memory_plus_layers(n_layers: int, interval: int | None = None, n_memory: int = 3) -> list[int]:
    """The paper's Memory+ placement: ``n_memory`` blocks centred, ``interval`` apart.

    ``interval=None`` takes the paper's (4 for the 12-layer 134M, 8 for the deeper
    models), halved until the blocks fit. Ties in centring round towards the output, which
    reproduces the paper's 24 layers -> ``[4, 12, 20]``; 12 layers give ``[2, 6, 10]``.
    """
    if n_memory < 1 or n_memory > n_layers:
        raise ValueError(
            f"need 1 <= n_memory <= n_layers, got n_memory={n_memory}, n_layers={n_layers}"
        )
    if interval is None:
        interval = 4 if n_layers < 16 else 8
        while interval > 1 and (n_memory - 1) * interval >= n_layers:
            interval //= 2
    span = (n_memory - 1) * interval
    if interval < 1 or span >= n_layers:
        raise ValueError(
            f"{n_memory} memory blocks {interval} apart don't fit in n_layers={n_layers}"
        )
    start = (n_layers - span) // 2
    return [start + i * interval for i in range(n_memory)]


def _paper_preset(size: str, variant: str) -> ModelConfig:
    base = dict(PAPER_SIZES[size], vocab_size=32000, max_seq_len=2048, tie_embeddings=False)
    n_layers = base["n_layers"]
    mem = dict(n_keys=1024, heads=4, topk=32, value_dtype="bf16")
    if variant == "dense":
        return ModelConfig(**base)
    if variant == "memory":
        memory = MemoryConfig(**mem, k_dim=512, swilu=False)
        return ModelConfig(**base, memory_layers=[n_layers // 2], memory=memory)
    if variant == "memory+":
        # Batch-normalised queries and the half-key balance loss at 0.1 keep the table read
        # (issue 10): 134m-memory+ on bios, 2,000 steps, three seeds, one H200 (2026-12-04,
        # benchmarks/results/usage_ablation_h200_20261204.md): every layer read 79-99% of
        # the rows in the last 25-step window (block 2 the least; 91-99% at step 300) and
        # the shared table 100%, against 4-60% and 39-64% without them, at the same
        # validation loss (0.4933 against 0.4933 over seeds); 373m, 800 steps: 73-98%
        # against 2-12%.
        memory = MemoryConfig(
            **mem, k_dim=None, swilu=True, share_values=True, query_batch_norm=True,
            balance_loss=0.1,
        )  # fmt: skip
        layers = memory_plus_layers(n_layers, 4 if size == "134m" else 8)
        return ModelConfig(**base, memory_layers=layers, memory=memory)
    if variant == "moe":
        return ModelConfig(**base, ffn="moe", moe=MoEConfig(n_experts=MOE_EXPERTS[size]))
    peer = PEERConfig(n_keys=768, heads=8, topk=16)
    return ModelConfig(**base, peer_layers=[n_layers // 2], peer=peer)


def _tiny_preset(variant: str) -> ModelConfig:
    # dim 128 × 6 layers, hidden 384, 4 query / 2 kv heads, tied 4k vocab: ~1.7M dense
    # parameters. Memories of 128² = 16,384 rows (2.1M values) keep CPU steps fast.
    base = dict(
        dim=128,
        n_layers=6,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=4096,
        multiple_of=64,
        max_seq_len=512,
        tie_embeddings=True,
    )
    # 2 heads × top-16 (a 32-row bag): the PyTorch embedding-bag backward dominates a CPU
    # step, and 4 × 16 halves the speed. (Their value lr: PRESET_OPTIM.)
    mem = dict(n_keys=128, heads=2, topk=16)
    if variant == "dense":
        return ModelConfig(**base)
    if variant == "memory":
        memory = MemoryConfig(**mem, k_dim=64, swilu=False)
        return ModelConfig(**base, memory_layers=[3], memory=memory)
    if variant == "memory+":
        memory = MemoryConfig(**mem, k_dim=None, swilu=True, share_values=True)
        return ModelConfig(**base, memory_layers=memory_plus_layers(6), memory=memory)
    if variant == "moe":
        return ModelConfig(**base, ffn="moe", moe=MoEConfig(n_experts=4))
    return ModelConfig(**base, peer_layers=[3], peer=PEERConfig(n_keys=64, heads=4, topk=8))


PRESETS: dict[str, ModelConfig] = {
    f"{size}-{variant}": (_tiny_preset(variant) if size == "tiny" else _paper_preset(size, variant))
    for size in (*PAPER_SIZES, "tiny")
    for variant in VARIANTS
}


# Optimizer settings a preset brings (``optim.*``), merged like the preset: under the YAML
# and the CLI. Tiny values learn at 3e-2, 30× the paper's 1e-3 (the OptimArgs default):
# on the main job (bios, 2M tokens) 1e-3 stored 33.0k bits, 1e-2 40.9k, 3e-2 42.5k
# (docs/results.md).
# The paper sizes' memory tables keep their Adam moments in bf16 (stochastic rounding,
# ``optim.value_optimizer=sparse_adam_bf16``): the row step of a bf16 table with its fp32
# master moves 20 bytes per touched value against 28, 4.0 against 4.7 ms at 134m's table
# (H200), and a spread 134m-memory+ trainer step went 368k -> 376k tokens/s, 24.0 -> 21.0
# GiB (benchmarks/results/train_h200_20261203c.md); bios exact match within the fp32
# moments' seed spread on the CPU main job, eight seeds
# (benchmarks/results/value_optimizer_quality_cpu_20261201.md). With the master split
# (optim.value_master_split, the default since 2026-12-06) 18 bytes against 20, 4.15
# against 4.65 ms at 134m's table on an H100 (benchmarks/results/row_adam_h100_20261206.md).
PRESET_OPTIM: dict[str, dict] = {
    **{f"tiny-{variant}": {"value_lr": 3e-2} for variant in VARIANTS},
    **{f"{size}-{variant}": {"value_optimizer": "sparse_adam_bf16"}
       for size in PAPER_SIZES for variant in ("memory", "memory+")},
}  # fmt: skip


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of the preset ``name`` (see :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


@dataclass
class ModelArgs(ModelConfig):
    """The trainer's model section: a preset name plus any ModelConfig field.

    The config loader merges ``preset`` under the YAML and CLI values, so
    ``model.preset=tiny-memory+ model.dim=256`` is the preset with ``dim`` replaced.
    ``preset: null`` uses the ModelConfig defaults.
    """

    preset: str | None = "tiny-memory+"
    # None: the dataset's, filled by config.with_vocab when the trainer has loaded the data
    vocab_size: int | None = None
    # A pretrained Llama-style model to start from (memlayers/retrofit.py): a pinned name
    # (smollm2), a .gguf file or a transformers model directory. Its architecture fields
    # (retrofit.ARCHITECTURE_FIELDS), weights and tokenizer are the run's; memory_layers
    # and memory say where Memory+ goes and how big it is. No preset then.
    hf: str | None = None
    # replace: memory blocks lose their feed-forward (the paper); parallel: the memory goes
    # beside it (retrofit.ParallelMemory). None: parallel with model.hf, else replace.
    memory_mode: str | None = None

    @property
    def resolved_memory_mode(self) -> str:
        if self.memory_mode is not None:
            return self.memory_mode
        return "parallel" if self.hf else "replace"

    def validate(self) -> None:
        """ModelConfig's checks; an unset ``vocab_size`` is checked once it is filled. With
        ``hf`` the architecture is the pretrained model's, known once it is read: only the
        memory settings are checked here (the layer indices against its depth later), and
        that every block is the pretrained one or gets Memory+ at ``memory_layers`` (an
        ``ffn`` kind or PEER blocks would have no pretrained weights to start from)."""
        from memlayers.retrofit import check_memory_mode

        if self.memory_mode is not None:
            check_memory_mode(self.memory_mode)
        if self.hf is not None:
            if not self.hf:
                raise ValueError("model.hf must name a model (or be null), got ''")
            if self.preset is not None:
                raise ValueError(
                    f"model.hf={self.hf!r} is the model; model.preset={self.preset!r} names "
                    f"another: set one of them (model.preset=null)"
                )
            other = {
                k: v
                for k, v in (("ffn", self.ffn), ("peer_layers", self.peer_layers))
                if v not in ("dense", [])
            }
            if other:
                shown = ", ".join(f"model.{k}={v!r}" for k, v in other.items())
                raise ValueError(
                    f"model.hf={self.hf!r} keeps the pretrained model's blocks and adds Memory+ "
                    f"at model.memory_layers; {shown} would replace blocks with kinds it has "
                    f"no weights for: leave model.ffn=dense and model.peer_layers=[] (Memory+ "
                    f"in every block: model.memory_layers=[0, ..., n_layers - 1])"
                )
            self.memory.validate()
            return
        self._config(1 if self.vocab_size is None else self.vocab_size)

    def to_config(self) -> ModelConfig:
        if self.vocab_size is None:
            raise ValueError(
                "model.vocab_size is unset: the trainer fills it from the dataset's tokenizer "
                "(memlayers.config.with_vocab)"
            )
        return self._config(self.vocab_size)

    def _config(self, vocab_size: int) -> ModelConfig:
        d = self.to_dict()
        for key in ("preset", "hf", "memory_mode"):
            d.pop(key)
        return ModelConfig.from_dict({**d, "vocab_size": vocab_size})
