"""Checkpoints: written atomically, described by a manifest, verified on load.

One checkpoint is a directory; ``latest`` names the newest complete one::

    checkpoints/
      step_000100/
        model.safetensors   weights (safetensors.torch.save_model: a tensor shared by
                            several modules is stored once; non-persistent buffers such
                            as the RoPE tables are rebuilt by init_weights)
        optimizer.pt        optimizer state (moments, step counts), torch.save
        trainer.pt          step, data-loader position, RNG states of every rank
        meta.json           step, model config, progress (tokens trained, training
                            seconds), size and sha256 of every file above
      latest                text file: "step_000100"

Distributed runs (and ``checkpoint.format=dcp``) write the weights and optimizer state
with torch.distributed.checkpoint instead, every rank its own shards::

      step_000100/
        dcp/                .metadata + one __R_0.distcp file per rank: the model (FSDP
                            shards, value-table column shards as DTensors), the AdamW
                            state and the value optimizer's moments
        trainer.pt, meta.json   as above ("layout": "dcp")

DCP reshards on load, so such a checkpoint loads on any number of ranks and any
memory-parallel degree (2 → 1, 1 → 4, 4 → 2), or into one process for evaluation;
:func:`consolidate` turns it into the single-file layout above. (A training resume on
another number of ranks than saved the RNG states: :mod:`memlayers.train`.) Either layout
loads the optimizer's moments and step counts only if they are of this config's
optimizers and parameter groups (:meth:`memlayers.optim.Optimizers.check_saved`, checked
before anything is read), and keeps the config's hyperparameters.

A save writes everything into a hidden ``.tmp-*`` directory, then ``os.replace`` renames
it into place and ``latest`` is replaced the same way, so a crash at any point leaves the
previous checkpoint and pointer intact. A crash between the rename and the new ``latest``
leaves a complete step directory that ``latest`` does not name yet: the newest checkpoint
of a run is therefore the newest complete step directory (``latest`` must name one of
this directory's steps: a path into another run is an error), and a resume takes the
newest one whose manifest verifies. The next save sweeps the ``.tmp-step_*`` directories
of crashed writes. A resume from an earlier step (chosen, or past newer checkpoints that
fail verification) moves the newer ones into ``abandoned_after_step_XXXXXX/``
(:func:`set_aside_after`), so they no longer count as the run's. A load checks the
manifest (missing files, sizes, checksums) before reading anything and raises
:class:`CheckpointError` naming the path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_model, save_model

from memlayers.files import fsync_dir, fsync_file, sha256_file, write_atomic

FORMAT_VERSION = 1


FORMATS = ("auto", "safetensors", "dcp")


@dataclass
class CheckpointArgs:
    enabled: bool = True  # false: no checkpoints at all (benchmarks, throwaway runs)
    every: int = 100  # steps between checkpoints (and one at the end); 0: only at the end
    keep: int = 2  # newest checkpoints kept; 0 keeps all
    checksum: bool = True  # sha256 of every file in meta.json, verified on load
    format: str = "auto"  # auto (dcp when distributed) | safetensors | dcp

    def validate(self) -> None:
        for name in ("every", "keep"):
            if getattr(self, name) < 0:
                raise ValueError(f"checkpoint.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.format not in FORMATS:
            raise ValueError(f"checkpoint.format must be one of {FORMATS}, got {self.format!r}")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not fit the model."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


_STEP_NAME = re.compile(r"step_(\d+)")


def _step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def _set_aside(path: Path) -> str:
    """The step a re-save moved aside (``.old-<step_dir>-<pid>``, :func:`_finalize`)."""
    return path.name[len(".old-") :].rsplit("-", 1)[0]


def _sweep(root: Path) -> None:
    """Remove what crashed saves left: ``.tmp-step_*`` directories, and ``.old-<step>-*``
    copies whose step directory is complete again (:func:`_finalize`)."""
    for p in root.glob(".tmp-step_*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".old-step_*"):
        if (root / _set_aside(p) / "meta.json").is_file():
            shutil.rmtree(p, ignore_errors=True)


def _new_tmp(root: Path, name: str) -> Path:
    tmp = root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _finalize(
    root: Path,
    tmp: Path,
    step: int,
    model_config,
    keep: int,
    checksum: bool,
    layout: str,
    progress: dict | None,
    quantization: dict | None = None,
) -> Path:
    """Describe every file of ``tmp`` in meta.json, rename it into place, point
    ``latest`` at it and prune old checkpoints."""
    name = step_dir_name(step)
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        fsync_file(f)
        info = {"bytes": f.stat().st_size}
        if checksum:
            info["sha256"] = sha256_file(f)
        files[f.relative_to(tmp).as_posix()] = info
    meta = {
        "format": FORMAT_VERSION,
        "layout": layout,
        "step": step,
        "model_config": model_config,
        "files": files,
    }
    if progress is not None:  # {"tokens_trained", "train_seconds"}: read by memlayers.run
        meta["progress"] = progress
    if quantization is not None:  # {"bits", "group", ...}: memlayers.quantize
        meta["quantization"] = quantization
    write_atomic(tmp / "meta.json", json.dumps(meta, indent=2))
    final = root / name
    if final.exists():  # re-saving a step: move the old one aside, then swap
        old = root / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    write_atomic(root / "latest", name + "\n")
    if keep > 0:  # by step number: names outgrow their 6 digits past step 999,999
        steps = sorted((p for p in root.glob("step_*") if p.is_dir()), key=_step_of)
        for p in steps[:-keep]:
            if p.name != name:
                shutil.rmtree(p)
    return final


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer=None,
    trainer_state: dict | None = None,
    model_config: dict | None = None,
    keep: int = 0,
    checksum: bool = True,
    progress: dict | None = None,
    quantization: dict | None = None,
) -> Path:
    """Write ``root/step_XXXXXX`` atomically, point ``root/latest`` at it, prune old ones.
    ``quantization``: the model's value tables are quantized (:mod:`memlayers.quantize`);
    recorded in ``meta.json`` so a load rebuilds them packed."""
    _check_not_offloaded(model)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _sweep(root)
    tmp = _new_tmp(root, f"{step_dir_name(step)}-{os.getpid()}")
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict() if optimizer is not None else {}, tmp / "optimizer.pt")
    torch.save({"step": step, **(trainer_state or {})}, tmp / "trainer.pt")
    return _finalize(
        root, tmp, step, model_config, keep, checksum, "safetensors", progress, quantization
    )


def _dcp_state(model: nn.Module, optimizer=None, plan=None) -> tuple[dict, list]:
    """The state DCP saves or loads in place, and the table entries wrapped as DTensors
    (``(container, key, local)`` to unwrap after a load). Value tables and their
    optimizer moments become DTensor views of this rank's column shard (``plan``)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from memlayers.parallel import value_tables

    wrapped = []

    def wrap(container: dict, key: str, table) -> None:
        local = container[key]
        if plan is not None and plan.sharded:
            container[key] = plan.table_dtensor(table, local)
            wrapped.append((container, key, local))

    state = {"model": get_model_state_dict(model)}
    for prefix, table in value_tables(model):
        state["model"][f"{prefix}.weight"] = table.weight.detach()
        wrap(state["model"], f"{prefix}.weight", table)
    if optimizer is not None:
        state.update(optimizer.distributed_state_dict(wrap))
    return state, wrapped


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _check_not_offloaded(model: nn.Module) -> None:
    """An offloaded value table is not in the model's ``state_dict``: a checkpoint of it
    would be missing the table. Refused before anything is written."""
    from memlayers.memory import MemoryValues

    if any(isinstance(m, MemoryValues) and m.offloaded is not None for m in model.modules()):
        raise CheckpointError(
            "the model's value tables are offloaded to host memory (for serving) and are not "
            "in its state_dict: save the run it was loaded from, not this model"
        )


