"""Benchmark the Memory+ layer at decoding sizes (a token per sequence, batch 1 to 32):
its search and lookup kernels one by one, and the whole layer against the SwiGLU FFN it
replaces, each as a decode step runs them (compiled, replayed from a CUDA graph).

    python benchmarks/bench_decode_layer.py                     # one GPU: 134m and 373m widths
    python benchmarks/bench_decode_layer.py --dims 768 --tokens 1 --sweep
    python benchmarks/bench_decode_layer.py --dims 768 --tokens 32 --sweep quantized search
    TRITON_INTERPRET=1 python benchmarks/bench_decode_layer.py --smoke   # CPU: code paths

Issue 12 (decoding at ≥ 0.9× the dense twin at batch 1): a batch-1 decode step is a chain
of small kernels whose time is their latency, not their bytes, so the launches that suit
training (a program per bag walking its rows one by one; one warp per top-k row) are the
wrong ones here. Each timing is the median over CUDA-graph replays of ``--calls`` calls,
divided by ``--calls``: device time plus the in-graph launch gaps, as in
:class:`memlayers.decoding.DecodeStep`. Each call follows a write that evicts L2 (the
writes' own graph is timed and subtracted), since in a decode step the rest of the
model's weights pass through L2 between two tokens; ``--warm`` leaves it out (every call
then finds its rows, keys and weights in L2: 41 against 25 µs for the training launch's
lookup at batch 1). Rows:

- lookup forward (``embedding_bag`` on a bf16 table of ``n_keys²`` rows, ``heads · topk``
  rows a bag): the simplest kernel (baseline), the training launch (``FWD_CONFIG``), the
  shipped rule (:func:`memlayers.ops.embedding_bag_triton.fwd_config`), and with
  ``--sweep`` every launch of ``FWD_FEW_SWEEP``;
- the same lookup from the table quantized (``--bits``: int8, 4-bit rows): the training
  launch (``QFWD_CONFIG``) against the rule (:func:`memlayers.ops.quantized_triton.
  qfwd_config`), with ``--sweep`` every launch of ``QFWD_FEW_SWEEP``;
- search: the half-key scores (a cuBLAS product per half, and both halves in one Triton
  launch: ``SCORES_FEW``); ``topk_launch`` on them: one warp and a launch per half (the
  training launch), the shipped rule, and with ``--sweep`` warps × halves per launch;
- the layer (eval, bf16 weights and autocast, compiled): with the launches as they were
  before the few-bags rules, as shipped, and as shipped with ``SCORES_FEW`` flipped,
  against the FFN of the same width, compiled.

``--sweep`` alone sweeps every part; ``--sweep quantized search`` only those.

``--zero-copy``: every table (float and packed) page-locked in host RAM and read in place
over the bus (:mod:`memlayers.ops.offloaded`, ``mode="zero-copy"``), the same rows: where
the link's round trips, not HBM, set a lookup's time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

import torch
from timing import card_name, report

from memlayers import MemoryConfig, MemoryValues, ProductKeyMemory
from memlayers.model import ModelConfig, SwiGLU
from memlayers.ops import embedding_bag_triton as ebt
from memlayers.ops import product_keys_triton as pkt
from memlayers.ops import quantized_triton as qt
from memlayers.ops.offloaded import device_alias
from memlayers.ops.quantized import QuantizedRows, quantize_rows

# Written before every call in the cold mode: more than an H200's 60 MB of L2, so each
# call reads its rows, keys and weights from HBM, as a decode step does (the rest of the
# model's weights pass through L2 between two tokens).
FLUSH_BYTES = 256 << 20
SWEEPS = ("lookup", "quantized", "search")  # --sweep's parts
COLD = True  # --warm: calls back to back, whatever L2 kept from the call before


def _replay_ms(body, calls: int, reps: int) -> float:
    """Median ms of ``reps`` replays of a CUDA graph of ``calls`` × ``body()``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            body()
    times = []
    for _ in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[2:])


@functools.cache
def _flush(calls: int, reps: int) -> tuple[torch.Tensor, float]:
    """The L2-evicting buffer and the ms of ``calls`` writes of it in one graph."""
    buf = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    return buf, _replay_ms(lambda: buf.fill_(1), calls, reps)


def graph_ms(fn, calls: int, reps: int = 20) -> float:
    """Milliseconds per call of ``fn``: ``calls`` calls captured in one CUDA graph, the
    median of ``reps`` replays, divided by ``calls``. Cold (the default): each call follows
    a write of :data:`FLUSH_BYTES`, and the same graph of writes alone is subtracted.
    CPU: a host clock around a plain call (code paths only)."""
    fn()
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    if not COLD:
        return _replay_ms(fn, calls, reps) / calls
    buf, flush_ms = _flush(calls, reps)

    def body():
        buf.fill_(1)
        fn()

    return (_replay_ms(body, calls, reps) - flush_ms) / calls


