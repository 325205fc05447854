"""The row-wise Adam / SGD steps check their arguments the same way on both paths (PyTorch
and Triton): shapes, devices and the rows' range, before anything is written.

On a CPU the Triton path runs under TRITON_INTERPRET=1 (tests/conftest.py); on a GPU an
out-of-range row is a device-side assert, which ends the process: run it in a child.
"""

import subprocess
import sys

import pytest
import torch

from memlayers.ops import row_adam
from memlayers.ops.row_adam import row_adam_step_, row_sgd_step_

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HP = dict(step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
IMPLS = ["torch", "triton"]


def _table(n=8, d=4, device=DEVICE):
    g = torch.Generator().manual_seed(0)
    param = torch.randn(n, d, generator=g).to(device)
    return param, torch.zeros_like(param), torch.zeros_like(param)


def _adam(param, m, v, rows, grad, impl, **kw):
    row_adam_step_(param, rows, grad, m, v, **HP, impl=impl, **kw)


def _sgd(param, rows, grad, impl):
    row_sgd_step_(param, rows, grad, 1, 1e-2, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_wrong_grad_shape_is_refused_on_both_paths(impl):
    # A [2, 1] gradient for 2 rows of a [8, 4] table: the PyTorch path broadcast it over
    # the 4 columns and updated them; now both paths refuse it and write nothing.
    param, m, v = _table()
    before = param.clone()
    rows = torch.tensor([1, 3], device=DEVICE)
    bad = torch.ones(2, 1, device=DEVICE)
    with pytest.raises(ValueError, match=r"grad must be \[2, 4\] .* got \(2, 1\)"):
        _adam(param, m, v, rows, bad, impl)
    with pytest.raises(ValueError, match=r"grad must be \[2, 4\]"):
        _sgd(param, rows, bad, impl)
    with pytest.raises(ValueError, match=r"optimizer state must be .* \(8,\)"):
        _adam(param, m, v, rows, torch.ones(2, 4, device=DEVICE), impl, rowwise_v=True)
    assert torch.equal(param, before) and not m.any() and not v.any()


@pytest.mark.skipif(CUDA, reason="the CPU path's host check (CUDA: a device-side assert)")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [8, 9, -1])
def test_row_outside_the_table_is_refused(impl, bad):
    param, m, v = _table()
    before = param.clone()
    rows = torch.tensor([1, bad])
    grad = torch.ones(2, 4)
    with pytest.raises(ValueError, match=rf"row {bad} is outside the table: .*\[0, 8\)"):
        _adam(param, m, v, rows, grad, impl)
    with pytest.raises(ValueError, match=rf"row {bad} is outside the table"):
        _sgd(param, rows, grad, impl)
    assert torch.equal(param, before) and not m.any() and not v.any()
    _adam(param, m, v, torch.tensor([1, 7]), grad, impl)  # the last row is in range
    assert not torch.equal(param[7], before[7])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the device-side assert)")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows", [[1, 9], [1, 1]], ids=["outside", "repeated"])
