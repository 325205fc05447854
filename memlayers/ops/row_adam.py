"""Row-wise (lazy) Adam(W) and SGD steps on a value table: Triton kernels and references.

A step reads and writes only the rows a batch touched: ``param[rows]``, the fp32 moments
``exp_avg[rows]`` and ``exp_avg_sq[rows]``, and reads the gradient rows. Untouched rows
are never read or written, so they stay bit-identical. Bytes per touched element:
Adam ``2·p + 2·4 + 2·4 + g`` (22 for a bf16 table and gradient, 28 for fp32); SGD
``2·p + g``. A dense AdamW over 1M × 1024 fp32 moves ~16+ GB per step (docs/method.md §4).

The row-wise variant (``rowwise_v=True``, as in embedding-table trainers' "row-wise
Adagrad/Adam") keeps one fp32 second moment per *row*, the running mean over the row of
``g²``: the state is ``[N, D] + [N]`` instead of ``2 × [N, D]``, and a step moves
``2·p + 2·4 + g`` per element plus 8 bytes per row (14·D + 8 for bf16, 20·D + 8 for fp32).

bf16 moments (``exp_avg``, and ``exp_avg_sq`` when element-wise, stored as bf16): the
step reads them as fp32, does the same fp32 arithmetic, updates the parameter with the
unrounded values and stores the moments *stochastically rounded* to bf16 (the fp32 bits
plus 16 pseudo-random bits below bf16's last place, cut: rounding up with probability
equal to the distance, so the stored moment is unbiased and small updates ``(1 - β)·g``
are not lost to round-to-nearest). The random bits are a hash of (element offset, step):
32 bits per element, the low 16 for the first moment and the high 16 for the second; the
same in both paths, so a step is deterministic and a resumed run repeats it.
Bytes per touched element: ``2·p + 2·2 + 2·2 + g`` (14 for a bf16 table and gradient, 20
for fp32), 36% / 29% fewer than fp32 moments.

A bf16 parameter (a bf16 value table, ``model.memory.value_dtype=bf16``) is stored the
same way, stochastically rounded from the fp32 result, in the Adam and the SGD step: an
update ``lr·u`` far below the bf16 step of the value (2^-8 to 2^-7 of it) is rounded away
every time by round-to-nearest, the known failure of pure-bf16 training; rounded up with
probability equal to its fraction of a step, it moves the value by ``lr·u`` on average.
Its bits come from another stream than the moments': the same hash of the element offset
under the seed :func:`param_round_seed` (a hash of the moments' seed and a constant), the
low 16 bits. A parameter of any other dtype is stored rounded to nearest (fp32: exactly
the result). With a bf16 table and bf16 moments a step moves 14 bytes per element, half
the 28 of an fp32 table with fp32 moments; with fp32 moments 22. The rounding adds one
hash per element, no bytes.

A *master copy* (``master``: an fp32 ``[N, D]`` tensor beside a bf16 ``param``, the
optimizer's state) is the mixed-precision alternative: the step reads the parameter from
the master, stores the result there exactly and in ``param`` rounded to nearest, so the
table the lookups read is bf16 (half the bytes of every row read) and no update is lost.
Bytes per touched element: ``2·4 + 2·4 + 2·4 + g + 2`` (28 with a bf16 gradient: as an
fp32 table's step, 4 of them the bf16 copy written), no hash.

A *split* master (``master``: an int16 ``[N, D]`` tensor) holds the same fp32 values in
half the bytes: the bf16 table is the fp32 value's high half rounded to nearest (ties
away from zero), the int16 its signed remainder, so ``bits(fp32) = bits(bf16) · 2¹⁶ +
remainder`` exactly (:func:`split_master`, :func:`join_master`). The step reads both
halves and writes both: ``2·2 + 2·2`` bytes per element for the parameter against the
fp32 master's ``2·4 + 2``, 2 fewer a touched element (18 against 20 with bf16 moments)
and 2 fewer bytes of state a value. Its steps are the fp32 master's bit for bit; the
table differs from the fp32 master's rounding only at exact ties (a remainder of half a
bf16 step, one value in 2¹⁶), which round away from zero instead of to even.

The PyTorch functions here are the references (and the CPU path), beside the argument
checks and the dispatchers; the Triton kernels and their launchers live in
:mod:`memlayers.ops.row_adam_triton` and do the same fp32 arithmetic in the same order,
with IEEE square root and division, so touched rows agree with the reference to fp32
rounding. Both paths check their arguments the same way first (:func:`check_rows`:
shapes, dtypes, devices, layout and the rows' range).
"""