def save_distributed_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer=None,
    trainer_state: dict | None = None,
    model_config: dict | None = None,
    keep: int = 0,
    checksum: bool = True,
    progress: dict | None = None,
    plan=None,
) -> Path:
    """Like :func:`save_checkpoint` in the DCP layout; every rank calls it (or a single
    process). ``trainer_state`` is written by rank 0 (gather per-rank parts first)."""
    import torch.distributed.checkpoint as dcp

    _check_not_offloaded(model)
    root = Path(root)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = root / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _sweep(root)
        _new_tmp(root, tmp.name[len(".tmp-") :])
    _barrier()
    state, _ = _dcp_state(model, optimizer, plan)
    dcp.save(state, checkpoint_id=str(tmp / "dcp"))
    _barrier()
    final = root / step_dir_name(step)
    if rank == 0:
        torch.save({"step": step, **(trainer_state or {})}, tmp / "trainer.pt")
        final = _finalize(root, tmp, step, model_config, keep, checksum, "dcp", progress)
    _barrier()
    return final


_GROUP_NAME = re.compile(r"optim\.param_groups\.(\d+)\.name")


def _dcp_optimizers(path: Path, saved: dict, no_dist: bool) -> dict[str, list]:
    """What a DCP checkpoint holds of optimizer state, from its metadata ``saved``:
    ``{optimizer name: its parameter groups' names}``
    (:meth:`memlayers.optim.Optimizers.check_saved`), empty when it holds none. The
    AdamW's group names are read (a few bytes); the value optimizer saves no groups: its
    one group, ``values``."""
    import torch.distributed.checkpoint as dcp

    from memlayers.optim import DCP_SECTIONS

    sections = {key.split(".", 1)[0] for key in saved}
    held = {name: ["values"] for name, sec in DCP_SECTIONS.items() if sec in sections}
    if "adamw" in held:
        n = sum(1 for key in saved if _GROUP_NAME.fullmatch(key))
        names = {"optim": {"param_groups": [{"name": None} for _ in range(n)]}}
        dcp.load(names, checkpoint_id=str(path / "dcp"), no_dist=no_dist)
        held["adamw"] = [g["name"] for g in names["optim"]["param_groups"]]
    return held


