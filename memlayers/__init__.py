"""memlayers: trainable product-key memory layers for PyTorch.

"Memory Layers at Scale" (Berges et al., Meta FAIR, 2024): a product-key key-value lookup
that adds billions of parameters to a language model at almost no extra FLOPs.
"""

from memlayers import ops
from memlayers.memory import MemoryConfig, MemoryValues, ProductKeyMemory
from memlayers.usage import MemoryUsage
from memlayers.value_optim import SparseValueAdam, SparseValueSGD

__version__ = "0.1.0"

__all__ = [
    "MemoryConfig",
    "MemoryUsage",
    "MemoryValues",
    "ProductKeyMemory",
    "SparseValueAdam",
    "SparseValueSGD",
    "ops",
]