from __future__ import annotations

import math

import torch

from memlayers.ops.embedding_bag import resolve_impl

_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) of int64 values in ``[0, 2**32)``; the
    Triton kernels compute the same (``row_adam_triton._hash32``) in uint32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def round_seed(step: int) -> int:
    """The 32-bit seed of a step's stochastic rounding (both moments draw from it)."""
    return (step * 0x9E3779B9 + 0x85EBCA6B) & _M32


# Any constant: xor-ed into the moments' seed before a hash, it gives the parameter's.
_PARAM_STREAM = 0x2545F491


def param_round_seed(step: int) -> int:
    """The 32-bit seed of a bf16 parameter's stochastic rounding at ``step``:
    ``_hash32(round_seed(step) ^ constant)``, so the parameter's bits are another stream
    than the moments' (which use ``round_seed(step)`` itself) and a rounding of the
    parameter does not follow its moments'."""
    return _hash32(round_seed(step) ^ _PARAM_STREAM)


def rounding_noise(offsets: torch.Tensor, seed: int) -> torch.Tensor:
    """32 random bits (int64 in ``[0, 2**32)``) per element offset: a hash of the offset's
    low 32 bits and of a hash of its high 32 bits and ``seed``. The first moment takes the
    low 16 bits, the second the high 16, so one hash serves both (the Triton kernels hash
    the high part once per tile: a tile spans at most two 2**32 blocks)."""
    off = offsets.to(torch.int64)
    hi = _hash32(((off >> 32) & _M32) ^ seed)
    return _hash32((off & _M32) ^ hi)


def split_master(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (fp32) as a bf16 high half and an int16 remainder, exactly: the high half is
    ``x`` rounded to the nearest bf16 (ties away from zero), the remainder the low 16
    bits' signed distance to it, so :func:`join_master` gives ``x`` back bit for bit. NaN:
    a quiet NaN of ``x``'s sign and remainder 0 (the joined value is NaN, not ``x``'s bits)."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64) & _M32
    low = bits & 0xFFFF
    rem = (low ^ 0x8000) - 0x8000  # [-2**15, 2**15): round up from half a step on
    hi = ((bits - rem) & _M32) >> 16
    nan = x.isnan()
    hi = torch.where(nan, (hi & 0x8000) | 0x7FC0, hi)
    rem = torch.where(nan, 0, rem)
    hi = torch.where(hi >= 1 << 15, hi - (1 << 16), hi)  # back to int16's range
    return hi.to(torch.int16).view(torch.bfloat16), rem.to(torch.int16)


def join_master(hi: torch.Tensor, rem: torch.Tensor) -> torch.Tensor:
    """The fp32 values :func:`split_master` split into ``hi`` (bf16) and ``rem`` (int16).
    A pair no split makes (the table written by something else than the step: a row set
    to ±0 beside a negative remainder, or to ±inf beside a positive one) drops the
    remainder: ``hi`` itself, never a value across zero or from inf into NaN."""
    hi_bits = hi.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    rem = rem.to(torch.int64)
    mag = hi_bits & 0x7FFF
    off = ((mag == 0x7F80) & (rem > 0)) | ((mag == 0) & (rem < 0))
    rem = torch.where(off, 0, rem)
    bits = ((hi_bits << 16) + rem) & _M32
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)
    return bits.to(torch.int32).view(torch.float32)


