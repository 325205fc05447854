"""Benchmark one training step of the whole Memory+ layer: query, product-key search,
value lookup, gating; forward + backward + optimizer steps (lazy Adam on the value table,
fused AdamW on the rest). Triton path against the same layer with ``impl="torch"``, and
against the SwiGLU FFN it replaces at the same dim and tokens, all in one run.

    python benchmarks/bench_memory_layer.py                    # one GPU, paper shape
    python benchmarks/bench_memory_layer.py --out results.md
    python benchmarks/bench_memory_layer.py --compile           # + both steps compiled
    python benchmarks/bench_memory_layer.py --shared --dim 768 --tokens 8192 --table-dtype fp32
    TRITON_INTERPRET=1 python benchmarks/bench_memory_layer.py --smoke   # CPU: code paths

``--compile`` adds the whole step of the layer and of the FFN with each module under
``torch.compile`` (the optimizers eager), as the trainer runs its blocks on a GPU
(``compile`` null: on CUDA), and their ratio beside the eager one: the layer's custom ops
stay whole in its graph, the gating and norms around them fuse, as the FFN's do.

Paper shape (docs/method.md §1): dim 1024, 1024² = 1,048,576 value rows of 1024 (bf16), 4 heads
× top-32, k_dim 512, 16,384 tokens; every parameter bf16, Adam moments fp32 for values.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import card_name, report, timed

from memlayers import MemoryConfig, MemoryValues, ProductKeyMemory, SparseValueAdam
from memlayers.ops import embedding_bag
from memlayers.ops.product_keys import product_key_topk
from memlayers.value_optim import coalesce_rows

# --value-optimizers: the lazy row Adam variants of memlayers.optim's value_optimizer.
VALUE_OPTIMIZERS = {
    "sparse_adam": {},
    "sparse_adam_bf16": {"moments": "bf16"},
    "sparse_adam_rowwise": {"rowwise_v": True},
    # The paper presets' step (presets.PRESET_OPTIM: bf16 moments, optim.value_master):
    # an fp32 master copy of the bf16 table.
    "sparse_adam_bf16+master": {"moments": "bf16", "master": True},
}


def value_adam(weight, name: str, impl: str) -> SparseValueAdam:
    """The value table's lazy Adam as ``optim.value_optimizer=name`` builds it."""
    return SparseValueAdam([weight], lr=1e-3, impl=impl, **VALUE_OPTIMIZERS[name])


def build(args, impl: str, sparse_grad: bool, device, dtype):
    cfg = MemoryConfig(n_keys=args.n_keys, heads=args.heads, topk=args.topk, impl=impl)
    values = MemoryValues(cfg.n_rows, args.dim, dtype=dtype, device=device, sparse_grad=sparse_grad)
    layer = ProductKeyMemory(args.dim, cfg, values=values, device=device).to(dtype)
    if sparse_grad:
        value_opt = value_adam(values.weight, args.value_optimizers[0], impl)
    else:
        value_opt = torch.optim.AdamW(
            [values.weight], lr=1e-3, weight_decay=0.0, fused=device.type == "cuda"
        )
    rest = [p for p in layer.parameters() if p is not values.weight]
    rest_opt = torch.optim.AdamW(rest, lr=1e-4, fused=device.type == "cuda")
    return layer, values, value_opt, rest_opt


def train_step(layer, x, gy, opts):
    out = layer(x)
    out.backward(gy)
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)


def timed_compiled(module, x, gy, opts) -> float:
    """:func:`timed` of a step with ``module`` under ``torch.compile`` (its compilation in
    two untimed steps first: the first compiles, the second checks nothing recompiles)."""
    compiled = torch.compile(module)
    fn = lambda: train_step(compiled, x, gy, opts)
    fn()
    fn()
    return timed(fn)


