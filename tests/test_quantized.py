"""Quantized value tables: the format's error bound, the packing, and the Triton lookup
against the PyTorch reference (int8 and 4-bit; odd widths, short last groups, empty
batches, bad indices, the refusals).

On a CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py); on a GPU the same
tests run on CUDA, plus a table past 2**31 bytes.
"""

import subprocess
import sys

import pytest
import torch

from memlayers.ops import embedding_bag
from memlayers.ops import quantized_triton as qt
from memlayers.ops.quantized import (
    QMAX,
    QuantizedRows,
    dequantize_rows,
    embedding_bag_quantized,
    quantize_rows,
    quantized_nbytes,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# (N rows, D, B bags, K per bag)
CASES = {
    "basic": (50, 64, 8, 6),
    "odd-dim": (37, 13, 5, 7),
    "many-duplicates": (3, 24, 10, 32),
    "one-column": (9, 1, 4, 3),
    "wide-odd-dim": (12, 301, 3, 4),
}
# (bits, group): per row (None for int8), groups that divide D or leave a short last group
FORMATS = {"int8-row": (8, None), "int8-g5": (8, 5), "int4-g32": (4, None), "int4-g4": (4, 4)}
# The Triton path and the reference sum fp32 products in different orders: K fp32
# roundings of terms bounded by the output's scale.
RTOL = 1e-5


def _inputs(n, d, b, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    values = (torch.randn(n, d, generator=g) * d**-0.5).to(dtype)
    indices = torch.randint(0, n, (b, k), generator=g)
    weights = torch.randn(b, k, generator=g).softmax(-1)
    return values.to(DEVICE), indices.to(DEVICE), weights.to(DEVICE)


def _scales_per_column(q: QuantizedRows) -> torch.Tensor:
    return q.scales.float().repeat_interleave(q.group, -1)[:, : q.dim]  # [N, D]


def _close(actual, expected, rtol=RTOL):
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("fmt", list(FORMATS), ids=list(FORMATS))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_rows_within_half_a_step(case, fmt):
    # The format's bound (memlayers/ops/quantized.py): every element moves by at most half
    # its stored scale, and the scale is at most absmax/qmax rounded up to bf16 (2^-8).
    n, d, _, _ = CASES[case]
    bits, group = FORMATS[fmt]
    values, _, _ = _inputs(n, d, 1, 1)
    values[0] = 0.0  # a zero row: scale 0, stored exactly
    values[1, 0] = 1e-30  # far below the rest of its group
    q = quantize_rows(values, bits, group)
    s = _scales_per_column(q)
    err = (values - dequantize_rows(q)).abs()
    assert (err <= s / 2).all()
    g = q.group
    padded = torch.nn.functional.pad(values.abs(), (0, q.scales.shape[1] * g - d))
    absmax = padded.view(n, -1, g).amax(-1)  # [N, G]
    assert (q.scales.float() <= absmax / QMAX[bits] * (1 + 2**-8)).all()
    assert torch.equal(dequantize_rows(q)[0], torch.zeros(d, device=DEVICE))


def test_packing_layout():
    # int4: column 2j in the low nibble of byte j, 2j+1 in the high one, as q + 8; an odd
    # width pads the last high nibble with 8 (a zero). One group: scale = 7 / 7 = 1.
    w = torch.tensor([[1.0, -2.0, 7.0, 0.0, -7.0]])
    q = quantize_rows(w, 4, group=6)
    assert q.scales.tolist() == [[1.0]]
    lo = [1 + 8, 7 + 8, -7 + 8]
    hi = [-2 + 8, 0 + 8, 8]
    assert q.data.tolist() == [[a | (b << 4) for a, b in zip(lo, hi, strict=True)]]
    q8 = quantize_rows(w, 8)
    assert q8.data.dtype == torch.int8 and q8.data.tolist() == [[18, -36, 127, 0, -127]]


def test_bf16_tables_and_bytes():
    values, _, _ = _inputs(16, 40, 1, 1, dtype=torch.bfloat16)
    q = quantize_rows(values, 4, 8)
    assert (values.float() - dequantize_rows(q)).abs().le(_scales_per_column(q) / 2).all()
    # Bytes per row: int8 D + 2 (one bf16 scale), 4-bit ceil(D/2) + 2 per group.
    assert q.nbytes == quantized_nbytes(16, 40, 4, 8) == 16 * (20 + 2 * 5)
    assert quantized_nbytes(1 << 20, 1024, 8) == (1 << 20) * 1026
    assert quantized_nbytes(1 << 20, 1024, 4) == (1 << 20) * 576


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("fmt", list(FORMATS), ids=list(FORMATS))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_lookup_matches_float_lookup_of_dequantized_table(case, fmt, impl):
    n, d, b, k = CASES[case]
    values, indices, weights = _inputs(n, d, b, k)
    q = quantize_rows(values, *FORMATS[fmt])
    expected = embedding_bag(dequantize_rows(q).double(), indices, weights.double(), impl="torch")
    _close(embedding_bag_quantized(q, indices, weights, impl=impl), expected)


@pytest.mark.parametrize("fmt", list(FORMATS), ids=list(FORMATS))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_lookup_within_quantization_bound_of_float_lookup(case, fmt):
    # Column c of bag b moves by at most Σ_k |w_bk| · s[idx_bk, c // group] / 2 (each row
    # within half a step), plus the fp32 sums' rounding.
    n, d, b, k = CASES[case]
    values, indices, weights = _inputs(n, d, b, k, seed=1)
    q = quantize_rows(values, *FORMATS[fmt])
    out = embedding_bag_quantized(q, indices, weights).double()
    ref = embedding_bag(values.double(), indices, weights.double(), impl="torch")
    bound = (weights.double().abs().unsqueeze(-1) * _scales_per_column(q)[indices] / 2).sum(1)
    assert ((out - ref).abs() <= bound + RTOL * ref.abs().max()).all()
    # The bound is not vacuous: 4-bit moves the output by a sizeable part of it.
    if FORMATS[fmt][0] == 4 and d > 1:
        assert (out - ref).abs().max() > 0.05 * bound.max()


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("b, k", [(0, 5), (3, 0), (0, 0)], ids=["no-bags", "empty-bags", "none"])
def test_empty(b, k, impl):
    values, indices, weights = _inputs(10, 7, max(b, 1), max(k, 1))
    q = quantize_rows(values, 4)
    out = embedding_bag_quantized(q, indices[:b, :k], weights[:b, :k], impl=impl)
    assert out.shape == (b, 7) and out.dtype == torch.float32
    assert not out.any()


@pytest.mark.parametrize("bits, group", [(8, None), (8, 14), (4, 8), (4, 70)])
def test_forward_order_fixed_across_launches(bits, group):
    # Every launch in the sweep adds a bag's rows in the same order: bitwise equal outputs
    # (a scale per row, and several a row: scalar and gathered scale loads).
    values, indices, weights = _inputs(40, 70, 6, 9, seed=2)
    q = quantize_rows(values, bits, group)
    # The few-bags launches too (tiles narrower than the row, rows pipelined, several
    # rows gathered a load: 9 rows a bag leave a part-filled last gather of 8 or 16), and
    # the rule's own choice for these 6 bags on a 132-SM card.
    sweep = qt.QFWD_SWEEP + qt.QFWD_FEW_SWEEP + [(2, 1, 2, 1), (2, 1, 1, 4), None]
    assert any(c[3] > 1 for c in qt.QFWD_FEW_SWEEP)
    outs = [qt._qfwd_launch(q, indices, weights, config=c) for c in sweep]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    block, *few = qt.QFWD_FEW[bits]
    assert qt.qfwd_config(132, 70, bits, 132) == qt.QFWD_CONFIG
    # 70 columns: 70 bytes (int8: one 256-byte tile), 35 (int4: two 32-byte tiles)
    assert qt.qfwd_config(6, 70, bits, 132) == ({8: 1, 4: 2}[bits], *few)
    # 768 columns (int8: 768 bytes, int4: 384): the format's tiles over the row's next
    # power of two of bytes, whatever the number of bags below the SMs.
    for bags in (1, 32, 131):
        want = (1024 if bits == 8 else 512) // block
        assert qt.qfwd_config(bags, 768, bits, 132) == (want, *few)


def test_out_dtype():
    values, indices, weights = _inputs(20, 16, 4, 5)
    q = quantize_rows(values, 8)
    for impl in ("torch", "triton"):
        out = embedding_bag_quantized(q, indices, weights, impl=impl, out_dtype=torch.bfloat16)
        assert out.dtype == torch.bfloat16
        ref = embedding_bag_quantized(q, indices, weights, impl="torch")
        torch.testing.assert_close(out.float(), ref, rtol=2**-7, atol=0)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bad", [10, -1], ids=["past-the-end", "negative"])
def test_out_of_range_index_raises(bits, bad):
    # The kernel reads no row outside the table and fails loudly instead; on a GPU through
    # a device-side assert, which ends the process: run it in a child.
    code = (
        "import torch\n"
        "from memlayers.ops.quantized import quantize_rows, embedding_bag_quantized\n"
        f"q = quantize_rows(torch.randn(10, 8, device='{DEVICE}'), {bits})\n"
        f"i = torch.tensor([[1, {bad}]], device='{DEVICE}')\n"
        f"w = torch.ones(1, 2, device='{DEVICE}')\n"
        "embedding_bag_quantized(q, i, w, impl='triton')\n"
        "torch.cuda.synchronize() if torch.cuda.is_available() else None\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    assert "outside [0, N)" in done.stderr or "device-side assert" in done.stderr
    # In-process on the CPU (the interpreter: the assert raises at once), every kind of
    # walk: a row a step and rows gathered, with the bad index in a part-filled gather.
    q = quantize_rows(torch.randn(10, 8), bits)
    if DEVICE == "cpu":
        for config in [(1, 1, 1, 1), (1, 1, 1, 4), (1, 1, 2, 2)]:
            with pytest.raises(RuntimeError, match="outside"):
                qt._qfwd_launch(q, torch.tensor([[1, 2, bad]]), torch.ones(1, 3), config=config)
    # The reference refuses it too, in the offloaded gather's words (plain indexing would
    # read row 9 for -1); unchecked, the caller vouches for its indices.
    with pytest.raises(ValueError, match=f"index {bad} is out of range for a table of 10 rows"):
        embedding_bag_quantized(q, torch.tensor([[1, bad]]), torch.ones(1, 2), impl="torch")
    ok = torch.tensor([[1, 9]])
    torch.testing.assert_close(
        embedding_bag_quantized(q, ok, torch.ones(1, 2), impl="torch", check_indices=False),
        embedding_bag_quantized(q, ok, torch.ones(1, 2), impl="torch"),
    )


def test_gradients_are_refused():
    values, indices, weights = _inputs(10, 8, 2, 3)
    q = quantize_rows(values, 8)
    w = weights.clone().requires_grad_()
    with pytest.raises(ValueError, match="forward only"):
        embedding_bag_quantized(q, indices, w)
    with torch.no_grad():
        embedding_bag_quantized(q, indices, w)


def test_registered_op_passes_opcheck():
    values, indices, weights = _inputs(12, 10, 3, 4)
    for bits in (8, 4):
        q = quantize_rows(values, bits)
        args = (*q[:2], indices, weights, q.bits, q.group, q.dim, torch.float32)
        torch.library.opcheck(qt.embedding_bag_quantized_op, args)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda w: quantize_rows(w, 3), "bits must be one of"),
        (lambda w: quantize_rows(w, 8, 0), "group must be a positive int"),
        (lambda w: quantize_rows(w, 4, 5), "4-bit groups must be even.*group=5"),
        (lambda w: quantize_rows(w[0], 8), r"weight must be \[N, D\]"),
        (lambda w: quantize_rows(w.long(), 8), "floating point"),
        (lambda w: quantize_rows(w.index_fill(0, torch.tensor([2]), float("nan")), 8), "row 2"),
        (lambda w: dequantize_rows(quantize_rows(w, 8)._replace(dim=7)), r"\[N, 7\]"),
        (lambda w: dequantize_rows(quantize_rows(w, 8)._replace(bits=4)), "uint8"),
        (
            lambda w: dequantize_rows(quantize_rows(w, 4)._replace(group=2)),
            r"scales must be \[N=5, ceil\(dim/group\)=4\]",
        ),
    ],
    ids=["bits", "group-0", "odd-group", "1d", "int", "nan", "dim", "dtype", "scales"],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(5, 8))


