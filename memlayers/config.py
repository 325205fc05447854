"""The training config: one root dataclass, loaded as defaults < preset < YAML < CLI.

Each section is the ``*Args`` dataclass that lives next to the code it configures::

    TrainArgs            run_dir, steps, seed, grad_accum, device, dtype, compile, eval_*
      model: ModelArgs        memlayers/presets.py  (a preset name + any ModelConfig field)
      optim: OptimArgs        memlayers/optim.py
      data: DataArgs          memlayers/data/loader.py
      checkpoint: CheckpointArgs  memlayers/checkpoint.py
      logging: LoggingArgs    memlayers/logger.py
      parallel: ParallelArgs  memlayers/parallel.py

``model.preset`` (with its optimizer settings, ``presets.PRESET_OPTIM``) is merged in
under the YAML and the CLI, so either may override single fields of it. A dataset's
options are its own typed section, ``data.<dataset>.<option>`` (memlayers/data/datasets.py).
Unknown keys, wrong types and invalid values raise ``ValueError`` naming the key and the
value.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from memlayers.checkpoint import CheckpointArgs
from memlayers.data.loader import DataArgs, check_dataset_name, reject_old_options
from memlayers.files import write_atomic
from memlayers.logger import LoggingArgs
from memlayers.optim import OptimArgs
from memlayers.parallel import ParallelArgs
from memlayers.presets import PRESET_OPTIM, ModelArgs, get_preset

DTYPES = ("auto", "fp32", "bf16")


@dataclass
class TrainArgs:
    """Defaults are the main job (docs/main_job.md): tiny Memory+ on 1,000 bios people,
    1,000 steps of 16 × 128 tokens (one epoch, ~36 exposures a person), ~5 min on 2 CPU
    cores, then ``memlayers eval``."""

    run_dir: str = "runs/tiny-memory-plus"
    steps: int = 1000  # optimizer steps (the schedule's length)
    seed: int = 0  # weights, dropout
    grad_accum: int = 1  # micro-batches per optimizer step
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on cuda, fp32 on cpu) | fp32 | bf16
    compile: bool | None = None  # torch.compile each block; null: on CUDA only
    eval_every: int = 250  # steps between validation losses; 0: only at the end
    eval_batches: int = 8  # validation micro-batches per evaluation
    final_eval: bool = True  # `memlayers train`: run `memlayers eval` on the last checkpoint
    # Divergence guard beyond NaN: stop when any weight's magnitude passes this (checked with
    # the NaN flags, at log and checkpoint steps); 0 turns it off.
    max_weight: float = 1e4
    model: ModelArgs = field(default_factory=ModelArgs)
    # lr 3e-3 beat 1e-3, 6e-3 and 1e-2 for both tiny-dense and tiny-memory+ on the main
    # job (docs/results.md)
    optim: OptimArgs = field(default_factory=lambda: OptimArgs(lr=3e-3, warmup_steps=50))
    data: DataArgs = field(default_factory=lambda: DataArgs(dataset="bios"))
    checkpoint: CheckpointArgs = field(default_factory=lambda: CheckpointArgs(every=250))
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)

    def validate(self) -> None:
        for name in ("steps", "grad_accum"):
            v = getattr(self, name)
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={v!r}")
        if not self.max_weight >= 0:
            raise ValueError(f"max_weight must be >= 0 (0: off), got max_weight={self.max_weight}")
        if self.final_eval and not self.checkpoint.enabled:
            raise ValueError(
                "final_eval=true evaluates the last checkpoint, but checkpoint.enabled=false "
                "writes none: set final_eval=false, or enable checkpoints"
            )
        for name in ("eval_every", "eval_batches"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {name}={getattr(self, name)!r}")
        if self.device != "auto":
            check_device(self.device)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got dtype={self.dtype!r}")
        self.model.validate()  # ModelConfig's checks
        self.optim.validate()
        self.data.validate()
        check_dataset_name(self.data.dataset)  # (load_dataset takes other tables too)
        self.checkpoint.validate()
        self.logging.validate()
        self.parallel.validate()
        if self.model.hf is None:  # with model.hf: once the pretrained model is read
            check_seq_len(self)


def check_device(device: str) -> None:
    """``device``: cpu or cuda, with a non-negative integer index or none (torch's own
    parser refuses ``cuda:x`` and ``cuda:-1``)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got device={device!r}")


