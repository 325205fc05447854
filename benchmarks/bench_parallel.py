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
trainer's own functions; tokens/s summed over ranks.
``big``: the 134m Memory+ model with a value table sized so that table + fp32 Adam moments
exceed one GPU's memory by 10%, sharded by columns over the ranks, trained a few steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch
import torch.distributed as dist

from memlayers import get_preset
from memlayers.config import load_config, with_vocab
from memlayers.optim import OptimArgs, build_optimizer, clip_grad_norm_, uses_sparse_values
from memlayers.parallel import ParallelArgs, build, build_mesh, parallelize
from memlayers.train import compute_loss, init_distributed, use_compile


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
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, losses = [], []
    for _ in range(ns.steps):
        tokens = torch.randint(0, 32000, (B, T + 1), device=env.device, generator=g)
        sync()
        t0 = time.perf_counter()
        with autocast:
            loss = compute_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        plan.sync_grads(model)
        plan.clip_grad_norm_(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    warm = sorted(times[3:]) or times
    step_s = warm[len(warm) // 2]
    table = next((m for m in model.modules() if type(m).__name__ == "MemoryValues"), None)
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
    }
    if table is not None:
        n, d = model_cfg.memory.n_rows, table.v_dim
        out["table_rows"], out["table_dim"] = n, d
        out["table_plus_adam_gib"] = n * d * (table.weight.element_size() + 8) / 2**30
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


def big(ns) -> dict:
    """n_keys so that rows × dim × (4 B fp32 value + 8 B Adam moments) ≈ 1.1 × one GPU."""
    gpu = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory
    dim = get_preset("134m-memory+").dim
    n_keys = math.ceil(math.sqrt(1.1 * gpu / (dim * 12)))
    world = int(os.environ.get("WORLD_SIZE", 1))
    over = [
        "model.preset=134m-memory+",
        f"model.memory.n_keys={n_keys}",
        f"model.memory.impl={ns.impl}",
        f"data.batch_size={ns.batch}",
        "data.seq_len=1024",
        f"parallel.mp={world}",
    ]
    return {"mode": "big", **_train_steps(ns, over)}


def table(paths: list[str]) -> str:
    rows = []
    for p in paths:
        with open(p) as f:
            rows.append(json.load(f))
    lines = [
        "| mode | GPUs | mp | impl | tokens/s | step ms | peak GiB (rank 0) | table + Adam GiB"
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
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=["check", "throughput", "big", "table"])
    p.add_argument("files", nargs="*", help="table: result JSON files")
    p.add_argument("--mp", type=int, default=1)
    p.add_argument("--impl", default="auto")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out")
    p.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo, smoke runs)")
    p.add_argument("--preset", default="134m-memory+", help="throughput: model preset")
    p.add_argument("--seq-len", type=int, default=1024)
    ns = p.parse_args()
    if ns.mode == "table":
        print(table(ns.files))
        return
    result = {"check": check, "throughput": throughput, "big": big}[ns.mode](ns)
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
