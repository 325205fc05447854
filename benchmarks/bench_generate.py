"""Benchmark generation: prefill and decode speed of dense and Memory+ models, with the
value table as trained (float), quantized (int8, 4-bit), offloaded to host memory, in
one run.

    python benchmarks/bench_generate.py                      # one GPU: 134m and 373m pairs
    python benchmarks/bench_generate.py --presets 134m-dense 134m-memory+ --batches 1 32
    python benchmarks/bench_generate.py --smoke              # CPU: tiny presets, code paths

Weights are freshly initialised (speed does not depend on training); bf16 autocast on a
GPU, as the trainer and eval run. Per (preset, table, batch): the prefill of a
``--prompt-len`` prompt (ms, median), then ``--new-tokens`` greedy decode steps with the KV
cache, timed as a whole (tokens/s = batch × steps / time; no host sync inside the loop:
argmax stays on the device). The Memory+ rows give their ratio to the dense twin's decode
speed at the same batch (issue 12's goal: ≥ 0.9× at batch 1 on the device).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from timing import card_name, report

from memlayers.model import KVCache, build_model
from memlayers.offload import offload_tables_
from memlayers.presets import get_preset
from memlayers.quantize import quantize_tables_

# "offload": the float table in host RAM, the rows read gathered per lookup
# (memlayers.offload); "int4-offload": the same for the 4-bit table.
TABLES = ("float", "int8", "int4", "offload", "int4-offload")
PRESETS = ["134m-dense", "134m-memory+", "373m-dense", "373m-memory+"]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, batch: int, prompt_len: int, new_tokens: int, reps: int, device, amp):
    """``(prefill ms, decode tokens/s)`` of greedy decoding with a KV cache."""
    g = torch.Generator(device=device).manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, prompt_len), device=device, generator=g)
    total = prompt_len + new_tokens
    prefill, decode = [], []
    for _ in range(reps + 1):  # the first is a warm-up (kernel compilation, allocation)
        cache = KVCache(len(model.layers), total)
        _sync(device)
        t0 = time.perf_counter()
        with amp():
            logits = model(prompt, cache)[:, -1]
        _sync(device)
        t1 = time.perf_counter()
        with amp():
            for _ in range(new_tokens):
                nxt = logits.argmax(-1, keepdim=True)  # [B, 1]
                logits = model(nxt, cache, check_ids=False)[:, -1]
        _sync(device)
        t2 = time.perf_counter()
        prefill.append((t1 - t0) * 1e3)
        decode.append(batch * new_tokens / (t2 - t1))
    return statistics.median(prefill[1:]), statistics.median(decode[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES,
                   help="value-table formats for the memory models")  # fmt: skip
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny presets, few tokens (CPU)")
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.presets = ["tiny-dense", "tiny-memory+"]
        args.batches, args.prompt_len, args.new_tokens, args.reps = [1, 4], 16, 8, 1
    for b in args.batches:
        if b < 1:
            raise SystemExit(f"error: --batches must be >= 1, got {b}")

    def amp():
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    rows, dense = [], {}
    for preset in args.presets:
        cfg = get_preset(preset)
        if args.prompt_len + args.new_tokens > cfg.max_seq_len:
            raise SystemExit(f"error: prompt + new tokens exceed {preset}'s {cfg.max_seq_len}")
        has_memory = bool(cfg.memory_layers)
        for table in args.tables if has_memory else ["float"]:
            model = build_model(cfg, device, seed=0).eval()
            if table.startswith("int"):
                quantize_tables_(model, int(table[3:4]))
            if table.endswith("offload"):
                offload_tables_(model)
            with torch.no_grad():
                for b in args.batches:
                    pre, dec = measure(model, b, args.prompt_len, args.new_tokens, args.reps,
                                       device, amp)  # fmt: skip
                    twin = preset.rsplit("-", 1)[0] + "-dense"
                    if not has_memory:
                        dense[(twin, b)] = dec
                    ratio = dec / dense[(twin, b)] if (twin, b) in dense else None
                    rows.append((preset, table, b, pre, dec, ratio))
                    r = f"{ratio:.2f}" if ratio is not None else ""
                    print(f"{preset:<14} {table:<6} batch {b:<3} prefill {pre:9.2f} ms  "
                          f"decode {dec:11,.0f} tok/s  {r}", flush=True)  # fmt: skip
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    lines = [
        f"# Generation speed, {card_name(device)}",
        "",
        f"prompt {args.prompt_len} tokens, {args.new_tokens} greedy decode steps, KV cache, "
        f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; median of {args.reps}",
        "",
        "| preset | table | batch | prefill ms | decode tokens/s | decode vs dense twin |",
        "|---|---|---|---|---|---|",
    ]
    for preset, table, b, pre, dec, ratio in rows:
        r = f"{ratio:.2f}" if ratio is not None else ""
        lines.append(f"| {preset} | {table} | {b} | {pre:.2f} | {dec:,.0f} | {r} |")
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
