"""Row-wise lazy Adam(W) and SGD for value tables: the Triton steps against the PyTorch
references and torch.optim.AdamW; untouched rows must stay bit-identical.

On a CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py).
"""

import pytest
import torch
import triton
import triton.language as tl

from memlayers import SparseValueAdam, SparseValueSGD
from memlayers.ops import embedding_bag
from memlayers.ops.row_adam import (
    param_round_seed,
    round_seed,
    rounding_noise,
    row_adam_step_torch,
    row_sgd_step_,
    row_sgd_step_torch,
    stochastic_round_bf16,
)
from memlayers.ops.row_adam_triton import _noise as _tile_noise
from memlayers.ops.row_adam_triton import row_adam_step_triton, row_sgd_step_triton

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


# A bf16 table stores each step's fp32 result rounded once; tiny fp32 differences can land
# on the neighbouring bf16 value, and the next step compounds it: two ulps (2^-7 relative
# each) on a GPU over a few steps. The interpreter truncates instead of rounding, one ulp
# per step: allow three.
BF16_ULPS = 2 if CUDA else 3


def _assert_param_close(actual, expected, travel=0.0):
    # fp32: the same formula, rounding differences only (fused multiply-adds).
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=1e-7)
    else:
        # ``travel``: how far a value may move after an ulp flip (Adam moves ~lr a step): a
        # flip made at |x| stays ~ulp(|x|) while the value shrinks towards 0.
        rtol = BF16_ULPS * 2**-7
        atol = max(1e-6, rtol * travel)
        torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def _table(n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(dtype).to(DEVICE)


def _rows(n, u, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:u].sort().values.to(DEVICE)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["adam", "adamw"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("d", [64, 37], ids=["d64", "odd-dim"])
def test_row_adam_matches_reference(d, dtype, weight_decay):
    n = 40
    params = [_table(n, d, dtype) for _ in range(2)]
    states = [[torch.zeros(n, d, device=DEVICE) for _ in range(2)] for _ in range(2)]
    touched = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    for step in (1, 2, 3):
        rows = _rows(n, 9, seed=step)
        touched[rows] = True
        grad = _table(rows.numel(), d, dtype, seed=10 + step)
        for fn, p, (m, v) in zip(
            (row_adam_step_torch, row_adam_step_triton), params, states, strict=True
        ):
            fn(p, rows, grad, m, v, step, weight_decay=weight_decay, **HP)
    _assert_param_close(params[1], params[0])
    for a, b in zip(states[0], states[1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-9)
    # Untouched rows: parameter bit-identical to the start, moments never written.
    start = _table(n, d, dtype)
    assert torch.equal(params[1][~touched], start[~touched])
    assert not states[1][0][~touched].any() and not states[1][1][~touched].any()


def test_row_adam_first_step_equals_adamw_on_touched_rows():
    # Step 1 of lazy AdamW on the touched rows is exactly dense AdamW's step on them.
    n, d = 30, 48
    p_lazy = _table(n, d, torch.float32).requires_grad_()
    p_dense = p_lazy.detach().clone().requires_grad_()
    rows = _rows(n, 11, seed=1)
    grad_rows = _table(rows.numel(), d, torch.float32, seed=2)
    p_lazy.grad = torch.sparse_coo_tensor(rows[None], grad_rows, (n, d), check_invariants=True)
    p_dense.grad = p_lazy.grad.to_dense()
    SparseValueAdam([p_lazy], lr=1e-2, weight_decay=0.1, impl="triton").step()
    torch.optim.AdamW([p_dense], lr=1e-2, weight_decay=0.1).step()
    _assert_param_close(p_lazy.detach()[rows], p_dense.detach()[rows])


def test_dense_grad_equals_adamw():
    # A dense gradient updates every row: plain AdamW, over several steps.
    n, d = 12, 33
    p1 = _table(n, d, torch.float32).requires_grad_()
    p2 = p1.detach().clone().requires_grad_()
    opt1 = SparseValueAdam([p1], lr=1e-2, weight_decay=0.05, impl="triton")
    opt2 = torch.optim.AdamW([p2], lr=1e-2, weight_decay=0.05)
    for step in range(3):
        g = _table(n, d, torch.float32, seed=20 + step)
        p1.grad, p2.grad = g.clone(), g.clone()
        opt1.step()
        opt2.step()
    torch.testing.assert_close(p1.detach(), p2.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_row_sgd_matches_reference(dtype):
    n, d = 25, 19
    p_ref, p_tri = _table(n, d, dtype), _table(n, d, dtype)
    rows = _rows(n, 7, seed=3)
    grad = _table(rows.numel(), d, dtype, seed=4)
    row_sgd_step_torch(p_ref, rows, grad, 1, 0.1)
    row_sgd_step_triton(p_tri, rows, grad, 1, 0.1)
    _assert_param_close(p_tri, p_ref)
    untouched = torch.ones(n, dtype=torch.bool, device=DEVICE)
    untouched[rows] = False
    assert torch.equal(p_tri[untouched], _table(n, d, dtype)[untouched])


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_optimizer_through_lookup(opt):
    # The whole path: sparse value gradient from the Triton lookup → Triton step, against
    # the PyTorch lookup → PyTorch step. Two lookups on one table make an uncoalesced
    # gradient (the shared-memory case), which the optimizer must coalesce.
    n, d = 50, 24
    g = torch.Generator().manual_seed(5)
    idx = [torch.randint(0, n, (6, 8), generator=g).to(DEVICE) for _ in range(2)]
    w = [torch.randn(6, 8, generator=g).to(DEVICE) for _ in range(2)]
    tables = []
    for impl in ("torch", "triton"):
        p = _table(n, d, torch.float32).requires_grad_()
        make = SparseValueAdam if opt == "adam" else SparseValueSGD
        optim = make([p], lr=1e-2, impl=impl)
        for _ in range(2):
            loss = sum(
                embedding_bag(p, i, ww, impl=impl, sparse_grad=True).pow(2).sum()
                for i, ww in zip(idx, w, strict=True)
            )
            loss.backward()
            assert p.grad.is_sparse
            optim.step()
            p.grad = None
        tables.append(p.detach())
    torch.testing.assert_close(tables[1], tables[0], rtol=1e-5, atol=1e-6)
    untouched = torch.ones(n, dtype=torch.bool, device=DEVICE)
    untouched[torch.cat(idx).unique()] = False
    assert torch.equal(tables[1][untouched], _table(n, d, torch.float32)[untouched])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_coalesce_rows_of_three_lookups(impl):
    # Three lookups into one table (Memory+'s shared values): autograd concatenates their
    # sparse gradients; coalesce_rows gives each row once, ascending, summed.
    from memlayers.value_optim import coalesce_rows

    n, d = 40, 12
    g = torch.Generator().manual_seed(8)
    p = _table(n, d, torch.float32).requires_grad_()
    loss = 0
    for _ in range(3):
        idx = torch.randint(0, n, (5, 6), generator=g).to(DEVICE)
        w = torch.randn(5, 6, generator=g).to(DEVICE)
        loss = loss + embedding_bag(p, idx, w, impl="triton", sparse_grad=True).pow(2).sum()
    loss.backward()
    assert p.grad.is_sparse and not p.grad.is_coalesced()
    ref = p.grad.coalesce()
    out = coalesce_rows(p.grad, impl=impl)
    assert out.is_coalesced()
    assert torch.equal(out.indices(), ref.indices())
    torch.testing.assert_close(out.values(), ref.values(), rtol=1e-5, atol=1e-6)
    dense = torch.randn(3, 4)
    assert coalesce_rows(dense) is dense


def test_bad_arguments():
    p = _table(10, 4, torch.float32)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    rows = torch.tensor([1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="grad must be"):
        row_adam_step_triton(p, rows, torch.zeros(3, 4, device=DEVICE), m, v, 1, **HP,
                             weight_decay=0.0)  # fmt: skip
    with pytest.raises(ValueError, match="optimizer state must be fp32"):
        row_adam_step_triton(p, rows, torch.zeros(2, 4, device=DEVICE), m.half(), v, 1, **HP,
                             weight_decay=0.0)  # fmt: skip
    with pytest.raises(ValueError, match="impl must be one of"):
        SparseValueAdam([p.requires_grad_()], impl="cuda")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_gpu_large(dtype):
    n, d = 100_000, 1024
    params = [_table(n, d, dtype) for _ in range(2)]
    states = [[torch.zeros(n, d, device=DEVICE) for _ in range(2)] for _ in range(2)]
    rows = _rows(n, 30_000, seed=6)
    grad = _table(rows.numel(), d, dtype, seed=7)
    for fn, p, (m, v) in zip(
        (row_adam_step_torch, row_adam_step_triton), params, states, strict=True
    ):
        for step in (1, 2):
            fn(p, rows, grad, m, v, step, weight_decay=0.1, **HP)
    _assert_param_close(params[1], params[0])
    untouched = torch.ones(n, dtype=torch.bool, device=DEVICE)
    untouched[rows] = False
    assert torch.equal(params[1][untouched], _table(n, d, dtype)[untouched])


def test_bf16_table_keeps_fp32_moments_through_state_dict():
    # torch.optim.Optimizer.load_state_dict casts state to the parameter's dtype; the
    # moments of a bf16 table must come back fp32 and bit-identical (exact resume).
    from memlayers.value_optim import SparseValueAdam

    table = torch.nn.Parameter(torch.randn(20, 8).bfloat16())
    opt = SparseValueAdam([table], lr=1e-2, impl="torch")
    table.grad = torch.randn(20, 8).bfloat16()
    opt.step()
    saved = {k: v.clone() for k, v in opt.state[table].items() if torch.is_tensor(v)}
    fresh = SparseValueAdam([table], lr=1e-2, impl="torch")
    fresh.load_state_dict(opt.state_dict())
    for key in ("exp_avg", "exp_avg_sq"):
        assert fresh.state[table][key].dtype == torch.float32
        assert torch.equal(fresh.state[table][key], saved[key])


# ---- row-wise second moment (SparseValueAdam(rowwise_v=True)) ----------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["adam", "adamw"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize(
    "d,block_d", [(64, 1024), (37, 1024), (37, 16)], ids=["d64", "odd-dim", "multi-tile"]
)
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_rowwise_adam_matches_reference(sparse, d, block_d, dtype, weight_decay):
    # block_d=16 splits a row over three tiles: the kernel's g² reduction loops.
    n = 40
    params = [_table(n, d, dtype) for _ in range(2)]
    states = [(torch.zeros(n, d, device=DEVICE), torch.zeros(n, device=DEVICE)) for _ in "ab"]
    touched = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    for step in (1, 2, 3):
        rows = _rows(n, 9, seed=step) if sparse else None
        touched[slice(None) if rows is None else rows] = True
        grad = _table(n if rows is None else rows.numel(), d, dtype, seed=10 + step)
        row_adam_step_torch(params[0], rows, grad, *states[0], step,
                            weight_decay=weight_decay, **HP, rowwise_v=True)  # fmt: skip
        row_adam_step_triton(params[1], rows, grad, *states[1], step, weight_decay=weight_decay,
                             **HP, rowwise_v=True, block_d=block_d)  # fmt: skip
    _assert_param_close(params[1], params[0], travel=3 * HP["lr"])
    # m sums terms of size ~0.1 and can cancel to near 0, where a fused multiply-add moves
    # the result by a rounding of those terms (~1e-8): an absolute tolerance at that scale.
    torch.testing.assert_close(states[1][0], states[0][0], rtol=1e-5, atol=3e-8)
    torch.testing.assert_close(states[1][1], states[0][1], rtol=1e-5, atol=1e-9)
    assert states[1][1].shape == (n,)
    # Untouched rows: parameter bit-identical to the start, moments never written.
    start = _table(n, d, dtype)
    assert torch.equal(params[1][~touched], start[~touched])
    assert not states[1][0][~touched].any() and not states[1][1][~touched].any()


def test_rowwise_reference_matches_hand_formula():
    # Two steps on rows {0, 2} of a 3 × 2 table, written out with Python floats.
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.99, 1e-8, 0.5
    p0 = [[1.0, -2.0], [0.5, 0.5], [3.0, 4.0]]
    grads = [[[1.0, 3.0], [-2.0, 0.0]], [[0.5, -1.0], [2.0, 2.0]]]
    rows = torch.tensor([0, 2])
    param = torch.tensor(p0, dtype=torch.float64).float()
    m, v = torch.zeros(3, 2), torch.zeros(3)
    want, mm, vv = [r[:] for r in p0], [[0.0, 0.0] for _ in p0], [0.0] * 3
    for step, g in enumerate(grads, start=1):
        row_adam_step_torch(param, rows, torch.tensor(g), m, v, step, lr, b1, b2, eps, wd,
                            rowwise_v=True)  # fmt: skip
        bc1, bc2 = 1 - b1**step, 1 - b2**step
        for gi, r in zip(g, (0, 2), strict=True):
            vv[r] = b2 * vv[r] + (1 - b2) * sum(x * x for x in gi) / len(gi)
            denom = (vv[r] / bc2) ** 0.5 + eps
            for j, x in enumerate(gi):
                mm[r][j] = b1 * mm[r][j] + (1 - b1) * x
                want[r][j] = want[r][j] * (1 - lr * wd) - lr / bc1 * mm[r][j] / denom
    torch.testing.assert_close(param, torch.tensor(want), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m, torch.tensor(mm), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(v, torch.tensor(vv), rtol=1e-6, atol=1e-10)
    assert param[1].tolist() == [0.5, 0.5] and m[1].tolist() == [0.0, 0.0] and v[1] == 0


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_rowwise_optimizer_state_dict_resume(impl):
    # Resume from a state dict continues exactly as the uninterrupted run; the saved
    # second moment is the [N] vector, and a full-width optimizer refuses it.
    n, d = 20, 8
    tables = [torch.nn.Parameter(_table(n, d, torch.bfloat16)) for _ in range(2)]
    opts = [SparseValueAdam([t], lr=1e-2, impl=impl, rowwise_v=True) for t in tables]

    def step(table, opt, seed):
        rows = _rows(n, 6, seed)
        g = _table(rows.numel(), d, torch.bfloat16, seed=30 + seed)
        table.grad = torch.sparse_coo_tensor(rows[None], g, (n, d), check_invariants=True)
        opt.step()

    for t, o in zip(tables, opts, strict=True):
        step(t, o, 1)
    saved = opts[1].state_dict()
    assert saved["state"][0]["exp_avg_sq"].shape == (n,)
    resumed = SparseValueAdam([tables[1]], lr=1e-2, impl=impl, rowwise_v=True)
    resumed.load_state_dict(saved)
    assert resumed.state[tables[1]]["exp_avg_sq"].dtype == torch.float32
    step(tables[0], opts[0], 2)
    step(tables[1], resumed, 2)
    assert torch.equal(tables[1], tables[0])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(resumed.state[tables[1]][key], opts[0].state[tables[0]][key])
    with pytest.raises(ValueError, match="rowwise_v=False"):
        SparseValueAdam([tables[1]], impl=impl).load_state_dict(saved)


def _memory_model():
    from memlayers.memory import MemoryValues

    model = torch.nn.Module()
    model.values = MemoryValues(16, 8, sparse_grad=True)
    model.proj = torch.nn.Linear(8, 8)
    return model


def test_trainer_option_sparse_adam_rowwise():
    from types import SimpleNamespace

    from memlayers.optim import OptimArgs, build_optimizer, uses_sparse_values

    args = OptimArgs(value_optimizer="sparse_adam_rowwise")
    args.validate()
    assert uses_sparse_values(args)
    model = _memory_model()
    opt = build_optimizer(model, args, impl="torch")
    assert opt.optimizers["values"].rowwise_v
    assert not build_optimizer(model, OptimArgs(), impl="torch").optimizers["values"].rowwise_v
    # The DCP state (one process): the [N] second moment as it is, made before step 1.
    entry = opt.distributed_state_dict()["values_optim"]["values"]
    assert entry["exp_avg"].shape == (16, 8) and entry["exp_avg_sq"].shape == (16,)
    with pytest.raises(ValueError, match="optim.value_optimizer must be one of"):
        OptimArgs(value_optimizer="rowwise").validate()
    # Column shards see D/mp columns of a row, so their mean of g² is not the row's.
    model.values.shard = SimpleNamespace(world=2)
    with pytest.raises(ValueError, match="parallel.mp=2"):
        build_optimizer(model, args, impl="torch")


# bf16 moments (stochastic rounding): the same bits in both paths, unbiased rounding,
# close to fp32 Adam, exact resume, the trainer option.


def _adam_both_paths(param_dtype, moment_dtype, sparse, rowwise, masters=None, block_d=None):
    """Four Adam steps of the reference and the Triton step from the same table, rows
    and gradients (the table's dtype): ``(params, states)``, reference first. ``masters``:
    a list to fill with the two paths' fp32 master copies (the steps then use them).
    ``block_d``: the Triton step's column tile (None: its launch rule)."""
    n, d = 24, 37
    params = [_table(n, d, param_dtype) for _ in range(2)]
    sq = (lambda: torch.zeros(n, device=DEVICE)) if rowwise else (
        lambda: torch.zeros(n, d, device=DEVICE, dtype=moment_dtype))  # fmt: skip
    states = [[torch.zeros(n, d, device=DEVICE, dtype=moment_dtype), sq()] for _ in range(2)]
    if masters is not None:
        masters += [p.float() for p in params]
    for step in (1, 2, 3, 4):
        rows = _rows(n, 9, seed=step) if sparse else None
        grad = _table(9 if sparse else n, d, param_dtype, seed=10 + step)
        for i, fn in enumerate((row_adam_step_torch, row_adam_step_triton)):
            m, v = states[i]
            tile = {} if i == 0 or block_d is None else {"block_d": block_d}
            fn(params[i], rows, grad, m, v, step, weight_decay=0.1, rowwise_v=rowwise, **HP,
               master=None if masters is None else masters[i], **tile)  # fmt: skip
    return params, states


@pytest.mark.parametrize("rowwise", [False, True], ids=["elementwise-v", "rowwise-v"])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_bf16_moments_match_reference(sparse, rowwise):
    params, states = _adam_both_paths(torch.float32, torch.bfloat16, sparse, rowwise)
    _assert_param_close(params[1], params[0])
    assert states[1][0].dtype == torch.bfloat16
    # The stored moments: the same random bits in both paths. An fp32 rounding difference
    # before the cut (fused multiply-adds on a GPU) may move a moment by one bf16 step.
    # A row-wise (fp32) second moment: the reduction order's rounding only.
    for a, b in zip(states[0], states[1], strict=True):
        if a.dtype == torch.float32:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-12)
        elif CUDA:
            torch.testing.assert_close(b.float(), a.float(), rtol=2**-7, atol=1e-12)
        else:
            assert torch.equal(a, b)


def test_seed_arguments_reach_the_kernels_as_unspecialized_int32(monkeypatch):
    """The step's seeds vary every step: as Python ints of 2**31 or more they reached the
    kernels as int64, and Triton specialized on their divisibility by 16, so new kernel
    variants were compiled mid-run (a stall each; benchmarks/NOTES.md session 13). Every
    launch must pass them as int32 holding the same 32 bits, in do_not_specialize."""
    import memlayers.ops.row_adam_triton as rat
    from memlayers.ops.row_adam import param_round_seed, round_seed

    def unspecialized(kernel):  # a JITFunction, or the interpreter's wrapper of one
        names = getattr(kernel, "do_not_specialize", None)
        return set(kernel.kwargs["do_not_specialize"] if names is None else names)

    for kernel in (rat.row_adam_kernel, rat.row_adam_rowwise_kernel):
        assert {"seed", "param_seed"} <= unspecialized(kernel)
    assert "param_seed" in unspecialized(rat.row_sgd_kernel)

    seen = []  # (step, the seed's parameter name, the value the launch passed)

    class Recorder:  # kernel[grid](*args, **kwargs): keep the seed arguments
        def __init__(self, positions):
            self.positions = positions  # [(parameter name, positional index)]

        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.extend(
                (step, name, args[i]) for name, i in self.positions
            )

    adam_seeds = [("seed", 15), ("param_seed", 16)]
    monkeypatch.setattr(rat, "row_adam_kernel", Recorder(adam_seeds))
    monkeypatch.setattr(rat, "row_adam_rowwise_kernel", Recorder(adam_seeds))
    monkeypatch.setattr(rat, "row_sgd_kernel", Recorder([("param_seed", 6)]))
    n, d = 8, 5
    param, grad = torch.zeros(n, d), torch.ones(3, d)
    rows = torch.tensor([0, 2, 5])
    for step in range(1, 31):
        for rowwise in (False, True):
            v = torch.zeros(n) if rowwise else torch.zeros(n, d)
            rat.row_adam_step_triton(param, rows, grad, torch.zeros(n, d), v, step, 1e-3,
                                     0.9, 0.999, 1e-8, 0.0, rowwise_v=rowwise)  # fmt: skip
        rat.row_sgd_step_triton(param, rows, grad, step, 1e-3)
    assert len(seen) == 30 * 5
    want = {"seed": round_seed, "param_seed": param_round_seed}
    for step, name, arg in seen:
        assert type(arg) is int and -(2**31) <= arg < 2**31, (step, name, arg)
        assert arg & 0xFFFFFFFF == want[name](step), (step, name, arg)
    assert any(arg < 0 for *_, arg in seen)  # seeds of 2**31 or more occur and are covered


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (Triton's compiled-kernel cache)")
def test_row_adam_compiles_one_variant_over_many_steps():
    """On the GPU: 30 steps (whose seeds fall in every int type and divisibility class)
    leave one compiled row_adam_kernel per launch configuration, not one per class."""
    import memlayers.ops.row_adam_triton as rat

    caches = getattr(rat.row_adam_kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton keeps no device_caches on a JITFunction")
    n, d = 64, 40
    param, m, v = (torch.zeros(n, d, device=DEVICE) for _ in range(3))
    rows = torch.arange(0, n, 3, device=DEVICE)
    grad = torch.ones(rows.numel(), d, device=DEVICE)

    def compiled() -> int:
        return sum(len(c[0]) for c in rat.row_adam_kernel.device_caches.values())

    rat.row_adam_step_triton(param, rows, grad, m, v, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    before = compiled()
    for step in range(2, 31):
        rat.row_adam_step_triton(param, rows, grad, m, v, step, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    assert compiled() == before


def test_stochastic_rounding_is_unbiased_and_deterministic():
    from memlayers.ops.row_adam import stochastic_round_bf16

    n = 1 << 16
    offsets = torch.arange(n) + (5 << 32)  # offsets past 2**32 use their high bits too
    noise = {s: rounding_noise(offsets, seed=s) for s in (7, 8)}
    for x in (1.0 + 2**-9, -3.0 - 3 * 2**-8, 1e-3 * (1 + 2**-10)):
        r = stochastic_round_bf16(torch.full((n,), x), noise[7]).float()
        values = r.unique()
        assert values.numel() == 2 and values[0] < x < values[1]  # the two neighbours
        ulp = (r.max() - r.min()).item()
        # Mean within 4 standard errors of x (a round-to-nearest would be off by >= ulp/8).
        assert abs(r.mean().item() - x) < 4 * ulp / 2 / n**0.5
        assert abs(torch.tensor(x).bfloat16().float().item() - x) > 4 * ulp / 2 / n**0.5
        again = stochastic_round_bf16(torch.full((n,), x), rounding_noise(offsets, seed=7))
        assert torch.equal(again.float(), r)
        other = stochastic_round_bf16(torch.full((n,), x), noise[8]).float()
        assert not torch.equal(other, r)  # another step, other bits
        # The second moment's bits (the high half) are another unbiased stream.
        high = stochastic_round_bf16(torch.full((n,), x), noise[7] >> 16).float()
        assert not torch.equal(high, r)
        assert abs(high.mean().item() - x) < 4 * ulp / 2 / n**0.5
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0])
    out = stochastic_round_bf16(special, rounding_noise(torch.arange(5), seed=3)).float()
    assert out[0] == float("inf") and out[1] == -float("inf") and out[2].isnan()
    assert out[3] == 0 and out[4] == 0


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bf16_moments_optimizer_close_to_fp32_and_resume_exact(impl):
    n, d = 20, 16
    tables = [torch.nn.Parameter(_table(n, d, torch.float32)) for _ in range(3)]
    fp32 = SparseValueAdam([tables[0]], lr=1e-2, impl=impl)
    bf16 = [SparseValueAdam([t], lr=1e-2, impl=impl, moments="bf16") for t in tables[1:]]

    def step(table, opt, seed):
        rows = _rows(n, 8, seed)
        g = _table(rows.numel(), d, torch.float32, seed=40 + seed)
        table.grad = torch.sparse_coo_tensor(rows[None], g, (n, d), check_invariants=True)
        opt.step()

    for seed in range(1, 6):
        for t, o in zip(tables, [fp32, *bf16], strict=True):
            step(t, o, seed)
    st = bf16[1].state[tables[2]]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
    # Each step moves a value ~lr; the moments' rounding changes it by ~2^-8 of that.
    torch.testing.assert_close(tables[1].data, tables[0].data, rtol=0, atol=1e-3)
    saved = bf16[1].state_dict()
    resumed = SparseValueAdam([tables[2]], lr=1e-2, impl=impl, moments="bf16")
    resumed.load_state_dict(saved)
    assert resumed.state[tables[2]]["exp_avg"].dtype == torch.bfloat16
    step(tables[1], bf16[0], 6)
    step(tables[2], resumed, 6)
    assert torch.equal(tables[2], tables[1])  # same bits: the rounding repeats
    # Switching the moments' dtype on resume converts them, as a DCP load does.
    widened = SparseValueAdam([tables[2]], impl=impl)
    widened.load_state_dict(saved)
    for key in ("exp_avg", "exp_avg_sq"):
        assert widened.state[tables[2]][key].dtype == torch.float32
        assert torch.equal(widened.state[tables[2]][key], saved["state"][0][key].float())
    with pytest.raises(ValueError, match="moments must be one of"):
        SparseValueAdam([tables[2]], moments="fp16")


def test_trainer_option_sparse_adam_bf16():
    from memlayers.optim import OptimArgs, build_optimizer, uses_sparse_values

    args = OptimArgs(value_optimizer="sparse_adam_bf16")
    args.validate()
    assert uses_sparse_values(args)
    opt = build_optimizer(_memory_model(), args, impl="torch").optimizers["values"]
    assert opt.moments == "bf16" and not opt.rowwise_v
    entry = build_optimizer(_memory_model(), args, impl="torch").distributed_state_dict()
    assert entry["values_optim"]["values"]["exp_avg_sq"].dtype == torch.bfloat16


@triton.jit
def _noise_kernel(out_ptr, first_ptr, seed, BLOCK: tl.constexpr):
    first = tl.load(first_ptr)  # int64, as the kernels compute it (row · D + column)
    offs = first + tl.arange(0, BLOCK).to(tl.int64)
    tl.store(out_ptr + tl.arange(0, BLOCK), _tile_noise(offs, first, seed).to(tl.int64))


def test_kernel_noise_across_a_2_32_offset_boundary():
    # The kernels hash an offset's high 32 bits once per tile, for the (at most two)
    # 2**32 blocks it spans: a tile straddling offset 2**32 must draw the reference's bits.
    # A seed of 2**31 or more arrives as the int32 of its bits (_seed_arg): the same noise.
    from memlayers.ops.row_adam_triton import _seed_arg

    for first, seed in (((1 << 32) - 5, 7), ((3 << 32) - 60, 0x9E3779B9), (17, 3)):
        ref = rounding_noise(first + torch.arange(64), seed)
        for arg in {seed, _seed_arg(seed)}:
            out = torch.empty(64, dtype=torch.int64, device=DEVICE)
            start = torch.tensor([first], dtype=torch.int64, device=DEVICE)
            _noise_kernel[(1,)](out, start, arg, BLOCK=64)
            assert torch.equal(out.cpu(), ref), (first, seed, arg)


# A bf16 table (model.memory.value_dtype=bf16): the parameter stored stochastically rounded,
# the same bits in both paths, its own stream, unbiased where round-to-nearest loses the
# update, exact resume (SGD's step count too).


# block_d 16 cuts a row of 37 into three tiles (the last partial): the rounding bits of
# every element are its own wherever the tiles fall.
@pytest.mark.parametrize("block_d", [None, 16], ids=["launch-rule", "three-tiles"])
@pytest.mark.parametrize("rowwise", [False, True], ids=["elementwise-v", "rowwise-v"])
@pytest.mark.parametrize("moments", ["fp32", "bf16"])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_bf16_param_matches_reference(sparse, moments, rowwise, block_d):
    params, _ = _adam_both_paths(torch.bfloat16, DTYPES[moments], sparse, rowwise,
                                 block_d=block_d)  # fmt: skip
    assert params[1].dtype == torch.bfloat16
    if CUDA:  # fused multiply-adds may move the fp32 result, rarely across a cut
        _assert_param_close(params[1], params[0], travel=4 * HP["lr"])
    else:  # the interpreter's fp32 arithmetic is the reference's: the same bits
        assert torch.equal(params[1], params[0])


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_row_sgd_bf16_param_matches_reference(sparse, dtype):
    n, d = 25, 19
    params = [_table(n, d, dtype) for _ in range(2)]
    for step in (1, 2, 3):
        rows = _rows(n, 7, seed=step) if sparse else None
        grad = _table(7 if sparse else n, d, dtype, seed=4 + step)
        row_sgd_step_torch(params[0], rows, grad, step, 0.01)
        row_sgd_step_triton(params[1], rows, grad, step, 0.01)
    if CUDA:  # the kernel fuses p - lr·g into one multiply-add: fp32 rounding apart
        _assert_param_close(params[1], params[0])
    else:  # the interpreter's fp32 arithmetic is the reference's: the same bits
        assert torch.equal(params[1], params[0])
    if dtype == torch.float32:  # fp32 as before: the exact fp32 result, no rounding
        want = _table(n, d, dtype)
        for step in (1, 2, 3):
            rows = _rows(n, 7, seed=step) if sparse else None
            grad = _table(7 if sparse else n, d, dtype, seed=4 + step)
            sel = slice(None) if rows is None else rows
            want[sel] = want[sel] - 0.01 * grad
        assert torch.equal(params[0], want)


def test_param_rounding_draws_bits_independent_of_the_moments():
    # The same value rounded with the moments' bits and with the parameter's: each is
    # unbiased, and they agree about half the time (the same bits would agree always).
    n, x = 1 << 16, 1.0 + 2**-8  # half a bf16 step above 1
    offsets = torch.arange(n)
    for step in (1, 2, 1000):
        assert param_round_seed(step) != round_seed(step)
        up_m = stochastic_round_bf16(torch.full((n,), x), rounding_noise(offsets, round_seed(step)))
        seed = param_round_seed(step)
        up_p = stochastic_round_bf16(torch.full((n,), x), rounding_noise(offsets, seed))
        up_v = stochastic_round_bf16(
            torch.full((n,), x), rounding_noise(offsets, round_seed(step)) >> 16
        )
        for up in (up_m, up_p):
            assert abs(up.float().mean().item() - x) < 4 * 2**-7 / 2 / n**0.5
        for other in (up_m, up_v):
            agree = (up_p == other).float().mean().item()
            assert 0.48 < agree < 0.52, agree


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("opt", ["adam", "adam-master", "sgd"])
def test_bf16_table_keeps_updates_below_its_rounding_step(opt, impl):
    # Values in [1, 2) have a bf16 step of 2^-7; an update of 2^-12 (1/32 step) a step is
    # lost by round-to-nearest every time (the value never moves). Stochastic rounding
    # moves the values by it on average: after 64 steps, 2^-6 (two steps) down; an fp32
    # master copy moves by it exactly, the table following it to nearest.
    n, d, steps, lr = 4, 1024, 64, 2**-12
    g = torch.Generator().manual_seed(0)
    start = (1.25 + 0.5 * torch.rand(n, d, generator=g)).bfloat16().to(DEVICE)
    table = torch.nn.Parameter(start.clone())
    # Adam's step with a constant gradient is lr (m̂ / √v̂ = 1); SGD's is lr · g.
    make = {"adam": lambda: SparseValueAdam([table], lr=lr, eps=1e-12, impl=impl),
            "adam-master": lambda: SparseValueAdam([table], lr=lr, eps=1e-12, impl=impl,
                                                   master=True),
            "sgd": lambda: SparseValueSGD([table], lr=lr, impl=impl)}  # fmt: skip
    optim = make[opt]()
    for _ in range(steps):
        table.grad = torch.ones(n, d, device=DEVICE, dtype=torch.bfloat16)
        optim.step()
    moved = (start.float() - table.detach().float()).mean().item()
    # Per value: 64 roundings of variance <= step² · (1/32)(31/32): sd ~1.4 steps; over
    # 4096 values the mean's sd is ~2^-7 · 1.4 / 64 = 1.7e-4. A round-to-nearest moves 0.
    assert abs(moved - steps * lr) < 1e-3, moved
    rtn = start.float()
    for _ in range(steps):
        rtn = (rtn - lr).bfloat16().float()
    assert torch.equal(rtn, start.float())  # what the round-to-nearest store does


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_sgd_step_count_resumes_the_rounding_exactly(impl):
    n, d = 20, 8
    tables = [torch.nn.Parameter(_table(n, d, torch.bfloat16)) for _ in range(3)]
    opts = [SparseValueSGD([t], lr=1e-3, impl=impl) for t in tables]

    def step(table, opt, seed):
        rows = _rows(n, 6, seed)
        g = _table(rows.numel(), d, torch.bfloat16, seed=50 + seed)
        table.grad = torch.sparse_coo_tensor(rows[None], g, (n, d), check_invariants=True)
        opt.step()

    for t, o in zip(tables, opts, strict=True):
        for seed in (1, 2):
            step(t, o, seed)
    saved = opts[1].state_dict()
    assert saved["state"][0]["step"] == 2
    resumed = SparseValueSGD([tables[1]], lr=1e-3, impl=impl)
    resumed.load_state_dict(saved)
    step(tables[0], opts[0], 3)
    step(tables[1], resumed, 3)
    assert torch.equal(tables[1], tables[0])
    # A fresh optimizer would start the count again and draw other bits (step 1's).
    step(tables[2], SparseValueSGD([tables[2]], lr=1e-3, impl=impl), 3)
    assert not torch.equal(tables[2], tables[0])


def test_bf16_table_needs_a_row_sparse_value_optimizer():
    from memlayers.memory import MemoryValues
    from memlayers.optim import OptimArgs, build_optimizer

    model = _memory_model()
    model.values = MemoryValues(16, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="value_dtype=bf16.*not 'adamw'"):
        build_optimizer(model, OptimArgs(value_optimizer="adamw"), impl="torch")
    model.values.sparse_grad = True
    opt = build_optimizer(model, OptimArgs(), impl="torch").optimizers["values"]
    assert opt.param_groups[0]["params"][0].dtype == torch.bfloat16


def _assert_equal(actual, expected):
    assert torch.equal(actual, expected)


def _stored_bf16(master: torch.Tensor, kernel: bool) -> torch.Tensor:
    """The bf16 table a step stores from its fp32 ``master``: rounded to nearest, or by a
    kernel under the interpreter, whose bf16 cast truncates (towards zero)."""
    if not kernel or CUDA:
        return master.bfloat16()
    return (master.view(torch.int32) & ~0xFFFF).view(torch.float32).bfloat16()


# An fp32 master copy of a bf16 table (SparseValueAdam(master=True), optim.value_master):
# the step of an fp32 table on the master, the table its rounding to nearest; the master
# through state_dict and DCP, made from the table when a checkpoint has none.


@pytest.mark.parametrize("rowwise", [False, True], ids=["elementwise-v", "rowwise-v"])
@pytest.mark.parametrize("moments", ["fp32", "bf16"])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_master_copy_matches_reference(sparse, moments, rowwise):
    masters = []
    params, _ = _adam_both_paths(torch.bfloat16, DTYPES[moments], sparse, rowwise, masters)
    assert params[1].dtype == torch.bfloat16 and masters[1].dtype == torch.float32
    _assert_param_close(masters[1], masters[0])  # fp32: rounding differences only
    assert not torch.equal(masters[0], _table(24, 37, torch.bfloat16).float())  # it moved
    assert torch.equal(params[0], masters[0].bfloat16())  # rounded to nearest
    assert torch.equal(params[1], _stored_bf16(masters[1], kernel=True))


@pytest.mark.parametrize("rowwise", [False, True], ids=["elementwise-v", "rowwise-v"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_master_copy_steps_as_an_fp32_table(impl, rowwise):
    # The same bf16 start, the same gradients: the master follows an fp32 table's steps
    # (bit for bit in the reference and the interpreter; a GPU compiles the two kernel
    # variants' multiply-adds apart: fp32 rounding), and the bf16 table is its rounding.
    same = _assert_param_close if CUDA and impl == "triton" else _assert_equal
    n, d = 20, 16
    start = _table(n, d, torch.bfloat16)
    fp32 = torch.nn.Parameter(start.float())
    bf16 = torch.nn.Parameter(start.clone())
    opts = [SparseValueAdam([t], lr=1e-2, weight_decay=0.1, impl=impl, rowwise_v=rowwise,
                            master=True) for t in (fp32, bf16)]  # fmt: skip
    assert "master" not in opts[0].init_state(fp32)  # an fp32 table needs none
    for seed in range(1, 6):
        rows = _rows(n, 8, seed)
        g = _table(rows.numel(), d, torch.bfloat16, seed=40 + seed)
        for t in (fp32, bf16):
            t.grad = torch.sparse_coo_tensor(rows[None], g.to(t.dtype), (n, d))
        for o in opts:
            o.step()
        master = opts[1].state[bf16]["master"]
        same(master, fp32.detach())
        assert torch.equal(bf16.detach(), _stored_bf16(master, kernel=impl == "triton"))
    for key in ("exp_avg", "exp_avg_sq"):
        same(opts[1].state[bf16][key], opts[0].state[fp32][key])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_master_copy_through_state_dict(impl):
    n, d = 20, 8

    def step(table, opt, seed):
        rows = _rows(n, 6, seed)
        g = _table(rows.numel(), d, torch.bfloat16, seed=seed)
        table.grad = torch.sparse_coo_tensor(rows[None], g, (n, d))
        opt.step()

    tables = [torch.nn.Parameter(_table(n, d, torch.bfloat16)) for _ in range(2)]
    opt = SparseValueAdam([tables[0]], lr=1e-3, impl=impl, master=True)
    for seed in (1, 2, 3):
        step(tables[0], opt, seed)
    master = opt.state[tables[0]]["master"]
    assert not torch.equal(master, tables[0].detach().float())  # below the table's rounding
    tables[1].data.copy_(tables[0].data)
    resumed = SparseValueAdam([tables[1]], lr=1e-3, impl=impl, master=True)
    resumed.load_state_dict(opt.state_dict())
    got = resumed.state[tables[1]]["master"]
    assert got.dtype == torch.float32 and torch.equal(got, master)  # not cast to bf16
    step(tables[0], opt, 4)
    step(tables[1], resumed, 4)
    assert torch.equal(tables[1], tables[0])
    assert torch.equal(resumed.state[tables[1]]["master"], opt.state[tables[0]]["master"])
    # Without a master the state drops it; a state saved without one gets the table's.
    plain = SparseValueAdam([tables[1]], lr=1e-3, impl=impl)
    plain.load_state_dict(opt.state_dict())
    assert "master" not in plain.state[tables[1]]
    fresh = SparseValueAdam([tables[1]], lr=1e-3, impl=impl, master=True)
    fresh.load_state_dict(plain.state_dict())
    assert torch.equal(fresh.state[tables[1]]["master"], tables[1].detach().float())


def test_master_copy_through_dcp_checkpoints(tmp_path):
    # A DCP checkpoint holds the master; one written without it (optim.value_master=
    # false) loads into a run with it, the master then made from the loaded table.
    from memlayers.checkpoint import load_checkpoint, save_distributed_checkpoint
    from memlayers.memory import MemoryValues
    from memlayers.model import build_model
    from memlayers.optim import OptimArgs, build_optimizer
    from memlayers.presets import get_preset
    from memlayers.train import compute_loss

    cfg = get_preset("tiny-memory+")
    cfg.memory.value_dtype = "bf16"
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))

    def run(master: bool, seed: int):
        model = build_model(cfg, seed=seed, sparse_values=True)
        opt = build_optimizer(model, OptimArgs(value_master=master, value_master_split=False),
                              impl="torch")  # fmt: skip
        compute_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        opt.step()
        return model, opt

    for saved_master in (True, False):
        root = tmp_path / f"m{int(saved_master)}"
        model, opt = run(saved_master, seed=0)
        save_distributed_checkpoint(root, 1, model, opt, {}, cfg.to_dict())
        other, other_opt = run(True, seed=1)  # other weights and moments
        load_checkpoint(root, other, other_opt)
        (table,) = [t.weight for t in other.modules() if isinstance(t, MemoryValues)]
        got = other_opt.optimizers["values"].state[table]["master"]
        assert got.dtype == torch.float32
        if saved_master:
            (mine,) = opt.optimizers["values"].state.values()
            assert torch.equal(got, mine["master"])
        else:
            assert torch.equal(got, table.detach().float())


# The clip's rescale handed to the value optimizer (clip_grad_norm_(..., defer_to=)): the
# same step as scaling the gradient first, the table's gradient itself left unscaled.


def _clipped_step(model, opt, defer: bool, dense: bool = False):
    """Seeded gradients (the table's row-sparse, or ``dense``), a clip that is active, one
    step: ``(norm, the table's gradient values after the clip)``."""
    from memlayers.optim import clip_grad_norm_

    g = torch.Generator().manual_seed(5)
    table = model.values.weight
    if dense:
        table.grad = torch.randn(16, 8, generator=g).to(DEVICE, table.dtype)
    else:
        rows = torch.tensor([1, 4, 9, 15], device=DEVICE)
        table.grad = torch.sparse_coo_tensor(
            rows[None], torch.randn(4, 8, generator=g).to(DEVICE, table.dtype), (16, 8),
            is_coalesced=True, check_invariants=True)  # fmt: skip
    for p in model.proj.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(DEVICE)
    norm = clip_grad_norm_(model.parameters(), 0.5, defer_to=opt if defer else None)
    after = (table.grad if dense else table.grad._values()).clone()
    opt.step()
    torch.optim.SGD(model.proj.parameters(), lr=0.1).step()
    return norm, after


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("which", ["adam", "adam-bf16-moments", "adam-rowwise-v", "sgd"])
def test_deferred_clip_scale_steps_as_a_scaled_gradient(which, impl):
    runs = []
    for defer in (False, True):
        torch.manual_seed(0)
        model = _memory_model().to(DEVICE)
        table = [model.values.weight]
        if which == "sgd":
            opt = SparseValueSGD(table, lr=0.1, impl=impl)
        else:
            moments = "bf16" if which == "adam-bf16-moments" else "fp32"
            opt = SparseValueAdam(table, lr=1e-2, impl=impl, moments=moments,
                                  rowwise_v=which == "adam-rowwise-v")  # fmt: skip
        runs.append((model, *_clipped_step(model, opt, defer), opt))
    (plain, norm0, scaled, _), (deferred, norm1, unscaled, opt) = runs
    assert torch.equal(norm0, norm1) and norm0 > 0.5  # the clip acted
    torch.testing.assert_close(scaled, unscaled * (0.5 / (norm0 + 1e-6)))
    assert not torch.equal(scaled, unscaled)  # left as it was for the optimizer
    # fp32 products in both (the clip's foreach multiply, the step's read): the same bits
    # (a GPU's compiled kernel may fuse them into other multiply-adds: fp32 rounding).
    for a, b in zip(plain.parameters(), deferred.parameters(), strict=True):
        if CUDA:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(a, b)
    assert opt.grad_scales == {}  # used by that step, not the next


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("table", ["dense-fp32", "bf16-master"])
def test_deferred_clip_scale_with_dense_gradients_and_bf16_tables(table, impl):
    # A dense gradient (every row) and a bf16 table stepped on its fp32 master. bf16: the
    # in-place clip rounds the rescaled gradient to bf16, the deferred step multiplies in
    # fp32, so the two agree to that rounding (Adam's first step is nearly sign(g)).
    params = []
    for defer in (False, True):
        torch.manual_seed(0)
        model = _memory_model().to(DEVICE)
        if table == "bf16-master":
            model.values.to(torch.bfloat16)
        opt = SparseValueAdam([model.values.weight], lr=1e-2, impl=impl,
                              master=table == "bf16-master")  # fmt: skip
        _clipped_step(model, opt, defer, dense=table == "dense-fp32")
        params.append(model.values.weight.detach().float())
        if table == "bf16-master":
            params[-1] = opt.state[model.values.weight]["master"]
    start = _memory_model().values.weight.detach().to(DEVICE)
    assert not torch.equal(params[1], start)  # it stepped
    if table == "dense-fp32" and not CUDA:
        assert torch.equal(params[1], params[0])
    else:
        torch.testing.assert_close(params[1], params[0], rtol=1e-3, atol=1e-4)


def test_deferred_clip_scale_checks_and_lifetime():
    from memlayers.optim import clip_grad_norm_

    model = _memory_model()
    table = model.values.weight
    opt = SparseValueAdam([table], impl="torch")
    table.grad = torch.ones(16, 8)
    model.proj.weight.grad = torch.ones(8, 8)
    clip_grad_norm_(model.parameters(), 1.0, defer_to=opt)
    assert set(opt.grad_scales) == {id(table)}
    assert torch.equal(table.grad, torch.ones(16, 8))  # left for the step
    assert model.proj.weight.grad.max() < 1  # the others rescaled in place
    # A second clip before the step would measure the table's gradient unscaled: refused.
    with pytest.raises(RuntimeError, match="already pending"):
        clip_grad_norm_(model.parameters(), 1.0, defer_to=opt)
    opt.zero_grad()
    assert opt.grad_scales == {}  # dropped with the gradients
    # Only the parameters the clip saw are scaled by its coefficient.
    other = torch.nn.Parameter(torch.zeros(4, 8))
    opt2 = SparseValueSGD([table, other], lr=1.0, impl="torch")
    table.grad, other.grad = torch.ones(16, 8), torch.ones(4, 8)
    clip_grad_norm_([table], 1.0, defer_to=opt2)
    opt2.step()
    assert torch.equal(other, torch.full((4, 8), -1.0))  # not scaled: not clipped
    with pytest.raises(TypeError, match="defer_to must be a value optimizer"):
        clip_grad_norm_(model.parameters(), 1.0, defer_to=torch.optim.SGD(model.parameters()))
    p = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="grad_scale must be one fp32 number"):
        row_sgd_step_(p, None, torch.ones(4, 3), 1, 0.1, impl="torch",
                      grad_scale=torch.ones(2))  # fmt: skip
    p = p.to(DEVICE)  # the Triton launchers check it too, before any kernel
    with pytest.raises(ValueError, match="grad_scale must be one fp32 number"):
        wide = torch.ones(1, dtype=torch.float64, device=DEVICE)
        row_sgd_step_triton(p, None, torch.ones(4, 3, device=DEVICE), 1, 0.1, grad_scale=wide)
