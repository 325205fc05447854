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

pytestmark = pytest.mark.gloo  # CPU processes throughout: CPU CI's (.ci/gpu leaves them)

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


def _bags(world, equal=False):
    """Every rank's bags (uneven sizes unless ``equal``), identical on all ranks."""
    sizes = [4] * world if equal else [3 + r for r in range(world)]
    idx = [torch.randint(0, N_ROWS, (b, K)) for b in sizes]
    w = [torch.randn(b, K, dtype=torch.float64) for b in sizes]
    g = [torch.randn(b, DIM, dtype=torch.float64) for b in sizes]
    return sizes, idx, w, g


def _lookup_worker(rank, world, sparse, equal=False):
    table = torch.randn(N_ROWS, DIM, dtype=torch.float64)
    sizes, idx, w, g = _bags(world, equal)
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
    values.shard.equal_bags = equal
    cols = slice(values.shard.start, values.shard.start + values.shard.width)
    mine = w[rank].clone().requires_grad_()
    out = values.lookup(idx[rank], mine, impl="torch")
    out.backward(g[rank])
    torch.testing.assert_close(out, ref[rows])
    torch.testing.assert_close(mine.grad, ref_w.grad[rows])
    grad = values.weight.grad.to_dense() if sparse else values.weight.grad
    assert values.weight.grad.is_sparse == sparse
    torch.testing.assert_close(grad, ref_t.grad[:, cols])


def _read_copy_worker(rank, world, merged, grad_read="float"):
    # A table whose lookups read an int8 copy (value_read=int8), column-sharded: each
    # shard packs its own columns (a scale per row of the shard). The reference: one
    # process reading the table those shard copies stand for, with the float table's
    # value gradient (straight through). grad_read=int8: the shard's merged walk reads
    # the output gradient of its columns packed (a scale per bag and shard).
    from memlayers.ops.quantized import dequantize_rows, quantize_rows
    from memlayers.ops.read_copy import value_grad_packed

    table = torch.randn(N_ROWS, DIM, dtype=torch.float64).float()
    sizes, idx, w, g = _bags(world)
    widths = column_widths(DIM, world)
    starts = [sum(widths[:r]) for r in range(world)]
    pieces = [table[:, a : a + n] for a, n in zip(starts, widths, strict=True)]
    seen = torch.cat([dequantize_rows(quantize_rows(p, 8)) for p in pieces], dim=1)
    ref_t = seen.clone().requires_grad_()
    ref_w = torch.cat(w).float().requires_grad_()
    ref = embedding_bag(ref_t, torch.cat(idx), ref_w)
    ref.backward(torch.cat(g).float())
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))

    values = MemoryValues(N_ROWS, DIM, sparse_grad=True, merge_grads=merged, read="int8",
                          grad_read=grad_read)  # fmt: skip
    with torch.no_grad():
        values.weight.copy_(table)
    shard_values_(values, dist.group.WORLD)
    cols = slice(values.shard.start, values.shard.start + values.shard.width)
    mine = w[rank].float().clone().requires_grad_()
    out = values.lookup(idx[rank], mine, impl="torch")
    out.backward(g[rank].float())
    torch.testing.assert_close(out, ref[rows])
    torch.testing.assert_close(mine.grad, ref_w.grad[rows])
    want = ref_t.grad[:, cols]
    if grad_read == "int8":
        packed = quantize_rows(torch.cat(g).float()[:, cols].contiguous(), 8)
        want = value_grad_packed(table[:, cols], torch.cat(idx), torch.cat(w).float(), packed,
                                 "torch").to_dense()  # fmt: skip
        assert not torch.allclose(want, ref_t.grad[:, cols])  # the packing shows
    torch.testing.assert_close(values.weight.grad.to_dense(), want)
    # A step of the shard's rows packs them again from the shard's columns.
    SparseValueAdam([values.weight], lr=0.1).step()
    want = quantize_rows(values.weight.detach(), 8)
    assert torch.equal(values.read_copy.packed.data, want.data)
    assert torch.equal(values.read_copy.packed.scales, want.scales)


