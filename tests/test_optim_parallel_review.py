"""Defects a review of parallel.py, value_optim.py and merged_grad.py found (session 32),
each with the case that failed before its fix."""

import datetime
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.checkpoint import checkpoint

from memlayers import MemoryValues, SparseValueAdam, SparseValueSGD
from memlayers.merged_grad import MergedValueGrad
from memlayers.ops.embedding_bag import embedding_bag
from memlayers.parallel import (
    ParallelArgs,
    ParallelPlan,
    build_mesh,
    column_widths,
    mark_shard,
    shard_values_,
)


def _bags(n=40, d=6, b=7, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(n, d, generator=g, dtype=torch.float64)
    idx = [torch.randint(0, n, (b, k), generator=g) for _ in range(3)]
    w = [torch.randn(b, k, generator=g, dtype=torch.float64).softmax(-1) for _ in range(3)]
    gy = [torch.randn(b, d, generator=g, dtype=torch.float64) for _ in range(3)]
    return table, idx, w, gy


def _table_grad(merged: bool, use_checkpoint: bool, hook=None) -> torch.Tensor | None:
    table, idx, w, gy = _bags()
    weight = torch.nn.Parameter(table)
    if hook is not None:
        weight.register_hook(hook)
    m = MergedValueGrad() if merged else None

    def lookups(x):  # x: a tensor the checkpointed region takes as input
        out = 0
        for i, ww, g in zip(idx, w, gy, strict=True):
            y = (
                m.lookup(weight, i, ww * x, "torch")
                if merged
                else embedding_bag(weight, i, ww * x, sparse_grad=True)
            )
            out = out + (y * g).sum()
        return out

    x = torch.ones((), dtype=torch.float64, requires_grad=True)
    loss = checkpoint(lookups, x, use_reentrant=False) if use_checkpoint else lookups(x)
    loss.backward()
    return None if weight.grad is None else weight.grad.to_dense()


def test_merged_table_gradient_reaches_the_parameter_under_non_reentrant_checkpointing():
    # Before: the merged walk set .grad on the recomputed alias ctx.saved_tensors gave
    # back, and the parameter kept grad=None (its optimizer then skipped the table).
    ref = _table_grad(merged=False, use_checkpoint=False)
    got = _table_grad(merged=True, use_checkpoint=True)
    assert got is not None
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_merged_table_tensor_hooks_get_the_merged_gradient():
    seen = []

    def hook(g):  # takes the None autograd hands it during the pass; halves the real one
        seen.append(g is None)
        return None if g is None else g * 0.5

    ref = _table_grad(merged=False, use_checkpoint=False)
    with pytest.warns(UserWarning, match="merge_grads=False"):
        got = _table_grad(merged=True, use_checkpoint=False, hook=hook)
    assert seen.count(False) == 1  # once, with the merged gradient at the end of the pass
    torch.testing.assert_close(got, ref * 0.5, rtol=1e-12, atol=1e-12)


def test_merged_table_post_accumulate_hooks_see_the_gradient():
    table, idx, w, gy = _bags()
    weight = torch.nn.Parameter(table)
    grads = []
    weight.register_post_accumulate_grad_hook(
        lambda p: grads.append(None if p.grad is None else p.grad.to_dense().clone())
    )
    m = MergedValueGrad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sum(
            (m.lookup(weight, i, ww, "torch") * g).sum()
            for i, ww, g in zip(idx, w, gy, strict=True)
        ).backward()
    assert grads and grads[-1] is not None  # before: only None (the engine's own call)
    torch.testing.assert_close(grads[-1], weight.grad.to_dense())


@pytest.mark.parametrize(
    "group, match",
    [
        ({"lr": -1.0}, "lr must be a finite number > 0"),
        ({"lr": float("inf")}, "lr must be a finite number > 0"),
        ({"betas": (1.5, 0.9)}, "betas must be two numbers"),
        ({"eps": -1.0}, "eps must be a finite number > 0"),
        ({"weight_decay": float("nan")}, "weight_decay must be a finite number >= 0"),
        ({"weight_decay": -5.0}, "weight_decay must be a finite number >= 0"),
    ],
)
def test_adam_checks_every_group_and_non_finite_values(group, match):
    a, b = torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(3, 2))
    opt = SparseValueAdam([a])
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [b], **group})
    assert len(opt.param_groups) == 1  # the bad group was not added
    with pytest.raises(ValueError, match=match):
        SparseValueAdam([{"params": [b], **group}])
    with pytest.raises(ValueError, match=match):
        SparseValueAdam([b], **group)