def stochastic_round_bf16(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32) stochastically rounded to bf16: ``noise`` (16 random bits per element,
    e.g. from :func:`rounding_noise`) is added to the low half of the fp32 bits, which are
    then cut. Up with probability equal to the distance to the lower bf16 neighbour (in
    magnitude): unbiased. Inf stays inf; NaN stays NaN."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64) & _M32
    bits = (bits + (noise & 0xFFFF)) & 0xFFFF0000
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)  # back to int32's range
    rounded = bits.to(torch.int32).view(torch.float32).to(torch.bfloat16)
    # NaN stays NaN: the noise carries a NaN with a full mantissa (0x7FFFFFFF, what a GPU
    # makes) into the sign bit, -0.0.
    return torch.where(x.isnan(), x.to(torch.bfloat16), rounded)


def row_adam_step_torch(
    param: torch.Tensor,
    rows: torch.Tensor | None,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    rowwise_v: bool = False,
    master: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    check_range: bool = True,
) -> None:
    """Adam(W) on ``param[rows]`` (all rows when ``rows`` is None), in place, fp32 math.

    The arithmetic follows ``torch.optim.Adam``'s order (denominator ``sqrt(v)/sqrt(bc2)
    + eps``, step ``lr / bc1``) so touched rows match it; decay is decoupled (AdamW).
    ``rowwise_v``: ``exp_avg_sq`` is ``[N]``, ``v_row = beta2·v_row + (1 - beta2)·
    mean_d(g²)``, and every element of a row divides by the same denominator.
    ``master``: fp32 ``[N, D]``, the parameter's exact values (read and written), ``param``
    its copy rounded to nearest; or int16 ``[N, D]`` beside a bf16 ``param``, the split
    master's remainders (:func:`split_master`: both read and written). ``grad_scale``: a
    one-element fp32 tensor the gradient is multiplied by (in fp32) as it is read: a
    clip's rescale (:func:`check_grad_scale`).
    Arguments checked as the Triton path's (:func:`check_adam_args`; ``check_range=False``
    skips the rows' range, for rows known to be in the table: a coalesced gradient's).
    """
    check_adam_args(param, rows, grad, exp_avg, exp_avg_sq, rowwise_v, master, grad_scale,
                    check_range, step)  # fmt: skip
    hyper = (step, lr, beta1, beta2, eps, weight_decay, rowwise_v)
    for sel, piece, g in _pieces(param, rows, grad):
        _row_adam_piece(param, sel, piece, g, exp_avg, exp_avg_sq, *hyper, master, grad_scale)


# Elements a piece of the reference steps (Adam's and SGD's) holds: their temporaries
# (fp32 moments and parameter, int64 rounding noise) are several times the touched rows'
# own bytes: ~7 GiB of int64 noise alone for 925,426 rows × 1,024, and an H100 could not
# hold its temporaries beside the layer (2026-12-05). 2**24 elements keep each temporary at
# 64-128 MB. Every row's update depends on that row alone, so on the CPU the pieces give
# the same bits as one pass; on CUDA a row-wise v's sum over a row may be reduced in
# another order for a piece of another shape (a last-bit difference).
PIECE_ELEMENTS = 1 << 24