@pytest.mark.parametrize(
    "merged, grad_read",
    [(False, "float"), (True, "float"), (True, "int8")],
    ids=["own-grad", "merged-grad", "merged-grad-int8-walk"],
)
def test_sharded_table_reading_its_int8_copy_matches_reference(merged, grad_read):
    _spawn(_read_copy_worker, 2, merged, grad_read)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense-grad", "sparse-grad"])
def test_sharded_lookup_matches_reference(world, sparse):
    _spawn(_lookup_worker, world, sparse)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense-grad", "sparse-grad"])
def test_equal_bags_lookup_matches_reference(sparse):
    # The ranks' bag counts taken as equal (not brought to the host): the same numbers.
    _spawn(_lookup_worker, 2, sparse, True)


def _unequal_bags_worker(rank, world):
    _, idx, w, _ = _bags(world)  # 3 and 4 bags
    values = MemoryValues(N_ROWS, DIM, dtype=torch.float64)
    shard_values_(values, dist.group.WORLD)
    values.shard.equal_bags = True
    with pytest.raises(RuntimeError, match="equal_bags is set but the ranks"):
        values.lookup(idx[rank], w[rank], impl="torch")


def test_equal_bags_broken_promise_fails_on_every_rank():
    # Both ranks stop at the check, before the bags' all-gather could hang or misread.
    _spawn(_unequal_bags_worker, 2)


