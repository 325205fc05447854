"""Benchmark generation: prefill and decode speed of dense and Memory+ models, with the
value table as trained (float), quantized (int8, 4-bit), offloaded to host memory, each
decoded eagerly and with the fast paths of memlayers/decoding.py, in one run.

    python benchmarks/bench_generate.py                      # one GPU: 134m and 373m pairs
    python benchmarks/bench_generate.py --presets 134m-dense 134m-memory+ --batches 1 32
    python benchmarks/bench_generate.py --decodes eager graph compile+graph --batches 1
    python benchmarks/bench_generate.py --smoke              # CPU: tiny presets, code paths

Weights are freshly initialised (speed does not depend on training) and, on a GPU, held
in bf16 as served (the RoPE tables stay fp32) under bf16 autocast (which runs the mixed
ops: a quantized lookup sums in fp32). Per (preset, table, batch, decode): the prefill of
a ``--prompt-len`` prompt (ms, median), then ``--new-tokens`` greedy decode steps, timed
as a whole (tokens/s = batch × steps / time; no host sync inside the loop: argmax stays
on the device). Decodes:

- ``eager``: the model's forward with its growing KV cache (what ``generate`` runs);
- ``static``: :func:`memlayers.decoding.static_forward`, the fixed-shape cache, eagerly;
- ``compile``: the same, each block through ``torch.compile`` (inductor);
- ``graph`` / ``compile+graph``: the step (eager / compiled blocks) captured in a CUDA
  graph, one replay per token. Tables offloaded with gathers cannot be captured (a host
  sync per lookup): those rows are skipped, saying so; zero-copy ones are captured.

``setup s`` is the first repetition's compilation and capture (later ones reuse the
compiled blocks). The Memory+ rows give their decode speed over the dense twin's at the
same batch, with the same decode and with the twin's fastest (issue 12's goal: ≥ 0.9×
on the device at batch 1, ≥ 0.5× offloaded). ``GB/s``: the bytes a decode step must read
(the parameters outside the value table, the value rows read, the keys and values
cached so far) per second.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

import torch
import torch.nn as nn
from timing import card_name, report

from memlayers.decoding import (
    DecodeStep,
    StaticKVCache,
    cache_length,
    graph_blockers,
    kv_dtype,
    static_forward,
)
from memlayers.model import KVCache, build_model
from memlayers.offload import cache_hot_rows_, offload_tables_
from memlayers.ops import product_keys_triton
from memlayers.presets import get_preset
from memlayers.quantize import quantize_tables_, value_tables

# "offload": the float table in host RAM, the rows read gathered per lookup
# (memlayers.offload); "int4-offload": the same for the 4-bit table; "offload-cache":
# offloaded with a device cache of the rows the prompt read most (--cache-frac of the
# table; memlayers.offload.cache_hot_rows_), its decode hit rate reported. "zero-copy"
# (and its int8 / int4 forms): the table page-locked in host RAM, the rows read in place
# by the GPU over the bus (mode="zero-copy": no sync, so compiled and graph-captured).
TABLES = ("float", "int8", "int4", "offload", "int4-offload", "offload-cache", "zero-copy",
          "int8-zero-copy", "int4-zero-copy")  # fmt: skip
PRESETS = ["134m-dense", "134m-memory+", "373m-dense", "373m-memory+"]
DECODES = ("eager", "static", "compile", "graph", "compile+graph")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bf16_parameters_(model: nn.Module) -> None:
    """Every parameter in bf16, as served; buffers (the RoPE tables) stay fp32."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False))


def step_bytes(model, batch: int, cached: float) -> float:
    """Bytes one decode step reads: parameters outside the value tables, the rows the
    memory layers read (each bag's ``heads · topk``), ``cached`` positions of K and V."""
    cfg = model.config
    tables = value_tables(model)
    skip = {id(p) for t in tables for p in t.parameters()}
    params = sum(p.nbytes for p in model.parameters() if id(p) not in skip)
    rows = 0.0
    if tables:
        t, mem = tables[0], cfg.memory
        row = t.nbytes / t.n_rows
        rows = len(model.memory_layers()) * batch * mem.heads * mem.topk * row
    kv = 2 * cfg.n_layers * batch * cfg.kv_heads * cfg.head_dim * cached * 2  # bf16
    return params + rows + kv