def _check_dcp_moments(saved: dict, optimizer) -> None:
    """Each table's saved second moment against the value optimizer's (row-wise ``[N]``
    or ``[N, D]``: :meth:`memlayers.value_optim.SparseValueAdam.check_saved_sq`), from the
    metadata's full shapes (its ``exp_avg`` is always the table's), before the DCP load
    would fail deep inside."""
    values = optimizer.optimizers.get("values")
    if values is None or not hasattr(values, "check_saved_sq"):
        return
    for key, meta in saved.items():
        if key.startswith("values_optim.") and key.endswith(".exp_avg_sq"):
            table = saved[key.removesuffix("_sq")].size
            values.check_saved_sq(meta.size, table, what=key)


def _read_as_saved(entry: dict, key: str, dtype: torch.dtype, wrapped: list) -> None:
    """Let DCP read ``entry[key]`` into a tensor of the saved ``dtype`` (a DTensor view
    stays one, of the same placements), so the load reads the saved values rather than
    casting them into this state's dtype; the caller converts them after the load."""
    new = entry[key].to(dtype)
    entry[key] = new
    for i, (container, k, _) in enumerate(wrapped):
        if container is entry and k == key:
            wrapped[i] = (container, k, new.to_local())


def _load_dcp(path: Path, model: nn.Module, optimizer=None, plan=None) -> bool:
    """Load a DCP checkpoint in place; True when it held optimizer state for
    ``optimizer`` (False: none given, or saved without: the optimizer stays fresh)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    # Without a plan the model is whole: this process reads every shard itself, even
    # inside a process group (e.g. rank 0 evaluating after a distributed run).
    no_dist = plan is None or plan.world == 1
    saved = dcp.FileSystemReader(str(path / "dcp")).read_metadata().state_dict_metadata
    # Optimizer state of other optimizers or groups than this config's (optim.
    # value_optimizer or optim.memory_lr changed) is refused before anything loads, as
    # the single-file load refuses it; a checkpoint saved without optimizer state (e.g.
    # by one process, for a distributed run to start from) leaves the optimizer fresh.
    held = {}
    if optimizer is not None:
        held = _dcp_optimizers(path, saved, no_dist)
        try:
            optimizer.check_saved(held)
            _check_dcp_moments(saved, optimizer)
        except ValueError as e:
            raise CheckpointError(f"{path / 'dcp'} does not fit the optimizer: {e}") from e
    state, wrapped = _dcp_state(model, optimizer, plan)
    sections = {key.split(".", 1)[0] for key in saved}
    state = {k: v for k, v in state.items() if k in sections}
    # A value table's master copy saved without one (a run of optim.value_master=false or
    # older): not read; the optimizer makes it from the loaded table. One saved as the
    # other kind (fp32 values, or a split master's int16 remainders:
    # optim.value_master_split changed) is read as it was saved and converted after.
    for prefix, entry in state.get("values_optim", {}).items():
        key = f"values_optim.{prefix}.master"
        if "master" in entry and key not in saved:
            del entry["master"]
        elif "master" in entry and entry["master"].dtype != saved[key].properties.dtype:
            _read_as_saved(entry, "master", saved[key].properties.dtype, wrapped)
    dcp.load(state, checkpoint_id=str(path / "dcp"), no_dist=no_dist)
    for container, key, local in wrapped:  # loaded in place; hand back the plain shards
        if key in container:
            container[key] = local
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        optimizer.load_distributed_state_dict(state)
    return bool(held)


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints (with ``meta.json``) of a ``checkpoints/`` directory,
    newest first; unverified. ``latest`` only has to be valid: the newest complete step
    wins over a stale one (see the module docstring)."""
    root = Path(root)
    latest = root / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        if not _STEP_NAME.fullmatch(name):
            raise CheckpointError(
                f"{latest} names {name!r}, not a step_XXXXXX directory of {root}: a "
                f"pointer out of this run is not followed (to start from another run's "
                f"checkpoint, pass it as --resume-from)"
            )
    found = {}
    for p in root.glob("step_*"):
        if _STEP_NAME.fullmatch(p.name) and (p / "meta.json").is_file():
            found[p.name] = p
    # A re-save of the same step swaps directories: between its two renames the previous
    # copy sits at .old-<name>-<pid>, complete.
    for p in sorted(root.glob(".old-step_*-*")):
        name = _set_aside(p)
        if name not in found and _STEP_NAME.fullmatch(name) and (p / "meta.json").is_file():
            found[name] = p
    return [found[n] for n in sorted(found, key=lambda n: _step_of(Path(n)), reverse=True)]


