"""Train a language model with memory layers: one script for CPU, one GPU and torchrun.

    memlayers train                                   # the main job: tiny Memory+ on bios,
                                                      # then eval (~4.5-15 min on 2 CPU cores)
    memlayers train model.preset=tiny-dense run_dir=runs/dense      # its dense baseline
    memlayers train data.bios.n_people=200 steps=200 run_dir=runs/quick   # ~1 min
    memlayers train configs/tiny_memory_plus.yaml optim.lr=3e-3
    memlayers train model.preset=tiny-memory+ data.dataset=text data.path=README.md \\
        run_dir=runs/readme                           # byte-level model of any text file
    memlayers train configs/tiny_memory_plus.yaml --resume          # from run_dir's latest
    memlayers train configs/tiny_memory_plus.yaml --overwrite       # replace the run there
    memlayers train configs/tiny_memory_plus.yaml --resume-from runs/x/checkpoints/step_000100
    memlayers train configs/tiny_memory_plus.yaml --print-config    # resolved config, no run
    memlayers train configs/smollm2_memory_plus.yaml run_dir=runs/smollm2-memory   # pretrained
    memlayers train model.hf=DIR_OR.gguf model.memory_layers=[4,12,20] data.dataset=corpus
    python -m memlayers train configs/373m_memory_plus.yaml          # one GPU, bf16 autocast
    torchrun --standalone --nproc_per_node=8 -m memlayers train configs/373m_memory_plus.yaml

Config precedence: dataclass defaults < ``model.preset`` < YAML files (in order) <
``key=value`` overrides (see :mod:`memlayers.config`). ``model.vocab_size`` comes from
the dataset (:func:`memlayers.config.with_vocab`).

``model.hf`` starts from a pretrained Llama-style model instead of a preset (a pinned name,
``smollm2``; a ``.gguf`` file; a transformers directory): its architecture fills the model
section when the trainer reads it (``--print-config`` shows the defaults until then), its
weights go into a memlayers Transformer with Memory+ at ``model.memory_layers``, beside the
MLP by default (``model.memory_mode``; :mod:`memlayers.retrofit`: logits unchanged at step
0), and its tokenizer encodes the data (``data.<dataset>.tokenizer=hf:<model>``), so eval,
generate, QA and finetune use it too. One process (no torchrun).

The run directory (``run_dir``) is laid out by :class:`memlayers.run.Run` (its docstring
draws it); the logger adds ``metrics.jsonl`` (one JSON object per logged step, and per
evaluation ``{"step", "val_loss", "time"}``), ``tb/``, ``loss.png`` and, for a model with
memory layers, ``usage.png``: with ``logging.usage`` (on by default) each logged step
holds ``usage/<block_i | shared_table>/<stat>``, rows used, KL from uniform and Gini of
the memory layers' reads in the log window (:class:`memlayers.usage.TrainingUsage`;
counted on the device, read with the loss). Every checkpoint's ``meta.json`` records the
run's ``progress`` (tokens trained, training seconds).

Under torchrun every rank reads its own shard of each global batch and rank 0 alone
logs. The model is built on the meta device and parallelised from outside
(:func:`memlayers.parallel.parallelize`): value tables split by columns over
``parallel.mp`` ranks, FSDP2 over all ranks (or HSDP, ``parallel.fsdp_shard``) for the
rest; checkpoints are DCP (every rank writes its shards) and load on any number of
ranks. A resume on the run's number of ranks is exact (the same losses); on another
number (a job that lost GPUs: ``--resume`` with fewer processes, and a ``parallel.mp``
that divides them) the weights and optimizer state reshard, the data go on at the same
place of the sequence order (the loader's order is a function of ``data.seed`` and the
epoch alone: :class:`memlayers.data.loader.PackedLoader`; while ranks ×
``data.batch_size`` × ``grad_accum`` stays the same, each step reads the sequences it
would have read, to the epoch's end), and each rank's RNG is re-seeded from ``(seed,
step, rank)``: exact in data, not in the random streams (dropout), as the log says. CPU
runs use gloo, GPU runs NCCL::

    torchrun --standalone --nproc_per_node=2 -m memlayers train parallel.mp=2 steps=50
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from memlayers import parallel, retrofit
from memlayers.checkpoint import (
    load_checkpoint,
    save_checkpoint,
    save_distributed_checkpoint,
    set_aside_after,
    step_dir_name,
)
from memlayers.config import (
    TOKENIZED_DATASETS,
    TrainArgs,
    check_seq_len,
    check_warmup,
    config_changes,
    resolve_device,
    save_config,
    with_architecture,
    with_vocab,
)
from memlayers.data.loader import PackedLoader, load_dataset
from memlayers.eval.validation import validation_loss
from memlayers.files import write_atomic
from memlayers.logger import RunLogger
from memlayers.memory import ProductKeyMemory
from memlayers.optim import build_optimizer, set_lr, uses_sparse_values
from memlayers.report import format_report, parameter_report, peak_flops
from memlayers.run import Run
from memlayers.usage import TrainingUsage


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf, or a weight passed ``max_weight``: the
    run stopped (and checkpointed nothing after it)."""