def bench_triton_layer(args, x, gy, add, device, dtype) -> tuple[float, float | None]:
    """The whole Triton step (and compiled with ``--compile``), then each part alone
    (forward + backward, or the step). Returns the two steps' ms (None: not compiled)."""
    layer, values, vopt, ropt = build(args, "triton", True, device, dtype)
    first, *others = args.value_optimizers
    t = add(
        f"Memory+ step, impl=triton (sparse grad, lazy Adam: {first})",
        timed(lambda: train_step(layer, x, gy, (vopt, ropt))),
    )
    for name in others:  # the same step with another value optimizer, same run
        other = value_adam(values.weight, name, "triton")
        add(
            f"Memory+ step, lazy Adam: {name}",
            timed(lambda o=other: train_step(layer, x, gy, (o, ropt))),
        )
    params = [p for p in layer.parameters() if p is not values.weight]

    def search_part():
        idx, w = layer.lookup(x)
        torch.autograd.grad(w, params, torch.ones_like(w), allow_unused=True)

    add("  part: query + qk-norm + product-key search (fwd+bwd)", timed(search_part))
    q = torch.randn(args.tokens, args.heads, layer.k_dim, device=device, dtype=dtype)
    q.requires_grad_()

    def topk_part():
        s, _ = product_key_topk(q, layer.router.keys, args.topk, impl="triton")
        torch.autograd.grad(s, (q, layer.router.keys), torch.ones_like(s))

    add("    of which product_key_topk (fwd+bwd)", timed(topk_part))
    bench_search_precision(args, layer, x, q, gy, (vopt, ropt), add)
    if args.sweep:
        bench_search(args, q, layer.router.keys, add)
    idx, w = (t.detach() for t in layer.lookup(x))
    gyv = torch.randn(args.tokens, values.v_dim, device=device, dtype=dtype)
    w.requires_grad_()

    def lookup_part():
        y = embedding_bag(values.weight, idx, w, impl="triton", sparse_grad=True)
        torch.autograd.grad(y, (values.weight, w), gyv)

    add("  part: value lookup (fwd+bwd, sparse grad)", timed(lookup_part))
    y = torch.randn(args.tokens, values.v_dim, device=device, dtype=dtype, requires_grad=True)

    def gating_part():
        out = layer.w2(y * F.silu(layer.w1(x)))
        torch.autograd.grad(out, (y, layer.w1.weight, layer.w2.weight), gy)

    add("  part: swilu gating + output projection (fwd+bwd)", timed(gating_part))
    embedding_bag(values.weight, idx, w.detach(), impl="triton", sparse_grad=True).backward(gyv)
    grad = values.weight.grad

    for name in args.value_optimizers:
        opt = vopt if name == first else value_adam(values.weight, name, "triton")

        def value_step(opt=opt):
            values.weight.grad = grad
            opt.step()

        add(
            f"  part: value lazy Adam step ({name})",
            timed(value_step),
            f"{grad._nnz()} of {values.n_rows} rows touched",
        )
    values.weight.grad = None
    for prm in params:
        prm.grad = torch.zeros_like(prm)
    add("  part: AdamW(fused) on the other parameters", timed(ropt.step))
    t_compiled = None
    if args.compile:  # last, so nothing compiled runs before the eager parts are timed
        t_compiled = add("Memory+ step, compiled (torch.compile of the layer)",
                         timed_compiled(layer, x, gy, (vopt, ropt)))  # fmt: skip
    return t, t_compiled


def search_recall(layer, x, chunk: int = 4096) -> tuple[float, float]:
    """``(rows, weight)``: the share of the exact (fp32) top-k rows the bf16-ranked search
    finds for the layer's own (normed) queries of ``x``, and the share of the exact
    softmax weight on them."""
    found = mass = 0.0
    with torch.no_grad():
        keys = layer.router.normed_keys()
        for i in range(0, x.shape[0], chunk):
            q = layer.router.normed_query(x[i : i + chunk])
            s, exact = product_key_topk(q, keys, layer.router.topk)
            _, approx = product_key_topk(q, keys, layer.router.topk, precision="bf16")
            hit = (exact.unsqueeze(-1) == approx.unsqueeze(-2)).any(-1)  # [N, H, k]
            w = s.float().softmax(-1)
            found += hit.float().mean().item() * q.shape[0]
            mass += (w * hit).sum(-1).mean().item() * q.shape[0]
    return found / x.shape[0], mass / x.shape[0]


