"""Parallel memory past two GPUs, on paper: a bytes-and-FLOPs model of one training step
for a (dp, mp) layout, checked against the measured 1- and 2-GPU runs. docs/scaling.md
explains every term and reads the tables.

    python benchmarks/scaling_model.py                  # the paper's 8B + 64M-row setting
    python benchmarks/scaling_model.py --card h200 --moments bf16
    python benchmarks/scaling_model.py --check          # against the 2-GPU measurement

No torch needed: plain arithmetic on the inputs below. Every input is either a measured
number of this repository (benchmarks/results/, named where it is used) or a data-sheet
number (card peak, link bandwidth), and the output says which.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

GB = 1e9


@dataclass
class Card:
    name: str
    bf16_flops: float  # dense peak, FLOP/s (data sheet)
    hbm: float  # bytes/s (data sheet; our kernels reach 93-100% of measured copy bandwidth)
    memory: float  # bytes
    nvlink: float  # bytes/s a GPU moves in an intra-node collective (NCCL bus bandwidth)
    ib: float  # bytes/s a GPU moves across nodes (one 400 Gb/s NIC per GPU)


CARDS = {
    # NCCL bus bandwidth inside a node: ~370 GB/s of NVLink 4's 450 GB/s per direction;
    # across nodes ~45 GB/s of a 400 Gb/s NDR NIC (typical all-reduce busbw, not measured).
    "h100": Card("H100 SXM", 989e12, 3.35e12, 80 * GB, 370 * GB, 45 * GB),
    "h200": Card("H200", 989e12, 4.8e12, 141 * GB, 370 * GB, 45 * GB),
}


@dataclass
class Model:
    name: str
    dim: int
    layers: int
    ffn: int  # SwiGLU hidden size
    vocab: int
    mem_layers: int  # Memory+ layers (each replaces an FFN)
    n_keys: int  # half keys per head: the table has n_keys² rows
    heads: int = 4
    topk: int = 32
    table_bytes: int = 2  # bytes per value (bf16)

    @property
    def rows(self) -> int:
        return self.n_keys**2

    @property
    def dense_params(self) -> float:
        """Parameters outside the table: attention, FFNs, Memory+ projections, embeddings."""
        d = self.dim
        attn = 4 * d * d
        ffn = 3 * d * self.ffn
        memory = d * self.heads * (d // 2) + 2 * d * d  # query + swilu w1, w2
        layers = self.layers * attn + (self.layers - self.mem_layers) * ffn
        return layers + self.mem_layers * memory + 2 * self.vocab * d

    def flops_per_token(self, seq: int) -> float:
        """Training FLOPs per token: 6 per dense parameter plus causal attention."""
        return 6 * self.dense_params + 6 * self.layers * seq * self.dim


PAPER_8B = Model("8B + 64M-row Memory+ (paper's largest)", 4096, 32, 14336, 128256, 3, 8192)
M134 = Model("134m-memory+ (this repo)", 768, 12, 2048, 32000, 3, 1024, table_bytes=4)

# Measured here (benchmarks/results/*_20261201*.md, H200): the top-k kernel at 1,024 half
# keys takes 1.44 ms per 65,536 (token, head) rows; its cost is dominated by work per key,
# so it is scaled by n_keys / 1024. The lookup forward reads its bytes at ~95% of HBM,
# forward + backward (sparse value grad + score grads) ~3.5x the forward's bytes.
TOPK_MS_PER_ROW_1024 = 1.44 / 65536
LOOKUP_FWD_BWD_FACTOR = 3.5
DENSE_MFU = 0.40  # dense 373m reached 44.9% on an H200 (train_h200_20261201b.md)


def step_model(m: Model, card: Card, dp: int, mp: int, tokens: int, seq: int, moments: str,
               gpus_per_node: int = 8, overhead_ms_per_layer: float = 0.0) -> dict:  # fmt: skip
    """One GPU's step (ms) and memory (bytes) at layout (dp, mp), ``tokens`` per GPU."""
    world = dp * mp
    cols = m.dim / mp  # value columns per rank
    bag = m.heads * m.topk
    out = {"dp": dp, "mp": mp, "world": world}
    # --- compute ---
    dense_ms = m.flops_per_token(seq) * tokens / (card.bf16_flops * DENSE_MFU) * 1e3
    search_ms = tokens * m.heads * TOPK_MS_PER_ROW_1024 * (m.n_keys / 1024) * m.mem_layers
    # Each rank looks up all tokens of its mp group on its columns: tokens·bag·D bytes.
    lookup_bytes = tokens * mp * bag * cols * m.table_bytes * LOOKUP_FWD_BWD_FACTOR
    lookup_ms = m.mem_layers * lookup_bytes / (0.95 * card.hbm) * 1e3
    # Lazy Adam over the rows the group's lookups touched (uniform: the worst case).
    lookups = m.mem_layers * tokens * mp * bag
    touched = m.rows * (1 - math.exp(-lookups / m.rows))
    state = {"fp32": 8, "bf16": 4}[moments]  # m + v bytes per value
    opt_bytes = touched * cols * (2 * m.table_bytes + m.table_bytes + 2 * state)
    opt_ms = opt_bytes / (0.95 * card.hbm) * 1e3
    # --- communication (bytes one GPU sends or receives; link by where the peers are) ---
    mp_link = card.nvlink if mp <= gpus_per_node else card.ib
    # Per Memory+ layer: all-gather of the group's bags (int64 row, fp32 weight), the
    # columns of each token's output back to its owner and its gradient out again (bf16),
    # the partial score gradients summed onto the owners (fp32).
    per_layer = (mp - 1) * tokens * bag * 12 + 2 * tokens * m.dim * 2 * (mp - 1) / mp
    per_layer += (mp - 1) * tokens * bag * 4
    mem_comm_ms = m.mem_layers * per_layer / mp_link * 1e3 if mp > 1 else 0.0
    # Dense parameters: HSDP (shard inside a node, replicate across): all-gather bf16
    # params twice and reduce-scatter fp32 grads inside the node, all-reduce the node's
    # shard of the grads across nodes.
    shard = min(world, gpus_per_node)
    p = m.dense_params
    intra = (2 * 2 * p + 4 * p) * (shard - 1) / shard if shard > 1 else 0.0
    nodes = world // shard
    inter = 2 * 4 * p / shard * (nodes - 1) / nodes if nodes > 1 else 0.0
    fsdp_ms = (intra / card.nvlink + inter / card.ib) * 1e3
    overhead_ms = overhead_ms_per_layer * m.mem_layers if mp > 1 else 0.0
    compute_ms = dense_ms + search_ms + lookup_ms + opt_ms
    # FSDP overlaps with compute (prefetch); the memory exchange is not overlapped yet
    # (issue 15 item 3): it adds to the step.
    step_ms = max(compute_ms, fsdp_ms) + mem_comm_ms + overhead_ms
    dense_twin_ms = max(dense_ms * _ffn_ratio(m), fsdp_ms)
    # --- memory per GPU ---
    table = m.rows * cols * (m.table_bytes + state)
    grad = touched * cols * m.table_bytes  # the row-sparse gradient
    dense_state = 16 * p / shard  # fp32 param + grad + Adam moments, sharded in the node
    out.update(
        dense_ms=dense_ms, search_ms=search_ms, lookup_ms=lookup_ms, opt_ms=opt_ms,
        mem_comm_ms=mem_comm_ms, fsdp_ms=fsdp_ms, overhead_ms=overhead_ms, step_ms=step_ms,
        tokens_per_s=world * tokens / step_ms * 1e3, vs_dense=dense_twin_ms / step_ms,
        table_gb=table / GB, grad_gb=grad / GB, dense_gb=dense_state / GB,
        mem_comm_gb=m.mem_layers * per_layer / GB if mp > 1 else 0.0,
    )  # fmt: skip
    return out