def test_bad_lookup_inputs():
    q = quantize_rows(torch.randn(5, 8), 8)
    i, w = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3)
    with pytest.raises(ValueError, match="indices must be int64"):
        embedding_bag_quantized(q, i.int(), w)
    with pytest.raises(ValueError, match="weights must have the shape"):
        embedding_bag_quantized(q, i, w[:, :2])
    with pytest.raises(ValueError, match="impl must be one of"):
        embedding_bag_quantized(q, i, w, impl="cuda")


@gpu_only
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_table_past_2_31_bytes(bits):
    # Row offsets idx * D are int64: rows past 2**31 bytes read the right data.
    n, d = (1 << 22) + 3, 520 if bits == 8 else 1040
    q = QuantizedRows(
        torch.randint(-127, 128, (n, d), dtype=torch.int8, device="cuda")
        if bits == 8
        else torch.randint(0, 256, (n, d // 2), dtype=torch.uint8, device="cuda"),
        torch.rand(n, -(-d // 32) if bits == 4 else 1, device="cuda").to(torch.bfloat16),
        bits,
        32 if bits == 4 else d,
        d,
    )
    assert q.data.numel() > 2**31
    indices = torch.tensor([[n - 1, n - 2, 5], [n - 3, 0, n - 1]], device="cuda")
    weights = torch.rand(2, 3, device="cuda")
    out = embedding_bag_quantized(q, indices, weights, impl="triton")
    ref = embedding_bag_quantized(q, indices, weights, impl="torch")
    _close(out, ref.double())


@gpu_only
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_paper_shape(bits):
    # A 2**20 x 1024 table and 4096 bags of 128: the serving shape of the 373m preset.
    g = torch.Generator(device="cuda").manual_seed(0)
    values = torch.randn(1 << 20, 1024, device="cuda", generator=g) * 1024**-0.5
    q = quantize_rows(values, bits)
    indices = torch.randint(0, 1 << 20, (4096, 128), device="cuda", generator=g)
    weights = torch.rand(4096, 128, device="cuda", generator=g).softmax(-1)
    out = embedding_bag_quantized(q, indices, weights, impl="triton")
    _close(out, embedding_bag_quantized(q, indices, weights, impl="torch").double())
