"""Parameter and FLOP accounting that treats sparse tables as sparse.

A memory layer adds ``n_keys² · v_dim`` parameters but a token reads only
``heads · topk`` rows of them; PEER likewise reads ``heads · topk`` of its rank-1
experts; an MoE token runs one of ``n_experts`` experts. :func:`parameter_report`
counts (all per token, forward pass):

- ``total``: every parameter once (a shared value table and tied embeddings once);
- ``embedding``: token embedding, plus the output head when untied;
- ``non_embedding``: ``total - embedding``;
- ``memory_table``: value-table parameters; ``peer_table``: PEER expert vectors;
  ``moe_experts``: expert weights of all MoE blocks;
- ``sparse_rows_read``: table parameters a token reads (memory: ``heads·topk·v_dim``
  per memory block; PEER: ``heads·topk·2·dim`` per PEER block);
- ``active_per_token``: non-embedding parameters a token uses: every dense parameter,
  one expert per MoE block, and the table rows it reads — never a whole table;
- ``flops_per_token``: ``2 ×`` (active matmul parameters + the output head + table rows
  read) + attention ``4 · n_layers · dim · seq_len`` (PaLM's convention, no causal
  discount). Product-key scoring is a dense matmul against the keys, so keys count as
  dense. ``train_flops_per_token`` is three times the training forward, in which an MoE
  block's experts do ``capacity_factor`` times one expert's work per token (expert
  choice: each expert takes ``capacity_factor · tokens / n_experts``); "active" counts
  are those of inference (top-1).

Models are counted on the meta device, so a 1.3B model with a billion-row table costs
nothing to report.
"""

from __future__ import annotations

import torch

from memlayers.memory import MemoryValues, ProductKeyMemory
from memlayers.model import ModelConfig, Transformer
from memlayers.moe import MoE
from memlayers.peer import PEER


def _numel(params) -> int:
    seen, n = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def parameter_report(model: Transformer | ModelConfig, seq_len: int | None = None) -> dict:
    """Counts described in the module docstring; ``seq_len`` defaults to ``max_seq_len``."""
    if isinstance(model, ModelConfig):
        with torch.device("meta"):
            model = Transformer(model)
    cfg = model.config
    seq_len = seq_len or cfg.max_seq_len
    total = _numel(model.parameters())
    embedding = model.tok_embeddings.weight.numel()
    if model.output is not None:
        embedding += model.output.weight.numel()
    tables = [m.weight for m in model.modules() if isinstance(m, MemoryValues)]
    memory_table = _numel(tables)
    peer_table = moe_experts = moe_active = rows_read = moe_train_extra = 0
    for block in model.layers:
        ffn = block.ffn
        if isinstance(ffn, ProductKeyMemory):
            rows_read += ffn.config.heads * ffn.config.topk * ffn.v_dim
        elif isinstance(ffn, PEER):
            peer_table += ffn.down.weight.numel() + ffn.up.weight.numel()
            rows_read += ffn.config.heads * ffn.config.topk * 2 * ffn.dim
        elif isinstance(ffn, MoE):
            experts = ffn.w1.numel() + ffn.w2.numel() + ffn.w3.numel()
            moe_experts += experts
            moe_active += experts // ffn.config.n_experts  # top-1 at inference
            moe_train_extra += experts / ffn.config.n_experts * (ffn.config.capacity_factor - 1)
    non_embedding = total - embedding
    dense_active = non_embedding - memory_table - peer_table - moe_experts + moe_active
    head = cfg.vocab_size * cfg.dim  # the output matmul, tied or not
    attention = 4 * cfg.n_layers * cfg.dim * seq_len
    flops = 2 * (dense_active + head + rows_read) + attention
    return {
        "total": total,
        "embedding": embedding,
        "non_embedding": non_embedding,
        "memory_table": memory_table,
        "peer_table": peer_table,
        "moe_experts": moe_experts,
        "sparse_rows_read": rows_read,
        "active_per_token": dense_active + rows_read,
        "flops_per_token": flops,
        "train_flops_per_token": 3 * (flops + round(2 * moe_train_extra)),
        "seq_len": seq_len,
    }


# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' datasheets: the MFU
# denominator. An unknown card gets no MFU rather than a guess. Matched against the device
# name in this order, so the PCIe and NVL cards (lower clocks, fewer SMs) are found before
# the SXM ones whose names they contain ("NVIDIA H100 PCIe" against "NVIDIA H100 80GB HBM3").
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756.5e12,
    "H100 NVL": 835.5e12,
    "H200 NVL": 835.5e12,
    "H100": 989.4e12,
    "H200": 989.4e12,
    "A100": 312e12,
    "L40S": 362e12,
}


def peak_flops(device: torch.device | str) -> float | None:
    """The bf16 dense peak of ``device`` (CUDA) in FLOP/s, or None (CPU, unknown card)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name: str) -> float | None:
    """The bf16 dense peak of the card called ``name`` (``torch.cuda.get_device_name``)."""
    card = known_card(name)
    return None if card is None else PEAK_BF16_FLOPS[card]


def known_card(name: str) -> str | None:
    """The :data:`PEAK_BF16_FLOPS` key the card called ``name`` matches, or None."""
    return next((k for k in PEAK_BF16_FLOPS if k in name), None)


SI_UNITS = {"T": 1e12, "B": 1e9, "M": 1e6, "k": 1e3}


def si(n: float, unit: str | None = None) -> str:
    """``n`` with two decimals in the largest unit of T/B/M/k it reaches (``1.60M``), or
    in ``unit`` when given (a table column keeps one unit: ``0.95M``)."""
    if unit is not None:
        return f"{n / SI_UNITS[unit]:.2f}{unit}"
    for name, scale in SI_UNITS.items():
        if abs(n) >= scale:
            return f"{n / scale:.2f}{name}"
    return f"{n:.0f}"


def format_report(report: dict, name: str = "model") -> str:
    """The report as an aligned two-column table."""
    rows = [(k, report[k]) for k in report if k != "seq_len" and (report[k] or k == "total")]
    width = max(len(k) for k, _ in rows)
    lines = [f"{name} (seq_len {report['seq_len']})"]
    lines += [f"  {k:<{width}}  {si(v):>9}  ({v:,})" for k, v in rows]
    return "\n".join(lines)