def _spawn_timed(fn, world, *args, timeout_s=30):
    """``_spawn`` with a short collective timeout: a rank left waiting for a collective
    another rank never joins fails after ``timeout_s`` instead of hanging the suite."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(_timed_entry, args=(fn, world, store, timeout_s, args), nprocs=world)


def _timed_entry(rank, fn, world, store, timeout_s, args):
    import datetime

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )  # fmt: skip
    try:
        torch.manual_seed(1234)
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _empty_rank_layer_worker(rank, world, sparse, merged):
    # Rank 0 has tokens, rank 1 none: both join the sharded lookup's collectives, forward
    # and backward, and the table's gradient is the one-process reference's.
    cfg = MemoryConfig(n_keys=8, heads=2, topk=3, k_dim=8, v_dim=DIM, impl="torch")
    f64 = torch.float64
    values = MemoryValues(cfg.n_rows, DIM, dtype=f64, sparse_grad=sparse, merge_grads=merged)
    ref_values = MemoryValues(cfg.n_rows, DIM, dtype=f64, sparse_grad=sparse)
    ref_values.load_state_dict(values.state_dict())
    layer = ProductKeyMemory(12, cfg, values=values).double()
    ref_layer = ProductKeyMemory(12, cfg, values=ref_values).double()
    ref_layer.load_state_dict(layer.state_dict())
    x, g = torch.randn(3, 12, dtype=f64), torch.randn(3, 12, dtype=f64)
    ref_layer(x).backward(g)

    shard_values_(values, dist.group.WORLD)
    mine = x if rank == 0 else x[:0]
    out = layer(mine)
    assert out.shape == mine.shape
    out.backward(g[: mine.shape[0]])
    if rank == 0:
        torch.testing.assert_close(out, ref_layer(x))
        torch.testing.assert_close(layer.router.keys.grad, ref_layer.router.keys.grad)
    cols = slice(values.shard.start, values.shard.start + values.shard.width)
    grad, want = values.weight.grad, ref_values.weight.grad
    if sparse:
        grad, want = grad.to_dense(), want.to_dense()
    torch.testing.assert_close(grad, want[:, cols])
    # A lookup with no tokens on any rank, and the empty rank's eval forward, run too.
    with torch.no_grad():
        assert layer.eval()(x[:0] if rank else x).shape == (3 - 3 * rank, 12)


@pytest.mark.parametrize(
    "sparse,merged", [(False, False), (True, False), (True, True)],
    ids=["dense-grad", "sparse-grad", "merged"],
)  # fmt: skip
def test_sharded_layer_with_an_empty_rank_does_not_hang(sparse, merged):
    _spawn_timed(_empty_rank_layer_worker, 2, sparse, merged)


def _empty_rank_model_worker(rank, world):
    # The model's early return for no tokens must not skip a sharded table's lookups.
    ref = _reference_model()
    import copy

    model = copy.deepcopy(ref)
    shard_values_(model.memory_values, dist.group.WORLD)
    tokens = torch.randint(0, 37, (2, 6))
    ref_loss = ref(tokens[:, :-1], targets=tokens[:, 1:])
    ref_loss.backward()
    x, y = (tokens[:, :-1], tokens[:, 1:]) if rank == 0 else (tokens[:, :0], tokens[:, :0])
    loss = model(x, targets=y)
    loss.backward()
    if rank == 0:
        torch.testing.assert_close(loss, ref_loss)
    table = model.memory_values
    cols = slice(table.shard.start, table.shard.start + table.shard.width)
    want = ref.memory_values.weight.grad.to_dense()[:, cols]
    torch.testing.assert_close(table.weight.grad.to_dense(), want)
    with torch.no_grad():  # logits: the empty rank's are empty
        assert model(x).shape == (*x.shape, 37)


def test_sharded_model_with_an_empty_rank_does_not_hang():
    _spawn_timed(_empty_rank_model_worker, 2)


def _empty_rank_fsdp_worker(rank, world, mp):
    # FSDP2 over both ranks, the table replicated (mp = 1) or split (mp = 2): each block's
    # all-gathers and reduce-scatters need every rank, so a rank with no tokens must run
    # the blocks too (the model once skipped them for an empty batch, and the other rank
    # waited), and give every weight of the block a gradient (the router's too, mp = 2).
    ref = _reference_model()
    model, _ = _parallel_model(world, mp, ref)
    tokens = torch.randint(0, 37, (2, 6), generator=torch.Generator().manual_seed(0))
    x, y = (tokens[:, :-1], tokens[:, 1:]) if rank == 0 else (tokens[:, :0], tokens[:, :0])
    loss = model(x, targets=y)
    loss.backward()
    if rank == 0:
        torch.testing.assert_close(loss, ref(tokens[:, :-1], targets=tokens[:, 1:]))
    with torch.no_grad():
        assert model(x).shape == (*x.shape, 37)


@pytest.mark.parametrize("mp", [1, 2])
def test_fsdp_model_with_an_empty_rank_does_not_hang(mp):
    _spawn_timed(_empty_rank_fsdp_worker, 2, mp)


def _train_step_worker(rank, world, options):
    cfg = MemoryConfig(n_keys=8, heads=2, topk=3, k_dim=8, v_dim=DIM, impl="torch", **options)
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

    def step(layer, values, batches, reduce_dense):
        dense = list(layer.parameters())
        opt = torch.optim.Adam(dense, lr=1e-2)
        vopt = SparseValueAdam(values.parameters(), lr=1e-2)
        loss = 0
        for x, t in batches:
            loss = loss + (layer(x) - t).square().sum()
            loss = loss + layer.take_aux_loss()  # the balance loss, when on
        loss.backward()
        if reduce_dense:  # data parallel for the dense parameters (FSDP does this)
            for p in dense:
                dist.all_reduce(p.grad)
        opt.step()
        vopt.step()

    # The batch norm and the balance loss see each rank's own batch: the reference runs
    # the ranks' batches one by one then.
    whole = [(torch.cat(xs), torch.cat(target))]
    ref_batches = list(zip(xs, target, strict=True)) if options else whole
    step(ref_layer, ref_values, ref_batches, reduce_dense=False)
    shard_values_(values, dist.group.WORLD)
    step(layer, values, [(xs[rank], target[rank])], reduce_dense=True)
    cols = slice(values.shard.start, values.shard.start + values.shard.width)
    torch.testing.assert_close(values.weight, ref_values.weight[:, cols])
    for (name, p), q in zip(layer.named_parameters(), ref_layer.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


@pytest.mark.parametrize(
    "world,options",
    [(2, {}), (4, {}), (2, dict(query_batch_norm=True, balance_loss=0.5))],
    ids=["2", "4", "2-query-batch-norm-balance-loss"],
)
def test_one_training_step_matches_reference(world, options):
    _spawn(_train_step_worker, world, options)


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


# ---- the whole model: parallelize (FSDP2 + sharded tables), one step, DCP resharding ----


def _tiny_config():
    from memlayers import ModelConfig

    mem = MemoryConfig(n_keys=8, heads=2, topk=3, impl="torch")
    # Memory+ (3 memory blocks sharing one table) + dense blocks; dim 10 per table column
    # split: v_dim = dim = 20 -> mp=4 shards [5, 5, 5, 5]; mp=3 would be [7, 7, 6].
    return ModelConfig(
        dim=20, n_layers=4, n_heads=2, vocab_size=37, ffn="dense", memory_layers=[0, 2, 3],
        multiple_of=8, max_seq_len=16, memory=mem,
    )  # fmt: skip


def _reference_model(seed=0):
    from memlayers import build_model

    return build_model(_tiny_config(), "cpu", seed=seed, sparse_values=True).double()


def _parallel_model(world, mp, reference, **fsdp):
    """The reference's weights, parallelised over a (world/mp, mp) mesh (``fsdp``: more
    ``ParallelArgs``, e.g. ``fsdp_shard=2`` for HSDP)."""
    import copy

    from memlayers.parallel import ParallelArgs, parallelize

    model = copy.deepcopy(reference)
    plan = parallelize(model, build_mesh(world, mp), ParallelArgs(mp=mp, **fsdp))
    return model, plan


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _step_worker(rank, world, mp, fsdp=None):
    from memlayers.optim import OptimArgs, build_optimizer, clip_grad_norm_
    from memlayers.train import compute_loss

    ref = _reference_model()
    model, plan = _parallel_model(world, mp, ref, **(fsdp or {}))
    plan.equal_bags()  # every rank has 2 sequences, as the trainer promises
    tokens = torch.randint(0, 37, (2 * world, 9))  # the global batch, same on every rank
    x, y = tokens[:, :-1], tokens[:, 1:]
    mine = slice(2 * rank, 2 * rank + 2)
    # A small clip so clipping is active: its global norm must be right too.
    args = OptimArgs(lr=1e-2, warmup_steps=0, grad_clip=0.05)

    ref_opt = build_optimizer(ref, args)
    ref_logits = ref(x)
    compute_loss(ref_logits, y).backward()
    ref_norm = clip_grad_norm_(ref.parameters(), args.grad_clip)
    ref_opt.step()

    opt = build_optimizer(model, args)
    logits = model(x[mine])
    torch.testing.assert_close(logits, ref_logits[mine])
    compute_loss(logits, y[mine]).backward()
    if plan.sharded:
        # The shared table's three lookups gave one merged walk over their gathered bags
        # (each separately would leave three uncoalesced parts).
        table = plan.tables[0][1]
        assert table.merged is not None and table.weight.grad.is_coalesced()
    plan.sync_grads(model)
    # As the trainer clips: the table's rescale handed to its optimizer (the reference
    # rescales in place), the same step.
    norm = plan.clip_grad_norm_(model, args.grad_clip, defer_to=opt.clip_defer)
    torch.testing.assert_close(norm.double(), ref_norm.double())
    opt.step()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        q = ref_params[name]
        if plan.is_table(p) and plan.sharded:
            shard = [t for _, t in plan.tables if t.weight is p][0].shard
            q = q[:, shard.start : shard.start + shard.width]
        torch.testing.assert_close(_full(p.detach()), q.detach(), msg=name)


@pytest.mark.parametrize(
    "world,mp", [(2, 1), (2, 2), (4, 2), (4, 4)], ids=["dp2", "mp2", "dp2xmp2", "mp4"]
)
def test_parallel_model_training_step_matches_reference(world, mp):
    torch.set_default_dtype(torch.float64)
    try:
        _spawn(_step_worker, world, mp)
    finally:
        torch.set_default_dtype(torch.float32)


def _hsdp_layout_worker(rank, world, mp):
    """Every dense parameter sharded 2 ways and replicated over the 2 pairs of ranks."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    model, plan = _parallel_model(world, mp, _reference_model(), fsdp_shard=2)
    for name, p in model.named_parameters():
        if plan.is_table(p):
            assert not isinstance(p, DTensor), name
            continue
        assert isinstance(p, DTensor), name
        assert p.device_mesh.mesh_dim_names == ("replicate", "shard"), name
        assert p.placements == (Replicate(), Shard(0)), (name, p.placements)
        assert plan._copies(p) == 2, name
        pair = p.device_mesh.mesh.tolist()  # [[0, 1], [2, 3]]: shards inside consecutive ranks
        assert pair == [[0, 1], [2, 3]], pair