def largest_weight(model: nn.Module) -> tuple[float, str]:
    """``(max |w|, parameter name)`` over every parameter (this rank's shard of a sharded
    one; the maximum over ranks when distributed). One foreach pass and one host sync."""
    names, tensors = [], []
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        if local.numel():
            names.append(name)
            tensors.append(local.detach())
    if not tensors:
        return 0.0, ""
    per_param = torch.stack([n.float() for n in torch._foreach_norm(tensors, float("inf"))])
    biggest = per_param.max()
    if dist.is_initialized():
        mine = biggest.clone()
        dist.all_reduce(biggest, op=dist.ReduceOp.MAX)
        where = names[int(per_param.argmax())] if bool(mine == biggest) else "(another rank)"
    else:
        where = names[int(per_param.argmax())]
    return float(biggest), where


@dataclass
class Env:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# The CUDA caching allocator's setting for training runs (see expandable_segments()).
ALLOCATOR_SETTING = "expandable_segments:True"


def expandable_segments() -> bool:
    """Let the CUDA caching allocator grow its segments in place, unless the user set
    ``PYTORCH_CUDA_ALLOC_CONF`` (or ``PYTORCH_ALLOC_CONF``) themselves, which stands.
    Returns whether this call set it.

    Measured on an H200 (134m-memory+, batch 32 × 1024, benchmarks/NOTES.md session 11):
    without it 7 of 40 steps ran at 50-150k tokens/s among steps at 330-400k, at the same
    steps in every run (the trainer benchmark's 25% run-to-run spread); with it (one run
    of 30 steps) the slowest step after the second ran at 349k. The likely cause: a
    Memory+ step allocates buffers whose sizes change every step (the rows its lookups
    touched), fixed segments fragment, and a request that finds no block makes the
    allocator free its cache and retry, which waits for the device. Set before CUDA starts
    (the variable is read when the allocator is made), else at run time where this torch
    has the call for it."""
    if any(v in os.environ for v in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")):
        return False
    if not torch.cuda.is_initialized():
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_SETTING
        return True
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or getattr(
        torch._C, "_cuda_cudaCachingAllocator_set_allocator_settings", None
    )
    if setter is None:
        return False
    setter(ALLOCATOR_SETTING)
    return True


def init_distributed(device: str) -> Env:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (torchrun) and pick the device."""
    device = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device.startswith("cuda"):
        if device == "cuda" or world_size > 1:  # torchrun: one GPU per local rank
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise ValueError(
                    f"local rank {local} needs cuda:{local} but this machine has "
                    f"{torch.cuda.device_count()} GPU(s): start at most that many processes "
                    "per node (torchrun --nproc-per-node), or train on the CPU with device=cpu"
                )
            device = f"cuda:{local}"
        expandable_segments()
        torch.cuda.set_device(torch.device(device))
    if world_size > 1 and not dist.is_initialized():
        if device.startswith("cuda"):
            dist.init_process_group("nccl", device_id=torch.device(device))
        else:
            dist.init_process_group("gloo")
    return Env(rank, world_size, torch.device(device))


def compute_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; ``logits (B, T, V)``, ``targets (B, T)``.
    (The trainer asks the model for the loss instead, which never builds the logits.)"""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def use_compile(setting: bool | None, device: torch.device) -> bool:
    """``compile``: None (auto) compiles on CUDA only: on a CPU the compile time is more
    than a short run saves."""
    return device.type == "cuda" if setting is None else setting


def _mean_over_ranks(x: torch.Tensor, env: Env) -> torch.Tensor:
    """The mean of a device scalar over ranks (no host sync)."""
    if env.world_size == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / env.world_size


def validation_loss_over_ranks(
    model, loader: PackedLoader, n_batches: int, env: Env, autocast
) -> float:
    """Mean loss over the first ``n_batches`` of ``loader``'s epoch 0 (same every call),
    averaged over ranks: :func:`memlayers.eval.validation_loss` on this rank's shard."""
    loader.rewind()
    n = min(n_batches, len(loader))
    batches = (tuple(t.to(env.device) for t in next(loader)) for _ in range(n))
    loss, _ = validation_loss(model, batches, autocast)
    return _mean_over_ranks(loss, env).item()


def usage_tracker(model: nn.Module) -> TrainingUsage | None:
    """Training-time usage statistics of every memory layer, named ``block_<i>`` as
    ``memlayers eval`` names them, and of the table they share (``shared_table``); None
    for a model without memory layers (dense, MoE, PEER)."""
    layers = {
        f"block_{i}": block.ffn
        for i, block in enumerate(model.layers)
        if isinstance(block.ffn, ProductKeyMemory)
    }
    if not layers:
        return None
    return TrainingUsage(layers, shared=model.memory_values is not None and len(layers) > 1)


def read_pretrained(
    args: TrainArgs, data_vocab: int, weights: bool = True
) -> tuple[TrainArgs, dict | None]:
    """``model.hf``: the pretrained model's architecture filled into ``args``
    (:func:`memlayers.config.with_architecture`) and, with ``weights``, its state dict
    (transformers names, for :func:`memlayers.retrofit.load_pretrained_`). The data must
    be encoded with its tokenizer (``data.<dataset>.tokenizer=hf:<model>``, the default)."""
    from memlayers import hf

    name = args.data.dataset
    want = f"hf:{args.model.hf}"
    section = getattr(args.data, name, None) if name in TOKENIZED_DATASETS else None
    if section is None:
        raise ValueError(
            f"model.hf={args.model.hf!r} reads the data with its own tokenizer, and "
            f"data.dataset={name!r} has no tokenizer option: use a dataset that has one "
            f"({', '.join(TOKENIZED_DATASETS)}; with model.hf its tokenizer is {want!r})"
        )
    if section.tokenizer != want:
        raise ValueError(
            f"model.hf={args.model.hf!r} reads the data with its own tokenizer: leave "
            f"data.{name}.tokenizer at {want!r} (it is {section.tokenizer!r})"
        )
    if weights:
        model = hf.load_transformers_model(args.model.hf)
        config, state = model.config, model.state_dict()
    else:
        config, state = hf.transformers_config(args.model.hf), None
    args = with_architecture(args, retrofit.architecture_from_transformers(config))
    if data_vocab > args.model.vocab_size:
        raise ValueError(
            f"the data's tokenizer has {data_vocab} tokens, the model {args.model.vocab_size}"
        )
    return args, state


def _rng_state(env: Env) -> dict:
    state = {"torch": torch.get_rng_state()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    return state


def _gather_rng(env: Env) -> list[dict]:
    mine = _rng_state(env)
    if env.world_size == 1:
        return [mine]
    states = [None] * env.world_size
    dist.all_gather_object(states, {k: v.cpu() for k, v in mine.items()})
    return states


def _restore_rng(states: list[dict], env: Env) -> None:
    """Every rank's own RNG states, saved by a run of as many ranks."""
    mine = states[env.rank]
    torch.set_rng_state(mine["torch"])
    if "cuda" in mine and env.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], env.device)


