"""Benchmark the lookup forward on quantized tables (int8, 4-bit) against the float
forward on fp32 and bf16 tables, in the same run.

    python benchmarks/bench_quantized.py                          # paper shape, uniform
    python benchmarks/bench_quantized.py --dims 768 1024 --sweep --out results.md
    TRITON_INTERPRET=1 python benchmarks/bench_quantized.py --smoke    # CPU: code paths

Shape: the paper's serving lookup (a 1,048,576-row table, 16,384 bags × 128 rows, fp32
weights; docs/method.md §4), for each width in ``--dims``, uniform lookups. Bytes are the
fewest the op must move: every looked-up row as stored (fp32 4D, bf16 2D, int8 D + 2,
4-bit ceil(D/2) + 2·ceil(D/group)), indices and weights (12 bytes a lookup) and the fp32
output. The float forward (:func:`memlayers.ops.embedding_bag_triton._fwd_launch`, the
shipped launch) is the baseline: a quantized table must be faster than bf16 for the
format to pay off in time, not only in memory.
"""

from __future__ import annotations

import argparse
import time

import torch
from timing import Table, bandwidth_table, report, timed

from memlayers.ops import embedding_bag_triton as ebt
from memlayers.ops import quantized_triton as qt
from memlayers.ops.quantized import embedding_bag_quantized_torch, quantize_rows


def bench_dim(d: int, n: int, b: int, k: int, group: int, sweep: bool, table: Table, device):
    g = torch.Generator(device=device).manual_seed(0)
    values = torch.empty(n, d, device=device).normal_(generator=g).mul_(d**-0.5)  # [N, D] fp32
    indices = torch.randint(0, n, (b, k), device=device, generator=g)  # [B, K]
    weights = torch.rand(b, k, device=device, generator=g).softmax(-1)  # [B, K]
    small = b * k * 12 + b * d * 4  # indices + weights, fp32 out
    rows = {"fp32": [], "bf16": []}
    for name, v in (("fp32", values), ("bf16", values.to(torch.bfloat16))):
        nbytes = b * k * d * v.element_size() + small
        ms = table.add(f"D={d} {name} float forward (baseline)",
                       timed(lambda v=v: ebt._fwd_launch(v, indices, weights)), nbytes)  # fmt: skip
        rows[name] = ms
    for bits in (8, 4):
        t0 = time.perf_counter()
        q = quantize_rows(values, bits, group if bits == 4 else None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        qsec = time.perf_counter() - t0
        # Spot check at full size against the reference (tests cover the rest).
        ref = embedding_bag_quantized_torch(q, indices[:256], weights[:256])
        out = qt._qfwd_launch(q, indices[:256], weights[:256])
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5
        nbytes = b * k * (q.nbytes // n) + small
        cfg = "SPLIT={} warps={} stages={} ROWS={}".format(*qt.QFWD_CONFIG)
        ms = timed(lambda q=q: qt._qfwd_launch(q, indices, weights))
        note = f"{cfg}; table {q.nbytes / 1e9:.2f} GB, quantized in {qsec:.1f}s"
        rows[f"int{bits}"] = table.add(f"D={d} int{bits} forward (shipped)", ms, nbytes, note)
        ms = timed(lambda q=q: qt._qfwd_launch(q, indices, weights, check=False))
        table.add(f"D={d} int{bits} forward, no index check", ms, nbytes, cfg)
        for c in qt.QFWD_SWEEP if sweep else ():
            fn = lambda q=q, c=c: qt._qfwd_launch(q, indices, weights, config=c)  # noqa: E731
            table.add(f"D={d} int{bits} sweep SPLIT={c[0]} warps={c[1]} stages={c[2]} "
                      f"ROWS={c[3]}",
                      timed(fn), nbytes)  # fmt: skip
        del q
    return d, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[1024, 768])
    p.add_argument("--rows", type=int, default=1 << 20)
    p.add_argument("--bags", type=int, default=16384)
    p.add_argument("--bag", type=int, default=128)
    p.add_argument("--group", type=int, default=32, help="4-bit columns per scale")
    p.add_argument("--sweep", action="store_true", help="every launch in QFWD_SWEEP")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter)")
    p.add_argument("--out", help="write the markdown tables here")
    args = p.parse_args()
    if args.smoke:
        args.dims, args.rows, args.bags, args.bag = [13, 64], 50, 8, 6
    device, card, table = bandwidth_table()
    copy_tbs = table.copy_tbs
    results = []
    for d in args.dims:
        results.append(bench_dim(d, args.rows, args.bags, args.bag, args.group, args.sweep,
                                 table, device))  # fmt: skip
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lines = [
        f"Card: {card}; torch {torch.__version__}, triton {qt.triton.__version__}; copy "
        f"{copy_tbs:.2f} TB/s. {args.rows:,} rows, {args.bags:,} bags × {args.bag}, "
        f"uniform; 4-bit group {args.group}.",
        "",
        table.markdown(),
        "",
        "| D | fp32 ms | bf16 ms | int8 ms | int4 ms | int8 ÷ bf16 time | int4 ÷ bf16 time |",
        "|---|---|---|---|---|---|---|",
    ]
    for d, r in results:
        lines.append(
            f"| {d} | {r['fp32']:.3f} | {r['bf16']:.3f} | {r['int8']:.3f} | {r['int4']:.3f} "
            f"| {r['int8'] / r['bf16']:.2f} | {r['int4'] / r['bf16']:.2f} |"
        )
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
