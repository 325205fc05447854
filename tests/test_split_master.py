"""A bf16 value table's fp32 master kept split: the table is the high half, the optimizer
state an int16 remainder a value (``SparseValueAdam(master="split")``,
``optim.value_master_split``). The split is exact, the steps are the fp32 master's, and
either kind of saved master loads into either optimizer (one file and DCP)."""

from __future__ import annotations

import pytest
import torch

from memlayers import SparseValueAdam
from memlayers.ops import row_adam
from memlayers.ops.row_adam import join_master, row_adam_step_torch, split_master
from memlayers.ops.row_adam_triton import row_adam_step_triton
from memlayers.optim import OptimArgs

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def _awkward_values() -> torch.Tensor:
    """fp32 values over the whole range: random magnitudes, subnormals, ±0, ±inf, the
    largest finite values, NaN, and exact ties (remainders of half a bf16 step)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=g) * torch.logspace(-44, 38, 4000)
    ties = _bits(torch.randn(500, generator=g)) & ~0xFFFF | 0x8000
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4e38, -3.4e38,
                            1e-45, -1e-45, float("nan")])  # fmt: skip
    return torch.cat([x, ties.view(torch.float32), special])


def test_split_is_exact_and_rounds_to_nearest():
    x = _awkward_values()
    hi, rem = split_master(x)
    assert hi.dtype == torch.bfloat16 and rem.dtype == torch.int16
    num = ~x.isnan()
    assert torch.equal(_bits(join_master(hi, rem))[num], _bits(x)[num])  # exact
    assert hi[~num].isnan().all() and join_master(hi, rem)[~num].isnan().all()
    # The high half is a nearest bf16: as near as round-to-nearest-even's.
    fin = num & x.isfinite() & hi.isfinite()
    assert ((hi.float() - x).abs() <= (x.bfloat16().float() - x).abs())[fin].all()
    # It differs from it only at ties (away from zero there, not to even).
    tie = (_bits(x) & 0xFFFF) == 0x8000
    differs = (hi != x.bfloat16()) & num
    assert differs.any() and not (differs & ~tie).any()
    assert (hi.float().abs() >= x.abs())[tie & fin].all()


def _lr0_step(fn, hi, rem):
    """A step that moves nothing (lr 0, no decay, zero gradient): the kernel's join and
    split of every value, nothing else."""
    n, d = hi.shape
    zeros = torch.zeros(n, d, device=hi.device)
    fn(hi, None, zeros.bfloat16(), zeros.clone(), zeros.clone(), 1, 0.0, 0.9, 0.999, 1e-8,
       0.0, master=rem)  # fmt: skip


@pytest.mark.parametrize("fn", [row_adam_step_torch, row_adam_step_triton], ids=["torch", "triton"])
def test_a_step_joins_and_splits_every_value_exactly(fn):
    x = _awkward_values()[: 4500 // 50 * 50].reshape(-1, 50)
    hi, rem = split_master(x)
    hi, rem = hi.to(DEVICE), rem.to(DEVICE)
    before = hi.clone(), rem.clone()
    _lr0_step(fn, hi, rem)
    assert torch.equal(rem, before[1])
    assert torch.equal(hi.view(torch.int16), before[0].view(torch.int16))


def _steps(fn, master_kind, rowwise, moments, steps=4):
    """``steps`` Adam steps of ``fn`` on a bf16 table from the same start and gradients,
    with an fp32 master or a split one: ``(table, fp32 values, exp_avg, exp_avg_sq)``."""
    n, d = 24, 37
    g = torch.Generator().manual_seed(3)
    start = torch.randn(n, d, generator=g)
    if master_kind == "split":
        table, master = (t.to(DEVICE) for t in split_master(start))
    else:
        table, master = start.bfloat16().to(DEVICE), start.to(DEVICE)
    m = torch.zeros(n, d, dtype=moments, device=DEVICE)
    v = torch.zeros(n, device=DEVICE) if rowwise else torch.zeros(n, d, dtype=moments,
                                                                   device=DEVICE)  # fmt: skip
    for step in range(1, steps + 1):
        rows = torch.randperm(n, generator=g)[:9].sort().values.to(DEVICE)
        grad = torch.randn(9, d, generator=g).bfloat16().to(DEVICE)
        fn(table, rows, grad, m, v, step, 1e-2, 0.9, 0.999, 1e-8, 0.1, rowwise_v=rowwise,
           master=master)  # fmt: skip
    values = join_master(table, master) if master_kind == "split" else master
    return table, values, m, v


@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16], ids=["fp32-m", "bf16-m"])
@pytest.mark.parametrize("rowwise", [False, True], ids=["elementwise-v", "rowwise-v"])
@pytest.mark.parametrize("fn", [row_adam_step_torch, row_adam_step_triton], ids=["torch", "triton"])
def test_split_master_steps_as_the_fp32_master(fn, rowwise, moments):
    table, values, m, v = _steps(fn, "split", rowwise, moments)
    ref_table, ref_values, ref_m, ref_v = _steps(fn, "fp32", rowwise, moments)
    if CUDA and fn is row_adam_step_triton:  # two compiled variants: fp32 rounding apart
        torch.testing.assert_close(values, ref_values, rtol=2e-6, atol=1e-7)
    else:  # bit for bit
        assert torch.equal(_bits(values), _bits(ref_values))
        assert torch.equal(m, ref_m) and torch.equal(v, ref_v)
    assert not torch.equal(values, table.float())  # the remainders hold something
    hi, _ = split_master(values)
    assert torch.equal(table.view(torch.int16), hi.view(torch.int16))
    if fn is row_adam_step_torch:  # the table: the fp32 master's rounding but at ties
        tie = (_bits(values) & 0xFFFF) == 0x8000
        assert torch.equal(table[~tie], ref_table[~tie])


def test_the_two_paths_agree():
    t_table, t_values, *_ = _steps(row_adam_step_torch, "split", False, torch.bfloat16)
    k_table, k_values, *_ = _steps(row_adam_step_triton, "split", False, torch.bfloat16)
    torch.testing.assert_close(k_values, t_values, rtol=2e-6, atol=1e-7)


def _optimizer_run(master, start, steps, impl="torch", opt_state=None, first=1):
    table = torch.nn.Parameter(start.clone().to(DEVICE))
    opt = SparseValueAdam([table], lr=1e-2, weight_decay=0.1, impl=impl, moments="bf16",
                          master=master)  # fmt: skip
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    n, d = table.shape
    for seed in range(first, first + steps):
        g = torch.Generator().manual_seed(seed)
        rows = torch.randperm(n, generator=g)[:7].sort().values.to(DEVICE)
        grad = torch.randn(7, d, generator=g).bfloat16().to(DEVICE)
        table.grad = torch.sparse_coo_tensor(rows[None], grad, (n, d))
        opt.step()
    return table, opt


def _values(table, opt):
    master = opt.state[table]["master"]
    return join_master(table.detach(), master) if master.dtype == torch.int16 else master


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_optimizer_split_master_state_and_steps(impl):
    start = torch.randn(20, 16, generator=torch.Generator().manual_seed(1)).bfloat16()
    split, opt = _optimizer_run("split", start, 5, impl)
    fp32, ref = _optimizer_run(True, start, 5, impl)
    assert opt.state[split]["master"].dtype == torch.int16
    assert opt.state[split]["master"].shape == split.shape
    got, want = _values(split, opt), _values(fp32, ref)
    if CUDA and impl == "triton":
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    else:
        assert torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize("saved, loaded", [("split", True), (True, "split"), ("split", "split")])
@pytest.mark.parametrize("piece", [None, 48], ids=["whole", "pieces"])
def test_either_master_loads_into_either(saved, loaded, piece, monkeypatch):
    # Three steps, saved with one kind of master, loaded into an optimizer of the other,
    # three more steps: the fp32 values of an uninterrupted run's, bit for bit. A
    # conversion walks the rows a piece at a time (48 elements: 3 rows a piece).
    if piece is not None:
        monkeypatch.setattr(row_adam, "PIECE_ELEMENTS", piece)
    start = torch.randn(20, 16, generator=torch.Generator().manual_seed(2)).bfloat16()
    whole, whole_opt = _optimizer_run(loaded, start, 6)
    first, first_opt = _optimizer_run(saved, start, 3)
    assert first_opt.state[first]["master"].dtype == (
        torch.int16 if saved == "split" else torch.float32)  # fmt: skip
    rest, rest_opt = _optimizer_run(loaded, first.detach(), 3, opt_state=first_opt.state_dict(),
                                    first=4)  # fmt: skip
    assert rest_opt.state[rest]["master"].dtype == whole_opt.state[whole]["master"].dtype
    assert torch.equal(_bits(_values(rest, rest_opt)), _bits(_values(whole, whole_opt)))
    assert torch.equal(rest.detach().view(torch.int16), whole.detach().view(torch.int16))


def test_split_master_refusals():
    # Only a bf16 table is an fp32 value's high half: others keep an fp32 copy.
    fp16 = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float16))
    assert SparseValueAdam([fp16], master="split").init_state(fp16)["master"].dtype == (
        torch.float32)  # fmt: skip
    with pytest.raises(ValueError, match="master must be one of .*got master='fp16'"):
        SparseValueAdam([torch.nn.Parameter(torch.zeros(4, 3))], master="fp16")
    p = torch.zeros(4, 3)  # fp32 param with int16 remainders
    z = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="int16 master .* bf16 param, got param torch.float32"):
        row_adam_step_torch(p, None, z, z.clone(), z.clone(), 1, 1e-3, 0.9, 0.99, 1e-8, 0.0,
                            master=torch.zeros(4, 3, dtype=torch.int16))  # fmt: skip
    with pytest.raises(ValueError, match="master must be fp32 or int16 \\(4, 3\\), got .*float16"):
        row_adam_step_torch(p.bfloat16(), None, z, z.clone(), z.clone(), 1, 1e-3, 0.9, 0.99,
                            1e-8, 0.0, master=torch.zeros(4, 3, dtype=torch.float16))  # fmt: skip


def test_the_trainer_options_pick_the_master():
    from memlayers.optim import value_master

    assert value_master(OptimArgs()) == "split"  # the default
    assert value_master(OptimArgs(value_master_split=False)) is True
    assert value_master(OptimArgs(value_master=False)) is False  # split: nothing to split


@pytest.mark.parametrize("saved_split, loaded_split", [(False, True), (True, False), (True, True)])
def test_split_master_through_dcp_checkpoints(tmp_path, saved_split, loaded_split):
    # A DCP checkpoint of either kind of master loads into a run of either kind: the fp32
    # values are the saved run's, bit for bit.
    from memlayers.checkpoint import load_checkpoint, save_distributed_checkpoint
    from memlayers.memory import MemoryValues
    from memlayers.model import build_model
    from memlayers.optim import build_optimizer
    from memlayers.presets import get_preset
    from memlayers.train import compute_loss

    cfg = get_preset("tiny-memory+")
    cfg.memory.value_dtype = "bf16"
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))

    def run(split: bool, seed: int):
        model = build_model(cfg, seed=seed, sparse_values=True)
        opt = build_optimizer(model, OptimArgs(value_master_split=split), impl="torch")
        for _ in range(2):
            compute_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
            opt.step()
            opt.zero_grad()
        (table,) = [t.weight for t in model.modules() if isinstance(t, MemoryValues)]
        return table, opt.optimizers["values"], model, opt

    table, values_opt, model, opt = run(saved_split, seed=0)
    want = _values(table, values_opt).clone()
    save_distributed_checkpoint(tmp_path, 2, model, opt, {}, cfg.to_dict())
    other, other_values_opt, other_model, other_opt = run(loaded_split, seed=1)
    load_checkpoint(tmp_path, other_model, other_opt)
    got = other_values_opt.state[other]["master"]
    assert got.dtype == (torch.int16 if loaded_split else torch.float32)
    assert torch.equal(_bits(_values(other, other_values_opt)), _bits(want))


@pytest.mark.parametrize("fn", [row_adam_step_torch, row_adam_step_triton], ids=["torch", "triton"])
def test_a_table_written_outside_the_step_keeps_its_value(fn):
    # A row set to ±0 or ±inf by someone else beside remainders of either sign: the join
    # stays within the table value's bf16 step, on its side of zero (the remainder dropped
    # where it would cross zero or turn inf into NaN), never a NaN.
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(7))
    hi, rem = (t.to(DEVICE) for t in split_master(x))
    assert (rem < 0).any() and (rem > 0).any()
    for value in (0.0, -0.0, float("inf"), -float("inf")):
        table = hi.clone()
        table[1] = value
        joined = join_master(table, rem)
        assert not joined.isnan().any()
        assert torch.equal(joined[1].signbit(), table[1].signbit())
        if value == 0:  # at most a subnormal of the remainder's size
            assert (joined[1].abs() < 2**-126).all()
        else:  # inf, or a finite value past the largest bf16 below it
            assert (joined[1].abs() >= 3.38e38).all()
        assert torch.equal(_bits(joined[0]), _bits(x[0].to(DEVICE)))  # untouched rows
        stepped, r = table.clone(), rem.clone()
        _lr0_step(fn, stepped, r)
        assert not stepped.isnan().any()
        # as values: the step's p + 0·u may give +0 for -0 (Triton 3.8's interpreter passes
        # the lr-0 step size -0.0 as +0.0), a zero either way
        assert torch.equal(stepped[1].float(), table[1].float())


@pytest.mark.parametrize("split", [False, True], ids=["fp32-master", "split-master"])
def test_dcp_without_optimizer_state_gives_a_master_of_the_loaded_table(tmp_path, split):
    # A DCP checkpoint saved without optimizer state (weights for a run to start from):
    # the master is the loaded table's, not the one made from the initial weights before
    # the load (the first step would pull the rows back towards those).
    from memlayers.checkpoint import load_checkpoint, save_distributed_checkpoint
    from memlayers.memory import MemoryValues
    from memlayers.model import build_model
    from memlayers.optim import build_optimizer
    from memlayers.presets import get_preset

    cfg = get_preset("tiny-memory+")
    cfg.memory.value_dtype = "bf16"
    saved = build_model(cfg, seed=0, sparse_values=True)
    save_distributed_checkpoint(tmp_path, 1, saved, None, {}, cfg.to_dict())
    model = build_model(cfg, seed=1, sparse_values=True)
    opt = build_optimizer(model, OptimArgs(value_master_split=split), impl="torch")
    load_checkpoint(tmp_path, model, opt)
    (table,) = [t.weight for t in model.modules() if isinstance(t, MemoryValues)]
    (want,) = [t.weight for t in saved.modules() if isinstance(t, MemoryValues)]
    assert torch.equal(table, want)
    values = _values(table, opt.optimizers["values"])
    assert torch.equal(values, want.detach().float())
