"""Benchmark one training step of the whole Memory+ layer: query, product-key search,
value lookup, gating; forward + backward + optimizer steps (lazy Adam on the value table,
fused AdamW on the rest). Triton path against the same layer with ``impl="torch"``, and
against the SwiGLU FFN it replaces at the same dim and tokens, all in one run.

    python benchmarks/bench_memory_layer.py                    # one GPU, paper shape
    python benchmarks/bench_memory_layer.py --out results.md
    python benchmarks/bench_memory_layer.py --compile           # + both steps compiled
    python benchmarks/bench_memory_layer.py --dim 4096 --no-reference --compile  # the 8B width
    python benchmarks/bench_memory_layer.py --compile --no-reference --profile 25  # op tables
    python benchmarks/bench_memory_layer.py --shared --dim 768 --tokens 8192 --table-dtype fp32
    TRITON_INTERPRET=1 python benchmarks/bench_memory_layer.py --smoke   # CPU: code paths

``--compile`` adds the whole step of the layer and of the FFN with each module under
``torch.compile`` (the optimizers eager), as the trainer runs its blocks on a GPU
(``compile`` null: on CUDA), and their ratio beside the eager one: the layer's custom ops
stay whole in its graph, the gating and norms around them fuse, as the FFN's do.

Paper shape (docs/method.md §1): dim 1024, 1024² = 1,048,576 value rows of 1024 (bf16), 4 heads
× top-32, k_dim 512, 16,384 tokens; every parameter bf16. The layer is built from the
memory+ presets' memory config (:data:`PRESET`'s: qk-norm, swilu, batch-normalised
queries, the balance loss at 0.1, whose gradient each step adds as the trainer's loss
does) with the shape given here; its value table steps with the presets' value optimizer
(bf16 moments, the fp32 master kept split) unless ``--value-optimizers`` says otherwise.

Memory+ shares one value table over its three layers, and the value step runs once a
training step for all three: the ratio to the FFN is given with this layer's whole value
step and with a third of it (the layer's share; the shared step covers the union of
three layers' rows, so its share is a little more than a third of one layer's step).

The FFN: SwiGLU with hidden size ``--ffn-hidden``, by default :func:`ffn_hidden`'s rule:
at D = 4096 the paper's 8B (Llama 3's: 8/3·d × 1.3 rounded up to 1024 = 14,336, as
``scaling_model.PAPER_8B``), at other widths the presets' Llama rule (8/3·d rounded up
to 256: 2,816 at D = 1024, 11,008 at 4096).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from profile_step import at_least, profile_ops
from timing import card_name, report, runs_note, runs_of, timed

from memlayers import MemoryValues, ProductKeyMemory, SparseValueAdam, get_preset
from memlayers.ops import embedding_bag
from memlayers.ops.product_keys import product_key_topk
from memlayers.value_optim import coalesce_rows

# The preset whose memory config the layer takes (every paper memory+ preset has the same).
PRESET = "134m-memory+"
# The paper's 8B (Llama 3 8B's shape): its FFN's hidden size at its width, by Llama 3's
# rule (8/3·d × 1.3 rounded up to 1024; scaling_model.PAPER_8B's too).
PAPER_8B_DIM = 4096
PAPER_8B_FFN = 1024 * math.ceil(int(1.3 * int(8 * PAPER_8B_DIM / 3)) / 1024)  # 14,336

# --value-optimizers: the lazy row Adam variants of memlayers.optim's value_optimizer.
VALUE_OPTIMIZERS = {
    "sparse_adam": {},
    "sparse_adam_bf16": {"moments": "bf16"},
    "sparse_adam_rowwise": {"rowwise_v": True},
    # The paper presets' step before 2026-12-06 (bf16 moments, optim.value_master): an
    # fp32 master copy of the bf16 table.
    "sparse_adam_bf16+master": {"moments": "bf16", "master": True},
    # The presets' step now: the same master split, the table and int16 remainders
    # (optim.value_master_split).
    "sparse_adam_bf16+split": {"moments": "bf16", "master": "split"},
}
# The presets' (presets.PRESET_OPTIM: optim.value_optimizer=sparse_adam_bf16 with
# optim.value_master and optim.value_master_split on by default).
PRESET_VALUE_OPTIMIZER = "sparse_adam_bf16+split"


def ffn_hidden(dim: int, override: int | None = None) -> int:
    """The SwiGLU FFN's hidden size the layer is compared with: ``override`` if given; at
    D = 4096 the paper's 8B's (Llama 3: ``8/3·d × 1.3`` rounded up to 1024 = 14,336); at
    other widths the presets' Llama rule (``8/3·d`` rounded up to 256,
    ``ModelConfig.hidden_dim``)."""
    if override is not None:
        return override
    if dim == PAPER_8B_DIM:
        return PAPER_8B_FFN
    return 256 * math.ceil(int(8 * dim / 3) / 256)


def ffn_rule(dim: int, override: int | None = None) -> str:
    """How :func:`ffn_hidden` chose the size, for the table."""
    if override is not None:
        return "--ffn-hidden"
    if dim == PAPER_8B_DIM:
        return "the paper's 8B: Llama 3's 8/3·d × 1.3 rounded to 1024"
    return "the presets' Llama rule: 8/3·d rounded to 256"


def memory_config(args, impl: str, dtype: torch.dtype = torch.bfloat16):
    """The memory+ presets' memory config (:data:`PRESET`) with this run's shape,
    ``impl`` and table ``dtype`` (the presets': bf16): batch-normalised queries and the
    balance loss as the presets train."""
    base = get_preset(PRESET).memory
    value_dtype = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    return dataclasses.replace(
        base, n_keys=args.n_keys, heads=args.heads, topk=args.topk, impl=impl,
        value_dtype=value_dtype,
    )  # fmt: skip


def value_adam(weight, name: str, impl: str) -> SparseValueAdam:
    """The value table's lazy Adam as ``optim.value_optimizer=name`` builds it."""
    return SparseValueAdam([weight], lr=1e-3, impl=impl, **VALUE_OPTIMIZERS[name])


def build(args, impl: str, sparse_grad: bool, device, dtype):
    cfg = memory_config(args, impl, dtype)
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


def with_aux(outputs, grads, layer) -> tuple[list, list]:
    """``outputs`` and ``grads`` with the memory layer's balance loss of its last forward
    (``take_aux_loss``: as the trainer's loss adds it) and its gradient 1, if it has one."""
    layer = getattr(layer, "_orig_mod", layer)  # a torch.compile'd layer's module
    outputs, grads = list(outputs), list(grads)
    if isinstance(layer, ProductKeyMemory):
        aux = layer.take_aux_loss()
        if aux.requires_grad:
            outputs.append(aux)
            grads.append(torch.ones_like(aux))
    return outputs, grads


def aux_backward(outputs, grads, layer) -> None:
    """``backward`` of ``outputs`` with ``grads``, and of the layer's balance loss
    (:func:`with_aux`)."""
    torch.autograd.backward(*with_aux(outputs, grads, layer))


def train_step(layer, x, gy, opts):
    out = layer(x)
    aux_backward([out], [gy], layer)
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)