@contextlib.contextmanager
def launches_before():
    """The launches as they were before the few-bags rules (training's, at any batch):
    one cuBLAS product per half for the scores, too."""
    saved = ebt.fwd_config, pkt.TOPK_FEW_WARPS, pkt.TOPK_BOTH_HALVES_BYTES
    ebt.fwd_config = lambda bags, d, n_sm: ebt.FWD_CONFIG
    pkt.TOPK_FEW_WARPS, pkt.TOPK_BOTH_HALVES_BYTES = pkt.TOPK_WARPS, 0
    try:
        with scores_few(False):
            yield
    finally:
        ebt.fwd_config, pkt.TOPK_FEW_WARPS, pkt.TOPK_BOTH_HALVES_BYTES = saved


@contextlib.contextmanager
def scores_few(on: bool):
    """``product_keys_triton.SCORES_FEW`` set to ``on`` for the block."""
    saved, pkt.SCORES_FEW = pkt.SCORES_FEW, on
    try:
        yield
    finally:
        pkt.SCORES_FEW = saved


def swept(args, part: str) -> bool:
    """Whether ``--sweep`` asked for ``part``'s launches (a bare ``--sweep``: every part)."""
    return args.sweep is not None and (not args.sweep or part in args.sweep)


def bench_width(args, dim: int, device, rows: list) -> None:
    dtype = torch.bfloat16
    cfg = MemoryConfig(n_keys=args.n_keys, heads=args.heads, topk=args.topk)
    torch.manual_seed(0)
    # eval(): a shared table is not the layer's submodule, so layer.eval() leaves it be.
    values = MemoryValues(cfg.n_rows, dim, dtype=dtype, device=device).eval()
    layer = ProductKeyMemory(dim, cfg, values=values, device=device).to(dtype).eval()
    # The FFN of the paper presets at this width (Llama's 8/3 rule, multiples of 256).
    hidden = ModelConfig(dim=dim, n_layers=1, n_heads=1, vocab_size=8).hidden_dim
    ffn = SwiGLU(dim, hidden).to(device, dtype).eval()
    n_sm = ebt.sm_count(device)

    def add(tokens, what, ms, base=None) -> float:
        rel = f"{ms / base:.2f}" if base else ""
        rows.append((dim, tokens, what, ms, rel))
        print(f"  D={dim} T={tokens:<3} {what:<58} {ms * 1e3:8.1f} us  {rel}", flush=True)
        return ms

    packed = {bits: quantize_rows(values.weight.detach(), bits) for bits in args.bits}
    if args.zero_copy:  # every table on the host, read in place (the layer's too)
        packed = {bits: QuantizedRows(*(device_alias(t.cpu(), device) for t in q[:2]), *q[2:])
                  for bits, q in packed.items()}  # fmt: skip
        values.offload_(mode="zero-copy", device=device)
    for tokens in args.tokens:
        bench_tokens(args, tokens, layer, ffn, packed, n_sm, device, dtype, add)


