"""Benchmark the training loss (the output head and cross-entropy, chunked) at a trainer's
shape: its forward + backward as the trainer runs it (bf16 autocast), by chunk size and
with the head's weight gradient summed two ways (one GEMM adding into the fp32 sum, or a
product then an add), beside the unchunked ``F.cross_entropy(F.linear(h, W).float())``.

    python benchmarks/bench_loss.py                     # 32 × 1024 tokens, D 768, V 32k
    python benchmarks/bench_loss.py --tokens 16384 --dim 1024 --out results.md
    python benchmarks/bench_loss.py --smoke             # CPU: code paths only

Every variant computes the same loss and gradients (to the rounding of bf16 products and
fp32 sums in another order); the table says how far each is from the first.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F
from timing import Table, card_name, report, timed

from memlayers import loss as loss_mod


@contextlib.contextmanager
def product_then_add():
    """The head's weight gradient summed as before: a bf16 product, then an add."""
    saved = loss_mod.accumulate_mm_
    loss_mod.accumulate_mm_ = lambda acc, a, b: acc.add_(a @ b)
    try:
        yield
    finally:
        loss_mod.accumulate_mm_ = saved


def step(h, w, targets, chunk):
    """Forward and backward of the chunked loss under autocast; the two gradients."""
    h.grad = w.grad = None
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=h.is_cuda):
        loss = loss_mod.linear_cross_entropy(h, w, targets, chunk=chunk)
    loss.backward()
    return loss, h.grad, w.grad


def unchunked(h, w, targets):
    h.grad = w.grad = None
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=h.is_cuda):
        loss = F.cross_entropy(F.linear(h, w).float(), targets)
    loss.backward()
    return loss, h.grad, w.grad


def diffs(out, ref) -> str:
    """Relative differences of (loss, h's gradient, W's gradient) from ``ref``'s."""
    rel = [float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))
           for a, b in zip(out, ref, strict=True)]  # fmt: skip
    return ", ".join(f"{k} {r:.1e}" for k, r in zip("LHW", rel, strict=True))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=32 * 1024)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunks", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--no-unchunked", action="store_true", help="skip F.cross_entropy")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.dim, args.vocab, args.chunks = 96, 16, 50, [32, 64]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(args.tokens, args.dim, device=device, generator=g, requires_grad=True)
    w = (torch.randn(args.vocab, args.dim, device=device, generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=g)
    table = Table()
    ref = None
    for chunk in args.chunks:
        for name, ctx in (("one GEMM into the fp32 sum", contextlib.nullcontext),
                          ("product, then add", product_then_add)):  # fmt: skip
            with ctx():
                out = [t.detach().clone() for t in step(h, w, targets, chunk)]
                ms = timed(lambda chunk=chunk: step(h, w, targets, chunk))
            ref = ref or out
            diff = diffs(out, ref)
            table.add(f"chunk {chunk}: {name}", ms, None, f"rel. diff to the first: {diff}")
    if not args.no_unchunked:
        with contextlib.suppress(torch.OutOfMemoryError):
            out = [t.detach().clone() for t in unchunked(h, w, targets)]
            diff = diffs(out, ref)
            table.add("F.cross_entropy(F.linear(h, W).float()), unchunked",
                      timed(lambda: unchunked(h, w, targets)), None, diff)  # fmt: skip
    text = (f"Card: {card_name(device)}; {args.tokens} tokens, D {args.dim}, V {args.vocab}, "
            f"bf16 autocast; forward + backward.\n\n" + table.markdown())  # fmt: skip
    report(text, args.out)


if __name__ == "__main__":
    main()
