"""memlayers: trainable product-key memory layers for PyTorch.

"Memory Layers at Scale" (Berges et al., Meta FAIR, 2024): a product-key key-value lookup
that adds billions of parameters to a language model at almost no extra FLOPs.
"""

from memlayers import ops
from memlayers.checkpoint import CheckpointError, load_model_from_checkpoint
from memlayers.config import TrainArgs, load_config
from memlayers.memory import MemoryConfig, MemoryValues, ProductKeyMemory
from memlayers.model import KVCache, ModelConfig, Transformer, build_model
from memlayers.moe import MoE, MoEConfig
from memlayers.peer import PEER, PEERConfig
from memlayers.presets import PRESETS, get_preset, memory_plus_layers
from memlayers.report import format_report, parameter_report
from memlayers.router import ProductKeyRouter
from memlayers.usage import MemoryUsage
from memlayers.value_optim import SparseValueAdam, SparseValueSGD

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "KVCache",
    "MemoryConfig",
    "MemoryUsage",
    "MemoryValues",
    "MoE",
    "MoEConfig",
    "ModelConfig",
    "PEER",
    "PEERConfig",
    "PRESETS",
    "ProductKeyMemory",
    "ProductKeyRouter",
    "SparseValueAdam",
    "SparseValueSGD",
    "TrainArgs",
    "Transformer",
    "build_model",
    "format_report",
    "get_preset",
    "load_config",
    "load_model_from_checkpoint",
    "memory_plus_layers",
    "ops",
    "parameter_report",
]
