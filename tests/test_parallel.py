"""Parallel memory on CPU with gloo: sharded results equal a single-process reference
built from the same unsharded weights (2 and 4 processes)."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from memlayers import MemoryConfig, MemoryValues, ProductKeyMemory, SparseValueAdam
from memlayers.ops import embedding_bag
from memlayers.parallel import build_mesh, column_widths, shard_values_

N_ROWS, DIM, K = 64, 10, 5  # DIM = 10 over 4 ranks: uneven shards [3, 3, 3, 1]


def _spawn(fn, world, *args):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(fn, world, os.path.join(tmp, "store"), args), nprocs=world)


def _entry(rank, fn, world, store, args):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(1234)  # same "unsharded" weights and data on every rank
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _bags(world):
    """Every rank's bags (uneven sizes), identical on all ranks."""
    sizes = [3 + r for r in range(world)]
    idx = [torch.randint(0, N_ROWS, (b, K)) for b in sizes]
    w = [torch.randn(b, K, dtype=torch.float64) for b in sizes]
    g = [torch.randn(b, DIM, dtype=torch.float64) for b in sizes]
    return sizes, idx, w, g


def _lookup_worker(rank, world, sparse):
    table = torch.randn(N_ROWS, DIM, dtype=torch.float64)
    sizes, idx, w, g = _bags(world)
    # Reference: one process, all tokens, the full table.
    ref_t = table.clone().requires_grad_()
    ref_w = torch.cat(w).requires_grad_()
    ref = embedding_bag(ref_t, torch.cat(idx), ref_w)
    ref.backward(torch.cat(g))
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))

    values = MemoryValues(N_ROWS, DIM, dtype=torch.float64, sparse_grad=sparse)
    with torch.no_grad():
        values.weight.copy_(table)
    shard_values_(values, dist.group.WORLD)
    cols = slice(values.shard.start, values.shard.start + values.shard.width)
    mine = w[rank].clone().requires_grad_()
    out = values.lookup(idx[rank], mine, impl="torch")
    out.backward(g[rank])
    torch.testing.assert_close(out, ref[rows])
    torch.testing.assert_close(mine.grad, ref_w.grad[rows])
    grad = values.weight.grad.to_dense() if sparse else values.weight.grad
    assert values.weight.grad.is_sparse == sparse
    torch.testing.assert_close(grad, ref_t.grad[:, cols])


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense-grad", "sparse-grad"])
def test_sharded_lookup_matches_reference(world, sparse):
    _spawn(_lookup_worker, world, sparse)


def _train_step_worker(rank, world):
    cfg = MemoryConfig(n_keys=8, heads=2, topk=3, k_dim=8, v_dim=DIM, impl="torch")
    # float64: Adam's first step is ~lr·sign(g), so fp32 summation-order noise in tiny
    # gradients would show up as O(lr) differences.
    f64 = torch.float64
    values = MemoryValues(cfg.n_rows, DIM, dtype=f64, sparse_grad=True)
    ref_values = MemoryValues(cfg.n_rows, DIM, dtype=f64, sparse_grad=True)
    ref_values.load_state_dict(values.state_dict())
    layer = ProductKeyMemory(12, cfg, values=values).double()
    ref_layer = ProductKeyMemory(12, cfg, values=ref_values).double()
    ref_layer.load_state_dict(layer.state_dict())
    xs = [torch.randn(2 + r, 12, dtype=f64) for r in range(world)]
    target = [torch.randn(2 + r, 12, dtype=f64) for r in range(world)]

    def step(layer, values, x, t, reduce_dense):
        dense = list(layer.parameters())
        opt = torch.optim.Adam(dense, lr=1e-2)
        vopt = SparseValueAdam(values.parameters(), lr=1e-2)
        (layer(x) - t).square().sum().backward()
        if reduce_dense:  # data parallel for the dense parameters (FSDP does this)
            for p in dense:
                dist.all_reduce(p.grad)
        opt.step()
        vopt.step()

    step(ref_layer, ref_values, torch.cat(xs), torch.cat(target), reduce_dense=False)
    shard_values_(values, dist.group.WORLD)
    step(layer, values, xs[rank], target[rank], reduce_dense=True)
    cols = slice(values.shard.start, values.shard.start + values.shard.width)
    torch.testing.assert_close(values.weight, ref_values.weight[:, cols])
    for (name, p), q in zip(layer.named_parameters(), ref_layer.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


@pytest.mark.parametrize("world", [2, 4])
def test_one_training_step_matches_reference(world):
    _spawn(_train_step_worker, world)


def _init_worker(rank, world):
    values = MemoryValues(N_ROWS, DIM)
    full = values.weight.detach().clone()
    with torch.device("meta"):
        sharded = MemoryValues(N_ROWS, DIM)
    shard_values_(sharded, dist.group.WORLD)
    sharded.to_empty(device="cpu")
    torch.manual_seed(1234)
    sharded.init_weights()
    cols = slice(sharded.shard.start, sharded.shard.start + sharded.shard.width)
    torch.testing.assert_close(sharded.weight, full[:, cols], rtol=0, atol=0)


def test_meta_build_shard_then_init_is_layout_independent():
    _spawn(_init_worker, 2)


def test_column_widths():
    assert column_widths(10, 4) == [3, 3, 3, 1]
    assert column_widths(1024, 2) == [512, 512]
    assert column_widths(7, 1) == [7]
    with pytest.raises(ValueError, match="v_dim=5 can't be split over mp=4"):
        column_widths(5, 4)  # chunk layout [2, 2, 1, 0]
    with pytest.raises(ValueError, match="v_dim=3 can't be split over mp=4"):
        column_widths(3, 4)


def test_mesh_errors():
    with pytest.raises(ValueError, match="world_size=6 .* mp=4"):
        build_mesh(6, 4)
    with pytest.raises(ValueError, match="mp=0"):
        build_mesh(4, 0)