def set_aside_after(root: str | Path, step: int, metrics: Path | None = None) -> Path | None:
    """Move this run's checkpoints past ``step`` out of the way of a resume from ``step``.

    A resume from an earlier checkpoint of the same run (``--resume-from
    checkpoints/step_000400`` when 600 exists, or a fall-back past a newer one that fails
    verification) starts another line of training: left in ``root``, the newer step
    directories would win as the newest checkpoint (eval, generate and the next
    ``--resume`` would read the abandoned model) and ``keep`` would prune the new ones
    first. They go instead, complete or not, into ``root/abandoned_after_step_XXXXXX/``
    (``-2``, ``-3``, ... when that exists), with a copy of ``metrics`` (the run's log,
    which the resume truncates to ``step``); ``latest`` then names ``step``'s directory.
    Nothing is deleted. Returns that directory, or None when nothing was past ``step``."""
    root = Path(root)
    newer = []
    for p in (*root.glob("step_*"), *root.glob(".old-step_*-*")):
        m = _STEP_NAME.fullmatch(_set_aside(p) if p.name.startswith(".old-") else p.name)
        if p.is_dir() and m and int(m.group(1)) > step:
            newer.append(p)
    if not newer:
        return None
    base = root / f"abandoned_after_{step_dir_name(step)}"
    dest, k = base, 1
    while dest.exists():
        k += 1
        dest = base.with_name(f"{base.name}-{k}")
    dest.mkdir()
    for p in sorted(newer):
        os.replace(p, dest / p.name)
    if metrics is not None and metrics.is_file():
        shutil.copy2(metrics, dest / metrics.name)
    if (root / step_dir_name(step) / "meta.json").is_file():
        write_atomic(root / "latest", step_dir_name(step) + "\n")
    fsync_dir(root)
    return dest


def _checkpoints_of(path: str | Path) -> tuple[Path, list[Path]]:
    """``path`` itself when it is a step directory, else the complete checkpoints of a
    ``checkpoints/`` directory or of a run directory's, newest first."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p, [p]
    for root in (p, p / "checkpoints"):
        latest = root / "latest"
        if latest.is_file() or any(root.glob("step_*")):
            found = complete_checkpoints(root)
            if found:
                return root, found
            if latest.is_file():
                name = latest.read_text().strip()
                raise CheckpointError(
                    f"{latest} points to {name!r}, which is missing or incomplete (no "
                    f"meta.json in {root / name}), and no other step directory is complete"
                )
    raise CheckpointError(
        f"no checkpoint at {p}: expected a step_XXXXXX directory with meta.json, a "
        f"checkpoints/ directory with a 'latest' file, or a run directory holding one"
    )


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a step directory, a ``checkpoints/`` directory or a run
    directory (their newest complete checkpoint, normally what ``latest`` names)."""
    return _checkpoints_of(path)[1][0]


def newest_verified(path: str | Path) -> tuple[Path, dict, list[str]]:
    """``(checkpoint, meta, skipped)``: the checkpoint ``path`` names (a step directory:
    itself) or else the newest one whose manifest verifies, with why each newer one was
    skipped. Raises the newest one's :class:`CheckpointError` when none verifies."""
    _, found = _checkpoints_of(path)
    errors = []
    for ckpt in found:
        try:
            return ckpt, verify_checkpoint(ckpt), [str(e) for e in errors]
        except CheckpointError as e:
            errors.append(e)
    raise errors[0]


