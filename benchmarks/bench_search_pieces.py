"""Where the product-key search's forward time goes, fp32 against bf16-ranked half scores
(``product_key_topk(..., precision="bf16")``, ``model.memory.search_precision=bf16``):
the two score products and the top-k launches, with the filter and key variants.

    python benchmarks/bench_search_pieces.py --out results.md     # one GPU, paper shape
    TRITON_INTERPRET=1 python benchmarks/bench_search_pieces.py --smoke   # CPU: code paths

Random bf16 queries and keys (std 1 and 1/sqrt(half)); every variant ranks the same
scores, so each pair of rows differs only in the launch.
"""

from __future__ import annotations

import argparse

import torch
from timing import card_name, report, timed

from memlayers.ops.product_keys_triton import TOPK_CAP, _half_scores, _half_tops, topk_launch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--n-keys", type=int, default=1024)
    p.add_argument("--half", type=int, default=256, help="half key width (k_dim / 2)")
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter)")
    p.add_argument("--out", help="write the markdown table here")
    a = p.parse_args()
    if a.smoke:
        a.tokens, a.heads, a.n_keys, a.half, a.topk = 8, 2, 256, 8, 4
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    q = torch.randn(a.tokens, a.heads, 2 * a.half, device=device, dtype=dtype)
    keys = torch.randn(a.heads, 2, a.n_keys, a.half, device=device, dtype=dtype) / a.half**0.5
    k, rows = a.topk, []

    def add(name, fn):
        ms = timed(fn)
        rows.append((name, ms))
        print(f"  {name:<64} {ms:8.3f} ms", flush=True)

    add("half scores, fp32 out (2 products)", lambda: _half_scores(q, keys))
    add("half scores, bf16 out (2 products)", lambda: _half_scores(q, keys, True))
    s1, s2 = _half_scores(q, keys)
    b1, b2 = _half_scores(q, keys, True)
    f32 = torch.float32

    def tops(x1, x2, warps=None, filt=True):
        return lambda: _half_tops(x1, x2, k, 1, warps, None, filt, TOPK_CAP, None)

    add("top-k, fp32 scores, int64 keys, filter (the op's default)",
        lambda: topk_launch(s1, s2, k, half_top=True))  # fmt: skip
    add("top-k, bf16 scores, narrow keys, filter (precision=bf16)",
        lambda: topk_launch(b1, b2, k, half_top=True, out_dtype=f32))  # fmt: skip
    add("top-k, bf16 scores, int64 keys, filter",
        lambda: topk_launch(b1, b2, k, narrow=False, out_dtype=f32))  # fmt: skip
    add("top-k, bf16 scores, narrow keys, every key ranked",
        lambda: topk_launch(b1, b2, k, filter_keys=False, out_dtype=f32))  # fmt: skip
    add("  half launches only: fp32, int64 keys, filter", tops(s1, s2))
    add("  half launches only: bf16, narrow keys, filter", tops(b1, b2))
    add("  half launches only: bf16, narrow keys, filter, 2 warps", tops(b1, b2, 2))
    add("  half launches only: bf16, narrow keys, every key ranked", tops(b1, b2, None, False))
    text = "\n".join([
        f"Card: {card_name(device)}; torch {torch.__version__}; {a.tokens} tokens × "
        f"{a.heads} heads, {a.n_keys} half keys of {a.half}, top-{k}; forward only.", "",
        "| search piece | ms |", "|---|---|",
        *[f"| {n.strip()} | {ms:.3f} |" for n, ms in rows],
    ])  # fmt: skip
    report(text, a.out)


if __name__ == "__main__":
    main()