def resolve_device(device: str) -> str:
    """``auto``: cuda when there is one, else cpu; any other ``device`` checked
    (:func:`check_device`), and cuda only where CUDA is available."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available")
    return device


def check_seq_len(args: TrainArgs) -> None:
    """Training sequences must fit the model's positions (the RoPE tables'
    ``max_seq_len``). :meth:`TrainArgs.validate` checks it, and the trainer again at its
    start (``model.hf``: against the pretrained model's config), before it writes
    anything in ``run_dir``."""
    if args.data.seq_len > args.model.max_seq_len:
        source = f" (the pretrained model's, model.hf={args.model.hf!r})" if args.model.hf else ""
        raise ValueError(
            f"data.seq_len={args.data.seq_len} exceeds model.max_seq_len="
            f"{args.model.max_seq_len}{source}: the model has positions for at most "
            f"model.max_seq_len tokens; lower data.seq_len"
            + ("" if args.model.hf else " or raise model.max_seq_len")
        )


def check_warmup(args: TrainArgs) -> None:
    """``optim.warmup_steps`` must end before the run does, or the learning rate never
    reaches ``optim.lr`` nor decays. The trainer checks it before it writes anything (not
    :meth:`TrainArgs.validate`: a run saved before the check, its warmup unfitted, still
    loads for eval). An unset warmup is fitted to the run by :func:`load_config`."""
    warmup = args.optim.warmup_steps
    if warmup > 0 and warmup >= args.steps:
        raise ValueError(
            f"optim.warmup_steps={warmup} >= steps={args.steps}: the learning rate would "
            f"never reach optim.lr nor decay; set optim.warmup_steps below steps (0: no "
            f"warmup), or train for more steps"
        )


def fit_warmup(warmup: int, steps: int) -> int:
    """An unset ``optim.warmup_steps`` (the default, 50) that is not
    shorter than the run becomes a tenth of ``steps`` (rounded down): a short run warms
    up, reaches ``optim.lr`` and decays. A set one is never changed (:func:`check_warmup`
    refuses one too long)."""
    return warmup if warmup < steps else max(0, steps // 10)


def upgrade(cfg: DictConfig) -> DictConfig:
    """A config file from before ``optim.value_lr`` owned the value tables' learning rate
    (saved runs keep loading): ``model.memory.value_lr`` moves to ``optim.value_lr``
    unless the file sets that, and the old ``optim.value_lr: null`` (meaning "the model's")
    goes."""
    optim = cfg.get("optim")
    if optim is not None and "value_lr" in optim and optim.value_lr is None:
        del optim["value_lr"]
    memory = cfg.get("model", {}).get("memory")
    if memory is not None and "value_lr" in memory:
        old = memory.pop("value_lr")
        if OmegaConf.select(cfg, "optim.value_lr") is None:
            OmegaConf.update(cfg, "optim.value_lr", old)
    return cfg


def _one_line(e: Exception) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def _read_yaml(path) -> DictConfig:
    """One config file, or a ValueError naming it (missing, not YAML, not a mapping)."""
    if not Path(path).is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {_one_line(e)}") from None
    if not isinstance(cfg, DictConfig):
        raise ValueError(
            f"{path}: a config's top level must map keys to values (steps: 100), "
            f"not a {type(cfg).__name__.removesuffix('Config').lower()}"
        )
    return cfg


# Datasets with a tokenizer option: with model.hf it defaults to the model's own.
TOKENIZED_DATASETS = ("bios", "bios_compact", "corpus", "facts")


def pretrained_defaults(hf: str, layers: list) -> dict:
    """What ``model.hf`` brings, merged like a preset (under the YAML and the CLI): no
    preset (unless a layer names one: then validation says to pick one) and the model's
    tokenizer for every dataset that takes one (``hf:<model>``). The architecture comes
    from the model itself when the trainer reads it (:func:`with_architecture`)."""
    named = any(OmegaConf.select(layer, "model.preset", default=None) for layer in layers)
    out = {"data": {name: {"tokenizer": f"hf:{hf}"} for name in TOKENIZED_DATASETS}}
    return out if named else {**out, "model": {"preset": None}}


# A study file's section for `memlayers compare` (memlayers.compare.read_study): not a
# training option, so the trainer reads the file without it.
STUDY_SECTION = "compare"


def _dotlist(overrides) -> DictConfig:
    """``key=value`` overrides as a config layer. A value is parsed as YAML (numbers,
    booleans, lists), except for a text field, which takes the text as written:
    ``run_dir=1e-3`` is the folder ``1e-3``, not ``0.001`` (``0755``, ``yes``, ``12:30``
    likewise); ``null`` still clears an optional one. An integer field reads digits in
    base 10 (YAML would read ``010`` as octal 8)."""
    layer = OmegaConf.from_dotlist(list(overrides))
    for o in overrides:
        key, raw = o.split("=", 1)
        kind = _declared_type(key)
        if typing.get_origin(kind) is list and not raw.lstrip().startswith("["):
            raise ValueError(f"{key} takes a list: {key}=[{raw}]")
        if kind in (str, str | None) and not (kind is not str and raw in ("null", "~", "")):
            OmegaConf.update(layer, key, raw, merge=False)
        elif kind in (int, int | None) and raw.strip().lstrip("+-").isdigit():
            OmegaConf.update(layer, key, int(raw), merge=False)  # 010 is ten, not octal 8
    return layer


def _check_preset_override(yaml_paths, layers) -> None:
    """A ``model.preset`` on the command line under a file that names another preset and
    sets the model's fields (a run's saved config.yaml) would keep the file's model under
    the new preset's name: refused, naming the fields. A file that sets fields without
    naming a preset (a study's shared settings) applies them over any preset, as ever."""
    preset = OmegaConf.select(layers[-1], "model.preset", default=None)
    if preset is None:
        return
    for path, layer in zip(yaml_paths, layers[:-1], strict=True):
        model = OmegaConf.select(layer, "model", default=None) or {}
        fields = sorted(k for k in model if k != "preset")
        named = model.get("preset")  # a study file sets shared fields and no preset
        if fields and named is not None and named != preset:
            shown = ", ".join(f"model.{k}" for k in fields[:4]) + (" …" if len(fields) > 4 else "")
            raise ValueError(
                f"model.preset={preset} on the command line, but {path} is a model.preset="
                f"{named} with its own fields ({shown}), which a file keeps over a preset: "
                f"the run would be that model labelled {preset}. Start from {preset} without "
                f"the file's model section, or set the fields you want on the command line"
            )


def _declared_type(key: str):
    """The type ``TrainArgs`` declares for the dotted ``key`` (None where it declares
    none: a free-form dict, or a key it lacks, which the merge then refuses)."""
    cls = TrainArgs
    for i, part in enumerate(key.split(".")):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return None
        cls = hints[part]
        if i == key.count("."):
            return cls
    return None


def load_config(yaml_paths=(), overrides=()) -> TrainArgs:
    """``TrainArgs`` from YAML files (merged in order; a study file's ``compare:`` section
    left out) and ``key=value`` overrides. An ``optim.warmup_steps`` that neither sets is
    fitted to the run (:func:`fit_warmup`)."""
    try:
        base = OmegaConf.structured(TrainArgs)
        layers = []
        for p in yaml_paths:
            layer = upgrade(_read_yaml(p))
            layer.pop(STUDY_SECTION, None)
            layers.append(layer)
        for o in overrides:
            if o.split("=", 1)[0] == "model.memory.value_lr":
                raise ValueError(
                    "model.memory.value_lr is now optim.value_lr (the optimizer owns it): "
                    f"pass optim.value_lr={o.split('=', 1)[1]}"
                )
        layers.append(_dotlist(overrides))
        _check_preset_override(yaml_paths, layers)
        reject_old_options(layers, base.data.dataset)
        merged = OmegaConf.merge(base, *layers)
        preset = merged.model.preset
        if merged.model.hf:
            base = OmegaConf.merge(base, pretrained_defaults(merged.model.hf, layers))
            preset = None
        if preset:
            # vocab_size: the dataset's, filled by with_vocab
            model = {k: v for k, v in get_preset(preset).to_dict().items() if k != "vocab_size"}
            base = OmegaConf.merge(base, {"model": model, "optim": PRESET_OPTIM.get(preset, {})})
        args = OmegaConf.to_object(OmegaConf.merge(base, *layers))
        if all(OmegaConf.select(la, "optim.warmup_steps", default=None) is None for la in layers):
            args.optim.warmup_steps = fit_warmup(args.optim.warmup_steps, args.steps)
    except OmegaConfBaseException as e:
        # e.g. "Key 'lrr' not in 'OptimArgs'\n    full_key: optim.lrr" -> one line.
        raise ValueError(f"bad config: {_one_line(e)}") from None
    args.validate()
    return args


def with_vocab(args: TrainArgs, vocab_size: int) -> TrainArgs:
    """A copy of ``args`` whose ``model.vocab_size`` is the dataset's (the trainer calls it
    once the tokenizer is loaded; the resolved config it saves holds the number)."""
    return replace(args, model=replace(args.model, vocab_size=vocab_size))


def with_architecture(args: TrainArgs, fields: dict) -> TrainArgs:
    """A copy of ``args`` whose model has the pretrained model's architecture ``fields``
    (:data:`memlayers.retrofit.ARCHITECTURE_FIELDS`, from its config), so the resolved
    config the trainer saves describes it. A field the config set to another value than
    the model's is an error (the weights could not fit), unless that value is the field's
    default (``ModelConfig``'s: ``tie_embeddings=false``, ``rope_theta=10000``,
    ``norm_eps=1e-5``, ``max_seq_len=2048``, ``dim=128``, ``n_layers=4``, ``n_heads=4``,
    ``vocab_size=32000``): the merged config cannot tell it from a field left unset, so
    the model's value replaces it (docs/retrofit.md)."""
    from memlayers.model import ModelConfig

    default = ModelConfig.__dataclass_fields__
    for name, value in fields.items():
        mine = getattr(args.model, name)
        if mine not in (value, None, default[name].default):
            raise ValueError(
                f"model.{name}={mine!r}, but the pretrained model model.hf={args.model.hf!r} "
                f"has {name}={value!r}: leave model.{name} unset"
            )
    model = replace(args.model, **fields)
    model.to_config()  # memory_layers against the model's depth, memory against its width
    return replace(args, model=model)


def to_yaml(args: TrainArgs) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(args))


