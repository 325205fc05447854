"""Serve a run with its value tables in host memory and the rest of the model on the device.

    memlayers generate runs/tiny-memory-plus --offload --prompt "Which city was ... born in?"
    memlayers generate runs/tiny-memory-plus-int8 --offload --prompt "..."   # packed rows
    memlayers generate runs/tiny-memory-plus --offload --quantized 4 --prompt "..."

With ``--offload`` the checkpoint's value tables are memory-mapped from its
``model.safetensors`` (:func:`model_offloaded_from_checkpoint`): never read whole, never
copied to the device; the rest of the model is loaded onto the device as usual. Each
lookup gathers the rows it reads to the device and sums them there
(:mod:`memlayers.ops.offloaded`), giving the tokens of the on-device model
(tests/test_offload.py). A table larger than the device's memory, or than host RAM (the
OS pages in the rows lookups touch), serves this way; each lookup costs one host sync and
a copy of the rows it reads. With ``--quantized`` the float table is quantized on the host
(a pass over the file) and the packed rows stay there (with ``--zero-copy`` too: only the
packed rows are then page-locked, :func:`set_offload_mode_`).

``--zero-copy`` (implies ``--offload``) reads the file into RAM and page-locks it instead:
the GPU then reads the rows a lookup needs in place, over the bus, with no sync (the
decode step compiles and is captured in a CUDA graph like an on-device model's), for a
table that fits in host RAM but not on the device.

In Python: :func:`offload_tables_` for a model in memory (its tables move to host RAM),
or :meth:`memlayers.memory.MemoryValues.offload_` for one table, from memory or a file;
:func:`cache_hot_rows_` keeps the rows read most (counted on sample text) on the device
too, so that lookups gather only the others from the host.
Offloaded tables are for serving: training, or a backward through a lookup, is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from memlayers.checkpoint import CheckpointError, meta_model
from memlayers.memory import MemoryValues
from memlayers.ops.offloaded import hottest_rows, map_tensors, offload_mode, table_tensor_names
from memlayers.quantize import value_tables


def _table_prefixes(model: nn.Module) -> dict[int, str]:
    """``id(table) -> "its.module.name."``: where its tensors are in the state dict."""
    mods = model.named_modules()
    return {id(m): f"{n}." if n else "" for n, m in mods if isinstance(m, MemoryValues)}


def offload_tables_(
    model: nn.Module,
    file: str | Path | None = None,
    mode: str = "gather",
    device: torch.device | str | None = None,
) -> list[MemoryValues]:
    """:meth:`MemoryValues.offload_` every value table of ``model``: to host RAM, or
    memory-mapped from ``file`` (a safetensors file of the model's state dict, where each
    table is found under its module's name); ``mode`` (``"gather"`` or ``"zero-copy"``)
    and ``device`` as there. Raises ``ValueError`` when there is none."""
    mode = offload_mode(mode)
    tables = value_tables(model)
    if not tables:
        raise ValueError("the model has no memory value table to offload")
    prefixes = _table_prefixes(model)
    for t in tables:
        t.offload_(file, prefixes[id(t)], mode, device)
    return tables


def set_offload_mode_(
    model: nn.Module, mode: str, device: torch.device | str | None = None
) -> list[MemoryValues]:
    """Serve every offloaded value table of ``model`` in ``mode`` from ``device``
    (default: each table's own), its host tensors kept as they are (:meth:`memlayers.ops.
    offloaded.HostTable.with_mode`): a table quantized on the host from its mapped file
    (gather) is then page-locked as packed rows alone (zero-copy). Raises ``ValueError``
    when none is offloaded."""
    mode = offload_mode(mode)
    tables = [t for t in value_tables(model) if t.offloaded is not None]
    if not tables:
        raise ValueError("the model has no offloaded value table to serve another way")
    for t in tables:
        t.offloaded = t.offloaded.with_mode(mode, device)
    return tables


@torch.no_grad()
def cache_hot_rows_(
    model: nn.Module, tokens: torch.Tensor, n_rows: int, device: torch.device | str
) -> list[dict]:
    """Count the rows the model's offloaded tables read over ``tokens (B, T)`` (one
    forward, eval mode) and keep the ``n_rows`` read most of each table on ``device``
    (:meth:`memlayers.ops.offloaded.HostTable.cache_rows_`); returns each table's
    ``{"rows", "read"}`` (cached, distinct rows the sample read)."""
    tables = [t for t in value_tables(model) if t.offloaded is not None]
    if not tables:
        raise ValueError("the model has no offloaded value table to cache rows of")
    layers = model.memory_layers()
    was_training = model.training
    model.eval()
    try:
        trackers = [layer.track_usage() for layer in layers]
        model(tokens)
    finally:
        for layer in layers:
            layer.track_usage(False)
        model.train(was_training)
    out = []
    for t in tables:
        counts = sum(u.counts for u, layer in zip(trackers, layers, strict=True)
                     if layer.values is t and u.counts is not None)  # fmt: skip
        rows = hottest_rows(counts, n_rows)
        t.offloaded.cache_rows_(rows, device)
        out.append({"rows": rows.numel(), "read": int((counts > 0).sum())})
    return out


def model_offloaded_from_checkpoint(
    path: Path, meta: dict, device: str | torch.device, mode: str = "gather"
):
    """The model of a verified single-file checkpoint with its value tables memory-mapped
    from ``model.safetensors`` (zero-copy: read into page-locked RAM, read in place from
    ``device``) and everything else loaded onto ``device``, in eval mode."""
    if meta.get("layout") == "dcp":
        raise CheckpointError(
            f"{path} is a DCP checkpoint: offloading memory-maps a single-file one; "
            f"write one with memlayers consolidate first"
        )
    model = meta_model(meta)  # nothing allocated: the table may not fit anywhere
    file = path / "model.safetensors"
    prefixes = _table_prefixes(model)
    tables = offload_tables_(model, file, mode, device)
    skip = {prefixes[id(t)] + n for t in tables for n in table_tensor_names(t.bits)}
    model.to_empty(device=device)
    model.init_weights()  # every buffer set (RoPE tables); the load fills the rest
    tensors, _ = map_tensors(file)
    state = {k: v for k, v in tensors.items() if k not in skip}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"cannot load {file} into the model: {e}") from e
    # safetensors stores a tensor shared by several modules once, under one of its names.
    sd = model.state_dict()
    loaded = {sd[k].data_ptr() for k in state if k in sd}
    missing = [k for k in missing if sd[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise CheckpointError(
            f"cannot load {file} into the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()