def verify_checkpoint(path: str | Path, size_only: Collection[str] = ()) -> dict:
    """Check the manifest of a checkpoint directory; returns ``meta``. Every file must be
    there at its size; its sha256 is checked too, except for the files named in
    ``size_only`` (those a load never reads, or reads only in part)."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable meta.json ({e})") from e
    if meta.get("format") != FORMAT_VERSION or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{path}: meta.json is not a format-{FORMAT_VERSION} manifest")
    for fname, info in meta["files"].items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"{path}: {fname} is missing")
        size = f.stat().st_size
        if size != info.get("bytes"):
            raise CheckpointError(
                f"{path}: {fname} has {size} bytes, the manifest says "
                f"{info.get('bytes')} (truncated or overwritten)"
            )
        if "sha256" in info and fname not in size_only and sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"{path}: {fname} fails its sha256 check (corrupted)")
    return meta


def _torch_load(f: Path) -> dict:
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {f}: {e}") from e


def load_checkpoint(path: str | Path, model: nn.Module, optimizer=None, plan=None) -> dict:
    """Load weights (and optimizer state) in place; returns the trainer state + ``meta``.

    ``path`` is anything :func:`resolve_checkpoint` accepts; the files are verified once,
    before anything is read, and a run's newest checkpoint that fails verification gives
    way to the newest one that passes (:func:`newest_verified`; ``state["skipped"]`` says
    why). A DCP checkpoint loads into any layout (``plan`` from
    :func:`memlayers.parallel.parallelize`, or none); a single-file one into an unsharded
    model. ``optimizer``'s state is refused when it is of other optimizers or parameter
    groups; a checkpoint saved without optimizer state leaves it fresh, in either layout,
    and ``state["optimizer_fresh"]`` says so (the trainer's log does).
    """
    path, meta, skipped = newest_verified(path)
    state = _load_verified(path, meta, model, optimizer, plan)
    state["skipped"] = skipped
    return state


def _check_table_dtype(path: Path, meta: dict, model: nn.Module) -> None:
    """A resume into value tables of another dtype than the checkpoint's would convert
    them silently and go on with other arithmetic (the paper presets' tables became bf16
    on 2026-12-03: a run begun in fp32 resumed with a newer config): refused, naming the
    setting that resumes it as it was."""
    from memlayers.memory import VALUE_DTYPES, MemoryValues

    saved = (meta.get("model_config") or {}).get("memory") or {}
    want = saved.get("value_dtype", "fp32")  # checkpoints older than the field: fp32
    # (a quantized table has no float dtype: None, and is loaded as quantized below)
    have = {m.dtype for m in model.modules() if isinstance(m, MemoryValues)} - {None}
    # value_dtype=fp32 means "not bf16": such a table follows the model's dtype (fp64 in
    # a double-precision model), so only bf16 against not-bf16 is a change.
    if any((d == torch.bfloat16) != (want == "bf16") for d in have):
        names = {v: k for k, v in VALUE_DTYPES.items()}
        got = ", ".join(sorted(names.get(d, str(d)) for d in have))
        raise CheckpointError(
            f"{path} holds {want} value tables, this model's are {got}: resume with "
            f"model.memory.value_dtype={want} (the paper presets' default became bf16 on "
            f"2026-12-03)"
        )


def _load_verified(path: Path, meta: dict, model: nn.Module, optimizer=None, plan=None) -> dict:
    """:func:`load_checkpoint` of a checkpoint whose manifest ``meta`` is verified."""
    _check_table_dtype(path, meta, model)
    q = meta.get("quantization")
    if q and not _has_quantized_tables(model):
        raise CheckpointError(
            f"{path} holds {q['bits']}-bit quantized value tables, for serving (memlayers "
            f"eval and generate read it); training cannot resume from it: resume the float "
            f"run it came from ({q.get('source', 'unknown')})"
        )
    if meta.get("layout") == "dcp":
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            loaded = _load_dcp(path, model, optimizer, plan)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException
            raise CheckpointError(f"cannot load the DCP checkpoint {path}: {e}") from e
        state = _torch_load(path / "trainer.pt")
        state["meta"], state["path"] = meta, str(path)
        state["optimizer_fresh"] = optimizer is not None and not loaded
        return state
    if plan is not None and plan.world > 1:
        raise CheckpointError(
            f"{path} is a single-file checkpoint; a distributed run resumes from DCP "
            f"checkpoints (checkpoint.format=dcp)"
        )
    device = next(model.parameters()).device
    try:
        load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))
    except Exception as e:
        raise CheckpointError(
            f"cannot load {path / 'model.safetensors'} into the model: {e}"
        ) from e
    saved = {}
    if optimizer is not None:
        saved = _torch_load(path / "optimizer.pt")
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path / 'optimizer.pt'} does not fit the optimizer: {e}") from e
    state = _torch_load(path / "trainer.pt")
    state["meta"], state["path"] = meta, str(path)
    state["optimizer_fresh"] = optimizer is not None and not saved
    return state


def _has_quantized_tables(model: nn.Module) -> bool:
    from memlayers.memory import MemoryValues

    return any(isinstance(m, MemoryValues) and m.bits is not None for m in model.modules())


def model_from_checkpoint(
    path: Path, meta: dict, device: str | torch.device = "cpu", offload: bool | str = False
):
    """Rebuild the model from a verified checkpoint's ``meta`` and load its weights. A
    quantized checkpoint's value tables are laid out packed on the meta device (never
    allocated as float) before the load fills them. ``offload``: the value tables stay
    memory-mapped on the host (:func:`memlayers.offload.model_offloaded_from_checkpoint`;
    ``True`` or ``"gather"``, or ``"zero-copy"``: :mod:`memlayers.ops.offloaded`)."""
    from memlayers.retrofit import build_model

    if not meta.get("model_config"):
        raise CheckpointError(f"{path}: meta.json has no model_config")
    if offload:
        from memlayers.offload import model_offloaded_from_checkpoint
        from memlayers.ops.offloaded import offload_mode

        return model_offloaded_from_checkpoint(path, meta, device, offload_mode(offload))
    if meta.get("quantization"):
        model = meta_model(meta)
        model.to_empty(device=device)
        model.init_weights()  # every buffer set (RoPE tables); the load fills the rest
    else:
        config, mode = model_config_of(meta)
        model = build_model(config, mode, device)
    _load_verified(path, meta, model)
    return model


def model_config_of(meta: dict):
    """``(ModelConfig, memory_mode)`` of a checkpoint's ``meta``: ``model_config`` holds
    ``memory_mode`` only when it is not the paper's ``replace`` (memlayers/retrofit.py)."""
    from memlayers.model import ModelConfig

    d = dict(meta["model_config"])
    mode = d.pop("memory_mode", "replace")
    return ModelConfig.from_dict(d), mode


