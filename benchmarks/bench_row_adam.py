"""Benchmark the row-wise value optimizer steps (lazy Adam, SGD) against a fused dense AdamW.

    python benchmarks/bench_row_adam.py                               # one GPU, paper shape
    python benchmarks/bench_row_adam.py --dims 1024 2048 --sweep --out results.md
    TRITON_INTERPRET=1 python benchmarks/bench_row_adam.py --smoke    # CPU: code paths

Paper shape (docs/method.md §4): a 1,048,576-row bf16 table with fp32 moments, the rows
that 16,384 × 128 uniform lookups touch (~907k); the table is stored stochastically
rounded, as with ``model.memory.value_dtype=bf16 optim.value_master=false``, or from an
fp32 master copy (the default: the master read and written, the table written), or from
a split master (``optim.value_master_split``: the table and int16 remainders, both read
and written). Bytes are
the fewest a step moves: Adam reads and writes param and both moments (fp32; or bf16 with
stochastic rounding) of the touched rows and reads their gradient rows; SGD reads and
writes param and reads the gradient.

Every step is timed as the value optimizers run it (``SparseValueAdam``/``SGD``):
``check_range=False``, the rows of a coalesced gradient being in the table and distinct by
making. One labelled row times the trainer's step with the check on (``aminmax`` and a
sort of the touched rows, and a device assert), what a direct call of the kernels pays.
"""

from __future__ import annotations

import argparse

import torch
from timing import Table, bandwidth_table, report, timed

from memlayers.ops.row_adam_triton import row_adam_step_triton, row_sgd_step_triton