@pytest.mark.parametrize("mp", [1, 2], ids=["dp4", "dp2xmp2"])
def test_hsdp_training_step_matches_reference(mp):
    """parallel.fsdp_shard=2 on 4 ranks (HSDP: 2 replicas of 2-way shards), with and
    without a sharded table: the same logits, clipped norm and step as one process (the
    norm counts a replicated shard once: ``ParallelPlan._copies``)."""
    torch.set_default_dtype(torch.float64)
    try:
        _spawn(_hsdp_layout_worker, 4, mp)
        _spawn(_step_worker, 4, mp, {"fsdp_shard": 2})
    finally:
        torch.set_default_dtype(torch.float32)


def _bf16_gather_worker(rank, world):
    """fsdp_param_dtype=bf16 under bf16 autocast: the blocks compute with bf16 parameters
    (their gathered dtype) while their inputs keep theirs (the residual stream is not cast);
    logits and the averaged gradients are those of one process under the same autocast up
    to bf16 rounding, and the stepped parameters and gradients keep the parameters' dtype."""
    from memlayers.optim import OptimArgs, build_optimizer
    from memlayers.train import compute_loss

    ref = _reference_model().float()  # fp32, as a trainer's: autocast leaves fp64 alone
    model, plan = _parallel_model(world, 1, ref, fsdp_param_dtype="bf16")
    seen = []
    block = model.layers[1]  # a dense block
    block.register_forward_pre_hook(
        lambda m, args: seen.append((m.attention.wq.weight.dtype, args[0].dtype))
    )
    tokens = torch.randint(0, 37, (2 * world, 9), generator=torch.Generator().manual_seed(0))
    mine = tokens[2 * rank : 2 * rank + 2]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with autocast:
        ref_logits = ref(tokens[:, :-1])
        compute_loss(ref_logits, tokens[:, 1:]).backward()
        logits = model(mine[:, :-1])
    assert seen == [(torch.bfloat16, torch.float32)], seen
    ref_logits = ref_logits[2 * rank : 2 * rank + 2].detach()
    diff = (logits.double() - ref_logits.double()).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.2, (diff.mean(), diff.max())
    assert diff.max() > 0  # bf16-rounded weights where autocast keeps fp32 (the norms)
    opt = build_optimizer(model, OptimArgs(lr=1e-2, warmup_steps=0))
    with autocast:
        loss = compute_loss(logits, mine[:, 1:])
    loss.backward()
    plan.sync_grads(model)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in model.named_parameters():
        if plan.is_table(p):
            continue
        got, want = _full(p.grad), ref_grads[name]
        assert p.grad.dtype == p.dtype == torch.float32, name
        # The mean over the ranks (a sum, or one rank's own, would be 2x or far off).
        err = (got - want).norm() / want.norm()
        assert err < 0.25, (name, float(err))  # bf16 rounding: 1-10% here
    opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fsdp_bf16_all_gathers():
    _spawn(_bf16_gather_worker, 2)


