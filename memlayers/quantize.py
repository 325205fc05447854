"""Quantize a trained run's value tables for serving: int8 or 4-bit rows, bf16 scales.

    memlayers quantize runs/tiny-memory-plus --bits 8      # writes runs/tiny-memory-plus-int8
    memlayers quantize runs/tiny-memory-plus --bits 4 --group 32 --out runs/tiny-int4
    memlayers eval runs/tiny-memory-plus-int8              # a quantized run loads like any run
    memlayers generate runs/tiny-memory-plus-int8 --prompt "Which city was ... born in?"
    memlayers generate runs/tiny-memory-plus --quantized 4 --prompt "..."   # on the fly

Only the value tables are quantized: they hold most of a Memory+ model's parameters (the
373m preset's table is 1.07B of its 1.44B) while a token reads 128 of their rows, so they
are what a compact format pays off on; everything else stays as trained. The format and
its error bound: :mod:`memlayers.ops.quantized` (docs/method.md §5).

The new run directory holds the source run's ``config.yaml`` (its ``run_dir`` the new
directory) and ``tokenizer.json`` and
``checkpoints/step_XXXXXX/`` of the same step: ``model.safetensors`` (``qdata`` and
``qscales`` in place of each table's ``weight``) and ``meta.json``, whose
``"quantization"`` records bits, group, the source checkpoint and the table's bytes before
and after. It is written into a hidden temporary directory and renamed into place, so a
crash leaves no half-written run; an existing non-empty ``--out`` is refused unless
``--overwrite``. Training cannot resume from it (the float run is the one to train).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple

import torch.nn as nn
from omegaconf import OmegaConf

from memlayers.checkpoint import model_from_checkpoint, save_checkpoint, verify_checkpoint
from memlayers.config import resolve_device
from memlayers.files import atomic_dir
from memlayers.memory import MemoryValues
from memlayers.ops.quantized import resolve_group
from memlayers.run import Run


def value_tables(model: nn.Module) -> list[MemoryValues]:
    """Every distinct value table of ``model`` (a shared Memory+ table once)."""
    return [m for m in model.modules() if isinstance(m, MemoryValues)]


def table_nbytes(model: nn.Module) -> int:
    """Bytes of the model's value tables as stored."""
    return sum(t.nbytes for t in value_tables(model))


def quantize_tables_(
    model: nn.Module, bits: int, group: int | None = None, progress: bool = False
) -> list[MemoryValues]:
    """:meth:`MemoryValues.quantize_` every value table of ``model`` in place (on the meta
    device: only the layout). Raises ``ValueError`` when there is none."""
    tables = value_tables(model)
    if not tables:
        raise ValueError("the model has no memory value table to quantize")
    for t in tables:
        t.quantize_(bits, group, progress)
    return tables


def table_format(model: nn.Module) -> dict | None:
    """``{"format", "group", "bytes"}`` of the model's value tables, or None without any."""
    tables = value_tables(model)
    if not tables:
        return None
    t = tables[0]
    fmt = f"int{t.bits}" if t.bits is not None else str(t.dtype).replace("torch.", "")
    return {"format": fmt, "group": t.group, "bytes": table_nbytes(model)}


class QuantizedRun(NamedTuple):
    out: Path  # the new run directory
    checkpoint: Path  # its checkpoint
    source: Path  # the checkpoint it was quantized from
    bits: int
    group: int
    bytes_before: int
    bytes_after: int


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is the source run (or inside it, or holds it), a file, or a
    non-empty directory without ``overwrite``: before anything is loaded."""
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise ValueError(
            f"--out {out} overlaps the source run {src}: a quantized run goes to a directory "
            f"of its own (the float run stays, it is the one to train further)"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"--out {out} is not empty: pass --overwrite to replace it, or another --out"
        )


def quantize_run(
    path: str | Path,
    bits: int,
    group: int | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> QuantizedRun:
    """Write a copy of the run at ``path`` (its newest checkpoint, or the checkpoint
    ``path`` names) with quantized value tables to ``out`` (default
    ``<run>-int<bits>``, ``-g<group>`` added when ``group`` is given); see the module
    docstring."""
    # Bits, group and --out first: verifying hashes every file and the load reads the
    # whole model (the table's width, known only then, is checked against the group below).
    resolve_group(bits, group, 2)
    device = resolve_device(device)
    run = Run.of(path)
    ckpt = run.checkpoint(path)
    if out is None:
        suffix = f"-int{bits}" + (f"-g{group}" if group is not None else "")
        out = run.root.parent / f"{run.root.name}{suffix}"
    out = Path(out)
    _check_out(run.root, out, overwrite)
    meta = verify_checkpoint(ckpt)
    if meta.get("quantization"):
        raise ValueError(
            f"{ckpt} is quantized already ({meta['quantization']['bits']}-bit); quantize "
            f"its float run ({meta['quantization'].get('source', 'unknown')})"
        )
    model = model_from_checkpoint(ckpt, meta, device).eval()
    tables = value_tables(model)
    if not tables:
        raise ValueError(f"{ckpt}: the model has no memory value table to quantize")
    group = resolve_group(bits, group, tables[0].v_dim)
    before = table_nbytes(model)
    quantize_tables_(model, bits, group, progress)
    after = table_nbytes(model)
    quantization = {
        "bits": bits,
        "group": group,
        "scale_dtype": "bfloat16",
        "source": str(ckpt.resolve()),
        "table_bytes_before": before,
        "table_bytes_after": after,
    }
    saved = write_derived_run(
        out, run, int(meta["step"]), model, meta["model_config"], meta.get("progress"),
        quantization=quantization,
    )  # fmt: skip
    return QuantizedRun(out, saved, ckpt, bits, group, before, after)


def write_derived_run(
    out: Path,
    source: Run,
    step: int,
    model: nn.Module,
    model_config: dict,
    progress: dict | None,
    files: dict[str, str] | None = None,
    **meta,
) -> Path:
    """Write a run made from ``source`` (quantized, finetuned) to ``out`` atomically: its
    config and tokenizer, ``files`` (name → text) and one checkpoint of ``model`` at
    ``step`` (``meta``: extra ``save_checkpoint`` fields), built in a temporary sibling
    directory and renamed into place. Returns the checkpoint's path under ``out``.

    The config's ``run_dir`` names ``out`` (absolute), not the source: ``memlayers train
    <out>/config.yaml --resume`` then trains the new run in place, where the source's
    ``run_dir`` resumed (and pruned the checkpoints of) the source run."""
    with atomic_dir(out) as tmp:
        if source.config_path.is_file():
            config = OmegaConf.load(source.config_path)
            config.run_dir = str(Path(out).resolve())
            (tmp / source.config_path.name).write_text(OmegaConf.to_yaml(config))
        if source.tokenizer_path.is_file():
            shutil.copy2(source.tokenizer_path, tmp / source.tokenizer_path.name)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        saved = save_checkpoint(
            Run(tmp).checkpoints, step, model, model_config=model_config, progress=progress,
            **meta,
        )  # fmt: skip
    return out / saved.relative_to(tmp)