def reseed_rng(seed: int, step: int, rank: int) -> None:
    """The RNG of a rank resuming a run saved by another number of ranks (whose states
    are not this run's): seeded from ``(seed, step, rank)`` alone, the same every time."""
    entropy = np.random.SeedSequence([seed % 2**64, step, rank]).generate_state(1, np.uint64)
    torch.manual_seed(int(entropy[0]))  # the CPU generator and every CUDA device's


def resume_layout_note(data_state: dict, saved_ranks: int, loader: PackedLoader) -> str | None:
    """The log's word on a resume whose ranks or batch differ from the checkpoint's
    (None when they do not): what carries over exactly and what does not."""
    was = (saved_ranks, data_state["batch_size"])
    now = (loader.world_size, loader.B)
    if was == now:
        return None
    where = (
        f"the data go on at the same place of the sequence order (sequence "
        f"{loader.offset:,} of epoch {loader.epoch}), now {now[1]} sequences a rank x "
        f"{now[0]} rank(s) a micro-batch (the checkpoint: {was[1]} x {was[0]})"
    )
    if was[0] == now[0]:
        return f"resumed with another data.batch_size: {where}"
    return (
        f"resumed on {now[0]} rank(s) from a checkpoint of {was[0]}: the weights and "
        f"optimizer state are resharded, {where}; the random streams (dropout, ...) are "
        f"not the saved ones but re-seeded from (seed, step, rank): exact in data, not in "
        f"random streams"
    )


