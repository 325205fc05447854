"""Benchmark the value lookup (forward, backward) and the row-wise value optimizer step.

Prints one markdown table: ms (median), bytes moved, effective TB/s, the fraction of the
device-to-device copy bandwidth measured in the same run, and speed-ups over PyTorch
measured in the same run. Shapes default to the paper's (PAPER.md §4): a 1,048,576-row
bf16 table, 16,384 bags × 128 rows, D in {512, 1024, 2048, 1000}.

    python benchmarks/bench_embedding_bag.py                          # one GPU
    python benchmarks/bench_embedding_bag.py --sweep --out results.md # + launch sweep
    TRITON_INTERPRET=1 python benchmarks/bench_embedding_bag.py --smoke   # CPU: code paths

Bytes are the fewest the op must move: forward reads every looked-up row (B·K·D) and
writes [B, D]; backward reads each distinct row once (U·D), grad_out, indices and
weights, and writes the value gradient (dense N·D or sparse U·D) and the score gradient;
the Adam step reads and writes param and both fp32 moments of the U touched rows and
reads their gradient rows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from memlayers.ops import embedding_bag_triton as ebt
from memlayers.ops.row_adam import row_adam_step_triton, row_sgd_step_triton

# --- alternatives measured against the library's backward (not used by the library) ---


@triton.jit
def _atomic_bwd_kernel(
    grad_out_ptr,  # [B, D]
    values_ptr,  # [N, D]
    indices_ptr,  # [B, K] int64
    weights_ptr,  # [B, K]
    grad_values_ptr,  # [N, D] fp32, zeroed
    grad_weights_ptr,  # [B, K] fp32, zeroed
    K,
    D,
    n_dtiles,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per (bag, column tile): score parts and value-gradient rows by fp32 atomics."""
    pid = tl.program_id(0).to(tl.int64)
    bag = pid // n_dtiles
    cols = (pid % n_dtiles) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    g = tl.load(grad_out_ptr + bag * D + cols, mask=dmask, other=0.0).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        idx = tl.load(indices_ptr + bag * K + ks, mask=kmask, other=0)
        w = tl.load(weights_ptr + bag * K + ks, mask=kmask, other=0.0).to(tl.float32)
        m2 = kmask[:, None] & dmask[None, :]
        rows = tl.load(values_ptr + idx[:, None] * D + cols[None, :], mask=m2, other=0.0)
        part = tl.sum(rows.to(tl.float32) * g[None, :], axis=1)
        tl.atomic_add(grad_weights_ptr + bag * K + ks, part, mask=kmask)
        tl.atomic_add(
            grad_values_ptr + idx[:, None] * D + cols[None, :], w[:, None] * g[None, :], mask=m2
        )