def _eager_step(model, cache: KVCache, nxt: torch.Tensor) -> torch.Tensor:
    return model(nxt, cache, check_ids=False)[:, -1]


def measure(model, batch, prompt_len, new_tokens, reps, device, amp, decode, cache_frac=None):
    """``(prefill ms, decode tokens/s, setup s, hit rate)`` of greedy decoding with
    ``decode``; with ``cache_frac`` the offloaded table first caches that fraction of its
    rows, those the prompt read most, and the hit rate is the last decode's (else None)."""
    g = torch.Generator(device=device).manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, prompt_len), device=device, generator=g)
    total = prompt_len + new_tokens
    host = model.memory_values.offloaded if cache_frac else None
    if host is not None:
        with amp():
            cache_hot_rows_(model, prompt, int(cache_frac * host.n_rows), device)
    prefill, tokens_s, setup = [], [], []
    for _ in range(reps + 1):  # the first is a warm-up (kernel compilation, allocation)
        with amp():
            if decode == "eager":
                cache = KVCache(len(model.layers), total)
            else:
                max_len = cache_length(total, model.config.max_seq_len)
                cache = StaticKVCache(model, batch, max_len, kv_dtype(model, device), device)
            _sync(device)
            t0 = time.perf_counter()
            if decode == "eager":
                logits = model(prompt, cache)[:, -1]
            else:
                logits = static_forward(model, cache, prompt, fresh=True)
            _sync(device)
            t1 = time.perf_counter()
            if decode == "eager":
                step = functools.partial(_eager_step, model, cache)
            else:
                step = DecodeStep(model, cache, batch, compile="compile" in decode,
                                  cuda_graph="graph" in decode)  # fmt: skip
            if host is not None:
                host.cache_stats(reset=True)  # count the decode's reads only
            _sync(device)
            t2 = time.perf_counter()
            for _ in range(new_tokens):
                nxt = logits.argmax(-1, keepdim=True)  # [B, 1]
                logits = step(nxt)
            _sync(device)
            t3 = time.perf_counter()
        prefill.append((t1 - t0) * 1e3)
        setup.append(t2 - t1)
        tokens_s.append(batch * new_tokens / (t3 - t2))
    hit = host.cache_stats()["hit_rate"] if host is not None else None
    return statistics.median(prefill[1:]), statistics.median(tokens_s[1:]), setup[0], hit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES,
                   help="value-table formats for the memory models")  # fmt: skip
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--decodes", nargs="+", choices=DECODES, default=None,
                   help="default: eager graph compile+graph on a GPU, eager static compile "
                   "on a CPU")  # fmt: skip
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cache-frac", type=float, default=0.1,
                   help="offload-cache: the fraction of the table's rows cached")  # fmt: skip
    p.add_argument("--no-scores-few", action="store_true",
                   help="product_keys_triton.SCORES_FEW off: the cuBLAS score products at "
                   "every size (its A/B)")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny presets, few tokens (CPU)")
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.no_scores_few:
        product_keys_triton.SCORES_FEW = False
    if args.decodes is None:
        gpu = device.type == "cuda"
        args.decodes = (
            ["eager", "graph", "compile+graph"] if gpu else ["eager", "static", "compile"]
        )
    if args.smoke:
        args.presets = ["tiny-dense", "tiny-memory+"]
        args.batches, args.prompt_len, args.new_tokens, args.reps = [1, 4], 16, 8, 1
    for b in args.batches:
        if b < 1:
            raise SystemExit(f"error: --batches must be >= 1, got {b}")
    if device.type != "cuda" and any("graph" in d for d in args.decodes):
        raise SystemExit("error: the graph decodes need a CUDA device")
    # Each (block kind, table format, batch) compiles its own block graph: more than
    # dynamo's default 8 per function in one run.
    torch._dynamo.config.recompile_limit = 256

    def amp():
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    rows, dense, notes = [], {}, []
    for preset in args.presets:
        cfg = get_preset(preset)
        if args.prompt_len + args.new_tokens > cfg.max_seq_len:
            raise SystemExit(f"error: prompt + new tokens exceed {preset}'s {cfg.max_seq_len}")
        has_memory = bool(cfg.memory_layers)
        twin = preset.rsplit("-", 1)[0] + "-dense"
        for table in args.tables if has_memory else ["float"]:
            model = build_model(cfg, device, seed=0).eval()
            if device.type == "cuda":
                bf16_parameters_(model)
            if table.startswith("int"):
                quantize_tables_(model, int(table[3:4]))
            if table.endswith("zero-copy"):
                offload_tables_(model, mode="zero-copy")
            elif "offload" in table:
                offload_tables_(model)
            frac = args.cache_frac if table.endswith("cache") else None
            cached = args.prompt_len + args.new_tokens / 2  # on average over the steps
            for decode in args.decodes:
                if "graph" in decode and graph_blockers(model):
                    print(f"{preset:<14} {table:<12} {decode:<13} skipped: "
                          f"{graph_blockers(model)[0]}", flush=True)  # fmt: skip
                    continue
                for b in args.batches:
                    try:
                        with torch.no_grad():
                            pre, dec, setup, hit = measure(model, b, args.prompt_len,
                                                           args.new_tokens, args.reps, device,
                                                           amp, decode, frac)  # fmt: skip
                    except (RuntimeError, ValueError) as e:  # a new path on a new card: the
                        # other rows still count; the error is the result of this one
                        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                        notes.append(f"{preset} {table} {decode} batch {b}: failed: {first}")
                        print(notes[-1], flush=True)
                        continue
                    if hit is not None:
                        notes.append(f"{preset} {table} {decode} batch {b}: {frac:.0%} of "
                                     f"the rows cached, decode hit rate {hit:.1%}")  # fmt: skip
                        print(notes[-1], flush=True)
                    if not has_memory:
                        dense[(twin, b, decode)] = dec
                    same = dense.get((twin, b, decode))
                    best = max((v for k, v in dense.items() if k[:2] == (twin, b)), default=None)
                    gbs = step_bytes(model, b, cached) * dec / b / 1e9
                    row = (preset, table, decode, b, pre, dec, gbs, setup,
                           dec / same if same else None, dec / best if best else None)  # fmt: skip
                    rows.append(row)
                    print(" ".join(_cells(row)), flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    lines = [
        f"# Generation speed, {card_name(device)}",
        "",
        f"prompt {args.prompt_len} tokens, {args.new_tokens} greedy decode steps, "
        f"{'bf16 weights, bf16 autocast' if device.type == 'cuda' else 'fp32'}; median of "
        f"{args.reps}; torch {torch.__version__}"
        + ("; SCORES_FEW off" if args.no_scores_few else ""),
        "",
        "| preset | table | decode | batch | prefill ms | decode tokens/s | GB/s | setup s "
        "| vs dense, same decode | vs dense's fastest |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(c.strip() for c in _cells(r)) + " |" for r in rows]
    lines += ["", *notes] if notes else []
    report("\n".join(lines), args.out)


def _cells(row) -> list[str]:
    preset, table, decode, b, pre, dec, gbs, setup, same, best = row
    ratio = [f"{r:.2f}" if r is not None else "-" for r in (same, best)]
    return [f"{preset:<14}", f"{table:<12}", f"{decode:<13}", f"{b:<3}", f"{pre:9.2f}",
            f"{dec:11,.0f}", f"{gbs:7.1f}", f"{setup:6.1f}", f"{ratio[0]:>5}",
            f"{ratio[1]:>5}"]  # fmt: skip


if __name__ == "__main__":
    main()