def test_fsdp_settings_are_checked():
    from memlayers.config import load_config
    from memlayers.parallel import ParallelArgs

    with pytest.raises(ValueError, match="parallel.fsdp_shard=3 must divide world_size=4"):
        ParallelArgs(fsdp_shard=3).check_world(4)
    ParallelArgs(fsdp_shard=2).check_world(4)
    bf16 = ParallelArgs(fsdp_param_dtype="bf16")
    with pytest.raises(ValueError, match="needs bf16 autocast .* computes in fp32"):
        bf16.check_run(2, bf16_autocast=False)
    with pytest.raises(ValueError, match="one process .world_size=1. has no FSDP"):
        bf16.check_run(1, bf16_autocast=True)
    bf16.check_run(2, bf16_autocast=True)
    for bad, match in [
        (["parallel.fsdp_shard=-1"], "fsdp_shard must be an int >= 0"),
        (["parallel.fsdp_param_dtype=fp16"], "fsdp_param_dtype must be one of"),
        (["parallel.fsdp=false", "parallel.fsdp_shard=2"], "but parallel.fsdp=false"),
        (["parallel.fsdp=false", "parallel.fsdp_param_dtype=bf16"], "but parallel.fsdp=false"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_config([], bad)


def _probe_logits(model):
    g = torch.Generator().manual_seed(7)
    return model(torch.randint(0, 37, (3, 8), generator=g))


def _local_moments(model, opt, plan):
    """This rank's optimizer moments and step counts, keyed by parameter name, with where
    each piece sits in the full tensor: ``{key: (dim, offset, tensor)}`` (dim None: whole).
    No collectives (gloo's all-gather of DTensors aborted ~1 run in 8 on 2 CPU cores):
    table moments are column shards (``shard.start``), FSDP moments row chunks (HSDP's
    replicas save the same pieces)."""
    from torch.distributed.tensor import DTensor, Shard

    shards = {id(t.weight): t.shard for _, t in plan.tables}
    states = {}
    for o in opt.optimizers.values():
        states.update({id(p): st for p, st in o.state.items()})
    out = {}
    for name, p in model.named_parameters():
        for key, val in states.get(id(p), {}).items():
            where = (None, 0)
            if isinstance(val, DTensor):
                if val.dim() > 0:  # FSDP2: torch.chunk rows over the mesh dim of Shard(0)
                    dim = [i for i, pl in enumerate(val.placements) if pl == Shard(0)][0]
                    step = -(-val.shape[0] // val.device_mesh.size(dim))
                    start = val.device_mesh.get_local_rank(dim) * step
                    where = (0, min(start, val.shape[0]))
                val = val.to_local()
            elif shards.get(id(p)) is not None and torch.is_tensor(val) and val.dim() == 2:
                where = (1, shards[id(p)].start)
            out[f"{name}.{key}"] = (*where, val.detach().clone() if torch.is_tensor(val) else val)
    return out


def _full_moments(root):
    """The saved ranks' moments, their pieces put back together."""
    files = sorted(f for f in os.listdir(root) if f.startswith("moments_rank"))
    parts = [torch.load(os.path.join(root, f)) for f in files]
    full = {}
    for key in parts[0]:
        dim = parts[0][key][0]
        if dim is None:
            full[key] = parts[0][key][2]
            continue
        pieces = {}
        for _, off, t in (part[key] for part in parts):
            if off in pieces:  # a replica (dp, HSDP) saved the same piece
                torch.testing.assert_close(t, pieces[off], rtol=0, atol=0, msg=key)
            pieces[off] = t
        full[key] = torch.cat([pieces[off] for off in sorted(pieces)], dim=dim)
    return full


def _save_worker(rank, world, mp, root, seed, step=False, fsdp=None):
    from memlayers.checkpoint import save_distributed_checkpoint
    from memlayers.optim import OptimArgs, build_optimizer
    from memlayers.train import compute_loss

    model, plan = _parallel_model(world, mp, _reference_model(seed), **(fsdp or {}))
    opt = build_optimizer(model, OptimArgs(lr=1e-2, warmup_steps=0))
    if step:  # so every moment (value-table shards, FSDP shards) holds something to check
        tokens = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(seed))
        compute_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        plan.sync_grads(model)
        opt.step()
    save_distributed_checkpoint(
        root, 1, model, opt, {"rng": []}, _tiny_config().to_dict(), plan=plan
    )
    logits = _probe_logits(model).detach()  # every rank: the forward is collective
    if step:
        torch.save(_local_moments(model, opt, plan), os.path.join(root, f"moments_rank{rank}.pt"))
    if rank == 0:
        torch.save(logits, os.path.join(root, "probe.pt"))


def _load_worker(rank, world, mp, root, seed, fsdp=None):
    from memlayers.checkpoint import load_checkpoint
    from memlayers.optim import OptimArgs, build_optimizer

    model, plan = _parallel_model(
        world, mp, _reference_model(seed), **(fsdp or {})
    )  # other weights
    opt = build_optimizer(model, OptimArgs(lr=1e-2, warmup_steps=0))
    load_checkpoint(root, model, opt, plan=plan)
    expected = torch.load(os.path.join(root, "probe.pt"))
    torch.testing.assert_close(_probe_logits(model), expected, rtol=0, atol=0)
    if os.path.exists(os.path.join(root, "moments_rank0.pt")):  # saved after a step
        want, got = _full_moments(root), _local_moments(model, opt, plan)
        assert sorted(got) == sorted(want) and any("exp_avg_sq" in k for k in got)
        for key, (dim, offset, mine) in got.items():
            expected = want[key]
            if dim is not None:
                expected = expected.narrow(dim, offset, mine.shape[dim])
            torch.testing.assert_close(mine, expected, rtol=0, atol=0, msg=key)


def test_dcp_checkpoints_reshard(tmp_path):
    """2 -> 1, 1 -> 4, 2 -> 4, 4 -> 2 ranks (memory-parallel degree = ranks): identical
    outputs, and after a step saved on 2 ranks, identical moments and step counts on 4."""
    from memlayers.checkpoint import (
        consolidate,
        load_model_from_checkpoint,
        save_distributed_checkpoint,
    )

    torch.set_default_dtype(torch.float64)
    try:
        two, one, four = (str(tmp_path / n) for n in ("two", "one", "four"))
        _spawn(_save_worker, 2, 2, two, 1, True)
        # 2 -> 1: a plain single-process model, no process group.
        model = load_model_from_checkpoint(two).double()
        expected = torch.load(os.path.join(two, "probe.pt"))
        torch.testing.assert_close(_probe_logits(model), expected, rtol=0, atol=0)
        # ... and consolidated into one safetensors file for inference.
        single = load_model_from_checkpoint(consolidate(two, tmp_path / "single"))
        torch.testing.assert_close(_probe_logits(single.double()), expected, rtol=0, atol=0)
        # 1 -> 4: a single process writes DCP (no process group), four ranks read it.
        ref = _reference_model(seed=2)
        save_distributed_checkpoint(one, 1, ref, None, {}, _tiny_config().to_dict())
        torch.save(_probe_logits(ref).detach(), os.path.join(one, "probe.pt"))
        _spawn(_load_worker, 4, 4, one, 0)
        # 2 -> 4 after a step: the moments of table and FSDP shards reshard too.
        _spawn(_load_worker, 4, 4, two, 0)
        # 4 -> 2.
        _spawn(_save_worker, 4, 4, four, 3)
        _spawn(_load_worker, 2, 2, four, 0)
    finally:
        torch.set_default_dtype(torch.float32)


def test_hsdp_checkpoints_reshard(tmp_path):
    """Saved after a step under HSDP (4 ranks: mp 2, dense parameters 2-way shards
    replicated twice), loaded under plain FSDP on 2 ranks and back under HSDP: the same
    outputs, moments and step counts."""
    torch.set_default_dtype(torch.float64)
    try:
        hsdp, plain = str(tmp_path / "hsdp"), str(tmp_path / "plain")
        _spawn(_save_worker, 4, 2, hsdp, 1, True, {"fsdp_shard": 2})
        _spawn(_load_worker, 2, 2, hsdp, 0)
        _spawn(_save_worker, 2, 1, plain, 4, True)
        _spawn(_load_worker, 4, 1, plain, 0, {"fsdp_shard": 2})
    finally:
        torch.set_default_dtype(torch.float32)


def _torchrun(tmp_path, *overrides, resume_from=None):
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "memlayers", "train",
        "model.preset=tiny-memory+", "model.n_layers=2",
        "model.memory_layers=[1]", "data.batch_size=4", "data.seq_len=32", "steps=4",
        "checkpoint.every=2", "logging.every=1", "logging.progress=false",
        "logging.tensorboard=false", "logging.plot=false", "eval_every=0", "parallel.mp=2",
        "data.dataset=synthetic", "final_eval=false",
        "device=cpu",  # gloo ranks on the CPU, also on a machine with fewer than 2 GPUs
        *overrides,
    ]  # fmt: skip
    if resume_from:
        cmd += ["--resume-from", resume_from]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _losses(run_dir):
    import json

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize(
    "extra",
    [[], ["model.memory.value_dtype=bf16"],
     ["model.memory.value_dtype=bf16", "optim.value_optimizer=sparse_adam_bf16"],
     ["parallel.mp=1", "parallel.fsdp_shard=1", "parallel.fsdp_param_dtype=bf16",
      "dtype=bf16"]],
    ids=["fp32-table", "bf16-table-master", "bf16-table-master-moments", "hsdp-bf16-gathers"],
)  # fmt: skip
def test_torchrun_two_ranks_resume_is_exact(tmp_path, extra):
    """torchrun with 2 gloo ranks, memory-parallel 2: 4 steps straight vs 2 + resume 2. A
    bf16 table's fp32 master copy is column-sharded and resumed like the moments; bf16
    moments (the paper memory presets' setting) too, their stochastic rounding included;
    and HSDP with bf16 all-gathers (the table replicated, mp 1)."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    out = _torchrun(tmp_path, f"run_dir={full}", *extra)
    if "parallel.fsdp_shard=1" in extra:  # the layout the run says it used
        log = out.stdout + out.stderr
        assert "HSDP: 2 replicas × 1-way shards, bf16 all-gathers" in log, log[-2000:]
    _torchrun(tmp_path, f"run_dir={part}", "steps=4", "checkpoint.every=2", *extra)
    # Resume the second run from its step-2 DCP checkpoint, overwriting steps 3 and 4.
    os.remove(os.path.join(part, "metrics.jsonl"))
    _torchrun(
        tmp_path, f"run_dir={part}", *extra,
        resume_from=os.path.join(part, "checkpoints", "step_000002"),
    )  # fmt: skip
    full_losses, resumed = _losses(full), _losses(part)
    assert set(resumed) == {3, 4}
    for step in (3, 4):
        assert resumed[step] == full_losses[step], (step, resumed[step], full_losses[step])
    assert os.path.isfile(os.path.join(full, "checkpoints", "step_000004", "dcp", ".metadata"))


def test_single_process_rejects_memory_parallel():
    from memlayers.config import load_config, with_vocab
    from memlayers.parallel import build

    args = with_vocab(load_config([], ["model.preset=tiny-memory+", "parallel.mp=2"]), 64)
    with pytest.raises(ValueError, match="parallel.mp=2 .* world_size=1"):
        build(args.model.to_config(), args.parallel, torch.device("cpu"), args.seed)
    with pytest.raises(ValueError, match="parallel.mp"):
        load_config([], ["parallel.mp=0"])