def meta_model(meta: dict) -> nn.Module:
    """The model of a checkpoint's ``meta`` on the meta device (nothing allocated), its
    value tables laid out packed when the checkpoint's are quantized."""
    from memlayers.model import Transformer
    from memlayers.quantize import quantize_tables_
    from memlayers.retrofit import add_parallel_mlps_

    config, mode = model_config_of(meta)
    with torch.device("meta"):
        model = Transformer(config)
        if mode == "parallel":
            add_parallel_mlps_(model)
    q = meta.get("quantization")
    if q:
        quantize_tables_(model, q["bits"], q["group"])  # meta: the packed buffers' shapes
    return model


def load_model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the model from ``meta.json``'s config and load its weights (for eval)."""
    path = resolve_checkpoint(path)
    return model_from_checkpoint(path, verify_checkpoint(path), device)


def consolidate(src: str | Path, dst_root: str | Path) -> Path:
    """Turn a checkpoint of any layout (e.g. DCP from a multi-GPU run) into one
    safetensors file, in one process, whatever the number of ranks that wrote it.

    memlayers consolidate runs/big/checkpoints/step_001000 runs/big-single
    memlayers consolidate runs/big runs/big-single      # the run's latest checkpoint

    The result (``OUT/step_XXXXXX/model.safetensors`` + ``meta.json``, ``OUT/latest``)
    loads in one process with :func:`load_model_from_checkpoint` for evaluation and
    generation. It holds weights and the trainer state, not the optimizer state.
    """
    src = resolve_checkpoint(src)
    meta = verify_checkpoint(src)
    model = model_from_checkpoint(src, meta)
    trainer = _torch_load(src / "trainer.pt")
    step = int(meta["step"])
    trainer.pop("step", None)
    return save_checkpoint(
        dst_root, step, model, None, trainer, meta["model_config"],
        progress=meta.get("progress"), quantization=meta.get("quantization"),
    )  # fmt: skip
