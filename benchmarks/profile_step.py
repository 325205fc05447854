"""Where a training step's time goes: torch.profiler over a few steps of a preset,
summarized by op (CUDA time), plus the median step time and tokens/s.

    python benchmarks/profile_step.py --preset 134m-memory+ --out $OUT/prof_mem.txt
    python benchmarks/profile_step.py --preset 134m-dense --batch 8 --seq-len 1024
    python benchmarks/profile_step.py --memory query_batch_norm=false balance_loss=0

``--memory KEY=VALUE...`` sets fields of the preset's MemoryConfig (parsed as YAML
scalars), e.g. without the settings that keep the reads spread over the table (the
memory+ presets' default since 2026-12-04; bench_train.py ``--collapsed-reads``) or
``value_dtype=fp32``.

Uses only the library's stable entry points (build_model, build_optimizer, compute_loss,
clip_grad_norm_), so the same script profiles an older checkout for a bisect. Its step,
:func:`trainer_step`, is the trainer's (bench_parallel.py times it too).
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch
import yaml

try:
    from timing import provenance_header
except ImportError:  # this script copied beside an older checkout's timing.py

    def provenance_header() -> str:
        return ""


from memlayers import build_model, get_preset
from memlayers.optim import OptimArgs, build_optimizer, clip_grad_norm_
from memlayers.train import compute_loss


def trainer_step(model, optimizer, grad_clip: float, autocast, plan=None):
    """A function ``step(x, y) -> loss`` of one training step as ``memlayers.train``'s
    loop runs it (one micro-batch): the model's own loss (``model(x, targets=y)``: the
    chunked loss, no logits tensor, the memory layers' balance loss in its gradient;
    checkouts without it: ``compute_loss`` of the logits) under ``autocast``, backward,
    ``plan``'s gradient sync and clip (``clip_grad_norm_`` of the parameters without a
    plan) at ``grad_clip`` handing the value tables' rescale to the value optimizer
    (``defer_to=optimizer.clip_defer``, where the checkout has it), the optimizers' step."""
    fused_loss = "targets" in inspect.signature(model.forward).parameters
    clip_kw = {}
    if "defer_to" in inspect.signature(clip_grad_norm_).parameters:
        clip_kw["defer_to"] = getattr(optimizer, "clip_defer", None)

    def step(x, y):
        with autocast:
            if fused_loss:
                loss = model(x, targets=y)
            else:
                loss = compute_loss(model(x), y)
        loss.backward()
        if plan is not None:
            plan.sync_grads(model)
            plan.clip_grad_norm_(model, grad_clip, **clip_kw)
        else:
            clip_grad_norm_(model.parameters(), grad_clip, **clip_kw)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def profile_ops(fn, runs: int, rows: int, trace: str | None = None) -> tuple[str, str]:
    """torch.profiler over ``runs`` calls of ``fn``: the op tables by total and by self
    device time (CUDA; by CPU time on a machine without one), ``rows`` ops each;
    ``trace``: also write the Chrome trace (JSON) there."""
    cuda = torch.cuda.is_available()
    acts = [torch.profiler.ProfilerActivity.CPU]
    acts += [torch.profiler.ProfilerActivity.CUDA] if cuda else []
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(runs):
            fn()
        if cuda:
            torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    avg = prof.key_averages()
    if not cuda:
        return (avg.table(sort_by="cpu_time_total", row_limit=rows),
                avg.table(sort_by="self_cpu_time_total", row_limit=rows))  # fmt: skip
    try:  # torch >= 2.4 names it device time
        return (avg.table(sort_by="device_time_total", row_limit=rows),
                avg.table(sort_by="self_device_time_total", row_limit=rows))  # fmt: skip
    except (AttributeError, KeyError):
        return (avg.table(sort_by="cuda_time_total", row_limit=rows),
                avg.table(sort_by="self_cuda_time_total", row_limit=rows))  # fmt: skip