def bench_tokens(args, tokens: int, layer, ffn, packed, n_sm: int, device, dtype, add) -> None:
    """The rows of one batch size (``add(tokens, what, ms, base)`` records one and returns
    ``ms``); ``packed``: the table quantized, by bits."""
    dim, topk = layer.dim, layer.config.topk
    x = torch.randn(tokens, dim, device=device, dtype=dtype)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        idx, w = layer.lookup(x)  # [T, H*k]
        q, keys = layer.router.normed_query(x), layer.router.normed_keys()
    host = layer.values.offloaded
    table = host.resident[0] if host is not None else layer.values.weight.detach()
    # Lookup forward.
    base = add(tokens, "lookup: simplest kernel (baseline)",
               graph_ms(lambda: ebt.simple_forward(table, idx, w), args.calls))  # fmt: skip
    add(tokens, f"lookup: training launch FWD_CONFIG {ebt.FWD_CONFIG}",
        graph_ms(lambda: ebt._fwd_launch(table, idx, w, config=ebt.FWD_CONFIG), args.calls),
        base)  # fmt: skip
    shipped = ebt.fwd_config(tokens, dim, n_sm)
    add(tokens, f"lookup: shipped rule {shipped}",
        graph_ms(lambda: ebt._fwd_launch(table, idx, w), args.calls), base)  # fmt: skip
    for c in ebt.FWD_FEW_SWEEP if swept(args, "lookup") else ():
        add(tokens, f"lookup: sweep {c}",
            graph_ms(lambda c=c: ebt._fwd_launch(table, idx, w, config=c), args.calls),
            base)  # fmt: skip
    # Quantized tables (serving): the packed rows' forward, training launch against the rule.
    for bits, table_q in packed.items():
        qbase = add(tokens, f"int{bits} lookup: training launch QFWD_CONFIG {qt.QFWD_CONFIG}",
                    graph_ms(lambda p=table_q: qt._qfwd_launch(p, idx, w, config=qt.QFWD_CONFIG),
                             args.calls))  # fmt: skip
        rule = qt.qfwd_config(tokens, dim, bits, n_sm)
        add(tokens, f"int{bits} lookup: shipped rule {rule}",
            graph_ms(lambda p=table_q: qt._qfwd_launch(p, idx, w), args.calls), qbase)  # fmt: skip
        for c in qt.QFWD_FEW_SWEEP if swept(args, "quantized") else ():
            add(tokens, f"int{bits} lookup: sweep {c}",
                graph_ms(lambda p=table_q, c=c: qt._qfwd_launch(p, idx, w, config=c), args.calls),
                qbase)  # fmt: skip
    # Search.
    with torch.no_grad():
        s1, s2 = pkt._half_scores(q, keys)
        with scores_few(False):
            bmm = add(tokens, "search: half-key scores (a bmm per half)",
                      graph_ms(lambda: pkt._half_scores(q, keys), args.calls))  # fmt: skip
        add(tokens, "search: half-key scores, one Triton launch (SCORES_FEW)",
            graph_ms(lambda: pkt.few_scores(q, keys), args.calls), bmm)  # fmt: skip
        training = functools.partial(pkt.topk_launch, num_warps=pkt.TOPK_WARPS,
                                     both_halves=False)  # fmt: skip
        before = graph_ms(lambda: training(s1, s2, topk), args.calls)
        add(tokens, f"search: top-k, training launch ({pkt.TOPK_WARPS} warp, per half)", before)
        add(tokens, "search: top-k, shipped rule",
            graph_ms(lambda: pkt.topk_launch(s1, s2, topk), args.calls), before)  # fmt: skip
        for warps in (1, 2, 4, 8) if swept(args, "search") else ():
            for both in (False, True):
                fn = lambda w_=warps, b=both: pkt.topk_launch(  # noqa: E731
                    s1, s2, topk, num_warps=w_, both_halves=b
                )
                add(tokens, f"search: top-k sweep warps={warps} both_halves={both}",
                    graph_ms(fn, args.calls), before)  # fmt: skip
    # The layer against the FFN it replaces. The kernels' launches are chosen when the
    # custom ops run, so one compiled layer serves both (captured under each).
    ffn_c = torch.compile(ffn, dynamic=False)
    mem = torch.compile(layer, dynamic=False)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        f_ms = add(tokens, "FFN (SwiGLU) it replaces, compiled",
                   graph_ms(lambda: ffn_c(x), args.calls))  # fmt: skip
        with launches_before():
            add(tokens, "memory layer, compiled, launches before",
                graph_ms(lambda: mem(x), args.calls), f_ms)  # fmt: skip
        add(tokens, "memory layer, compiled, shipped launches",
            graph_ms(lambda: mem(x), args.calls), f_ms)  # fmt: skip
        flipped = not pkt.SCORES_FEW
        with scores_few(flipped):
            add(tokens, f"memory layer, compiled, shipped but SCORES_FEW={flipped}",
                graph_ms(lambda: mem(x), args.calls), f_ms)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[768, 1024])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--n-keys", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--calls", type=int, default=20, help="calls per captured graph")
    p.add_argument(
        "--sweep",
        nargs="*",
        choices=SWEEPS,
        default=None,
        help="every few-rows launch too, of these parts (none named: all)",
    )
    p.add_argument("--bits", type=int, nargs="*", default=[8, 4], help="quantized tables")
    p.add_argument("--warm", action="store_true", help="no L2 flush between calls")
    p.add_argument("--zero-copy", action="store_true", help="tables in host RAM, read in place")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter)")
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args()
    if args.smoke:
        args.dims, args.tokens, args.n_keys, args.heads, args.topk = [64], [1, 3], 32, 2, 4
        args.calls = 1
        torch._dynamo.config.suppress_errors = False
    global COLD
    COLD = not args.warm
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.zero_copy and device.type != "cuda":
        raise SystemExit("error: --zero-copy reads host tables from a GPU: no CUDA device here")
    rows: list = []
    for dim in args.dims:
        bench_width(args, dim, device, rows)
    card = card_name(device)
    head = (
        f"# Memory+ layer at decoding sizes, {card}\n\n"
        f"n_keys {args.n_keys}, {args.heads} heads x top-{args.topk}, bf16 table, weights "
        f"and autocast; time per call: median of CUDA-graph replays of {args.calls} calls, "
        + ("each after an L2 flush (its time subtracted)" if COLD else "back to back (warm L2)")
        + ("; tables in host RAM read in place (zero-copy)" if args.zero_copy else "")
        + f"; torch {torch.__version__}\n\n"
        "| dim | tokens | what | us per call | vs baseline / before / FFN |\n|---|---|---|---|---|"
    )
    lines = [f"| {d} | {t} | {w} | {ms * 1e3:.1f} | {rel} |" for d, t, w, ms, rel in rows]
    report("\n".join([head, *lines]), args.out)


if __name__ == "__main__":
    main()
