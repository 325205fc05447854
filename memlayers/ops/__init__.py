"""Kernels and their PyTorch references; one dispatcher per op (``impl=``)."""

from memlayers.ops.embedding_bag import embedding_bag
from memlayers.ops.product_keys import product_key_topk

__all__ = ["embedding_bag", "product_key_topk"]