def value_step_fn(values, grad, opt):
    """One value optimizer step on ``grad``, as a training step gets it: each call a fresh
    alias of its rows not flagged coalesced (what autograd's accumulation hands over), so
    each pays the sortedness check of :func:`memlayers.value_optim.coalesce_rows` as a
    real step does, not only the first (which would flag ``grad`` itself)."""

    def step():
        values.weight.grad = torch.sparse_coo_tensor(
            grad._indices(), grad._values(), grad.shape, check_invariants=False
        )
        opt.step()

    return step


def search_inputs(layer, x) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's own search inputs for ``x``: its normalised queries (projection, batch
    norm, qk-norm) and normalised half keys, as leaves that take a gradient."""
    with torch.no_grad():
        q = layer.router.normed_query(x.reshape(-1, layer.dim))
        keys = layer.router.normed_keys()
    return q.detach().requires_grad_(), keys.detach().requires_grad_()


def topk_fn(layer, q, keys, topk: int, precision: str = "fp32"):
    """``product_key_topk`` forward + backward on ``(q, keys)`` as the layer runs it
    (its half-key choices too, when its balance loss needs them)."""
    half_top = layer.training and layer.config.balance_loss > 0

    def fn():
        out = product_key_topk(q, keys, topk, "triton", half_top=half_top, precision=precision)
        s = out[0]
        torch.autograd.grad(s, (q, keys), torch.ones_like(s))

    return fn


# ``--profile N``: op tables (by self device time, N ops) of parts of the layer's step,
# by what was profiled; printed and written after the timing tables.
PROFILES: dict[str, str] = {}


def timed_compiled(module, x, gy, opts, profile: int = 0) -> float:
    """:func:`timed` of a step with ``module`` under ``torch.compile`` (its compilation in
    two untimed steps first: the first compiles, the second checks nothing recompiles);
    ``profile``: also its op table (that many ops) into :data:`PROFILES`."""
    compiled = torch.compile(module)
    fn = lambda: train_step(compiled, x, gy, opts)
    fn()
    fn()
    if profile:
        name = f"the whole step of {type(module).__name__}, compiled"
        PROFILES[name] = profile_ops(fn, 3, profile)[1]
    return timed(fn)


def bench_triton_layer(args, x, gy, add, device, dtype) -> dict:
    """The whole Triton step (and compiled with ``--compile``), then each part alone
    (forward + backward, or the step). Returns the ms of the step (``step``), of the
    compiled step (``compiled``, None without ``--compile``) and of the first value
    optimizer's step alone (``value_step``)."""
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

    def search_part(lookup=layer.lookup):
        idx, w = lookup(x)
        outs, grads = with_aux([w], [torch.ones_like(w)], layer)  # + the balance loss's
        torch.autograd.grad(outs, params, grads, allow_unused=True)

    add("  part: query + norms + product-key search + balance loss (fwd+bwd)", timed(search_part))
    if args.profile:
        PROFILES["the search part (query + norms + search + balance loss), eager"] = profile_ops(
            search_part, 3, args.profile
        )[1]
    # The search op on the layer's own normalised queries and keys (a training forward's).
    q, keys = search_inputs(layer, x)
    add("    of which product_key_topk (fwd+bwd, the layer's normed q and keys)",
        timed(topk_fn(layer, q, keys, args.topk)))  # fmt: skip
    bench_search_precision(args, layer, x, q, keys, gy, (vopt, ropt), add)
    if args.sweep:
        bench_search(args, q, keys, add)
    idx, w = (t.detach() for t in layer.lookup(x))
    layer.take_aux_loss()  # not trained here
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

    value_ms = None
    for name in args.value_optimizers:
        opt = vopt if name == first else value_adam(values.weight, name, "triton")
        ms = add(
            f"  part: value lazy Adam step ({name})",
            timed(value_step_fn(values, grad, opt)),
            f"{grad._nnz()} of {values.n_rows} rows touched",
        )
        value_ms = ms if value_ms is None else value_ms
    values.weight.grad = None
    for prm in params:
        prm.grad = torch.zeros_like(prm)
    add("  part: AdamW(fused) on the other parameters", timed(ropt.step))
    reads = {}
    if not args.no_value_read:
        reads = bench_value_read(args, layer, values, x, gy, (vopt, ropt), idx, w, gyv, grad, add)
    t_compiled = None
    if args.compile:  # last, so nothing compiled runs before the eager parts are timed
        t_compiled = add("Memory+ step, compiled (torch.compile of the layer)",
                         timed_compiled(layer, x, gy, (vopt, ropt), args.profile))  # fmt: skip
        # The search part as the trainer runs it: its forward compiled (the norms fused
        # around the search's custom ops), the backward AOTAutograd's.
        search_compiled = functools.partial(search_part, torch.compile(layer.lookup))
        search_compiled()  # compiles
        add("  part: query + norms + search + balance loss, compiled (fwd+bwd)",
            timed(search_compiled))  # fmt: skip
    return {"step": t, "compiled": t_compiled, "value_step": value_ms, "reads": reads}


