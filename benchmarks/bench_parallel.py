"""Parallel memory on GPUs: NCCL equality checks, tokens/s on 1 and N GPUs, and a value
table (with its optimizer state) larger than one GPU trained across several.

    python benchmarks/bench_parallel.py throughput --out $OUT/one.json          # 1 GPU
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_parallel.py check
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_parallel.py throughput \\
        --mp 2 --out $OUT/two.json
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_parallel.py big --out $OUT/big.json
    python benchmarks/bench_parallel.py table $OUT/*.json       # markdown table

``check``: the sharded model (FSDP2 + value columns over ``mp`` ranks, NCCL) against a
single-device reference built from the same unsharded weights, in float64: logits, the
global gradient norm and every parameter after one AdamW + lazy-Adam step.
``throughput``: training steps of the 134m Memory+ preset (bf16 autocast) through the
trainer's own functions and its step (profile_step.trainer_step: the model's own loss with
the balance loss's gradient, the gradient sync, the clip handing the tables' rescale to
the value optimizer); tokens/s summed over ranks, from the median step after
:data:`WARMUP_STEPS` (``--steps`` at least :data:`MIN_STEPS`).
``big``: the 134m Memory+ model with a value table sized so that the table and its
optimizer state (bytes per value as the preset resolves them: bf16 table, fp32 master,
bf16 moments = 10) exceed one GPU's memory by 10%, sharded by columns over the ranks,
trained a few steps.

Each result JSON holds its ``provenance`` (argv, commit, date, card, torch, Triton).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from profile_step import trainer_step
from timing import provenance

from memlayers import MemoryValues, get_preset
from memlayers.config import load_config, with_vocab
from memlayers.optim import OptimArgs, build_optimizer, clip_grad_norm_, uses_sparse_values
from memlayers.parallel import ParallelArgs, build, build_mesh, parallelize
from memlayers.train import compute_loss, init_distributed, use_compile

WARMUP_STEPS = 3  # untimed: the first compiles, the next settle the allocator and caches
MIN_TIMED = 3  # timed steps at least, for a median
MIN_STEPS = WARMUP_STEPS + MIN_TIMED
BIG_MARGIN = 1.1  # big: the table and its optimizer state over one GPU's memory


def check_steps(steps: int) -> None:
    """Refuse a ``--steps`` that leaves fewer than :data:`MIN_TIMED` steps after the
    warm-up (0 steps would time nothing; 3 or fewer timed the compiling step)."""
    if steps < MIN_STEPS:
        raise ValueError(
            f"--steps must be >= {MIN_STEPS} ({WARMUP_STEPS} warm-up steps, the first "
            f"compiling, then at least {MIN_TIMED} timed for a median), got {steps}"
        )


def table_bytes_per_value(args) -> float:
    """Bytes per value of the memory table plus its optimizer state as ``args`` (the
    trainer's resolved config: the preset's ``value_dtype`` and ``optim.*``) build them:
    ``build_optimizer``'s value optimizer (its master: fp32, or a split one's int16
    remainders; moments in their dtype; a row-wise second moment) measured on a 16-row
    table of the model's width, on the CPU."""
    cfg = args.model.to_config()
    width = cfg.memory.resolved_dims(cfg.dim)[1]
    holder = nn.Module()
    holder.values = MemoryValues(16, width, dtype=cfg.memory.table_dtype,
                                 sparse_grad=uses_sparse_values(args.optim))  # fmt: skip
    holder.other = nn.Linear(1, 1, bias=False)  # the dense AdamW needs a parameter
    opt = build_optimizer(holder, args.optim, impl="torch")
    w = holder.values.weight
    if "values" in opt.optimizers:
        state = opt.optimizers["values"].init_state(w)
    else:  # the table in the dense AdamW: its state comes with a first step
        for p in holder.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        state = opt.optimizers["adamw"].state[w]
    tensors = [t for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    nbytes = w.numel() * w.element_size() + sum(t.numel() * t.element_size() for t in tensors)
    return nbytes / w.numel()


def big_n_keys(gpu_bytes: int, width: int, bytes_per_value: float) -> int:
    """Half keys such that ``n_keys² × width × bytes_per_value`` (the table and its
    optimizer state) is at least :data:`BIG_MARGIN` × ``gpu_bytes``."""
    return math.ceil(math.sqrt(BIG_MARGIN * gpu_bytes / (width * bytes_per_value)))


def _env(device: str = "cuda"):
    env = init_distributed(device)
    return env, env.rank, env.world_size


def check(ns) -> dict:
    env, rank, world = _env(ns.device)
    torch.set_default_dtype(torch.float64)
    cfg = get_preset("tiny-memory+")
    cfg.memory.impl = ns.impl
    cfg.vocab_size = 512
    torch.manual_seed(0)
    from memlayers import build_model

    ref = build_model(cfg, env.device, seed=0, sparse_values=True).double()
    model = copy.deepcopy(ref)
    plan = parallelize(model, build_mesh(world, ns.mp, env.device.type), ParallelArgs(mp=ns.mp))
    g = torch.Generator(device=env.device).manual_seed(1)
    tokens = torch.randint(0, 512, (4 * world, 65), device=env.device, generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    mine = slice(4 * rank, 4 * rank + 4)
    args = OptimArgs(lr=1e-2, warmup_steps=0, grad_clip=0.05)
    ref_opt = build_optimizer(ref, args, impl=ns.impl)
    ref_logits = ref(x)
    compute_loss(ref_logits, y).backward()
    ref_norm = clip_grad_norm_(ref.parameters(), args.grad_clip)
    ref_opt.step()
    opt = build_optimizer(model, args, impl=ns.impl)
    logits = model(x[mine])
    compute_loss(logits, y[mine]).backward()
    plan.sync_grads(model)
    norm = plan.clip_grad_norm_(model, args.grad_clip)
    opt.step()
    worst = {"logits": (logits - ref_logits[mine]).abs().max().item()}
    worst["grad_norm"] = abs(norm.item() - ref_norm.item())
    ref_params = dict(ref.named_parameters())
    err = 0.0
    for name, p in model.named_parameters():
        q = ref_params[name].detach()
        if plan.is_table(p) and plan.sharded:
            shard = next(t for _, t in plan.tables if t.weight is p).shard
            q = q[:, shard.start : shard.start + shard.width]
        full = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
        err = max(err, (full - q).abs().max().item())
    worst["params_after_step"] = err
    # float64 models; the clip coefficient is fp32 in both (as in torch's clip_grad_norm_),
    # so parameters agree to fp32 rounding of the update, not to float64.
    ok = worst["logits"] < 1e-9 and worst["grad_norm"] < 1e-5 and err < 1e-6
    return {"mode": "check", "world": world, "mp": ns.mp, "impl": ns.impl, **worst, "ok": ok}


def _train_steps(ns, overrides: list[str]) -> dict:
    check_steps(ns.steps)
    env, rank, world = _env(ns.device)
    cuda = env.device.type == "cuda"
    args = with_vocab(load_config([], overrides), 32000)
    model_cfg = args.model.to_config()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    compile_ = use_compile(args.compile, env.device)
    sparse = uses_sparse_values(args.optim)
    model, plan = build(model_cfg, args.parallel, env.device, args.seed, compile_, sparse)
    plan.equal_bags()  # every rank's batch is [B, T], as in the trainer
    optimizer = build_optimizer(model, args.optim, impl=model_cfg.memory.impl)
    B, T = args.data.batch_size, args.data.seq_len
    g = torch.Generator(device=env.device).manual_seed(rank)
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cuda)
    step = trainer_step(model, optimizer, args.optim.grad_clip, autocast, plan=plan)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model.train()
    times, losses = [], []
    for _ in range(ns.steps):
        tokens = torch.randint(0, 32000, (B, T + 1), device=env.device, generator=g)
        sync()
        t0 = time.perf_counter()
        loss = step(tokens[:, :-1], tokens[:, 1:])
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    step_s = statistics.median(times[WARMUP_STEPS:])
    table = next((m for m in model.modules() if isinstance(m, MemoryValues)), None)
    out = {
        "world": world,
        "mp": args.parallel.mp,
        "tokens_per_step": B * T * world,
        "step_ms": 1000 * step_s,
        "tokens_per_s": B * T * world / step_s,
        "loss_first_last": [losses[0], losses[-1]],
        "peak_gib_rank0": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "gpu_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0,
        "impl": model_cfg.memory.impl,
        "timed_steps": len(times) - WARMUP_STEPS,
        "value_optimizer": args.optim.value_optimizer,
    }
    if table is not None:
        n, d = model_cfg.memory.n_rows, table.v_dim
        per_value = table_bytes_per_value(args)
        out["table_rows"], out["table_dim"] = n, d
        out["table_bytes_per_value"] = per_value
        out["table_plus_adam_gib"] = n * d * per_value / 2**30
    return out


def throughput(ns) -> dict:
    over = [
        f"model.preset={ns.preset}",
        f"model.memory.impl={ns.impl}",
        f"data.batch_size={ns.batch}",
        f"data.seq_len={ns.seq_len}",
        f"parallel.mp={ns.mp}",
        f"device={ns.device}",
    ]
    return {"mode": "throughput", **_train_steps(ns, over)}


def big_overrides(ns, gpu_bytes: int, world: int) -> list[str]:
    """``big``'s config: the 134m Memory+ preset with ``n_keys`` such that the table and
    its optimizer state, at the bytes per value this config resolves
    (:func:`table_bytes_per_value`), exceed ``gpu_bytes`` by :data:`BIG_MARGIN`."""
    over = [
        "model.preset=134m-memory+",
        f"model.memory.impl={ns.impl}",
        f"data.batch_size={ns.batch}",
        "data.seq_len=1024",
        f"parallel.mp={world}",
    ]
    args = with_vocab(load_config([], over), 32000)
    cfg = args.model.to_config()
    width = cfg.memory.resolved_dims(cfg.dim)[1]
    n_keys = big_n_keys(gpu_bytes, width, table_bytes_per_value(args))
    return [*over, f"model.memory.n_keys={n_keys}"]


def big(ns) -> dict:
    """The table and its optimizer state ≈ :data:`BIG_MARGIN` × one GPU (:func:`big_overrides`)."""
    gpu = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory
    world = int(os.environ.get("WORLD_SIZE", 1))
    return {"mode": "big", **_train_steps(ns, big_overrides(ns, gpu, world))}


def table(paths: list[str]) -> str:
    rows = []
    for p in paths:
        with open(p) as f:
            rows.append(json.load(f))
    lines = [
        "| mode | GPUs | mp | impl | tokens/s | step ms | peak GiB (rank 0) | table + optimizer GiB"
        " | loss first → last | ok |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["mode"] == "check":
            lines.append(
                f"| check | {r['world']} | {r['mp']} | {r['impl']} | | | | | "
                f"max |Δ| logits {r['logits']:.1e}, params {r['params_after_step']:.1e} "
                f"| {r['ok']} |"
            )
            continue
        lines.append(
            f"| {r['mode']} | {r['world']} | {r['mp']} | {r['impl']} | {r['tokens_per_s']:,.0f} "
            f"| {r['step_ms']:.1f} | {r['peak_gib_rank0']:.1f} | "
            f"{r.get('table_plus_adam_gib', 0):.1f} | {r['loss_first_last'][0]:.3f} → "
            f"{r['loss_first_last'][1]:.3f} | |"
        )
    made = [(p, r["provenance"]) for p, r in zip(paths, rows, strict=True) if "provenance" in r]
    if made:
        lines.append("")
        lines += [
            f"- {p}: `{m['argv']}`, commit {m['commit']}, {m['date']}, {m['card']}, "
            f"torch {m['torch']}, triton {m['triton']}"
            for p, m in made
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=["check", "throughput", "big", "table"])
    p.add_argument("files", nargs="*", help="table: result JSON files")
    p.add_argument("--mp", type=int, default=1)
    p.add_argument("--impl", default="auto")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12,
                   help=f"throughput, big: training steps, at least {MIN_STEPS} "
                   f"({WARMUP_STEPS} untimed)")  # fmt: skip
    p.add_argument("--out")
    p.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo, smoke runs)")
    p.add_argument("--preset", default="134m-memory+", help="throughput: model preset")
    p.add_argument("--seq-len", type=int, default=1024)
    ns = p.parse_args(argv)
    if ns.mode in ("throughput", "big"):
        try:
            check_steps(ns.steps)
        except ValueError as e:
            p.error(str(e))
    return ns


def main(argv: list[str] | None = None) -> None:
    ns = parse_args(argv)
    if ns.mode == "table":
        print(table(ns.files))
        return
    result = {"check": check, "throughput": throughput, "big": big}[ns.mode](ns)
    result["provenance"] = provenance()
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result, indent=1))
        if ns.out:
            with open(ns.out, "w") as f:
                json.dump(result, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