def bench_search_precision(args, layer, x, q, gy, opts, add) -> None:
    """The search with bf16-ranked half scores (``search_precision=bf16``) beside fp32:
    its top-k alone, the whole step with it, and its recall for the layer's queries."""

    def topk_bf16():
        s, _ = product_key_topk(q, layer.router.keys, args.topk, impl="triton", precision="bf16")
        torch.autograd.grad(s, (q, layer.router.keys), torch.ones_like(s))

    add("    product_key_topk (fwd+bwd), precision=bf16", timed(topk_bf16))
    rows, weight = search_recall(layer, x)
    layer.router.search_precision = "bf16"
    try:
        add(
            "Memory+ step, search_precision=bf16 (first value optimizer)",
            timed(lambda: train_step(layer, x, gy, opts)),
            f"recall on these queries: {100 * rows:.2f}% of the exact top-k rows, "
            f"{100 * weight:.2f}% of their softmax weight",
        )
    finally:
        layer.router.search_precision = "fp32"


def bench_search(args, q, keys, add) -> None:
    """The product-key search alone: PyTorch's three top-k passes against the fused
    kernel, forward and forward+backward, and the kernel's launch parameters."""
    from memlayers.ops import product_keys_triton as pkt

    keys = keys.detach().requires_grad_()
    for impl in ("torch", "triton"):

        def fwd(impl=impl):
            with torch.no_grad():
                product_key_topk(q, keys, args.topk, impl=impl)

        def fwd_bwd(impl=impl):
            s, _ = product_key_topk(q, keys, args.topk, impl=impl)
            torch.autograd.grad(s, (q, keys), torch.ones_like(s))

        add(f"    search impl={impl}: forward", timed(fwd))
        add(f"    search impl={impl}: forward+backward", timed(fwd_bwd))
    with torch.no_grad():
        s1, s2 = pkt._half_scores(q, keys)  # [H, T, n_keys] in the score dtype (fp32)
        add("    half-key score matmuls (cuBLAS)", timed(lambda: pkt._half_scores(q, keys)))
        # Ranking every key of a row (bitonic top-k over n_keys, the kernel before the
        # filter) against the filter (group bound, compaction, top-k of <= cap keys).
        for filt, rows, warps in [(False, 1, 8), (True, 1, 8), (True, 1, 4), (True, 1, 2),
                                  (True, 1, 1), (True, 2, 2)]:  # fmt: skip
            fn = lambda f=filt, r=rows, w=warps: pkt.topk_launch(
                s1, s2, args.topk, r, w, filter_keys=f
            )
            what = "filter" if filt else "rank all keys"
            add(f"    top-k kernel, {what}, ROWS={rows} warps={warps} ({s1.dtype})", timed(fn))
        # What bf16 scores would cost: 32-bit keys with the index in the zero low bits.
        b1, b2 = s1.bfloat16(), s2.bfloat16()
        fn = lambda: pkt.topk_launch(b1, b2, args.topk, 1, 4, True)
        add("    top-k kernel, rank all keys, ROWS=1 warps=4 (bf16 scores, narrow keys)", timed(fn))
        # The backward's first step: each half key's score gradient, by the kernel against
        # what it replaced (fp32 zeros, scatter_add, cast, the matmul's transpose copy).
        _, _, i1, i2 = pkt.topk_launch(s1, s2, args.topk)
        shape = (q.shape[0], args.heads, args.topk)
        i1, i2 = i1.view(shape), i2.view(shape)
        ds = torch.randn(shape, device=q.device)
        nk = keys.shape[2]

        def scatter():
            for idx in (i1, i2):
                d = ds.new_zeros(*shape[:-1], nk).scatter_add_(-1, idx.long(), ds)
                d.to(q.dtype).transpose(0, 1).contiguous()

        add("    score grad: scatter_add (before)", timed(scatter))
        fn = lambda: pkt.dense_score_grad(ds, i1, i2, q, nk)
        add("    score grad: kernel", timed(fn))


def bench_torch_layer(args, x, gy, add, device, dtype, sparse_grad: bool) -> float:
    layer, values, vopt, ropt = build(args, "torch", sparse_grad, device, dtype)
    name, note = "Memory+ step, impl=torch (sparse grad, lazy Adam reference)", ""
    if not sparse_grad:
        name = "Memory+ step, impl=torch (dense grad, AdamW fused on values)"
        note = "bf16 moments (fused AdamW keeps the param dtype)"
    return add(name, timed(lambda: train_step(layer, x, gy, (vopt, ropt)), rep_ms=300), note)