def row_slices(n: int, width: int):
    """Slices of ``n`` rows of ``width`` elements, :data:`PIECE_ELEMENTS` a slice (at least
    one row): the pieces a step or a conversion of a whole table walks, so that its
    temporaries stay a piece's size."""
    per = max(1, PIECE_ELEMENTS // max(1, width))
    for start in range(0, n, per):
        yield slice(start, min(n, start + per))


def _pieces(param: torch.Tensor, rows: torch.Tensor | None, grad: torch.Tensor):
    """``(sel, rows, grad)`` of each piece of the touched rows: ``sel`` indexes ``param``
    (a slice when all rows are stepped), ``rows`` the piece's row numbers (the rounding
    noise's offsets), ``grad`` its gradient rows."""
    total = param.shape[0] if rows is None else rows.shape[0]
    for cut in row_slices(total, param.shape[1]):
        start, end = cut.start, cut.stop
        if rows is None:
            piece = torch.arange(start, end, device=param.device)
            yield slice(start, end), piece, grad[start:end]
        else:
            yield rows[start:end], rows[start:end], grad[start:end]


def _row_adam_piece(
    param, sel, rows, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay,
    rowwise_v, master, grad_scale,
) -> None:  # fmt: skip
    """:func:`row_adam_step_torch` on one piece: ``param[sel]``, whose row numbers are
    ``rows``, with gradient rows ``grad``."""
    g = _scaled(grad, grad_scale)  # [U, D] fp32
    m = exp_avg[sel].float().mul_(beta1).add_(g, alpha=1 - beta1)  # [U, D]
    if rowwise_v:
        # fp32 sum then one division: the order the Triton kernel reduces in.
        g2 = g.square().sum(dim=1) / g.shape[1]  # [U]
        v = exp_avg_sq[sel].float().mul_(beta2).add_(g2, alpha=1 - beta2)  # [U]
    else:
        v = exp_avg_sq[sel].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)  # [U, D]
    if master is None:
        p = param[sel].float()
    elif master.dtype == torch.int16:
        p = join_master(param[sel], master[sel])
    else:
        p = master[sel].float()
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)  # [U, D] or [U]
    p.addcdiv_(m, denom[:, None] if rowwise_v else denom, value=-lr / bc1)
    bf16 = (exp_avg.dtype == torch.bfloat16, exp_avg_sq.dtype == torch.bfloat16)
    noise = _noise(exp_avg, rows, round_seed(step)) if any(bf16) else None  # [U, D]
    exp_avg[sel] = stochastic_round_bf16(m, noise) if bf16[0] else m
    # A bf16 v is element-wise (a row-wise v is fp32): the noise's high 16 bits.
    exp_avg_sq[sel] = stochastic_round_bf16(v, noise >> 16) if bf16[1] else v
    if master is not None and master.dtype == torch.int16:
        param[sel], master[sel] = split_master(p)
    elif master is not None:
        master[sel] = p
        param[sel] = p.to(param.dtype)
    else:
        param[sel] = _stored_param(p, param, rows, step)


def _noise(table: torch.Tensor, rows, seed: int) -> torch.Tensor:
    """The rounding noise under ``seed`` of the elements ``[U, D]`` (``rows`` of the
    ``[N, D]`` ``table``, all rows when None): each element's offset is its random stream."""
    n, d = table.shape
    r = torch.arange(n, device=table.device) if rows is None else rows
    offsets = r[:, None] * d + torch.arange(d, device=table.device)
    return rounding_noise(offsets, seed)


def _stored_param(p: torch.Tensor, param: torch.Tensor, rows, step: int) -> torch.Tensor:
    """The new rows ``p`` (fp32 ``[U, D]``) as ``param`` stores them: stochastically
    rounded under :func:`param_round_seed` when bf16, else cast (rounded to nearest)."""
    if param.dtype == torch.bfloat16:
        return stochastic_round_bf16(p, _noise(param, rows, param_round_seed(step)))
    return p.to(param.dtype)


def _scaled(grad: torch.Tensor, grad_scale: torch.Tensor | None) -> torch.Tensor:
    """The gradient rows in fp32, times ``grad_scale`` when given (fp32 product)."""
    g = grad.float()
    return g if grad_scale is None else g * grad_scale.reshape(())


def row_sgd_step_torch(
    param: torch.Tensor,
    rows: torch.Tensor | None,
    grad: torch.Tensor,
    step: int,
    lr: float,
    grad_scale: torch.Tensor | None = None,
    check_range: bool = True,
) -> None:
    """``param[rows] -= lr * grad`` in fp32 (all rows when ``rows`` is None), in place; a
    bf16 ``param`` is stored stochastically rounded with the bits of ``step``.
    ``grad_scale``: as :func:`row_adam_step_torch`'s. Arguments checked as the Triton
    path's (:func:`check_rows`)."""
    check_rows(param, rows, grad, grad_scale=grad_scale, check_range=check_range)
    for sel, piece, g in _pieces(param, rows, grad):  # as Adam's: PIECE_ELEMENTS
        g = _scaled(g, grad_scale)
        param[sel] = _stored_param(param[sel].float() - lr * g, param, piece, step)


