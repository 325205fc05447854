"""Benchmark counting one memory layer's reads (the trainer's usage statistics).

    python benchmarks/bench_usage_counts.py                  # one GPU, the 134m trainer's shape
    python benchmarks/bench_usage_counts.py --smoke          # CPU: code paths only

Per micro-batch the trainer counts ``tokens × heads × top-k`` reads into ``[n_rows]``
(memlayers.usage.RowCounts). Two ways, eager and compiled, on uniform and skewed reads
(early in training, or in a collapsed memory, most reads fall on a few rows):

- ``index_add_`` of ones: one atomic add per read; costs as much as the contention on the
  most read rows;
- sort + searchsorted (the shipped RowCounts): the reads sorted as int32, each row's count
  the width of its run; no atomics, the same cost for any distribution.
"""

from __future__ import annotations

import argparse

import torch
from timing import card_name, report, timed

from memlayers.usage import RowCounts


def distributions(n: int, e: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    u = torch.rand(e, device=device, generator=g)
    return {
        "uniform": torch.randint(0, n, (e,), device=device, generator=g),
        # Pareto(1) ranks: row r read about as often as 1 / r^2 of the reads.
        "zipf": (1.0 / u.clamp_min(1e-12) - 1).clamp(max=n - 1).long(),
        "1,000 rows": torch.randint(0, 1000, (e,), device=device, generator=g),
        "32 rows": torch.randint(0, 32, (e,), device=device, generator=g),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1 << 20)
    p.add_argument("--reads", type=int, default=32 * 1024 * 128, help="tokens × heads × top-k")
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, e = (4096, 1 << 14) if args.smoke else (args.rows, args.reads)

    counts = torch.zeros(n, dtype=torch.int64, device=device)

    def atomics(idx):
        counts.index_add_(0, idx, idx.new_ones(()).expand_as(idx))

    shipped = RowCounts(n, device)

    def sort_count(idx):
        shipped.update(idx.view(-1, 1))

    methods = {"index_add_": atomics, "sort + searchsorted (shipped)": sort_count}
    if not args.no_compile:
        methods["compiled index_add_"] = torch.compile(atomics)
        methods["compiled sort + searchsorted"] = torch.compile(sort_count)
    dists = distributions(n, e, device)
    rows = []
    for name, idx in dists.items():
        times = {m: timed(lambda f=f, idx=idx: f(idx)) for m, f in methods.items()}
        for m, f in methods.items():  # every method counts the same reads
            counts.zero_()
            shipped.counts.zero_()
            f(idx)
            got = counts if "index_add_" in m else shipped.counts
            want = torch.bincount(idx, minlength=n)
            if not torch.equal(got, want):
                raise SystemExit(f"error: {m} miscounted the {name} reads")
        rows.append((name, times))
        print(name, {m: f"{t:.3f}" for m, t in times.items()}, flush=True)
    head = "| reads | " + " | ".join(f"{m} ms" for m in methods) + " |"
    lines = [
        f"# Counting {e:,} reads into {n:,} rows, {card_name(device)}",
        "",
        head,
        "|---|" + "---|" * len(methods),
    ]
    lines += [f"| {d} | " + " | ".join(f"{t[m]:.3f}" for m in methods) + " |" for d, t in rows]
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