def test_row_outside_the_table_asserts_on_the_gpu(impl, rows):
    code = (
        "import torch\n"
        "from memlayers.ops.row_adam import row_sgd_step_\n"
        "p = torch.zeros(8, 4, device='cuda')\n"
        f"rows = torch.tensor({rows}, device='cuda')\n"
        f"row_sgd_step_(p, rows, torch.ones(2, 4, device='cuda'), 1, 1e-2, impl='{impl}')\n"
        "torch.cuda.synchronize()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    assert "outside [0, 8)" in done.stderr or "device-side assert" in done.stderr


@pytest.mark.parametrize("impl", IMPLS)
def test_tensors_on_another_device_are_refused(impl):
    # The meta device stands in for a second device (the table on the GPU where there is
    # one: the Triton path takes CPU tensors only in the interpreter).
    param, m, v = _table()
    rows, grad = torch.tensor([1, 3], device=DEVICE), torch.ones(2, 4, device=DEVICE)
    on = f"but param is on {param.device}"
    with pytest.raises(ValueError, match=f"grad is on meta {on}"):
        _sgd(param, rows, grad.to("meta"), impl)
    with pytest.raises(ValueError, match=f"rows is on meta {on}"):
        _adam(param, m, v, rows.to("meta"), grad, impl)
    with pytest.raises(ValueError, match=f"optimizer state is on meta {on}"):
        _adam(param, m, v.to("meta"), rows, grad, impl)


def test_the_range_check_can_be_skipped_for_rows_known_to_be_in_range(monkeypatch):
    # The value optimizers pass check_range=False (a coalesced gradient's rows are in the
    # table): the check's reduction and device assert are not paid every step.
    import memlayers.ops.row_adam as ra

    calls = []
    monkeypatch.setattr(ra, "_check_row_range", lambda rows, n: calls.append(n))
    p, rows, g = torch.zeros(8, 4), torch.tensor([1, 3]), torch.ones(2, 4)
    ra.row_sgd_step_(p, rows, g, 1, 0.1, impl="torch")
    assert calls == [8]
    ra.row_sgd_step_(p, rows, g, 2, 0.1, impl="torch", check_range=False)
    assert calls == [8]
    from memlayers.value_optim import SparseValueAdam

    table = torch.nn.Parameter(torch.zeros(8, 4))
    table.grad = torch.sparse_coo_tensor(rows[None], g, (8, 4)).coalesce()
    SparseValueAdam([table], lr=0.1, impl="torch").step()
    assert calls == [8] and table[1].ne(0).all()


@pytest.mark.parametrize("rows_given", [True, False], ids=["rows", "all-rows"])
@pytest.mark.parametrize(
    "kind", ["fp32", "bf16-moments", "rowwise-v", "bf16-table-master", "bf16-table-rounded"]
)
def test_the_reference_in_pieces_gives_the_bits_of_one_pass(monkeypatch, kind, rows_given):
    """The reference steps its rows in pieces of ``PIECE_ELEMENTS`` (its temporaries at
    the paper shape did not fit an H100): pieces of 3 rows give one pass's bits, the
    stochastic rounding's streams included."""
    n, d = 11, 8
    g = torch.Generator().manual_seed(0)
    bf16_table = kind.startswith("bf16-table")
    moments = torch.bfloat16 if kind != "fp32" and kind != "rowwise-v" else torch.float32
    rows = torch.tensor([0, 2, 3, 5, 7, 8, 10]) if rows_given else None
    u = n if rows is None else rows.numel()
    grad = torch.randn(u, d, generator=g)
    scale = torch.tensor([0.5])

    def state():
        param = torch.randn(n, d, generator=g)
        master = param.clone() if kind == "bf16-table-master" else None
        if bf16_table:
            param = param.bfloat16()
        m = torch.randn(n, d, generator=g).to(moments)
        v_shape = (n,) if kind == "rowwise-v" else (n, d)
        v = torch.rand(v_shape, generator=g).to(moments if kind != "rowwise-v" else torch.float32)
        return param, m, v, master

    first = state()
    copies = [tuple(t.clone() if t is not None else None for t in first) for _ in range(2)]
    outs = []
    for pieces, (param, m, v, master) in zip([False, True], copies, strict=True):
        if pieces:
            monkeypatch.setattr(row_adam, "PIECE_ELEMENTS", 3 * d)  # 3 rows a piece
        row_adam.row_adam_step_torch(
            param, rows, grad, m, v, step=7, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
            weight_decay=0.1, rowwise_v=kind == "rowwise-v", master=master, grad_scale=scale,
        )  # fmt: skip
        outs.append((param, m, v, master))
    for one, split in zip(*outs, strict=True):
        if one is not None:
            assert torch.equal(one, split)
    assert not torch.equal(outs[0][0], first[0])  # it stepped


@pytest.mark.parametrize("rows_given", [True, False], ids=["rows", "all-rows"])
def test_the_sgd_reference_in_pieces_gives_the_bits_of_one_pass(monkeypatch, rows_given):
    """SGD's reference on a bf16 table (stochastically rounded) in pieces of 3 rows."""
    n, d = 11, 8
    g = torch.Generator().manual_seed(1)
    rows = torch.tensor([1, 2, 4, 6, 7, 9, 10]) if rows_given else None
    grad = torch.randn(n if rows is None else rows.numel(), d, generator=g)
    start = torch.randn(n, d, generator=g).bfloat16()
    one, split = start.clone(), start.clone()
    row_adam.row_sgd_step_torch(one, rows, grad, step=5, lr=0.1)
    monkeypatch.setattr(row_adam, "PIECE_ELEMENTS", 3 * d)
    row_adam.row_sgd_step_torch(split, rows, grad, step=5, lr=0.1)
    assert torch.equal(one, split) and not torch.equal(one, start)