def test_sgd_refuses_non_finite_lr():
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        SparseValueSGD([torch.nn.Parameter(torch.zeros(2, 2))], lr=float("nan"))


def _stepped(master=True, shape=(8, 4), steps=2):
    p = torch.nn.Parameter(torch.randn(*shape).to(torch.bfloat16))
    opt = SparseValueAdam([p], lr=0.1, master=master)
    for _ in range(steps):
        p.grad = torch.randn(*shape).to(torch.bfloat16)
        opt.step()
    return p, opt


def test_load_state_dict_keyed_by_parameter_names():
    # torch's distributed state-dict helpers key the state by name, not 0..n-1: the
    # loaded fp32 moments and master were the base class's bf16 casts and a fresh master.
    p, opt = _stepped()
    sd = opt.state_dict()
    named = {
        "state": {"values.weight": sd["state"][0]},
        "param_groups": [{**sd["param_groups"][0], "params": ["values.weight"]}],
    }
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = SparseValueAdam([q], lr=0.1, master=True)
    opt2.load_state_dict(named)
    for key in ("exp_avg", "exp_avg_sq", "master"):
        assert opt2.state[q][key].dtype == torch.float32
        torch.testing.assert_close(opt2.state[q][key], opt.state[p][key], rtol=0, atol=0)


def test_load_state_dict_of_another_table_shape_names_it_and_changes_nothing():
    _, opt = _stepped(shape=(8, 4))
    q, opt2 = _stepped(shape=(16, 4), steps=1)
    before = {k: v.clone() for k, v in opt2.state[q].items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match=r"value table is \(16, 4\): the table's shape changed"):
        opt2.load_state_dict(opt.state_dict())
    for k, v in before.items():
        torch.testing.assert_close(opt2.state[q][k], v, rtol=0, atol=0)
    # The other layout of the same table still says the optimizer changed.
    p = torch.nn.Parameter(torch.zeros(8, 4))
    rowwise = SparseValueAdam([p], rowwise_v=True)
    with pytest.raises(ValueError, match="optim.value_optimizer changed"):
        rowwise.load_state_dict(opt.state_dict())


def test_column_widths_lists_the_mp_values_that_work():
    with pytest.raises(ValueError, match=r"work for this v_dim: \[1, 2, 4\]"):
        column_widths(4, 5)  # mp = 3 gives [2, 2, 0]: not suggested


# ---- two gloo ranks ---------------------------------------------------------------------


def _spawn(fn, world=2):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(fn, world, os.path.join(tmp, "store")), nprocs=world)


def _entry(rank, fn, world, store):
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )  # fmt: skip
    try:
        torch.manual_seed(1234)
        fn(rank, world)
    finally:
        dist.destroy_process_group()


def _sharded_worker(rank, world):
    # Row-wise v on a column shard: each rank's mean of g² covered its columns only.
    values = shard_values_(MemoryValues(16, 6), dist.group.WORLD)
    with pytest.raises(ValueError, match="rowwise_v=True needs whole table rows"):
        SparseValueAdam(values.parameters(), rowwise_v=True)
    SparseValueAdam(values.parameters())  # element-wise moments are per column: fine
    # A meta build (to_empty makes new parameters) keeps the mark through mark_shard.
    with torch.device("meta"):
        meta = MemoryValues(16, 6)
    shard_values_(meta, dist.group.WORLD)
    meta.to_empty(device="cpu")
    mark_shard(meta)
    with pytest.raises(ValueError, match="rowwise_v=True needs whole table rows"):
        SparseValueAdam(meta.parameters(), rowwise_v=True)
    # Weights of another shape than the indices: refused on the rank before any
    # collective (before: zero-padded, the last bags' outputs silently 0).
    idx = torch.randint(0, 16, (4, 3))
    with pytest.raises(ValueError, match="weights must have the shape of indices"):
        values.shard.lookup(values.weight, idx, torch.rand(3, 3), "torch", False)
    # Frozen replicated parameters get no gradient from sync_grads (before: zeros, which
    # a weight-decaying optimizer then moved).
    mesh = build_mesh(world, 1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[0].requires_grad_(False)
    model(torch.randn(2, 3)).sum().backward()
    ParallelPlan(mesh, ParallelArgs(mp=1, fsdp=False), []).sync_grads(model)
    assert model[0].weight.grad is None and model[1].weight.grad is not None


@pytest.mark.gloo
def test_sharded_table_review_fixes_on_two_ranks():
    _spawn(_sharded_worker)
