"""The training loss without a full logits tensor: the output head and the cross-entropy
computed together, one chunk of tokens at a time.

A 32k vocabulary makes the logits the largest activation of a small model: 8 × 1024
tokens × 32,000 is 0.5 GB in bf16, and ``F.cross_entropy(logits.float())`` adds an fp32
copy, its log-softmax and their gradients (~3 GB more). Here each chunk of ``chunk``
tokens gets its logits (in the head's compute dtype, as ``F.linear`` under autocast would
give), an fp32 log-sum-exp and loss, and — when a gradient is wanted — its logit gradient
``softmax − onehot`` right away, turned into the chunk's hidden-state gradient and added
to the head's weight gradient (fp32). Only one ``[chunk, V]`` block is ever live, and the
backward is two scalings. Under ``torch.no_grad`` (validation, eval) no gradient is
computed: the forward is the loss alone. The forward value equals
``F.cross_entropy(F.linear(h, W).float(), targets)`` (tested); the gradients agree to the
rounding of the bf16 products.
"""

from __future__ import annotations

import torch

# Rows per chunk: [chunk, V] bf16 logits are ~262 MB at V = 32k (and so are their
# gradient's), small next to a step's activations. 4,096 against 2,048: the loss's
# forward + backward at 32 × 1024 tokens, D 768, 9.96 against 10.77 ms on an H100 (fewer
# weight-gradient sums, larger products; 8,192: 9.85), +0.4 GiB
# (benchmarks/results/loss_h100_20261206.md).
DEFAULT_CHUNK = 4096


def _chunk_loss(logits, targets, valid, acc):
    """Summed cross-entropy of one chunk's ``logits [c, V]``: an fp32 log-sum-exp."""
    lf = logits.to(acc)
    lse = torch.logsumexp(lf, dim=-1)  # [c]
    picked = lf.gather(1, targets.clamp(min=0)[:, None])[:, 0]  # ignored rows: masked below
    return torch.where(valid, lse - picked, 0.0).sum()


def _chunk_grad(logits, targets, valid, acc):
    """``(loss_sum, d loss_sum / d logits)`` of one chunk: ``softmax − onehot``, zero on
    ignored rows, at the logits' dtype (the mean's 1/count and the incoming gradient are
    applied in backward). Written as one expression so that, compiled, it is a pass or two
    over the bf16 logits instead of eight over an fp32 copy (19% of a 134m step's GPU
    time eagerly, H100)."""
    lf = logits.to(acc)
    lse = torch.logsumexp(lf, dim=-1, keepdim=True)  # [c, 1]
    safe = targets.clamp(min=0)[:, None]  # [c, 1]
    picked = lf.gather(1, safe)  # [c, 1]
    loss = torch.where(valid[:, None], lse - picked, 0.0).sum()
    cols = torch.arange(lf.shape[1], device=lf.device)[None, :]  # [1, V]
    p = torch.exp(lf - lse) - (cols == safe).to(acc)
    return loss, torch.where(valid[:, None], p, 0.0).to(logits.dtype)


def accumulate_mm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in place, ``acc`` fp32 and ``a``, ``b`` at the compute dtype. On
    CUDA one GEMM that adds into ``acc`` in its epilogue (``addmm`` with an fp32
    ``out_dtype``); elsewhere, or for inputs already fp32, the product then an add.

    The head's weight gradient is summed over the loss's chunks this way: as a product
    and an add it wrote a bf16 ``[V, D]`` product and read it back beside the fp32 sum,
    16 times a 32 × 1024-token step (an add of ~0.1 ms each at V = 32k, D = 768 on an
    H100: issue 15's profiles, ``aten::add_``)."""
    if acc.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and acc.dtype == torch.float32:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except TypeError:  # a torch without addmm's out_dtype (added in 2.8)
            pass
    acc.add_(a @ b)


# On CUDA the chunk's elementwise work runs compiled (fused); elsewhere eagerly.
_compiled: dict = {}


def _maybe_compiled(fn, device: torch.device):
    if device.type != "cuda":
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk, ignore_index, dtype):
        # h [N, D], weight [V, D], targets [N] int64; matmuls at ``dtype``
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(dtype)  # [V, D], one cast per call (what F.linear under autocast does)
        n = h.shape[0]
        valid = targets != ignore_index  # [N]
        count = valid.sum()  # stays on the device: no host sync
        acc = torch.promote_types(dtype, torch.float32)  # fp32 at least (fp64 stays fp64)
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        chunk_grad = _maybe_compiled(_chunk_grad, h.device)
        chunk_loss = _maybe_compiled(_chunk_loss, h.device)
        for s in range(0, n, chunk):
            hc, tc, vc = h[s : s + chunk].to(dtype), targets[s : s + chunk], valid[s : s + chunk]
            logits = hc @ w.t()  # [c, V] at the compute dtype
            if need_h or need_w:
                loss_c, p = chunk_grad(logits, tc, vc, acc)  # p: [c, V] at the compute dtype
            else:
                loss_c = chunk_loss(logits, tc, vc, acc)
            total = total + loss_c
            if need_h:
                grad_h[s : s + chunk] = p @ w  # [c, D]
            if need_w:
                accumulate_mm_(grad_w, p.t(), hc)  # [V, D], summed over chunks in fp32
        count = count.clamp(min=1).to(acc)
        ctx.save_for_backward(grad_h, grad_w, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad / count  # []
        dh = (grad_h * scale).to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        dw = (grad_w * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of ``F.linear(h, weight)`` against ``targets``, chunked.

    Args:
        h: ``[..., D]`` final hidden states (under autocast, pass them as they come: the
            chunks' matmuls run at the autocast dtype like ``F.linear`` would).
        weight: ``[V, D]`` output head.
        targets: ``[...]`` int64 class ids; ``ignore_index`` entries don't count.
        chunk: tokens per chunk (memory: one ``[chunk, V]`` fp32 block at a time).

    Returns:
        A scalar fp32 loss, differentiable in ``h`` and ``weight``.
    """
    if h.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets must have the leading shape of h {tuple(h.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != h.shape[-1]:
        raise ValueError(f"weight must be [V, D={h.shape[-1]}], got {tuple(weight.shape)}")
    if targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64, got {targets.dtype}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got chunk={chunk!r}")
    device = h.device.type
    dtype = torch.promote_types(h.dtype, weight.dtype)
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)  # as F.linear under autocast
    flat_h = h.reshape(-1, h.shape[-1])
    if not torch.is_grad_enabled():
        # no_grad / inference_mode (validation, eval): inside the Function needs_input_grad
        # still follows requires_grad, so detached inputs keep it from computing (and
        # holding) gradients nothing will read: the loss alone, one [chunk, V] at a time.
        flat_h, weight = flat_h.detach(), weight.detach()
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(
            flat_h, weight, targets.reshape(-1), chunk, ignore_index, dtype
        )