def bench_dim(args, table: Table, d: int, device) -> None:
    n, elt = args.rows, 2
    g = torch.Generator(device=device).manual_seed(0)
    values = torch.randn(n, d, device=device, generator=g).bfloat16()
    rows = torch.randint(0, n, (args.lookups,), device=device, generator=g).unique()
    u = rows.numel()
    grad = torch.randn(u, d, device=device, generator=g).bfloat16()
    m = torch.zeros(n, d, dtype=torch.float32, device=device)
    v = torch.zeros_like(m)
    # check_range=False: as SparseValueAdam / SparseValueSGD call the kernels.
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, check_range=False)
    v_row = torch.zeros(n, dtype=torch.float32, device=device)
    # Per touched row: param read + write, gradient read, moments read + write (fp32);
    # the row index (8) is left out of the per-row figures.
    per_row = {"adam": d * (2 * elt + elt + 16), "rowwise": d * (2 * elt + elt + 8) + 8,
               "bf16": d * (2 * elt + elt + 8), "sgd": d * 3 * elt,
               "master": d * (8 + elt + 16 + elt),
               "master_bf16": d * (8 + elt + 8 + elt),
               "split_bf16": d * (2 * elt + 4 + 8 + elt)}  # fmt: skip
    m16, v16 = m.bfloat16(), v.bfloat16()
    master = values.float()
    rem = torch.zeros(n, d, dtype=torch.int16, device=device)  # a split master's remainders
    adam_bytes = u * (per_row["adam"] + 8)
    note = f"{u} of {n} rows"
    table.add(f"D={d}: row Adam step (bf16 table, fp32 moments)",
              timed(lambda: row_adam_step_triton(values, rows, grad, m, v, 1, **hp)),
              adam_bytes, f"{note}; {per_row['adam']} B/row")  # fmt: skip
    table.add(f"D={d}: row Adam step, fp32 master (bf16 table, fp32 moments)",
              timed(lambda: row_adam_step_triton(values, rows, grad, m, v, 1, **hp,
                                                 master=master)),
              u * (per_row["master"] + 8), f"{note}; {per_row['master']} B/row")  # fmt: skip
    table.add(f"D={d}: row Adam step, fp32 master, bf16 moments (stochastic rounding)",
              timed(lambda: row_adam_step_triton(values, rows, grad, m16, v16, 1, **hp,
                                                 master=master)),
              u * (per_row["master_bf16"] + 8),
              f"{note}; {per_row['master_bf16']} B/row")  # fmt: skip
    scale = torch.full((1,), 0.5, device=device)  # the clip's coefficient (clip_grad_norm_)
    table.add(f"D={d}: the same, the clip's scale multiplied in (the trainer's step)",
              timed(lambda: row_adam_step_triton(values, rows, grad, m16, v16, 1, **hp,
                                                 master=master, grad_scale=scale)),
              u * (per_row["master_bf16"] + 8),
              f"{note}; {per_row['master_bf16']} B/row")  # fmt: skip
    # The same fp32 values kept split (optim.value_master_split): the table its high half,
    # int16 remainders beside it; both read and written, the master's 4 + 4 bytes gone.
    table.add(f"D={d}: the trainer's step, split master (bf16 table + int16 remainders)",
              timed(lambda: row_adam_step_triton(values, rows, grad, m16, v16, 1, **hp,
                                                 master=rem, grad_scale=scale)),
              u * (per_row["split_bf16"] + 8),
              f"{note}; {per_row['split_bf16']} B/row")  # fmt: skip
    checked = {**hp, "check_range": True}
    table.add(f"D={d}: the trainer's step with the rows' range check (check_range=True)",
              timed(lambda: row_adam_step_triton(values, rows, grad, m16, v16, 1, **checked,
                                                 master=master, grad_scale=scale)),
              u * (per_row["master_bf16"] + 8),
              f"{note}; not what the optimizer runs: aminmax + sort of the rows")  # fmt: skip
    table.add(f"D={d}: row Adam step, row-wise v (bf16 table, fp32 m, [N] v)",
              timed(lambda: row_adam_step_triton(values, rows, grad, m, v_row, 1, **hp,
                                                 rowwise_v=True)),
              u * (per_row["rowwise"] + 8), f"{note}; {per_row['rowwise']} B/row")  # fmt: skip
    table.add(f"D={d}: row Adam step, bf16 moments (stochastic rounding)",
              timed(lambda: row_adam_step_triton(values, rows, grad, m16, v16, 1, **hp)),
              u * (per_row["bf16"] + 8), f"{note}; {per_row['bf16']} B/row")  # fmt: skip
    table.add(f"D={d}: row SGD step (bf16 table)",
              timed(lambda: row_sgd_step_triton(values, rows, grad, 1, 1e-3,
                                                check_range=False)),
              u * (per_row["sgd"] + 8), f"{note}; {per_row['sgd']} B/row")  # fmt: skip
    for bd, wp in [(1024, 4), (512, 4), (2048, 8), (1024, 8), (256, 1)] if args.sweep else ():
        fn = lambda bd=bd, wp=wp: row_adam_step_triton(  # noqa: E731
            values, rows, grad, m, v, 1, **hp, block_d=bd, num_warps=wp
        )
        table.add(f"D={d}: sweep Adam BLOCK_D={bd} warps={wp}", timed(fn), adam_bytes)
    # The paper presets' step (fp32 master, bf16 moments): its rounding hashes make it
    # compute-heavier, so lanes masked off past D (D = 768 in a 1024 tile) may cost here.
    for bd, wp in [(1024, 4), (256, 1), (512, 2), (512, 4), (1024, 8)] if args.sweep else ():
        fn = lambda bd=bd, wp=wp: row_adam_step_triton(  # noqa: E731
            values, rows, grad, m16, v16, 1, **hp, master=master, block_d=bd, num_warps=wp
        )
        table.add(f"D={d}: sweep master + bf16 moments BLOCK_D={bd} warps={wp}", timed(fn),
                  u * (per_row["master_bf16"] + 8))  # fmt: skip
    if args.dense:
        # The dense alternative the lazy step replaces: fused AdamW over the whole table.
        p32 = torch.zeros(n, d, dtype=torch.float32, device=device, requires_grad=True)
        p32.grad = torch.randn_like(p32)
        opt = torch.optim.AdamW([p32], lr=1e-3, fused=p32.is_cuda)
        opt.step()
        table.add(f"D={d}: torch.optim.AdamW(fused), dense fp32 table", timed(opt.step),
                  n * d * 4 * 7, "whole table")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1 << 20)
    p.add_argument("--lookups", type=int, default=16384 * 128, help="tokens × heads × top-k")
    p.add_argument("--dims", type=int, nargs="+", default=[1024])
    p.add_argument("--sweep", action="store_true", help="launch sweep")
    p.add_argument("--dense", action="store_true", help="fused dense AdamW for comparison")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter)")
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args(argv)
    if args.smoke:
        args.rows, args.lookups, args.dims = 64, 40, [16, 13]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, card, table = bandwidth_table()
    for d in args.dims:
        bench_dim(args, table, d, device)
    text = f"Card: {card}; {args.rows} rows, {args.lookups} lookups.\n\n" + table.markdown()
    report(text, args.out)


if __name__ == "__main__":
    main()