MOMENT_DTYPES = (torch.float32, torch.bfloat16)
# A master copy: fp32 values, or the int16 remainders of a split one (split_master).
MASTER_DTYPES = (torch.float32, torch.int16)


def check_rows(
    param, rows, grad, *state, row_state=(), master=None, grad_scale=None, check_range=True
) -> None:
    """Raise ``ValueError`` naming the offending shape, dtype, device or layout, or a row
    outside ``[0, N)``. ``state``: fp32 or bf16 ``[N, D]`` tensors; ``row_state``: fp32
    ``[N]`` tensors (a row-wise second moment); ``master``: None, the fp32 ``[N, D]``
    master copy of ``param``, or the int16 ``[N, D]`` remainders of a bf16 ``param``'s
    split master; ``grad_scale``: as :func:`check_grad_scale` takes it. Every
    tensor must be on ``param``'s device. The rows' range is checked on the host for a
    CPU table; on a GPU by a device-side assert (no wait for the device: a bad row stops
    the process at the next synchronisation, with this message on its stderr) run
    before the step's kernel, which would write out of bounds; ``check_range=False``
    skips it (the value optimizers' rows: a coalesced gradient's, in range by making)."""
    check_grad_scale(grad_scale, param)
    if param.dim() != 2:
        raise ValueError(f"param must be a 2-D table [N, D], got shape {tuple(param.shape)}")
    named = [("rows", rows), ("grad", grad), ("master", master)]
    named += [("optimizer state", s) for s in (*state, *row_state)]
    for name, t in named:
        if t is not None and t.device != param.device:
            raise ValueError(f"{name} is on {t.device} but param is on {param.device}")
    n, d = param.shape
    if master is not None and (master.shape != param.shape or master.dtype not in MASTER_DTYPES):
        raise ValueError(f"master must be fp32 or int16 {tuple(param.shape)}, got "
                         f"{tuple(master.shape)} {master.dtype}")  # fmt: skip
    if master is not None and master.dtype == torch.int16 and param.dtype != torch.bfloat16:
        raise ValueError(f"an int16 master (the remainders of a split master) is for a bf16 "
                         f"param, got param {param.dtype}")  # fmt: skip
    if rows is not None and (rows.dim() != 1 or rows.dtype != torch.int64):
        raise ValueError(f"rows must be 1-D int64, got {tuple(rows.shape)} {rows.dtype}")
    u = n if rows is None else rows.shape[0]
    if grad.shape != (u, d):
        raise ValueError(f"grad must be [{u}, {d}] for param {tuple(param.shape)}, got "
                         f"{tuple(grad.shape)}")  # fmt: skip
    for s in state:
        if s.shape != param.shape or s.dtype not in MOMENT_DTYPES:
            raise ValueError(f"optimizer state must be fp32 or bf16 {tuple(param.shape)}, "
                             f"got {tuple(s.shape)} {s.dtype}")  # fmt: skip
    for s in row_state:
        if s.shape != (n,) or s.dtype != torch.float32:
            raise ValueError(f"row-wise optimizer state must be fp32 ({n},), got "
                             f"{tuple(s.shape)} {s.dtype}")  # fmt: skip
    tensors = (grad, *state, *row_state, param, *([] if master is None else [master]))
    if not all(t.is_contiguous() for t in (*tensors, *([] if rows is None else [rows]))):
        raise ValueError("param, rows, grad and optimizer state must be contiguous")
    if check_range and rows is not None and rows.numel():
        _check_row_range(rows, n)