def save_config(args: TrainArgs, path: str | Path) -> None:
    """Write the resolved config (what :func:`load_config` reads back), atomically."""
    write_atomic(Path(path), to_yaml(args))


def _flat(node, prefix: str = "") -> dict:
    """``{"optim.lr": 0.001, ...}`` of a nested config container (lists are values)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


# Keys added after runs were saved whose value here is what every run saved before them
# did (or, as said at the key, differs only in a way not worth a rerun): a file without
# one is the same config where ``args`` holds that value (mixing in no facts makes the
# share and seed of the mix inert). Other new keys stay changes.
SAME_WHEN_ABSENT = {
    "data.corpus.facts_qa": 0.0,
    "data.corpus.facts_qa_share": 0.25,
    "data.corpus.facts_qa_seed": 0,
    # Not the same to the bit for a bf16 table: the split master steps the fp32 master's
    # values bit for bit, but its table rounds exact ties (one value in 2**16) away from
    # zero where the fp32 master's rounds them to even, and a resume converts the saved
    # master. Counted the same so that compare does not retrain every earlier run for it
    # (an fp32 table has no master: there it is the same).
    "optim.value_master_split": True,
}


def config_changes(saved: str | Path, args: TrainArgs) -> list[str]:
    """``["optim.lr: 0.001 -> 0.0001", ...]``: every key whose value in ``args`` differs
    from the config file ``saved`` as written (no preset or default filled in: a key the
    file lacks is a change, ``<absent>``, unless :data:`SAME_WHEN_ABSENT` says its value
    does what the file's run did), in key order."""
    old = _flat(OmegaConf.to_container(OmegaConf.load(saved)))
    new = _flat(OmegaConf.to_container(OmegaConf.create(to_yaml(args))))
    missing = "<absent>"
    for k, v in SAME_WHEN_ABSENT.items():
        if k not in old and new.get(k, missing) == v:
            old[k] = v
    return [
        f"{k}: {old.get(k, missing)} -> {new.get(k, missing)}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k, missing) != new.get(k, missing)
    ]