def _tables_note(model_cfg, optim) -> str:
    """The start line's word on a bf16 value table (its master copy, or its rounding) and
    on an int8 read copy."""
    if not model_cfg.memory_layers:
        return ""
    reads = ""
    if model_cfg.memory.value_read == "int8":
        reads = "; lookups read an int8 copy of the value tables (a bf16 scale a row)"
    if model_cfg.memory.grad_read == "int8":
        reads += "; the value-gradient walk reads int8 output gradients"
    if model_cfg.memory.value_dtype != "bf16":
        return reads
    # (a bf16 table always has a sparse value optimizer: build_optimizer refuses adamw)
    if optim.value_master and optim.value_master_split:
        split = "fp32 master split: the table and a 16-bit remainder in the value optimizer"
        return f"; value tables bf16 ({split})" + reads
    if optim.value_master:
        return "; value tables bf16 (fp32 master copy in the value optimizer)" + reads
    return "; value tables bf16 (stochastically rounded)" + reads


def train(args: TrainArgs, resume: str | None = None, overwrite: bool = False) -> list[dict]:
    """Run (or resume) training; returns the per-step records of this process.

    ``args`` as :func:`memlayers.config.load_config` returns them (it validates them),
    checked again here before anything is written where only the trainer can (or where a
    saved config may predate the check): ``data.seq_len`` against the final model's
    ``max_seq_len`` (``model.hf``: the pretrained one's), ``optim.warmup_steps`` against
    ``steps``. ``resume``: ``"latest"`` for ``run_dir``'s newest checkpoint, or any path
    :func:`memlayers.checkpoint.resolve_checkpoint` accepts. Without it, a ``run_dir``
    that already holds a run is an error unless ``overwrite`` (which deletes that run's
    files once everything that can refuse the new one has passed, before its first
    write): :meth:`memlayers.run.Run.start_fresh`.
    """
    t_start = time.perf_counter()  # the run's training seconds count from here
    check_warmup(args)
    env = init_distributed(args.device)
    run = Run(args.run_dir)
    # What this process count refuses, before anything in run_dir is written or deleted.
    if (args.model.hf or args.model.resolved_memory_mode == "parallel") and env.world_size > 1:
        raise ValueError(
            f"model.hf / memory_mode=parallel train on one process (world_size="
            f"{env.world_size}): the pretrained weights go into an unsharded model"
        )
    if args.checkpoint.format == "safetensors" and env.world_size > 1:
        raise ValueError(
            f"checkpoint.format=safetensors writes one file from rank 0; with "
            f"world_size={env.world_size} use checkpoint.format=dcp (or auto)"
        )
    # data.seq_len against the model's positions (a pretrained model's, model.hf, from its
    # config), before run_dir is written or deleted.
    if args.model.hf:
        from memlayers import hf

        arch = retrofit.architecture_from_transformers(hf.transformers_config(args.model.hf))
        check_seq_len(with_architecture(args, arch))
    else:
        check_seq_len(args)
    own = resume == "latest" or (resume is not None and run.holds(resume))
    if overwrite and own:
        raise ValueError(
            f"overwrite would delete the run in {run.root} that the resume reads "
            f"({resume!r}): resume it, or start afresh without resuming"
        )
    if not own:
        # A fresh start, or another run's checkpoint starting this one: either must not
        # mix with a run already here. Every rank checks now (the same answer, so no rank
        # waits on one that raised); with overwrite the old run is deleted only once
        # everything below that can refuse (the data and its tokenizer, the pretrained
        # model and its weights, the optimizer, the checkpoint) has passed, just before
        # the first write.
        run.start_fresh(overwrite, clear=False)
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and env.device.type == "cuda")
    args.parallel.check_run(env.world_size, use_bf16)
    autocast = (
        torch.autocast(env.device.type, dtype=torch.bfloat16)
        if use_bf16
        else contextlib.nullcontext()
    )

    data = load_dataset(args.data)
    pretrained = None
    if args.model.hf:  # weights only for a fresh start: a resume loads all of them
        args, pretrained = read_pretrained(args, data.vocab_size, weights=resume is None)
    else:
        args = with_vocab(args, data.vocab_size)
    model_cfg = args.model.to_config()
    mode = args.model.resolved_memory_mode
    compile_ = use_compile(args.compile, env.device)
    if args.model.hf or mode == "parallel":
        model = retrofit.build_model(
            model_cfg, mode, env.device, args.seed, uses_sparse_values(args.optim)
        )
        if pretrained is not None:
            retrofit.load_pretrained_(model, pretrained, mode)
            del pretrained
        if compile_:
            parallel.compile_blocks(model)
        plan = parallel.shard_tables(model, None, args.parallel)  # one process: no-op plan
    else:
        model, plan = parallel.build(
            model_cfg, args.parallel, env.device, args.seed, compile_,
            sparse_values=uses_sparse_values(args.optim),
        )  # fmt: skip
    # Every rank's micro-batches are [batch, seq_len] (PackedLoader), training and
    # validation alike: sharded lookups need not bring the ranks' bag counts to the host.
    plan.equal_bags()
    # what a checkpoint rebuilds the model from (checkpoint.model_config_of)
    saved_config = model_cfg.to_dict() | ({"memory_mode": mode} if mode != "replace" else {})
    optimizer = build_optimizer(model, args.optim, impl=model_cfg.memory.impl)
    # The value optimizer applies the clip's rescale of the tables' gradients as its step
    # reads them (no pass over them of its own: 1.4 GB a spread 134m step).
    defer_clip = optimizer.clip_defer
    usage = usage_tracker(model) if args.logging.usage else None
    B, T = args.data.batch_size, args.data.seq_len
    loader = PackedLoader(data.train, B, T, env.rank, env.world_size, seed=args.data.seed)
    val_loader = no_val = None
    if args.eval_batches > 0:  # one global batch: B × T × world_size tokens, + 1 target
        need = B * T * env.world_size + 1
        if len(data.val) >= need:
            val_loader = PackedLoader(data.val, B, T, env.rank, env.world_size, seed=0)
        else:
            no_val = (
                f"no validation: the validation split has {len(data.val):,} tokens, one "
                f"global batch needs {need:,} (data.batch_size={B} x data.seq_len={T} x "
                f"{env.world_size} rank(s) + 1)"
            )

    start, layout_note = 0, None
    if resume is not None:
        state = load_checkpoint(
            run.root if resume == "latest" else resume, model, optimizer, plan=plan
        )
        start = int(state["step"])
        # A checkpoint of another number of ranks (DCP reshards the weights and optimizer
        # state): the data go on at the same place of the order, the RNGs re-seeded.
        if "rng" not in state or "data" not in state:
            # weights only (memlayers finetune writes such checkpoints): they train on
            reseed_rng(args.seed, start, env.rank)
            layout_note = (
                f"the checkpoint holds no data-loader position or RNG state (a finetuned "
                f"run's): training goes on from its weights, the data from the start of "
                f"their order (data.seed={args.data.seed}), the random streams re-seeded "
                f"from (seed, step, rank)"
            )
        else:
            if len(state["rng"]) == env.world_size:
                _restore_rng(state["rng"], env)
            else:
                reseed_rng(args.seed, start, env.rank)
            loader.load_state_dict(state["data"])
            layout_note = resume_layout_note(state["data"], len(state["rng"]), loader)
        if usage is not None and "usage" in state:
            usage.load_state_dict(state["usage"])
    else:
        torch.manual_seed(args.seed + env.rank)  # dropout streams differ per rank
    if start >= args.steps:
        raise ValueError(f"the checkpoint is at step {start}, nothing to do for steps={args.steps}")
    if not own:  # nothing refused: the old run (with overwrite) goes now, before any write
        # The barrier keeps rank 0's first writes, deleting an old run too, after every
        # rank's check: a rank still looking at checkpoints/ must not find it gone.
        if env.world_size > 1:
            dist.barrier()
        if env.is_main:
            run.start_fresh(overwrite)
    set_aside = changes = kept = None
    if env.is_main:
        if resume is not None and own:
            # An earlier checkpoint of this run (chosen, or the newest that verifies): the
            # newer ones are another line of training, set aside before they win.
            set_aside = set_aside_after(run.checkpoints, start, run.metrics_path)
            if run.config_path.is_file():
                changes = config_changes(run.config_path, args)
                if changes:  # the config the run trained with so far is kept beside
                    kept = run.config_path.with_name(f"config.until_{step_dir_name(start)}.yaml")
                    write_atomic(kept, run.config_path.read_text())
        if hasattr(data.tokenizer, "save"):
            # eval and generate decode with the run's own tokenizer (memlayers/run.py);
            # written once the resume has loaded (a refused one leaves the run's as it was)
            data.tokenizer.save(run.tokenizer_path)

    log = RunLogger(run.root, args.logging, args.steps, start, enabled=env.is_main)
    if env.is_main:
        save_config(args, run.config_path)
        # From the config (a meta-device model) when parallelised: this rank holds only its
        # shards of the tables.
        rep = parameter_report(model_cfg if plan.world > 1 else model, seq_len=T)
        log.message(format_report(rep, args.model.preset or args.model.hf or "model"))
        log.message(
            f"device {env.device} x{env.world_size}, {'bf16 autocast' if use_bf16 else 'fp32'}; "
            f"data {args.data.dataset}: {len(data.train):,} train / {len(data.val):,} val "
            f"tokens, vocab {data.vocab_size}; run_dir {run.root}"
            + _tables_note(model_cfg, args.optim)
            + (f"; {parallel.describe(plan)}" if plan.world > 1 else "")
            + (f"; resumed at step {start} from {state['path']}" if resume else "")
        )
        for why in state["skipped"] if resume else ():
            log.message(f"skipped a newer checkpoint that fails verification: {why}")
        if resume and layout_note:
            log.message(layout_note)
        if resume and state.get("optimizer_fresh"):
            log.message(
                "the checkpoint holds no optimizer state (saved for inference, or "
                "consolidated): the optimizer's moments and step counts start fresh"
            )
        if no_val:
            log.message(no_val)
        if set_aside is not None:
            log.message(
                f"resumed from an earlier checkpoint: the newer ones (and the metrics up to "
                f"them) are set aside in {set_aside}"
            )
        if changes:
            log.message(
                f"resumed with a changed config ({kept.name} holds the one before): "
                + "; ".join(changes)
            )
        if resume and usage is not None and "usage" not in state:
            log.message(
                f"usage: the checkpoint holds no read rows, so rows_ever_used_pct counts "
                f"from step {start + 1}"
            )
    tokens_per_step = B * T * args.grad_accum * env.world_size
    # the model itself on one process: a parallel memory block's MLP is not in the config
    train_flops = parameter_report(model_cfg if plan.world > 1 else model, seq_len=T)[
        "train_flops_per_token"
    ]
    flops_per_step = train_flops * tokens_per_step
    peak = (peak_flops(env.device) or 0.0) * env.world_size  # 0: no MFU (CPU, unknown card)
    history: list[dict] = []
    last_ckpt = state["path"] if resume else None
    # Training seconds and tokens (checkpoint meta, read by memlayers.run) go on from the
    # checkpoint's; older checkpoints recorded no seconds, so the total stays unknown.
    before = state["meta"].get("progress", {"train_seconds": None}) if resume else {}
    tokens_before = before.get("tokens_trained", start * tokens_per_step)

    def tokens_at(step: int) -> int:
        """Tokens trained by the end of ``step`` (those before the resume at their own
        grad_accum and batch, then this run's)."""
        return tokens_before + (step - start) * tokens_per_step

    seconds_before = before.get("train_seconds", 0.0)

    dcp = args.checkpoint.format == "dcp" or (
        args.checkpoint.format == "auto" and env.world_size > 1
    )

    def checkpoint(step: int) -> str:
        trainer_state = {"data": loader.state_dict(), "rng": _gather_rng(env)}
        if usage is not None:  # a checkpoint step is a log step: the window was collected
            trainer_state["usage"] = usage.state_dict()
        seconds = time.perf_counter() - t_start
        progress = {
            "tokens_trained": tokens_at(step),
            "train_seconds": None if seconds_before is None else seconds_before + seconds,
        }
        what = dict(
            root=run.checkpoints, step=step, model=model, optimizer=optimizer,
            trainer_state=trainer_state, model_config=saved_config,
            keep=args.checkpoint.keep, checksum=args.checkpoint.checksum, progress=progress,
        )  # fmt: skip
        path = None
        if dcp:  # every rank writes its shards
            path = save_distributed_checkpoint(**what, plan=plan)
        elif env.is_main:
            path = save_checkpoint(**what)
        if env.world_size > 1:
            dist.barrier()
        return str(path or run.checkpoints / "latest")

    def stop_if_non_finite(step: int) -> None:
        """Read the on-device flags (a host sync: only at log and checkpoint steps), and
        stop a run whose weights blew up while its loss stayed finite."""
        if int(first_bad) < 0:
            if args.max_weight:
                size, name = largest_weight(model)
                if not size <= args.max_weight:  # NaN weights too
                    raise NonFiniteLossError(
                        f"weights diverged: |{name}| reaches {size:.3g} > max_weight="
                        f"{args.max_weight:g} at step {step}. Last good checkpoint: "
                        f"{last_ckpt or 'none'}. Try a lower optim.lr (or optim.value_lr), "
                        f"more optim.warmup_steps, then --resume; max_weight=0 turns this off."
                    )
            return
        loss_bad = bool(bad_loss)
        raise NonFiniteLossError(
            f"non-finite {'loss' if loss_bad else 'gradient norm'} at step {int(first_bad)} "
            f"(checked at step {step}; every logging.every={args.logging.every} steps and "
            f"before each checkpoint). Last good checkpoint: {last_ckpt or 'none'}. Try a "
            f"lower optim.lr, more optim.warmup_steps or dtype=fp32, then --resume."
        )

    # Nothing in the step reads a value back to the host: losses and gradient norms are
    # summed on the device and read once per log interval (with the usage statistics), and
    # the step of the first non-finite one (so a NaN is still caught, and never
    # checkpointed). The memory layers count their reads on the device (usage).
    first_bad = torch.full((), -1, dtype=torch.int64, device=env.device)
    bad_loss = torch.zeros((), dtype=torch.bool, device=env.device)
    loss_acc = torch.zeros((), dtype=torch.float64, device=env.device)
    norm_acc = torch.zeros((), dtype=torch.float64, device=env.device)
    interval_steps, t_last = 0, time.perf_counter()
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    try:
        model.train()
        for step in range(start + 1, args.steps + 1):
            mult = set_lr(optimizer, step, args.steps, args.optim)
            loss_sum = torch.zeros((), device=env.device)
            for _ in range(args.grad_accum):
                x, y = (t.to(env.device, non_blocking=True) for t in next(loader))
                with autocast:
                    loss = model(x, targets=y)
                (loss / args.grad_accum).backward()
                loss_sum += loss.detach()
            step_loss = _mean_over_ranks(loss_sum / args.grad_accum, env)
            plan.sync_grads(model)
            grad_norm = plan.clip_grad_norm_(model, args.optim.grad_clip, defer_to=defer_clip)
            finite_loss, finite_norm = torch.isfinite(step_loss), torch.isfinite(grad_norm)
            now_bad = ~(finite_loss & finite_norm) & (first_bad < 0)
            first_bad = torch.where(now_bad, step, first_bad)
            bad_loss = torch.where(now_bad, ~finite_loss, bad_loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_acc += step_loss.double()
            norm_acc += grad_norm.double()
            interval_steps += 1
            last = step == args.steps
            ckpt_due = args.checkpoint.enabled and (
                last or (args.checkpoint.every and step % args.checkpoint.every == 0)
            )
            eval_due = val_loader is not None and (
                last or (args.eval_every and step % args.eval_every == 0)
            )
            if last or step % args.logging.every == 0 or ckpt_due or eval_due:
                stop_if_non_finite(step)  # syncs: the interval's work is done
                dt = time.perf_counter() - t_last
                tok_s = tokens_per_step * interval_steps / dt
                read = torch.stack([loss_acc, norm_acc])
                if usage is not None:  # [R, 4] statistics of the window, on the device
                    stats = usage.collect(dist.all_reduce if env.world_size > 1 else None)
                    read = torch.cat([read, stats.flatten()])
                loss_sum, norm_sum, *usage_stats = read.tolist()  # one read to the host
                record = {
                    "step": step, "loss": loss_sum / interval_steps,
                    "lr": args.optim.lr * mult, "grad_norm": norm_sum / interval_steps,
                    "tokens": tokens_at(step),
                    "tok_per_s": tok_s,
                }  # fmt: skip
                if peak:
                    record["mfu"] = flops_per_step * interval_steps / dt / peak
                if env.device.type == "cuda":
                    record["peak_mem_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
                    # times the caching allocator freed its cache to retry a request (each
                    # waits for the device: see expandable_segments); host-side, no sync
                    stats = torch.cuda.memory_stats(env.device)
                    record["alloc_retries"] = int(stats.get("num_alloc_retries", 0))
                    # device memory the allocator holds, and how often it asked the driver
                    # for more (a step that grows the pool waits on the driver)
                    record["reserved_gib"] = stats.get("reserved_bytes.all.current", 0) / 2**30
                    record["device_allocs"] = int(stats.get("num_device_alloc", 0))
                if usage is not None:
                    record.update(usage.record(usage_stats))
                history.append(record)
                log.log_step(record)
                loss_acc.zero_()
                norm_acc.zero_()
                interval_steps = 0
            else:
                log.advance(step)
            if eval_due:
                val = validation_loss_over_ranks(
                    model, val_loader, args.eval_batches, env, autocast
                )
                log.log_eval({"step": step, "val_loss": val})
                history[-1]["val_loss"] = val
            if ckpt_due:
                last_ckpt = checkpoint(step)
            if interval_steps == 0:
                t_last = time.perf_counter()  # evaluation and checkpoints are not timed
    finally:
        log.close()
        if usage is not None:
            usage.close()
    if env.is_main:
        log.message(
            f"done: {args.steps} steps, final loss {history[-1]['loss']:.4f}; "
            f"checkpoint {last_ckpt or 'none'}"
        )
    return history
