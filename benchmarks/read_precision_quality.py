"""Would a narrower read copy of the value table keep the quality? A study, CPU.

The H100 profile of a 134m-memory+ step (results/profile_134m_h100_20261205.md) has the
lookup forward and the score gradient each read 19.3 GB of bf16 rows a step at the card's
bandwidth. A read copy of the table in int8 with a scale per row (what
:meth:`memlayers.MemoryValues.quantize_` packs for serving) would halve those bytes: the
optimizer would keep the bf16 table and its fp32 master as now and write the int8 copy of
the rows it steps. Whether a model trained so learns as well is the question to answer
before the kernels are written. This script answers it on the torch path: every lookup
(forward, score gradient, evaluation) reads the table's rows packed and unpacked in the
serving format (int8 with a bf16 scale per row; ``--bits 4``: 4-bit with one per 32
columns, 3.6× fewer bytes than bf16 at D = 1024); the value gradient, which does not read
the rows, and the optimizer are untouched (a straight-through estimate, as
quantization-aware training does).

    python benchmarks/read_precision_quality.py --bits 8 -- run_dir=runs/int8-s0 seed=0 \\
        model.memory.value_dtype=bf16 optim.value_optimizer=sparse_adam_bf16

Everything after ``--`` is ``memlayers train``'s (the main job: tiny-memory+ on bios,
1,000 steps, then its evaluation, all in this process with the reads quantized).

Since the int8 read copy is built (``model.memory.value_read=int8``), ``--bits 16``
leaves the reads as the run's config has them, and ``--grad-bits 8`` asks the next
question: could the value-gradient walk, which reads the output gradient once per lookup
(3.5 ms of a 134m-memory+ step on an H100), read it as int8 rows with a scale each?
Every value gradient is then computed from ``grad_out`` packed and unpacked that way (the
score gradient from ``grad_out`` as it is):

    python benchmarks/read_precision_quality.py --bits 16 --grad-bits 8 -- run_dir=R \
        seed=S model.memory.value_dtype=bf16 optim.value_optimizer=sparse_adam_bf16 \
        model.memory.value_read=int8
"""

from __future__ import annotations

import argparse
import functools
import importlib

import torch

from memlayers.ops.quantized import dequantize_rows, quantize_rows, resolve_group


def read_copy(values: torch.Tensor, bits: int, group: int | None = None) -> torch.Tensor:
    """``values [N, D]`` as a lookup would read them from their packed copy in the serving
    format (:func:`memlayers.ops.quantized.quantize_rows`: int8 with a bf16 scale per row,
    or 4-bit with one per ``group`` columns, 32 by default), dequantized to ``values``'
    dtype."""
    packed = quantize_rows(values.detach(), bits, group)
    return dequantize_rows(packed).to(values.dtype)


def patch_reads(bits: int, group: int | None = None):
    """Make every torch-path lookup read its rows through :func:`read_copy`: the
    forward (and the score gradient it saves the rows for) and the merged shared-table
    backward's score gradient. The value gradient does not read rows: unchanged. Returns
    a function that undoes the patch."""
    from memlayers import merged_grad

    # The module (memlayers.ops re-exports its function under the same name).
    eb = importlib.import_module("memlayers.ops.embedding_bag")

    forward = eb._TorchEmbeddingBag.forward

    def quantized_forward(ctx, values, indices, weights, sparse_grad=False):
        return forward(ctx, read_copy(values, bits, group), indices, weights, sparse_grad)

    eb._TorchEmbeddingBag.forward = staticmethod(quantized_forward)
    grads = merged_grad.embedding_bag_grads

    @functools.wraps(grads)
    def quantized_grads(values, *args, **kwargs):
        return grads(read_copy(values, bits, group), *args, **kwargs)

    merged_grad.embedding_bag_grads = quantized_grads

    def restore() -> None:
        eb._TorchEmbeddingBag.forward = staticmethod(forward)
        merged_grad.embedding_bag_grads = grads

    return restore


def patch_grads(bits: int = 8):
    """Make every torch-path value gradient read the output gradient through
    :func:`read_copy` (int8 rows, a scale each): the merged shared-table walk and a
    lookup's own backward. The score gradient reads the output gradient as it is. Returns
    a function that undoes the patch."""
    from memlayers import merged_grad

    eb = importlib.import_module("memlayers.ops.embedding_bag")
    grads, torch_grads = merged_grad.embedding_bag_grads, eb._torch_grads

    @functools.wraps(grads)
    def packed_grads(values, indices, weights, grad_out, need_values=True, need_weights=True,
                     **kwargs):  # fmt: skip
        gv = dw = None
        if need_values:
            gv, _ = grads(values, indices, weights, read_copy(grad_out, bits), True, False,
                          **kwargs)  # fmt: skip
        if need_weights:
            _, dw = grads(values, indices, weights, grad_out, False, True, **kwargs)
        return gv, dw

    def packed_torch_grads(values, indices, weights, grad_out, need_v, need_w, sparse):
        gv = dw = None
        if need_v:
            gv, _ = torch_grads(values, indices, weights, read_copy(grad_out, bits), True, False,
                                sparse)  # fmt: skip
        if need_w:
            _, dw = torch_grads(values, indices, weights, grad_out, False, True, sparse)
        return gv, dw

    merged_grad.embedding_bag_grads = packed_grads
    eb._torch_grads = packed_torch_grads

    def restore() -> None:
        merged_grad.embedding_bag_grads = grads
        eb._torch_grads = torch_grads

    return restore


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--bits", type=int, default=8, choices=[16, 8, 4],
        help="bits of the read copy (16: the reads as the run's config has them)",
    )  # fmt: skip
    p.add_argument(
        "--grad-bits", type=int, default=16, choices=[16, 8],
        help="8: value gradients read the output gradient as int8 rows (16: as it is)",
    )  # fmt: skip
    p.add_argument(
        "--group", type=int, default=None,
        help="columns per scale (default: a row at 8 bits, 32 at 4, the serving format's)",
    )  # fmt: skip
    p.add_argument("train", nargs=argparse.REMAINDER, help="-- then memlayers train's args")
    args = p.parse_args(argv)
    rest = args.train[1:] if args.train[:1] == ["--"] else args.train
    try:  # the serving format's check (a positive group, even at 4 bits), before any run
        if args.bits != 16:
            resolve_group(args.bits, args.group, 1)
    except ValueError as e:
        p.error(str(e))
    if any(a.startswith("device=") and a != "device=cpu" for a in rest):
        p.error("the patched reads are the torch path's: the run must be on the CPU (device=cpu)")
    if args.bits != 16:
        patch_reads(args.bits, args.group)
    if args.grad_bits != 16:
        patch_grads(args.grad_bits)
    from memlayers.cli import main as cli_main

    return cli_main(["train", "device=cpu", *rest])


if __name__ == "__main__":
    raise SystemExit(main())
