"""Kernels and their PyTorch references; one dispatcher per op (``impl=``)."""

from memlayers.ops.embedding_bag import embedding_bag
from memlayers.ops.product_keys import product_key_topk
from memlayers.ops.quantized import dequantize_rows, embedding_bag_quantized, quantize_rows

__all__ = [
    "dequantize_rows",
    "embedding_bag",
    "embedding_bag_quantized",
    "product_key_topk",
    "quantize_rows",
]