def bench_value_read(args, layer, values, x, gy, opts, idx, w, gyv, grad, add) -> dict:
    """The int8 read copy (``value_read=int8``, memlayers/ops/read_copy.py) beside the
    table's rows, on the same layer and table. Both with merged gradients, as the
    presets' shared table trains (the score gradient its own pass, the walk without it),
    so that the two differ only in what the lookups read: the whole step each way, the
    lookup alone each way, and the packing of the stepped rows after the value step;
    then the walk reading int8 output gradients (``grad_read=int8``) beside the float
    one. Returns the ms of the steps (``table``, ``int8``, ``int8_walk`` with both;
    ``int8_compiled`` with ``--compile``) and of the packing (``pack``)."""
    out = {}
    from memlayers.merged_grad import MergedValueGrad, read_copy_lookup
    from memlayers.ops.embedding_bag import embedding_bag_grads
    from memlayers.ops.read_copy import (
        READ_COPY,
        ReadCopy,
        pack_rows,
        requantize_rows_,
        value_grad_packed,
    )

    values.merged = MergedValueGrad()
    try:
        out["table"] = add("Memory+ step, merged grads (the presets' shared table), table reads",
                           timed(lambda: train_step(layer, x, gy, opts)))  # fmt: skip
        values.read_copy = ReadCopy()
        note = "reads an int8 copy (a bf16 scale a row), packed again after each step"
        out["int8"] = add("Memory+ step, merged grads, value_read=int8",
                          timed(lambda: train_step(layer, x, gy, opts)), note)  # fmt: skip
        values.merged = MergedValueGrad("int8")
        out["int8_walk"] = add(
            "Memory+ step, merged grads, value_read=int8 + grad_read=int8",
            timed(lambda: train_step(layer, x, gy, opts)),
            "the walk also reads the output gradient as int8 rows",
        )
        values.merged = MergedValueGrad()
        packed = values.read_copy.rows(values.weight)

        def lookup(read, grad_read="float"):
            merged = MergedValueGrad(grad_read)

            def fn():
                y = merged.lookup(values.weight, idx, w, "triton", read)
                torch.autograd.backward([y], [gyv])
                values.weight.grad = None

            return fn

        add("  part: value lookup, merged grads (fwd+bwd), table reads", timed(lookup(None)))
        add("  part: value lookup, merged grads (fwd+bwd), int8 reads", timed(lookup(packed)))
        add("  part: value lookup, merged grads (fwd+bwd), int8 reads + int8 walk",
            timed(lookup(packed, "int8")))  # fmt: skip
        g = gyv.contiguous()
        table_walk = functools.partial(embedding_bag_grads, values.weight.detach(), idx, w, g,
                                       True, False, "triton", True)  # fmt: skip
        int8_walk = functools.partial(value_grad_packed, values.weight.detach(), idx, w,
                                      pack_rows(g, "triton"), "triton")  # fmt: skip
        with torch.no_grad():
            add("    of which the walk, float output gradient", timed(table_walk))
            add("    of which the walk, int8 output gradient", timed(int8_walk))
            add("    packing the output gradient", timed(lambda: pack_rows(g, "triton")))
        table_fwd = functools.partial(embedding_bag, values.weight, idx, w, impl="triton")
        int8_fwd = functools.partial(read_copy_lookup, values.weight, packed, idx, w, "triton")
        with torch.no_grad():
            add("    of which the forward, table reads", timed(table_fwd))
            add("    of which the forward, int8 reads", timed(int8_fwd))
        rows = grad._indices()[0]
        out["pack"] = add("  part: packing the stepped rows into the int8 copy",
                          timed(lambda: requantize_rows_(packed, values.weight.detach(), rows,
                                                         "triton")),
                          f"{rows.numel()} rows")  # fmt: skip
        if args.compile:  # after this function's eager parts
            out["int8_compiled"] = add("Memory+ step, merged grads, value_read=int8, compiled",
                                       timed_compiled(layer, x, gy, opts))  # fmt: skip
    finally:
        values.merged, values.read_copy = None, None
        values.weight.grad = None
        # The optimizer finds the copy on the parameter: gone, or the later steps would
        # still pack rows after each value step.
        if hasattr(values.weight, READ_COPY):
            delattr(values.weight, READ_COPY)
    return out


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