def _check_row_range(rows: torch.Tensor, n: int) -> None:
    """Every row in ``[0, n)`` and none twice (the kernels' programs would race on it,
    the PyTorch path keep one of its gradients): a ``ValueError`` naming one on the CPU,
    a device-side assert (no host sync) elsewhere."""
    lo, hi = torch.aminmax(rows)
    srt = rows.sort().values
    repeated = srt[1:] == srt[:-1]
    if rows.device.type == "cpu":
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= n:
            raise ValueError(
                f"row {lo if lo < 0 else hi} is outside the table: rows must be in [0, {n})"
            )
        if bool(repeated.any()):
            row = int(srt[1:][repeated][0])
            raise ValueError(
                f"row {row} appears more than once: rows must be distinct (sum the "
                f"gradients of a repeated row first, e.g. coalesce_rows)"
            )
        return
    ok = (lo >= 0) & (hi < n) & ~repeated.any()
    torch._assert_async(ok, f"row-wise step: a row is outside [0, {n}) or repeated")


def check_adam_args(
    param, rows, grad, exp_avg, exp_avg_sq, rowwise_v: bool = False, master=None,
    grad_scale=None, check_range: bool = True, step: int = 1,
) -> None:  # fmt: skip
    """:func:`check_rows` for a row-wise Adam step's arguments (both paths): ``exp_avg``
    ``[N, D]``; ``exp_avg_sq`` ``[N, D]``, or fp32 ``[N]`` with ``rowwise_v``; ``step``
    (the bias correction's) at least 1."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1 (Adam's bias correction divides by "
                         f"1 - beta**step), got step={step!r}")  # fmt: skip
    state, row_state = ((exp_avg,), (exp_avg_sq,)) if rowwise_v else ((exp_avg, exp_avg_sq), ())
    check_rows(param, rows, grad, *state, row_state=row_state, master=master,
               grad_scale=grad_scale, check_range=check_range)  # fmt: skip


def check_grad_scale(grad_scale: torch.Tensor | None, param: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``grad_scale`` is None or a one-element fp32 tensor on
    ``param``'s device."""
    if grad_scale is None:
        return
    if grad_scale.numel() != 1 or grad_scale.dtype != torch.float32:
        raise ValueError(f"grad_scale must be one fp32 number, got "
                         f"{tuple(grad_scale.shape)} {grad_scale.dtype}")  # fmt: skip
    if grad_scale.device != param.device:
        raise ValueError(f"grad_scale must be on {param.device} (the parameter's device), "
                         f"got {grad_scale.device}")  # fmt: skip


def row_adam_step_(
    param, rows, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay,
    impl: str = "auto", rowwise_v: bool = False, master: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None, check_range: bool = True,
) -> None:  # fmt: skip
    """Dispatch a row-wise Adam(W) step to Triton (CUDA) or PyTorch (``impl``);
    ``rowwise_v``: ``exp_avg_sq`` is one fp32 per row (``[N]``); ``master``: the fp32
    master copy of a bf16 ``param``, or its split master's int16 remainders;
    ``grad_scale``: a one-element fp32 tensor the gradient is multiplied by as it is read.
    Either path checks its arguments first (:func:`check_adam_args`)."""
    fn = row_adam_step_torch
    if resolve_impl(impl, param.device) == "triton":
        from memlayers.ops.row_adam_triton import row_adam_step_triton as fn
    fn(param, rows, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay,
       rowwise_v, master, grad_scale=grad_scale, check_range=check_range)  # fmt: skip


def row_sgd_step_(
    param, rows, grad, step, lr, impl: str = "auto", grad_scale: torch.Tensor | None = None,
    check_range: bool = True,
) -> None:  # fmt: skip
    """Dispatch a row-wise SGD step to Triton (CUDA) or PyTorch (``impl``); ``step`` (from
    1) seeds a bf16 parameter's stochastic rounding; ``grad_scale`` as
    :func:`row_adam_step_`'s. Either path checks its arguments first (:func:`check_rows`)."""
    if resolve_impl(impl, param.device) == "triton":
        from memlayers.ops.row_adam_triton import row_sgd_step_triton

        row_sgd_step_triton(param, rows, grad, step, lr, grad_scale=grad_scale,
                            check_range=check_range)  # fmt: skip
    else:
        row_sgd_step_torch(param, rows, grad, step, lr, grad_scale=grad_scale,
                           check_range=check_range)  # fmt: skip