def _ffn_ratio(m: Model) -> float:
    """The dense twin's FLOPs over the memory model's (its memory layers are FFNs)."""
    twin = Model(m.name, m.dim, m.layers, m.ffn, m.vocab, 0, m.n_keys, m.heads, m.topk)
    return twin.dense_params / m.dense_params


def table_rows(args) -> str:
    card = CARDS[args.card]
    lines = [
        f"{PAPER_8B.name}, {card.name}, {args.tokens} tokens per GPU (seq {args.seq}), "
        f"{args.moments} value moments; dense MFU {DENSE_MFU:.0%} assumed; "
        f"{args.overhead_ms:g} ms unexplained exchange overhead per Memory+ layer",
        "",
        "| GPUs | dp × mp | step ms | memory compute / exchange ms | FSDP ms (hidden) | "
        "tokens/s | vs dense twin | table+state + grad GB/GPU | dense state GB/GPU | fits |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for world in (16, 64, 256):
        for mp in (8, 16, 32, 64):
            if mp > world:
                continue
            r = step_model(PAPER_8B, card, world // mp, mp, args.tokens, args.seq,
                           args.moments, overhead_ms_per_layer=args.overhead_ms)  # fmt: skip
            used = r["table_gb"] + r["grad_gb"] + r["dense_gb"] + args.activations_gb
            fits = "yes" if used * GB < 0.95 * card.memory else f"no ({used:.0f} GB)"
            mem = r["search_ms"] + r["lookup_ms"] + r["opt_ms"]
            lines.append(
                f"| {world} | {r['dp']} × {mp} | {r['step_ms']:,.0f} | {mem:,.0f} / "
                f"{r['mem_comm_ms'] + r['overhead_ms']:,.0f} | {r['fsdp_ms']:,.0f} | "
                f"{r['tokens_per_s']:,.0f} | {r['vs_dense']:.2f} | "
                f"{r['table_gb']:.0f} + {r['grad_gb']:.0f} | {r['dense_gb']:.1f} | {fits} |"
            )
    return "\n".join(lines)


def check() -> str:
    """The model against the 2-GPU run (parallel_h200x2_20261125.md, H200 pair, 134m-
    memory+, 8 × 1024 tokens per GPU, fp32 table): one GPU 74.8 ms a step (109,491
    tokens/s), mp = 2 109.0 ms (150,294 tokens/s, 1.37x). The model takes the measured
    one-GPU step and predicts only what mp = 2 adds."""
    card = CARDS["h200"]
    one = step_model(M134, card, 1, 1, 8192, 1024, "fp32")
    two = step_model(M134, card, 1, 2, 8192, 1024, "fp32")
    added = two["step_ms"] - one["step_ms"]
    measured_one, measured_two = 74.8, 109.0
    predicted_two = measured_one + added
    gap = measured_two - predicted_two
    return "\n".join([
        "check against the measured 2-GPU run (134m-memory+, 2× H200, mp = 2):",
        f"  exchange per step: {two['mem_comm_gb'] * 1e3:.0f} MB a GPU, "
        f"{two['mem_comm_ms']:.2f} ms at NVLink bus bandwidth; FSDP {two['fsdp_ms']:.2f} ms "
        "(overlapped)",
        f"  predicted step {predicted_two:.1f} ms ({2 * 8192 / predicted_two * 1e3:,.0f} "
        f"tokens/s, {2 * measured_one / predicted_two:.2f}x one GPU); measured "
        f"{measured_two} ms (150,294 tokens/s, 1.37x)",
        f"  unexplained: {gap:.1f} ms a step = {gap / M134.mem_layers:.1f} ms per Memory+ "
        "layer (collective launch and host syncs of the unoverlapped exchange, FSDP2's extra "
        "all-reduces; not measured apart)",
    ])  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--card", choices=sorted(CARDS), default="h100")
    p.add_argument("--moments", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per GPU per step")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument(
        "--activations-gb",
        type=float,
        default=20.0,
        help="activation memory per GPU (per-block checkpointing; an assumption)",
    )
    p.add_argument(
        "--overhead-ms",
        type=float,
        default=0.0,
        help="added per Memory+ layer when mp > 1 (the 2-GPU check's gap: 12)",
    )
    p.add_argument("--check", action="store_true", help="only the 2-GPU check")
    args = p.parse_args()
    print(check())
    if not args.check:
        print()
        print(table_rows(args))


if __name__ == "__main__":
    main()