def bench_search_precision(args, layer, x, q, keys, gy, opts, add) -> None:
    """The search with bf16-ranked half scores (``search_precision=bf16``) beside fp32:
    its top-k alone (on the layer's normed ``q`` and ``keys``), the whole step with it,
    and its recall for the layer's queries."""
    add("    product_key_topk (fwd+bwd), precision=bf16",
        timed(topk_fn(layer, q, keys, args.topk, "bf16")))  # fmt: skip
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


def bench_torch_layer(args, x, gy, add, device, dtype, sparse_grad: bool, missing: list):
    """The layer's step with ``impl="torch"``: ms, or None (the reason appended to
    ``missing``) when the card cannot hold the reference's temporaries at this shape
    (the presets' bf16-moment step draws its rounding noise as int64 tensors)."""
    name, note = "Memory+ step, impl=torch (sparse grad, lazy Adam reference)", ""
    if not sparse_grad:
        name = "Memory+ step, impl=torch (dense grad, AdamW fused on values)"
        note = "bf16 moments (fused AdamW keeps the param dtype)"
    try:
        layer, values, vopt, ropt = build(args, "torch", sparse_grad, device, dtype)
        fn = lambda: train_step(layer, x, gy, (vopt, ropt))
        return add(name, timed(fn, rep_ms=300), note)
    except torch.OutOfMemoryError as e:
        first = str(e).split(". ")[0]
        missing.append(f"{name}: not timed, out of memory on this card ({first})")
        print(f"  {missing[-1]}", flush=True)
        return None