def at_least(minimum: int):
    """An argparse type: an int ``>= minimum``, refused with a clear message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="134m-memory+")
    p.add_argument("--batch", type=at_least(1), default=8)
    p.add_argument("--seq-len", type=at_least(1), default=1024)
    p.add_argument("--steps", type=at_least(1), default=12,
                   help="timed steps (after 3 warm-ups), at least 1")  # fmt: skip
    p.add_argument("--profile-steps", type=at_least(1), default=3)
    p.add_argument("--rows", type=at_least(1), default=40, help="ops in the summary table")
    p.add_argument("--out", help="write the full summary table here")
    p.add_argument("--trace", help="write the profiled steps' Chrome trace (JSON) here")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (trainer)")
    p.add_argument(
        "--no-merge", action="store_true",
        help="memory.merge_grads=false: one value backward per lookup (A/B of merged_grad.py)",
    )  # fmt: skip
    p.add_argument(
        "--dump-lookups", metavar="PATH",
        help="save one step's lookups of the shared table (indices, weights, grad_out of "
        "each memory layer) for bench_embedding_bag.py --replay, after the warm-up",
    )  # fmt: skip
    p.add_argument("--memory", nargs="*", default=[], metavar="KEY=VALUE",
                   help="MemoryConfig fields of the preset's memory layers")  # fmt: skip
    p.add_argument("--balance-kth-torch", action="store_true",
                   help="router.BALANCE_KTH_TRITON off: the balance loss's k-th scores by "
                   "torch.topk, not the search's Triton top-k (the default)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    ns = parse_args(argv)

    dev = torch.device("cuda")
    cfg = get_preset(ns.preset)
    cfg.vocab_size = 32000
    if ns.no_merge:
        cfg.memory.merge_grads = False
    for item in ns.memory:
        key, sep, value = item.partition("=")
        if not sep or not hasattr(cfg.memory, key):
            raise SystemExit(f"error: --memory takes MemoryConfig KEY=VALUE, got {item!r}")
        setattr(cfg.memory, key, yaml.safe_load(value))
    cfg.memory.validate()
    if ns.balance_kth_torch:
        import memlayers.router as router

        router.BALANCE_KTH_TRITON = False
    try:
        model = build_model(cfg, dev, seed=0, sparse_values=True)
    except TypeError:  # checkouts where build_optimizer switched the tables to sparse
        model = build_model(cfg, dev, seed=0)
    # The preset's optimizer settings as the trainer merges them (checkouts without them:
    # the defaults), and the clip's rescale of the tables as the trainer hands it over.
    try:
        from memlayers.presets import PRESET_OPTIM
    except ImportError:
        PRESET_OPTIM = {}
    optim_args = OptimArgs(**PRESET_OPTIM.get(ns.preset, {}))
    opt = build_optimizer(model, optim_args)
    if ns.compile:
        try:
            from memlayers.parallel import compile_blocks
        except ImportError:  # checkouts before parallel.build
            from memlayers.train import compile_blocks

        compile_blocks(model)
    g = torch.Generator(device=dev).manual_seed(0)
    B, T = ns.batch, ns.seq_len
    clip = getattr(optim_args, "grad_clip", 1.0)  # the trainer's clip (1.0 before the option)
    train = trainer_step(model, opt, clip, torch.autocast("cuda", dtype=torch.bfloat16))

    def step():
        tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), device=dev, generator=g)
        train(tokens[:, :-1], tokens[:, 1:])

    for _ in range(5 if ns.compile else 3):
        step()
    if ns.dump_lookups:
        dump_lookups(model, step, ns.dump_lookups)
    times = []
    for _ in range(ns.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    what = ns.preset + (" (merge_grads=false)" if ns.no_merge else "")
    what += "".join(f" {m}" for m in ns.memory)
    what += " (balance k-th by torch.topk)" if ns.balance_kth_torch else ""
    head = f"{what}: step {1e3 * med:.1f} ms, {B * T / med:,.0f} tokens/s (median, {ns.steps})"
    print(head, flush=True)

    table, short = profile_ops(step, ns.profile_steps, ns.rows, trace=ns.trace)
    if ns.out:
        with open(ns.out, "w") as f:
            f.write(provenance_header() + "\n" + head + "\n\n## by total CUDA time\n" + table)
            f.write("\n\n## by self CUDA time\n" + short + "\n")
    print(short)


def dump_lookups(model, step, path: str) -> None:
    """One step's ``(indices, weights, grad_out)`` of every lookup into the shared table
    (what its merged backward receives), saved on the host with the table's shape."""
    merged = getattr(getattr(model, "memory_values", None), "merged", None)
    if merged is None:
        raise SystemExit("--dump-lookups needs a Memory+ preset with merged gradients")
    seen = []
    add = merged.add

    def spy(weight, indices, weights, grad_out, impl):
        seen.append({"indices": indices.cpu(), "weights": weights.detach().cpu(),
                     "grad_out": grad_out.cpu()})  # fmt: skip
        add(weight, indices, weights, grad_out, impl)

    merged.add = spy
    try:
        step()
    finally:
        del merged.add  # the bound method again
    w = model.memory_values.weight
    torch.save({"n_rows": w.shape[0], "dim": w.shape[1], "dtype": str(w.dtype),
                "lookups": seen}, path)  # fmt: skip
    print(f"saved {len(seen)} lookups of the shared table to {path}", flush=True)


if __name__ == "__main__":
    main()