def atomic_backward(grad_out, values, indices, weights, block_k=16, block_d=256, warps=4):
    b, k = indices.shape
    n, d = values.shape
    gv = torch.zeros(n, d, dtype=torch.float32, device=values.device)
    gw = torch.zeros(b, k, dtype=torch.float32, device=values.device)
    block_d = min(block_d, triton.next_power_of_2(d))
    nt = triton.cdiv(d, block_d)
    _atomic_bwd_kernel[(b * nt,)](
        grad_out,
        values,
        indices,
        weights,
        gv,
        gw,
        k,
        d,
        nt,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    return gv.to(values.dtype), gw


@triton.jit
def _segmented_add(f1, v1, f2, v2):
    """Combine of a segmented inclusive sum: a flagged element starts a new segment."""
    return f1 | f2, tl.where(f2 != 0, v2, v1 + v2)


@triton.jit
def _chunked_bwd_kernel(
    grad_out_ptr,  # [B, D]
    values_ptr,  # [N, D]
    weights_ptr,  # [B * K]
    sorted_rows_ptr,  # [E] table row of each lookup, ascending (E = B * K entries)
    perm_ptr,  # [E] int64: flat position b * K + k of each sorted entry
    out_row_ptr,  # [E] int64: output row of each entry (sparse: its row's ordinal)
    bounds_ptr,  # [C + 1] int64: program c owns entries bounds[c] : bounds[c + 1]
    grad_values_ptr,  # [R, D]: dense R = N, sparse R = U distinct rows
    score_parts_ptr,  # [n_dtiles, E] fp32: each column tile's part of each score grad
    K,
    n_entries,
    D: tl.constexpr,
    DENSE: tl.constexpr,
    WRITE_DV: tl.constexpr,
    WRITE_DW: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    dmask = cols < D
    e_lo = tl.load(bounds_ptr + c)
    e_hi = tl.load(bounds_ptr + c + 1)
    lane = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)  # open row's sum from the last step
    for e0 in range(e_lo, e_hi, BLOCK_E):
        es = e0 + lane  # [BLOCK_E] sorted entries
        emask = es < e_hi
        row = tl.load(sorted_rows_ptr + es, mask=emask, other=-1).to(tl.int64)
        j = tl.load(perm_ptr + es, mask=emask, other=0)
        m2 = emask[:, None] & dmask[None, :]
        # grad_out ([B, D], 32 MB at the paper's shape) is re-read once per lookup: ask L2
        # to keep it over the table rows, which are read about once.
        g = tl.load(
            grad_out_ptr + (j // K)[:, None] * D + cols[None, :], mask=m2, other=0.0,
            eviction_policy="evict_last",
        ).to(tl.float32)  # fmt: skip
        if WRITE_DW:
            # Score gradient grad_out[bag] · values[row]: this tile's part. Repeats of a
            # row sit side by side in sorted order, so they hit in L1/L2.
            v = tl.load(values_ptr + row[:, None] * D + cols[None, :], mask=m2, other=0.0)
            part = tl.sum(g * v.to(tl.float32), axis=1)  # [BLOCK_E]
            tl.store(score_parts_ptr + tile * n_entries + es, part, mask=emask)
        if WRITE_DV:
            prev = tl.load(sorted_rows_ptr + es - 1, mask=emask & (es > e_lo), other=-1)
            nxt = tl.load(sorted_rows_ptr + es + 1, mask=es + 1 < e_hi, other=-1)
            starts = (row != prev).to(tl.int32)  # [BLOCK_E] first entry of its row
            ends = emask & (row != nxt)  # last entry of its row: the row's sum is ready
            w = tl.load(weights_ptr + j, mask=emask, other=0.0).to(tl.float32)
            wg = g * w[:, None]  # [BLOCK_E, BLOCK_D]
            # A row continued from the previous step: fold its running sum into entry 0.
            wg += tl.where(((lane == 0) & (starts == 0))[:, None], carry[None, :], 0.0)
            flags = tl.broadcast_to(starts[:, None], [BLOCK_E, BLOCK_D])
            _, run = tl.associative_scan((flags, wg), 0, _segmented_add)  # per-row sums
            if DENSE:
                out_row = row
            else:
                out_row = tl.load(out_row_ptr + es, mask=ends, other=0)
            out = grad_values_ptr + out_row[:, None] * D + cols[None, :]
            tl.store(out, run.to(grad_values_ptr.dtype.element_ty), mask=ends[:, None] & dmask)
            carry = tl.sum(tl.where((lane == BLOCK_E - 1)[:, None], run, 0.0), axis=0)


def _program_bounds(sorted_rows: torch.Tensor, chunk: int) -> torch.Tensor:
    """``[C + 1]`` entry bounds giving each program about ``chunk`` entries, whole rows.

    Program c owns the rows that end in entries ``(c·chunk - 1, (c+1)·chunk - 1]``: the
    bound after entry ``c·chunk - 1`` is the end of that entry's row (a binary search).
    """
    n = sorted_rows.numel()
    marks = torch.arange(chunk - 1, max(n - 1, chunk - 1), chunk, device=sorted_rows.device)
    ends = torch.searchsorted(sorted_rows, sorted_rows[marks], right=True)
    edge = torch.tensor([n], device=sorted_rows.device)
    return torch.cat([edge.new_zeros(1), ends, edge])


def _chunked_launch(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    sorted_rows: torch.Tensor,
    perm: torch.Tensor,
    out_rows: torch.Tensor | None,
    grad_values: torch.Tensor | None,
    write_dw: bool,
    block_e: int = 8,
    chunk: int = 32,
    block_d: int = 256,
    num_warps: int = 4,
) -> torch.Tensor:
    """Run the backward kernel: fills ``grad_values`` rows (dense when ``out_rows`` is
    None, else row ``out_rows[e]`` for entry e) and returns the score gradient ``[B, K]``
    fp32 (empty when not asked for)."""
    b, k = indices.shape
    d = values.shape[1]
    n = sorted_rows.numel()
    dw = torch.empty(b, k, dtype=torch.float32, device=values.device)
    if not write_dw:
        dw = dw.new_empty(0)
    if n == 0 or d == 0 or (grad_values is None and not write_dw):
        return dw.zero_()
    block_d = min(block_d, triton.next_power_of_2(d))
    n_dtiles = triton.cdiv(d, block_d)
    bounds = _program_bounds(sorted_rows, chunk)
    parts = torch.empty(n_dtiles if write_dw else 0, n, dtype=torch.float32, device=dw.device)
    _chunked_bwd_kernel[(bounds.numel() - 1, n_dtiles)](
        grad_out, values, weights, sorted_rows, perm,
        perm if out_rows is None else out_rows, bounds,
        values if grad_values is None else grad_values, parts, k, n,
        D=d, DENSE=out_rows is None, WRITE_DV=grad_values is not None, WRITE_DW=write_dw,
        BLOCK_E=block_e, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    if write_dw:
        # Column-tile parts summed in a fixed order, then back to (bag, slot) order.
        dw.view(-1)[perm] = parts.sum(0) if n_dtiles > 1 else parts[0]
    return dw


def chunked_backward(grad_out, values, indices, weights, **launch):
    """v3: sparse value gradient + score gradient by a segmented scan over the sorted
    entries, each program a run of whole rows (benchmarks/NOTES.md)."""
    sorted_rows, perm = ebt.sort_by_row(indices, values.shape[0])
    rows, ordinal = torch.unique_consecutive(sorted_rows, return_inverse=True)
    grad_rows = values.new_empty(rows.numel(), values.shape[1])
    dw = _chunked_launch(grad_out, values, indices, weights, sorted_rows, perm, ordinal,
                         grad_rows, True, **launch)  # fmt: skip
    return rows.long(), grad_rows, dw


@triton.jit
def _score_kernel(
    grad_out_ptr,  # [B, D]
    values_ptr,  # [N, D]
    indices_ptr,  # [B, K]
    grad_weights_ptr,  # [B, K] fp32
    K,
    D,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per bag: score gradients only, reading every looked-up row (as the forward)."""
    bag = tl.program_id(0).to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        idx = tl.load(indices_ptr + bag * K + ks, mask=kmask, other=0)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            dmask = cols < D
            g = tl.load(grad_out_ptr + bag * D + cols, mask=dmask, other=0.0).to(tl.float32)
            m2 = kmask[:, None] & dmask[None, :]
            rows = tl.load(values_ptr + idx[:, None] * D + cols[None, :], mask=m2, other=0.0)
            acc += tl.sum(rows.to(tl.float32) * g[None, :], axis=1)
        tl.store(grad_weights_ptr + bag * K + ks, acc, mask=kmask)


def two_kernel_backward(grad_out, values, indices, weights):
    """Score gradients per bag (re-reading every lookup) + the sorted value-gradient
    kernel without its table reads: what fusing the two saves."""
    b, k = indices.shape
    gw = torch.empty(b, k, dtype=torch.float32, device=values.device)
    _score_kernel[(b,)](
        grad_out, values, indices, gw, k, values.shape[1], BLOCK_K=16, BLOCK_D=256, num_warps=4
    )
    rows, grad_rows, _ = ebt._bwd_sparse(grad_out, values, indices, weights, False)
    return rows, grad_rows, gw


# --- timing ------------------------------------------------------------------------------


def timed(fn, rep_ms: float = 200.0) -> float:
    """Median milliseconds of ``fn()``: CUDA events via do_bench (L2 flushed between
    calls), or a host clock on the CPU (smoke runs only)."""
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, nbytes: int) -> tuple[float, float]:
    """(ms, TB/s) of a device-to-device copy, counting bytes read + written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), rep_ms=300)
    return ms, 2 * nbytes / ms / 1e9


class Table:
    """Rows of the printed table; TB/s and the fraction of copy bandwidth derived."""

    def __init__(self, copy_tbs: float):
        self.copy_tbs, self.rows = copy_tbs, []

    def add(self, name, d, ms, nbytes=None, note=""):
        tbs = nbytes / ms / 1e9 if nbytes else None
        self.rows.append((name, d, ms, nbytes, tbs, note))
        print(
            f"  {name:<44} D={d:<5} {ms:8.3f} ms" + (f" {tbs:6.2f} TB/s" if tbs else ""), flush=True
        )
        return ms

    def markdown(self) -> str:
        out = [
            "| what | D | ms | GB moved | TB/s | of copy BW | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, d, ms, nbytes, tbs, note in self.rows:
            gb = f"{nbytes / 1e9:.2f}" if nbytes else ""
            t = f"{tbs:.2f}" if tbs else ""
            frac = f"{tbs / self.copy_tbs:.0%}" if tbs else ""
            out.append(f"| {name} | {d} | {ms:.3f} | {gb} | {t} | {frac} | {note} |")
        return "\n".join(out)


def make_inputs(n, d, b, k, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    values = torch.empty(n, d, dtype=dtype, device=device).normal_(generator=g)
    values.mul_(d**-0.5)
    indices = torch.randint(0, n, (b, k), device=device, generator=g)
    weights = torch.rand(b, k, device=device, generator=g).softmax(-1)
    grad = torch.randn(b, d, device=device, generator=g).to(dtype)
    return values, indices, weights, grad


def bench_dim(args, table: Table, d: int, device, sweep: bool, extras: bool, summary: dict) -> None:
    n, b, k = args.rows, args.tokens, args.bag
    dt = torch.bfloat16
    elt = 2
    values, indices, weights, grad = make_inputs(n, d, b, k, dt, device)
    u = indices.unique().numel()
    # Spot check at full size against PyTorch in fp32 (tests cover the rest).
    ref = F.embedding_bag(
        indices[:512], values.float(), per_sample_weights=weights[:512], mode="sum"
    )
    out = ebt._fwd_launch(values, indices[:512], weights).float()
    err = ((out - ref).norm() / ref.norm()).item()
    print(f"  forward check vs F.embedding_bag fp32: rel err {err:.2e}", flush=True)
    assert err < 1e-2, err
    small = b * k * 12 + b * d * elt  # indices + weights, grad_out or out
    fwd_bytes = b * k * d * elt + small
    bwd_sparse_bytes = u * d * elt * 2 + small + b * k * 4
    bwd_dense_bytes = u * d * elt + n * d * elt + small + b * k * 4
    print(f"D={d}: {u} distinct rows of {n} ({b * k} lookups)", flush=True)

    # PyTorch baselines, measured in this run.
    t_ref_fwd = table.add(
        "F.embedding_bag bf16 forward",
        d,
        timed(
            lambda: F.embedding_bag(indices, values, per_sample_weights=weights.to(dt), mode="sum")
        ),
        fwd_bytes,
    )
    v32 = values.float().requires_grad_()
    w32 = weights.clone().requires_grad_()

    def torch_fp32_fwd_bwd():
        out = F.embedding_bag(indices, v32, per_sample_weights=w32, mode="sum")
        torch.autograd.grad(out, (v32, w32), grad.float())

    t_ref32 = table.add(
        "F.embedding_bag fp32 forward+backward",
        d,
        timed(torch_fp32_fwd_bwd, rep_ms=400),
        note="value + score grads",
    )

    launch = "BLOCK_D={} warps={}".format(*ebt.bwd_launch(d))

    # Ours.
    t_fwd = table.add(
        "triton forward", d, timed(lambda: ebt._fwd_launch(values, indices, weights)), fwd_bytes
    )
    t_bwd_s = table.add(
        "triton backward, sparse value grad",
        d,
        timed(lambda: ebt._bwd_sparse(grad, values, indices, weights, True)),
        bwd_sparse_bytes,
        note="value + score grads",
    )
    t_bwd_d = table.add(
        "triton backward, dense value grad",
        d,
        timed(lambda: ebt._bwd_dense(grad, values, indices, weights, True, True)),
        bwd_dense_bytes,
        note="value + score grads",
    )
    v = values.clone().requires_grad_()
    w = weights.clone().requires_grad_()

    def ours_fwd_bwd(sparse):
        out = ebt.embedding_bag_triton(v, indices, w, sparse_grad=sparse)
        torch.autograd.grad(out, (v, w), grad)

    t_fb_s = table.add(
        "triton forward+backward (sparse, autograd)",
        d,
        timed(lambda: ours_fwd_bwd(True)),
        fwd_bytes + bwd_sparse_bytes,
    )
    t_fb_d = table.add(
        "triton forward+backward (dense, autograd)",
        d,
        timed(lambda: ours_fwd_bwd(False)),
        fwd_bytes + bwd_dense_bytes,
    )

    if extras:
        # fp32 table, the dtype F.embedding_bag's backward supports: like for like.
        v32 = values.float().requires_grad_()

        def ours_fp32():
            out = ebt.embedding_bag_triton(v32, indices, w, sparse_grad=True)
            torch.autograd.grad(out, (v32, w), grad.float())

        table.add("triton forward+backward fp32 table (sparse)", d, timed(ours_fp32))

    # Value optimizer: lazy Adam on the touched rows, fp32 moments.
    rows, grad_rows, _ = ebt._bwd_sparse(grad, values, indices, weights, False)
    m = torch.zeros(n, d, dtype=torch.float32, device=device)
    s = torch.zeros_like(m)
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    adam_bytes = u * d * (2 * elt + 16 + elt) + u * 8
    t_adam = table.add(
        "row Adam step (bf16 table, fp32 moments)",
        d,
        timed(lambda: row_adam_step_triton(values, rows, grad_rows, m, s, 1, **hp)),
        adam_bytes,
    )
    table.add(
        "row SGD step (bf16 table)",
        d,
        timed(lambda: row_sgd_step_triton(values, rows, grad_rows, 1e-3)),
        u * d * 3 * elt + u * 8,
    )

    summary[d] = dict(
        bwd_launch=launch,
        fwd_copy=fwd_bytes / t_fwd / 1e9 / table.copy_tbs,
        bwd_over_fwd=min(t_bwd_s, t_bwd_d) / t_fwd,
        bwd_sparse_over_fwd=t_bwd_s / t_fwd,
        bwd_dense_over_fwd=t_bwd_d / t_fwd,
        vs_torch_fp32=t_ref32 / min(t_fb_s, t_fb_d),
        fwd_vs_torch_bf16=t_ref_fwd / t_fwd,
        adam_copy=adam_bytes / t_adam / 1e9 / table.copy_tbs,
    )

    if sweep:
        print("  -- sweep", flush=True)
        fwd_sweep = [(16, 256, 4), (16, 512, 4), (8, 1024, 4), (32, 128, 4), (16, 1024, 8)]
        for bk, bd, wp in fwd_sweep:
            fn = lambda bk=bk, bd=bd, wp=wp: ebt._fwd_launch(values, indices, weights, bk, bd, wp)
            table.add(f"sweep fwd BLOCK_K={bk} BLOCK_D={bd} warps={wp}", d, timed(fn), fwd_bytes)
        bwd_sweep = [
            dict(block_d=256),
            dict(block_d=1024, num_warps=2),
            dict(stages=3),
            dict(rows_per_program=64),
        ]
        for cfg in bwd_sweep:
            fn = lambda cfg=cfg: ebt._bwd_sparse(grad, values, indices, weights, True, **cfg)
            name = "sweep bwd sparse " + " ".join(f"{a}={c}" for a, c in cfg.items())
            table.add(name, d, timed(fn), bwd_sparse_bytes)
        for cfg in [dict(), dict(block_e=4, block_d=1024), dict(block_e=16, chunk=64)]:
            fn = lambda cfg=cfg: chunked_backward(grad, values, indices, weights, **cfg)
            name = "alt bwd: chunked segmented scan (v3) " + " ".join(
                f"{a}={c}" for a, c in cfg.items()
            )
            table.add(name, d, timed(fn), bwd_sparse_bytes)
    if sweep and extras:
        table.add(
            "alt bwd: atomics into fp32 [N, D] (dense)",
            d,
            timed(lambda: atomic_backward(grad, values, indices, weights)),
            bwd_dense_bytes,
        )
        table.add(
            "alt bwd: per-bag scores + sorted value grad",
            d,
            timed(lambda: two_kernel_backward(grad, values, indices, weights)),
            bwd_sparse_bytes,
        )
        flat = indices.reshape(-1)
        table.add(
            "  part: sort (int32 keys, stable)",
            d,
            timed(lambda: torch.sort(flat.to(torch.int32), stable=True)),
        )
        table.add(
            "  part: segments (sort, prep, scan, starts)",
            d,
            timed(lambda: ebt.row_segments(indices, weights, n)),
        )
        segs = ebt.row_segments(indices, weights, n)
        out_rows = values.new_empty(segs.rows.numel(), d)
        table.add(
            "  part: walk kernel + score-part sum",
            d,
            timed(lambda: ebt._bwd_launch(grad, values, indices, segs, out_rows, False, True)),
            bwd_sparse_bytes,
        )
        for bd, wp in [(512, 4), (2048, 8), (1024, 8), (256, 2)]:
            fn = lambda bd=bd, wp=wp: row_adam_step_triton(
                values, rows, grad_rows, m, s, 1, **hp, block_d=bd, num_warps=wp
            )
            table.add(f"sweep Adam BLOCK_D={bd} warps={wp}", d, timed(fn), adam_bytes)
        # The dense alternative the sparse step replaces: fused AdamW over the whole table.
        p32 = torch.zeros(n, d, dtype=torch.float32, device=device, requires_grad=True)
        p32.grad = torch.randn_like(p32)
        opt = torch.optim.AdamW([p32], lr=1e-3, fused=p32.is_cuda)
        opt.step()
        table.add(
            "torch.optim.AdamW(fused) dense fp32 table",
            d,
            timed(opt.step, rep_ms=300),
            n * d * 4 * 7,
            note="whole table",
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1 << 20)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--bag", type=int, default=128, help="heads × top-k")
    p.add_argument("--dims", type=int, nargs="+", default=[1024, 512, 2048, 1000])
    p.add_argument("--sweep", action="store_true", help="launch-parameter sweep at every D")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter)")
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args()
    if args.smoke:
        args.rows, args.tokens, args.bag, args.dims = 64, 8, 6, [16, 13]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    copy_ms, copy_tbs = copy_bandwidth(device, 4 << 30 if device.type == "cuda" else 1 << 20)
    print(f"{card}: copy {copy_tbs:.2f} TB/s (read + write, {copy_ms:.3f} ms for 4 GiB)")
    table = Table(copy_tbs)
    table.add(
        "device-to-device copy (read + write)",
        "-",
        copy_ms,
        2 * (4 << 30 if device.type == "cuda" else 1 << 20),
    )
    summary = {}
    for i, d in enumerate(args.dims):
        bench_dim(args, table, d, device, args.sweep, i == 0, summary)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lines = [
        f"Card: {card}; torch {torch.__version__}, triton {triton.__version__}; "
        f"table {args.rows} rows bf16, {args.tokens} bags × {args.bag} rows.",
        "",
        table.markdown(),
        "",
        "| D | fwd of copy BW (≥90%) | bwd / fwd (≤1.6; sparse, dense) | fwd+bwd vs "
        "F.embedding_bag fp32 (≥8×) | fwd vs F.embedding_bag bf16 | Adam of copy BW (≥80%) "
        "| backward launch |",
        "|---|---|---|---|---|---|---|",
    ]
    for d, s in summary.items():
        lines.append(
            f"| {d} | {s['fwd_copy']:.0%} | {s['bwd_sparse_over_fwd']:.2f}, "
            f"{s['bwd_dense_over_fwd']:.2f} | {s['vs_torch_fp32']:.1f}× | "
            f"{s['fwd_vs_torch_bf16']:.1f}× | {s['adam_copy']:.0%} | {s['bwd_launch']} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