def bench_ffn(args, x, gy, add, device, dtype) -> tuple[float, float | None]:
    """The SwiGLU FFN the layer replaces (hidden size :func:`ffn_hidden`): its step, and
    compiled with ``--compile`` (None without)."""
    from memlayers.model import SwiGLU

    hidden = ffn_hidden(args.dim, args.ffn_hidden)
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=at_least(1), default=1024)
    p.add_argument("--n-keys", type=at_least(1), default=1024)
    p.add_argument("--heads", type=at_least(1), default=4)
    p.add_argument("--topk", type=at_least(1), default=32)
    p.add_argument("--tokens", type=at_least(1), default=16384)
    p.add_argument(
        "--ffn-hidden", type=at_least(1), default=None,
        help="the SwiGLU FFN's hidden size (default: 14,336 at --dim 4096, the paper's 8B; "
        "8/3·dim rounded up to 256 otherwise)",
    )  # fmt: skip
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
        "--value-optimizers", nargs="+", default=[PRESET_VALUE_OPTIMIZER],
        choices=list(VALUE_OPTIMIZERS),
        help="the value table's lazy Adam (the first in the whole step and the ratio; the "
        "others timed beside it: their step and the whole step with them); default the "
        "presets' (bf16 moments, the fp32 master split)",
    )  # fmt: skip
    p.add_argument(
        "--compile", action="store_true",
        help="also time the layer's and the FFN's whole step with each under torch.compile",
    )  # fmt: skip
    p.add_argument(
        "--profile", type=at_least(1), default=0, metavar="N",
        help="also torch.profiler op tables (N ops, by self device time) of the search part "
        "(eager) and, with --compile, of the layer's compiled step, after the timings",
    )  # fmt: skip
    p.add_argument("--no-value-read", action="store_true",
                   help="skip the int8 read copy's rows (value_read=int8)")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter)")
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args(argv)
    if args.smoke:
        args.dim, args.n_keys, args.heads, args.topk, args.tokens = 64, 16, 2, 4, 32
    if args.topk > args.n_keys:
        p.error(f"--topk {args.topk} must be <= --n-keys {args.n_keys}")
    return args