def bench_ffn(args, x, gy, add, device, dtype) -> tuple[float, float | None]:
    """The SwiGLU FFN the layer replaces (Llama hidden size 8/3·dim rounded to 256): its
    step, and compiled with ``--compile`` (None without)."""
    from memlayers.model import SwiGLU

    hidden = 256 * -(-int(8 * args.dim / 3) // 256)
    ffn = SwiGLU(args.dim, hidden).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(ffn.parameters(), lr=1e-4, fused=device.type == "cuda")
    fn = lambda: train_step(ffn, x, gy, (opt,))
    t = add(f"SwiGLU FFN step (hidden {hidden})", timed(fn))
    if not args.compile:
        return t, None
    return t, add("SwiGLU FFN step, compiled", timed_compiled(ffn, x, gy, (opt,)))


def bench_shared_table(args, add, device) -> dict:
    """Memory+'s three layers read one value table: autograd adds their row-sparse
    gradients by concatenation, and the optimizer (and gradient clipping) must sum the
    repeated rows. One lookup against three, each forward + backward into ``.grad``, then
    the coalesce and the lazy Adam step, with ``Tensor.coalesce`` against
    :func:`memlayers.value_optim.coalesce_rows` (uniform lookups: the rows of three
    layers overlap as at init)."""
    n, d, b = args.n_keys**2, args.dim, args.tokens
    dtype = torch.float32 if args.table_dtype == "fp32" else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(2)
    table = torch.randn(n, d, device=device, generator=g).to(dtype).requires_grad_()
    bag = args.heads * args.topk
    idx = [torch.randint(0, n, (b, bag), device=device, generator=g) for _ in range(3)]
    w = [torch.rand(b, bag, device=device, generator=g).softmax(-1) for _ in range(3)]
    gy = torch.randn(b, d, device=device, generator=g).to(dtype)
    tag = f"shared table {n}×{d} {args.table_dtype}, {b}×{bag}"

    def lookups(count):
        table.grad = None
        ys = [embedding_bag(table, idx[i], w[i], sparse_grad=True) for i in range(count)]
        torch.autograd.backward(ys, [gy] * count)

    out = {"one": add(f"{tag}: 1 lookup fwd+bwd", timed(lambda: lookups(1)))}
    out["three"] = add(f"{tag}: 3 lookups fwd+bwd (concatenated grad)", timed(lambda: lookups(3)))
    # What one walk over all three layers' lookups would cost (no concatenation, no
    # coalesce): one lookup of 3·B bags.
    idx3, w3, gy3 = torch.cat(idx), torch.cat(w), gy.repeat(3, 1)

    def merged():
        table.grad = None
        embedding_bag(table, idx3, w3, sparse_grad=True).backward(gy3)

    out["merged"] = add(f"{tag}: 1 lookup of 3×{b} bags fwd+bwd (a merged walk)", timed(merged))
    lookups(3)
    grad = table.grad
    m = grad._nnz()
    out["coalesce"] = add(f"{tag}: Tensor.coalesce() of the sum", timed(grad.coalesce),
                          note=f"{m} rows in")  # fmt: skip
    uncoalesced = lambda: coalesce_rows(torch.sparse_coo_tensor(  # noqa: E731
        grad._indices(), grad._values(), grad.shape, check_invariants=False))  # fmt: skip
    out["coalesce_rows"] = add(f"{tag}: coalesce_rows() of the sum", timed(uncoalesced))
    opt = SparseValueAdam([table], lr=1e-3)

    def step():
        table.grad = torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape,
                                             check_invariants=False)  # fmt: skip
        opt.step()

    out["step"] = add(f"{tag}: lazy Adam step on the sum (coalesce_rows inside)", timed(step))

    def whole(count):
        lookups(count)
        opt.step()

    out["whole1"] = add(f"{tag}: 1 lookup fwd+bwd + Adam step", timed(lambda: whole(1)))
    out["whole3"] = add(f"{tag}: 3 lookups fwd+bwd + Adam step", timed(lambda: whole(3)))
    # The merged backward's per-layer part: the score gradient alone, the shipped launch
    # (embedding_bag_triton.SCORE_GRAD_*) and whole-row launches (rows per sum, warps).
    from memlayers.ops.embedding_bag_triton import score_grad

    t = table.detach()
    add(f"{tag}: score grad alone, shipped launch", timed(lambda: score_grad(t, idx[0], gy)))
    for chunk, warps in [(1, 4), (8, 4), (8, 8), (4, 4), (16, 8), (2, 2)]:
        fn = lambda c=chunk, w=warps: score_grad(t, idx[0], gy, c, w, split=1, block_d=None)  # noqa: E731
        add(f"{tag}: score grad alone, {chunk} rows per sum, {warps} warps", timed(fn))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--n-keys", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument(
        "--shared",
        action="store_true",
        help="only the shared-table case: 1 vs 3 lookups into one table",
    )
    p.add_argument("--table-dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--sweep", action="store_true", help="search breakdown and launch sweep")
    p.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the impl=torch steps (at D = 4096 their temporaries do not fit on a card)",
    )
    p.add_argument(
        "--value-optimizers", nargs="+", default=["sparse_adam"], choices=list(VALUE_OPTIMIZERS),
        help="the value table's lazy Adam (the first in the whole step and the ratio; the "
        "others timed beside it: their step and the whole step with them)",
    )  # fmt: skip
    p.add_argument(
        "--compile", action="store_true",
        help="also time the layer's and the FFN's whole step with each under torch.compile",
    )  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter)")
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args()
    if args.smoke:
        args.dim, args.n_keys, args.heads, args.topk, args.tokens = 64, 16, 2, 4, 32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = card_name(device)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype)
    gy = torch.randn(args.tokens, args.dim, device=device, dtype=dtype)
    rows = []

    def add(name, ms, note=""):
        rows.append((name, ms, note))
        print(f"  {name:<62} {ms:9.3f} ms  {note}", flush=True)
        return ms

    def release():
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.shared:
        sh = bench_shared_table(args, add, device)
        lines = [
            f"Card: {card}; torch {torch.__version__}.", "",
            "| step | ms | note |", "|---|---|---|",
            *[f"| {n.strip()} | {ms:.3f} | {note} |" for n, ms, note in rows], "",
            f"3 lookups ÷ 1 lookup, fwd+bwd: {sh['three'] / sh['one']:.2f}; with the Adam step "
            f"(coalesce_rows): {sh['whole3'] / sh['whole1']:.2f}; "
            f"coalesce() ÷ coalesce_rows(): {sh['coalesce'] / sh['coalesce_rows']:.1f}",
        ]  # fmt: skip
        report("\n".join(lines), args.out)
        return
    t_tri, t_tri_c = bench_triton_layer(args, x, gy, add, device, dtype)
    release()
    t_torch = t_torch_dense = None
    if not args.no_reference:
        t_torch = bench_torch_layer(args, x, gy, add, device, dtype, sparse_grad=True)
        release()
        t_torch_dense = bench_torch_layer(args, x, gy, add, device, dtype, sparse_grad=False)
        release()
    t_ffn, t_ffn_c = bench_ffn(args, x, gy, add, device, dtype)
    vs_torch = [] if t_torch is None else [
        f"| Memory+ triton vs impl=torch, same config (≥6×) | {t_torch / t_tri:.1f}× |",
        f"| Memory+ triton vs impl=torch dense + AdamW | {t_torch_dense / t_tri:.1f}× |",
    ]  # fmt: skip

    lines = [
        f"Card: {card}; torch {torch.__version__}; dim {args.dim}, {args.n_keys}² values, "
        f"{args.heads} heads × top-{args.topk}, {args.tokens} tokens, bf16 parameters.",
        "",
        "| step (forward + backward + optimizer) | ms | note |",
        "|---|---|---|",
        *[f"| {n.strip()} | {ms:.3f} | {note} |" for n, ms, note in rows],
        "",
        "| ratio | value |",
        "|---|---|",
        *vs_torch,
        f"| Memory+ triton step / SwiGLU FFN step | {t_tri / t_ffn:.2f} |",
        *([] if t_tri_c is None else [
            f"| the same, both compiled | {t_tri_c / t_ffn_c:.2f} |"]),
    ]  # fmt: skip
    text = "\n".join(lines)
    report(text, args.out)


if __name__ == "__main__":
    main()
