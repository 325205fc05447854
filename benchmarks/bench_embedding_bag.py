"""Benchmark the value lookup, forward and backward, on uniform and skewed lookups, with
simple baselines measured in the same run.

    python benchmarks/bench_embedding_bag.py                          # trainer + paper shapes
    python benchmarks/bench_embedding_bag.py --shapes paper --sweep --out results.md
    TRITON_INTERPRET=1 python benchmarks/bench_embedding_bag.py --smoke   # CPU: code paths
    python benchmarks/profile_step.py --batch 32 --compile --dump-lookups L.pt   # then:
    python benchmarks/bench_embedding_bag.py --shapes --replay L.pt --sweep      # the trainer's

Shapes: ``trainer`` is one lookup of today's 134m-memory+ trainer (bf16 table 1,048,576 ×
768, 32 × 1024 = 32,768 bags × 128, fp32 weights, bf16 grad_out), ``paper`` the paper's
(bf16 table 1,048,576 × 1024, 16,384 bags × 128; docs/method.md §4). ``trainer-b8-fp32``
is what ``trainer`` was until 2026-12-05 (fp32 table, 8,192 bags: the trainer of
2026-11; results files before then that say ``--shapes trainer`` ran it). Lookup
distributions: ``uniform``; ``zipf`` (row of rank r drawn with p ∝ 1/r, ranks scattered
over the table); ``hot-half`` (one row takes half of all lookups, the rest uniform);
``one-row`` (every lookup on one row). Early training is skewed (issue 10: 2.5% of rows
used at init), which uniform benchmarks hide.

Baselines, each tested in tests/test_embedding_bag_triton.py: the simplest Triton forward
(one program per bag, the whole row per load, default warps) and the simplest
reverse-index backward (one program per distinct row walking its lookups). Bytes: the
forward and the score gradient count a row read **per lookup** (B·K·D, not the fewest:
a row looked up twice may come from cache the second time) and write [B, D]; the backward
counts each distinct row once, grad_out, and the U gradient rows written.

``--torch-ref``: PyTorch's ``F.embedding_bag`` forward + backward on an fp32 copy of the
table, with a dense ``[N, D]`` table gradient (``sparse=False``) and with a sparse one
(``sparse=True``), beside ours (the table's own dtype, a row-sparse gradient): the rows
say which is which.
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
import torch.nn.functional as F
from timing import bandwidth_table, report, timed

from memlayers.ops import embedding_bag_triton as ebt

SHAPES = {
    # One lookup of today's 134m-memory+ trainer: its bf16 table (the paper presets'
    # value_dtype since 2026-12-03), 32 × 1024 tokens a micro-batch.
    "trainer": dict(rows=1 << 20, dim=768, tokens=32768, bag=128, dtype=torch.bfloat16),
    "paper": dict(rows=1 << 20, dim=1024, tokens=16384, bag=128, dtype=torch.bfloat16),
    # ``trainer`` until 2026-12-05 (the 2026-11 trainer: fp32 table, batch 8), which
    # embedding_bag_h100_20261128 and embedding_bag_h200_20261201 ran as ``trainer``.
    "trainer-b8-fp32": dict(rows=1 << 20, dim=768, tokens=8192, bag=128, dtype=torch.float32),
    # One lookup of today's 134m-memory+ trainer (32 x 1024 tokens a micro-batch); its
    # merged value-gradient walk takes 3 such lookups' bags at once (``merged``).
    "trainer-b32": dict(rows=1 << 20, dim=768, tokens=32768, bag=128, dtype=torch.float32),
    "merged": dict(rows=1 << 20, dim=768, tokens=3 * 32768, bag=128, dtype=torch.float32),
    # The same with the bf16 table the paper presets train since 2026-12-03 (grad_out
    # bf16 too).
    "merged-bf16": dict(rows=1 << 20, dim=768, tokens=3 * 32768, bag=128, dtype=torch.bfloat16),
}
DISTS = ("uniform", "zipf", "narrow", "l2", "hot-half", "one-row")
# ``narrow``: uniform over 2.5% of the rows (scattered), the share a 134m model read after
# 500 steps of text (issue 10). ``l2``: uniform over 4,096 rows (12 MB of the fp32
# trainer table: they stay in L2), as the trainer benchmark's synthetic tokens read
# (its lookup forward ran at 17 TB/s, profile_134m_h200_20261202.md).
NARROW_SHARE = 0.025
L2_ROWS = 4096
# The score gradient's launches tried by --sweep: (rows per reduction, warps, stages,
# programs per bag, columns per load (None: the whole row)). chunk is capped at 64
# values per thread (score_grad).
SCORE_SWEEP = (
    [(c, w, st, 1, None) for c, w in ((4, 4), (8, 4), (8, 8), (16, 8)) for st in (1, 3)]
    + [(c, 1, 3, sp, None) for c in (1, 2) for sp in (1, 4)]
    + [(c, 2, 3, sp, None) for c in (2, 4) for sp in (1, 4)]
    + [(c, w, st, 1, 256) for c, w in ((2, 1), (4, 1), (8, 1), (4, 2), (8, 2), (8, 4), (16, 4))
       for st in (1, 3)]
    + [(c, w, 3, 1, 128) for c, w in ((4, 1), (8, 1), (8, 2), (16, 2))]
)  # fmt: skip
# The value-gradient walk alone on precomputed segments (--walk-sweep, and --sweep):
# (BLOCK_D, warps, stages). A narrower tile keeps a smaller slice of grad_out live in L2
# (module docstring of embedding_bag_triton). Gathering several lookups' grad_out tiles
# per load was tried and lost on every shape (results/walk_sweep_h200_20261203.md).
# The note of the rows whose bytes count every lookup's row read (B·K·D).
PER_LOOKUP = "bytes: a row read per lookup"
WALK_SWEEP = [
    (bd, w, st) for bd, w in ((256, 1), (128, 1), (512, 1), (256, 2), (512, 2)) for st in (1, 2, 4)
]


def make_indices(dist: str, n: int, b: int, k: int, device, g) -> torch.Tensor:
    """``[B, K]`` int64 lookups drawn from ``dist`` (see the module docstring)."""
    if dist == "one-row":
        return torch.full((b, k), n // 2, device=device)
    if dist == "zipf":
        p = 1.0 / torch.arange(1, n + 1, device=device, dtype=torch.float32)
        ranks = torch.multinomial(p, b * k, replacement=True, generator=g)
        return torch.randperm(n, device=device, generator=g)[ranks].view(b, k)
    if dist in ("narrow", "l2"):  # uniform over a scattered subset of the rows
        size = max(1, int(n * NARROW_SHARE)) if dist == "narrow" else L2_ROWS
        live = torch.randperm(n, device=device, generator=g)[:size]
        return live[torch.randint(0, live.numel(), (b, k), device=device, generator=g)]
    indices = torch.randint(0, n, (b, k), device=device, generator=g)
    if dist == "hot-half":
        indices[torch.rand(b, k, device=device, generator=g) < 0.5] = 12345 % n
    return indices


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_compare(path: str | None):
    """A module file defining ``sparse_backward(grad_out, values, indices, weights)``
    (e.g. an earlier version's kernel), timed beside ours."""
    return load_module(path, "compare_bwd").sparse_backward if path else None


def random_table(n: int, d: int, dtype, device, g) -> torch.Tensor:
    """``[n, d]`` values drawn as the memory initialises them (std ``d**-0.5``)."""
    return torch.empty(n, d, dtype=dtype, device=device).normal_(generator=g).mul_(d**-0.5)


def bench_shape(name, shp, args, table, device, summary, compare) -> None:
    n, d, b, k, dt = shp["rows"], shp["dim"], shp["tokens"], shp["bag"], shp["dtype"]
    g = torch.Generator(device=device).manual_seed(0)
    values = random_table(n, d, dt, device, g)
    weights = torch.rand(b, k, device=device, generator=g).softmax(-1)
    grad = torch.randn(b, d, device=device, generator=g).to(dt)
    print(f"{name}: {n} × {d} {dt}, {b} bags × {k}", flush=True)
    for dist in args.dists:
        indices = make_indices(dist, n, b, k, device, g)
        tag = f"{name} {dist}"
        summary[tag] = bench_lookups(tag, values, indices, weights, grad, args, table, compare)


def bench_replay(path, args, table, device, summary, compare) -> None:
    """The lookups of one trainer step (``profile_step.py --dump-lookups``): their indices,
    weights and grad_out as the trainer had them, over a random table of its shape."""
    saved = torch.load(path, weights_only=True)
    n, d = saved["n_rows"], saved["dim"]
    dt = getattr(torch, saved["dtype"].removeprefix("torch."))
    values = random_table(n, d, dt, device, torch.Generator(device=device).manual_seed(0))
    print(f"replay {path}: {n} × {d} {dt}, {len(saved['lookups'])} lookups", flush=True)
    for i, lk in enumerate(saved["lookups"]):
        indices, weights, grad = (lk[k].to(device) for k in ("indices", "weights", "grad_out"))
        tag = f"replay {i} {grad.dtype}".replace("torch.", "")
        summary[tag] = bench_lookups(tag, values, indices, weights.float(), grad, args, table,
                                     compare)  # fmt: skip


def bench_int8_reads(tag, values, indices, weights, grad, args, table, small) -> None:
    """The two kernels that read the int8 read copy of a training table
    (``value_read=int8``, memlayers/ops/read_copy.py) on the same lookups: the forward
    (the quantized kernel's training launch) and the score gradient (the shipped launch,
    and the score sweep's with ``--sweep``), at ``D + 2`` bytes a row read."""
    from memlayers.ops import quantized_triton as qt
    from memlayers.ops.quantized import quantize_rows

    packed = quantize_rows(values, 8)
    b, k = indices.shape
    nbytes = b * k * (values.shape[1] + 2) + small
    table.add(f"{tag}: int8 reads: forward", timed(
        lambda: qt._qfwd_launch(packed, indices, weights, values.dtype, check=False)), nbytes,
        "SPLIT={} warps={} stages={} ROWS={}".format(*qt.QFWD_CONFIG))  # fmt: skip
    data, scales = packed.data, packed.scales
    shipped = lambda: ebt.score_grad(data, indices, grad, scales=scales)  # noqa: E731
    table.add(f"{tag}: int8 reads: score gradient (shipped)", timed(shipped), nbytes)
    for a in args.score_launches or (SCORE_SWEEP if args.sweep else ()):
        fn = lambda a=a: ebt.score_grad(data, indices, grad, *a, scales=scales)  # noqa: E731
        name = "chunk={} warps={} stages={} split={} block_d={}".format(*a)
        table.add(f"{tag}: int8 reads: sweep score gradient {name}", timed(fn), nbytes)


def bench_lookups(tag, values, indices, weights, grad, args, table, compare) -> dict:
    """Forward, backward and both through autograd on one set of lookups."""
    d, (b, k) = values.shape[1], indices.shape
    elt = values.element_size()
    u = indices.unique().numel()
    top = torch.bincount(indices.view(-1)).max().item()
    s = dict(note=f"U={u}, top row {top} lookups")
    print(f" {tag}: {s['note']}", flush=True)
    # Spot check at full size against F.embedding_bag in fp32 (tests cover the rest).
    ref = F.embedding_bag(indices[:256], values.float(), per_sample_weights=weights[:256],
                          mode="sum")  # fmt: skip
    out = ebt._fwd_launch(values, indices[:256], weights).float()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2
    small = b * k * 12 + b * d * elt  # indices + weights, and out or grad_out
    fwd_bytes = b * k * d * elt + small
    bwd_bytes = 2 * u * d * elt + small + b * k * 4
    s["fwd_simple"] = table.add(
        f"{tag}: forward, simple baseline",
        timed(lambda: ebt.simple_forward(values, indices, weights)),
        fwd_bytes,
        PER_LOOKUP,
    )
    s["fwd"] = table.add(
        f"{tag}: forward (shipped)",
        timed(lambda: ebt._fwd_launch(values, indices, weights)),
        fwd_bytes,
        "SPLIT={} warps={} stages={}".format(*ebt.FWD_CONFIG) + f"; {PER_LOOKUP}",
    )
    # The score gradient reads the rows the forward reads (a dot product with grad_out
    # per row instead of a weighted sum): the forward beside it is its yardstick.
    fn = lambda: ebt.score_grad(values, indices, grad)  # noqa: E731
    launch = (ebt.SCORE_GRAD_CHUNK, ebt.SCORE_GRAD_WARPS, ebt.SCORE_GRAD_SPLIT,
              ebt.SCORE_GRAD_BLOCK_D)  # fmt: skip
    cfg = "chunk={} warps={} split={} block_d={}".format(*launch)
    s["score"] = table.add(
        f"{tag}: score gradient (shipped)", timed(fn), fwd_bytes, f"{cfg}; {PER_LOOKUP}"
    )
    for a in args.score_launches or (SCORE_SWEEP if args.sweep else ()):
        fn = lambda a=a: ebt.score_grad(values, indices, grad, *a)  # noqa: E731
        name = "chunk={} warps={} stages={} split={} block_d={}".format(*a)
        table.add(f"{tag}: sweep score gradient {name}", timed(fn), fwd_bytes)
    if args.int8_reads:
        bench_int8_reads(tag, values, indices, weights, grad, args, table, small)
    bench_walk(tag, values, indices, weights, grad, table, args)
    if args.sweep and grad.dtype == torch.float32:
        # Half the bytes of grad_out, which the walk reads once per lookup.
        g16 = grad.bfloat16()
        fn = lambda: ebt._bwd_sparse(g16, values, indices, weights, False)  # noqa: E731
        table.add(f"{tag}: sweep value-grad walk, bf16 grad_out", timed(fn), bwd_bytes)
    s["bwd_simple"] = table.add(
        f"{tag}: backward sparse, simple baseline",
        timed(lambda: ebt.simple_backward(grad, values, indices, weights)),
        bwd_bytes,
    )
    if compare is not None:
        s["bwd_prev"] = table.add(
            f"{tag}: backward sparse, --compare-bwd",
            timed(lambda: compare(grad, values, indices, weights)),
            bwd_bytes,
        )
    s["bwd"] = table.add(
        f"{tag}: backward sparse (shipped)",
        timed(lambda: ebt._bwd_sparse(grad, values, indices, weights, True)),
        bwd_bytes,
        "value + score grads",
    )
    s["bwd_dense"] = table.add(
        f"{tag}: backward dense (shipped)",
        timed(lambda: ebt._bwd_dense(grad, values, indices, weights, True, True)),
    )
    for chunk in (32, 64, 256, 512) if args.sweep else ():
        fn = lambda c=chunk: ebt._bwd_sparse(grad, values, indices, weights, True, chunk=c)  # noqa: E731
        table.add(f"{tag}: sweep backward sparse chunk={chunk}", timed(fn), bwd_bytes)
    v, w = values.clone().requires_grad_(), weights.clone().requires_grad_()

    def ours_fwd_bwd():
        out = ebt.embedding_bag_triton(v, indices, w, sparse_grad=True)
        torch.autograd.grad(out, (v, w), grad)

    what = f"{str(values.dtype).removeprefix('torch.')} table, row-sparse gradient"
    s["fwd_bwd"] = table.add(f"{tag}: forward+backward (ours: {what}, autograd)",
                             timed(ours_fwd_bwd))  # fmt: skip
    if args.torch_ref and tag.endswith("uniform"):
        s.update(bench_torch_ref(tag, values, indices, w, grad, table))
    return s


def bench_torch_ref(tag, values, indices, weights, grad, table) -> dict:
    """``F.embedding_bag`` forward + backward on an fp32 copy of ``values``: with a dense
    ``[N, D]`` table gradient, and with a sparse one (``sparse=True``)."""
    v32 = values.float().requires_grad_()
    out = {}
    variants = (
        ("torch_fp32", False, "dense [N, D] gradient"),
        ("torch_fp32_sparse", True, "sparse gradient (sparse=True)"),
    )
    for key, sparse, what in variants:

        def torch_ref(sparse=sparse):
            y = F.embedding_bag(indices, v32, per_sample_weights=weights, mode="sum",
                                sparse=sparse)  # fmt: skip
            torch.autograd.grad(y, (v32, weights), grad.float())

        name = f"{tag}: F.embedding_bag, fp32 copy of the table, {what}, forward+backward"
        out[key] = table.add(name, timed(torch_ref, rep_ms=300))
    return out


def bench_walk(tag, values, indices, weights, grad, table, args) -> None:
    """The value-gradient walk alone (sparse rows, no score gradient: the merged
    shared-table backward's launch) over precomputed segments: the shipped launch, an
    earlier version's walk (``--compare-walk``: a copy of an earlier
    ``memlayers/ops/embedding_bag_triton.py``, loaded once by main; its own sort and its
    ``_bwd_launch``; e.g. the lookup-by-lookup walk of ``git show
    2c7195c:memlayers/ops/embedding_bag_triton.py``) and, with ``--walk-sweep``/``--sweep``,
    every WALK_SWEEP launch. Bytes: a grad_out tile read per lookup, a gradient row
    written per distinct row."""
    n, d = values.shape
    seg = ebt.row_segments(indices, weights, n)
    out = values.new_empty(seg.rows.numel(), d)
    u = int(seg.n_distinct.item())
    nbytes = indices.numel() * d * grad.element_size() + u * d * values.element_size()
    shipped = (ebt.bwd_launch(d)[0], ebt.BWD_WARPS, ebt.BWD_STAGES)
    before = args.walk_before
    if before is not None:
        seg_b = before.row_segments(indices, weights, n)
        fn = lambda: before._bwd_launch(grad, None, seg_b, out, False, False)  # noqa: E731
        table.add(f"{tag}: walk, --compare-walk", timed(fn), nbytes)
    table.add(
        f"{tag}: walk shipped BLOCK_D={shipped[0]} warps={shipped[1]} stages={shipped[2]}",
        timed(lambda: ebt._bwd_launch(grad, None, seg, out, False, False)), nbytes,
    )  # fmt: skip
    for bd, w, st in WALK_SWEEP if args.walk_sweep or args.sweep else ():
        fn = lambda bd=bd, w=w, st=st: ebt._bwd_launch(  # noqa: E731
            grad, None, seg, out, False, False, block_d=bd, num_warps=w, stages=st
        )
        table.add(f"{tag}: walk sweep BLOCK_D={bd} warps={w} stages={st}", timed(fn), nbytes)


def bench_forward_dims(args, table, device) -> list:
    """The forward alone at the paper's bags over several widths (issue 16 item 1)."""
    n, b, k = 1 << 20, 16384, 128
    g = torch.Generator(device=device).manual_seed(1)
    rows = []
    for d in args.fwd_dims:
        values = torch.empty(n, d, dtype=torch.bfloat16, device=device).normal_(generator=g)
        indices = torch.randint(0, n, (b, k), device=device, generator=g)
        weights = torch.rand(b, k, device=device, generator=g)
        rows.append(bench_forward(table, d, values, indices, weights, args.sweep))
    return rows


def bench_forward(table, d, values, indices, weights, sweep: bool):
    """Simple baseline, shipped launch, and (``sweep``) every launch in FWD_SWEEP."""
    b, k = indices.shape
    nbytes = b * k * d * 2 + b * k * 12 + b * d * 2
    fn0 = lambda: ebt.simple_forward(values, indices, weights)  # noqa: E731
    t0 = table.add(f"fwd D={d} bf16 uniform: simple baseline", timed(fn0), nbytes, PER_LOOKUP)
    t1 = timed(lambda: ebt._fwd_launch(values, indices, weights))
    cfg = "SPLIT={} warps={} stages={}".format(*ebt.FWD_CONFIG)
    table.add(f"fwd D={d} bf16 uniform: shipped", t1, nbytes, cfg)
    # The index check's cost (issue 14): the same launch without it.
    t2 = timed(lambda: ebt._fwd_launch(values, indices, weights, check=False))
    table.add(f"fwd D={d} bf16 uniform: shipped, no index check", t2, nbytes, cfg)
    for c in ebt.FWD_SWEEP if sweep else ():
        fn = lambda c=c: ebt._fwd_launch(values, indices, weights, config=c)  # noqa: E731
        table.add(f"fwd D={d}: sweep SPLIT={c[0]} warps={c[1]} stages={c[2]}", timed(fn), nbytes)
    return d, t0, t1, t2, nbytes, cfg


def summary_rows(summary: dict) -> list[str]:
    """The summary table's rows: ``bwd ÷ uniform`` against the same shape's uniform
    lookups, "–" where there are none (a replay, or ``--dists`` without uniform)."""
    lines = []
    for tag, s in summary.items():
        shape, _, dist = tag.partition(" ")
        uni = None if shape == "replay" else summary.get(f"{shape} uniform")
        vs_uniform = f"{s['bwd'] / uni['bwd']:.2f}" if uni is not None else "–"
        prev = f"{s['bwd_prev']:.3f}" if "bwd_prev" in s else ""
        lines.append(
            f"| {tag} | {s['fwd_simple']:.3f} | {s['fwd']:.3f} | {s['score']:.3f} "
            f"| {s['score'] / s['fwd']:.2f} | {s['bwd_simple']:.3f} | {prev} "
            f"| {s['bwd']:.3f} | {vs_uniform} | {s['bwd'] / s['bwd_simple']:.2f} "
            f"| {s['fwd_bwd']:.3f} | {s['note']} |"
        )
    return lines


def score_launch(text: str) -> tuple:
    """``"8,1,3,1,256"`` -> ``(8, 1, 3, 1, 256)``: a SCORE_SWEEP entry (block_d 0: None)."""
    parts = text.split(",")
    if len(parts) != 5 or not all(x.strip().isdigit() for x in parts):
        raise argparse.ArgumentTypeError(
            f"a score launch is five integers chunk,warps,stages,split,block_d, got {text!r}"
        )
    c, w, st, sp, bd = (int(x) for x in parts)
    return c, w, st, sp, bd or None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="*", default=["trainer", "paper"], choices=list(SHAPES))
    p.add_argument("--dists", nargs="+", default=list(DISTS), choices=list(DISTS))
    p.add_argument("--fwd-dims", type=int, nargs="*", default=[512, 1024, 1000, 2048])
    p.add_argument(
        "--sweep", action="store_true",
        help="backward chunks, score-gradient, walk and forward launches",
    )  # fmt: skip
    p.add_argument("--walk-sweep", action="store_true", help="value-gradient walk launches")
    p.add_argument(
        "--score-launches", nargs="+", type=score_launch, metavar="C,W,ST,SP,BD",
        help="score-gradient launches to time instead of --sweep's (chunk, warps, stages, "
        "split, block_d; block_d 0: the whole row), e.g. 8,1,3,1,256",
    )  # fmt: skip
    p.add_argument("--torch-ref", action="store_true", help="F.embedding_bag fp32 fwd+bwd")
    p.add_argument(
        "--int8-reads", action="store_true",
        help="also the forward and score gradient reading an int8 copy (value_read=int8)",
    )  # fmt: skip
    p.add_argument("--compare-bwd", help="module file with sparse_backward(...) to time too")
    p.add_argument(
        "--compare-walk", help="an earlier embedding_bag_triton.py whose walk to time too"
    )
    p.add_argument("--replay", help="lookups saved by profile_step.py --dump-lookups")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter)")
    p.add_argument("--out", help="write the markdown tables here")
    args = p.parse_args()
    shapes = {s: SHAPES[s] for s in args.shapes}
    if args.smoke:
        shapes = {"smoke": dict(rows=64, dim=16, tokens=8, bag=6, dtype=torch.float32)}
        args.fwd_dims = []
    device, card, table = bandwidth_table()
    copy_tbs = table.copy_tbs
    compare = load_compare(args.compare_bwd)
    args.walk_before = load_module(args.compare_walk, "compare_walk") if args.compare_walk else None
    summary = {}
    for name, shp in shapes.items():
        bench_shape(name, shp, args, table, device, summary, compare)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.replay:
        bench_replay(args.replay, args, table, device, summary, compare)
    fwd_rows = bench_forward_dims(args, table, device)
    lines = [
        f"Card: {card}; torch {torch.__version__}, triton {ebt.triton.__version__}; "
        f"copy {copy_tbs:.2f} TB/s. GB moved: forward and score gradient a row read per "
        f"lookup (B·K·D, not the fewest); backward each distinct row once.",
        "",
        table.markdown(),
        "",
        "| shape, lookups | fwd simple | fwd | score grad | score ÷ fwd | bwd simple "
        "| bwd before | bwd | bwd ÷ uniform | bwd ÷ simple | fwd+bwd | |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += summary_rows(summary)
    if fwd_rows:
        lines += ["", "| D (paper bags, bf16; bytes a row read per lookup) | simple of copy BW | "
                  "shipped of copy BW | "
                  "shipped ÷ simple time | index check's cost | launch |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for d, t0, t1, t2, nb, cfg in fwd_rows:
            bw0, bw1 = nb / t0 / 1e9 / copy_tbs, nb / t1 / 1e9 / copy_tbs
            lines.append(
                f"| {d} | {bw0:.0%} | {bw1:.0%} | {t1 / t0:.3f} | {t1 / t2 - 1:+.1%} | {cfg} |"
            )
    text = "\n".join(lines)
    report(text, args.out)


if __name__ == "__main__":
    main()