def ratio_rows(args, tri: dict, t_ffn: float, t_ffn_c: float | None) -> list[str]:
    """The ratio table's rows of the layer's step to the FFN's: with the layer's whole
    value step, and with a third of it (Memory+'s three layers share one table and one
    value step a training step); compiled too when timed."""
    hidden = ffn_hidden(args.dim, args.ffn_hidden)
    share = tri["step"] - tri["value_step"] * 2 / 3  # the step with a third of its value step
    rows = [
        f"| Memory+ triton step / SwiGLU FFN step (hidden {hidden}), the whole value step "
        f"| {tri['step'] / t_ffn:.2f} |",
        f"| the same with a third of the value step (one table and one step shared by "
        f"Memory+'s 3 layers: {share:.3f} ms) | {share / t_ffn:.2f} |",
    ]
    if tri["compiled"] is not None and t_ffn_c is not None:
        share_c = tri["compiled"] - tri["value_step"] * 2 / 3
        rows += [
            f"| the same, both compiled, the whole value step | {tri['compiled'] / t_ffn_c:.2f} |",
            f"| both compiled, a third of the (eager) value step | {share_c / t_ffn_c:.2f} |",
        ]
    reads = tri.get("reads") or {}
    if reads:
        rows.append(
            f"| merged-grad step reading the int8 copy / reading the table (eager) "
            f"| {reads['int8'] / reads['table']:.3f} |"
        )
        rows.append(
            f"| the same reading int8 output gradients in the walk too (grad_read=int8) / "
            f"reading the table (eager) | {reads['int8_walk'] / reads['table']:.3f} |"
        )
    if "int8_compiled" in reads and t_ffn_c is not None:
        # The packing runs once a training step for the shared table, as the value step.
        share_i = reads["int8_compiled"] - (tri["value_step"] + reads["pack"]) * 2 / 3
        rows += [
            f"| value_read=int8, merged grads, compiled / SwiGLU FFN compiled, the whole "
            f"value step | {reads['int8_compiled'] / t_ffn_c:.2f} |",
            f"| the same, a third of the (eager) value step and of the packing "
            f"| {share_i / t_ffn_c:.2f} |",
        ]
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = card_name(device)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype)
    gy = torch.randn(args.tokens, args.dim, device=device, dtype=dtype)
    rows = []

    def add(name, ms, note=""):
        rows.append((name, ms, note))
        print(f"  {name:<62} {ms:9.3f} ms{runs_note(ms)}  {note}", flush=True)
        return ms

    def table_rows() -> list[str]:
        out = ["| step | ms | runs | IQR | note |", "|---|---|---|---|---|"]
        for n, ms, note in rows:
            runs, iqr = runs_of(ms)
            out.append(f"| {n.strip()} | {ms:.3f} | {runs} | {iqr} | {note} |")
        return out

    def release():
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.shared:
        sh = bench_shared_table(args, add, device)
        lines = [
            f"Card: {card}; torch {torch.__version__}.", "",
            *table_rows(), "",
            f"3 lookups ÷ 1 lookup, fwd+bwd: {sh['three'] / sh['one']:.2f}; with the Adam step "
            f"(coalesce_rows): {sh['whole3'] / sh['whole1']:.2f}; "
            f"coalesce() ÷ coalesce_rows(): {sh['coalesce'] / sh['coalesce_rows']:.1f}",
        ]  # fmt: skip
        report("\n".join(lines), args.out)
        return
    tri = bench_triton_layer(args, x, gy, add, device, dtype)
    t_tri = tri["step"]
    release()
    t_torch = t_torch_dense = None
    missing = []
    if not args.no_reference:
        t_torch = bench_torch_layer(args, x, gy, add, device, dtype, True, missing)
        release()
        t_torch_dense = bench_torch_layer(args, x, gy, add, device, dtype, False, missing)
        release()
    t_ffn, t_ffn_c = bench_ffn(args, x, gy, add, device, dtype)
    vs_torch = []
    if t_torch is not None:
        vs_torch.append(f"| Memory+ triton vs impl=torch, same config | {t_torch / t_tri:.1f}× |")
    if t_torch_dense is not None:
        vs_torch.append(
            f"| Memory+ triton vs impl=torch dense + AdamW | {t_torch_dense / t_tri:.1f}× |"
        )
    mem = memory_config(args, "triton")
    hidden = ffn_hidden(args.dim, args.ffn_hidden)
    lines = [
        f"Card: {card}; torch {torch.__version__}; dim {args.dim}, {args.n_keys}² values, "
        f"{args.heads} heads × top-{args.topk}, {args.tokens} tokens, bf16 parameters; "
        f"the {PRESET} memory config (query_batch_norm={mem.query_batch_norm}, "
        f"balance_loss={mem.balance_loss}); value step {args.value_optimizers[0]}; "
        f"SwiGLU FFN hidden {hidden} ({ffn_rule(args.dim, args.ffn_hidden)}).",
        "",
        *table_rows(),
        *[f"\n{m}" for m in missing],
        "",
        "| ratio | value |",
        "|---|---|",
        *vs_torch,
        *ratio_rows(args, tri, t_ffn, t_ffn_c),
        *[f"\n## Profile: {name}\n\n```\n{table}\n```" for name, table in PROFILES.items()],
    ]  # fmt: skip
    text = "\n".join(lines)
    report(text, args.out)


if __name__ == "__main__":
    main()
