"""Usage statistics: rows used, KL from uniform, Gini; against hand-computed values."""

import math

import pytest
import torch

from memlayers import MemoryConfig, MemoryUsage, MemoryValues, ProductKeyMemory
from memlayers.usage import (
    TRAINING_STATS,
    RowCounts,
    TrainingUsage,
    gini,
    gini_coefficient,
    kl_from_uniform,
    kl_uniform,
)


def test_hand_computed():
    u = MemoryUsage(4)
    u.update(torch.tensor([[0, 0, 1]]), torch.tensor([[0.5, 0.25, 0.25]]))
    r = u.report()
    # mass = [0.75, 0.25, 0, 0]
    assert r["rows_used_pct"] == 50.0
    assert r["kl_uniform"] == pytest.approx(0.75 * math.log(3.0))
    assert r["gini"] == pytest.approx(0.625)  # (-3·0 - 1·0 + 1·0.25 + 3·0.75) / (4·1)
    # counts = [2, 1, 0, 0] -> p = [2/3, 1/3]
    assert r["kl_uniform_count"] == pytest.approx(2 / 3 * math.log(8 / 3) + 1 / 3 * math.log(4 / 3))
    assert r["lookups"] == 1


def test_uniform_and_concentrated_extremes():
    even = torch.ones(10)
    assert kl_from_uniform(even) == pytest.approx(0.0, abs=1e-12)
    assert gini(even) == pytest.approx(0.0, abs=1e-12)
    one_hot = torch.zeros(10)
    one_hot[3] = 5.0
    assert kl_from_uniform(one_hot) == pytest.approx(math.log(10))
    assert gini(one_hot) == pytest.approx(0.9)  # (n - 1) / n


def test_accumulates_over_batches():
    u = MemoryUsage(6)
    u.update(torch.tensor([[0, 1]]))
    u.update(torch.tensor([[2, 3], [4, 5]]))
    r = u.report()
    assert r["rows_used_pct"] == 100.0 and r["lookups"] == 3
    assert r["kl_uniform"] == pytest.approx(0.0, abs=1e-12)


def test_layer_tracking():
    layer = ProductKeyMemory(16, MemoryConfig(n_keys=8, heads=2, topk=4))
    usage = layer.track_usage()
    layer(torch.randn(5, 7, 16))
    r = usage.report()
    assert r["lookups"] == 35
    assert int(usage.counts.sum()) == 35 * 2 * 4
    assert 0 < r["rows_used_pct"] <= 100
    assert 0 <= r["kl_uniform"] <= r["kl_max"]
    layer.track_usage(False)
    assert layer.usage is None


def test_errors():
    with pytest.raises(ValueError, match="n_rows=0"):
        MemoryUsage(0)
    u = MemoryUsage(4)
    with pytest.raises(ValueError, match="no lookups"):
        u.report()
    with pytest.raises(ValueError, match="\\[0, 4\\)"):
        u.update(torch.tensor([[1, 4]]))


# ---- training-time statistics (TrainingUsage) ------------------------------------------------


def _shared_layers(n_keys=8, heads=2, topk=2, dim=16):
    """Two Memory+ layers reading one value table, as a model's blocks 0 and 2."""
    cfg = MemoryConfig(n_keys=n_keys, heads=heads, topk=topk)
    values = MemoryValues(cfg.n_rows, dim)
    torch.manual_seed(0)
    return {
        "block_0": ProductKeyMemory(dim, cfg, values),
        "block_2": ProductKeyMemory(dim, cfg, values),
    }


def _reference(layers, batches) -> dict[str, dict]:
    """MemoryUsage.report() of each layer and of the shared table over the same lookups."""
    refs = {name: MemoryUsage(layer.config.n_rows) for name, layer in layers.items()}
    shared = MemoryUsage(next(iter(layers.values())).config.n_rows)
    for x in batches:
        for name, layer in layers.items():
            indices, _ = layer.lookup(x)  # [N, heads*topk]
            refs[name].update(indices)
            shared.update(indices)
    return {**{n: u.report() for n, u in refs.items()}, "shared_table": shared.report()}


def _window(layers, batches, tracker) -> dict[str, float]:
    for x in batches:
        for layer in layers.values():
            layer(x)
    return tracker.record(tracker.collect().flatten().tolist())


def test_training_statistics_equal_memory_usage_report():
    layers = _shared_layers()
    tracker = TrainingUsage(layers, shared=True)
    batches = [torch.randn(2, 3, 16) for _ in range(3)]
    got = _window(layers, batches, tracker)
    want = _reference(layers, batches)
    assert tracker.names == ["block_0", "block_2", "shared_table"]
    assert set(got) == {f"usage/{n}/{s}" for n in tracker.names for s in TRAINING_STATS}
    for name, r in want.items():
        assert 0 < r["rows_used_pct"] < 100  # 18 tokens × 4 reads into 64 rows: a part
        assert got[f"usage/{name}/rows_used_pct"] == pytest.approx(r["rows_used_pct"])
        assert got[f"usage/{name}/rows_ever_used_pct"] == pytest.approx(r["rows_used_pct"])
        assert got[f"usage/{name}/kl_uniform_count"] == pytest.approx(r["kl_uniform_count"])
        assert got[f"usage/{name}/gini_count"] == pytest.approx(r["gini_count"])


def test_training_window_resets_and_skips_evaluation():
    layers = _shared_layers()
    tracker = TrainingUsage(layers, shared=True)
    first, second = [torch.randn(2, 3, 16)], [torch.randn(1, 4, 16)]
    _window(layers, first, tracker)
    assert all(int(c.counts.sum()) == 0 for c in tracker.counters)  # a fresh window
    for layer in layers.values():  # evaluation-mode lookups (validation) are not counted
        layer.eval()
        layer(torch.randn(3, 5, 16))
        layer.train()
    got = _window(layers, second, tracker)
    want = _reference(layers, second)
    ever = _reference(layers, first + second)
    for name in tracker.names:
        assert got[f"usage/{name}/rows_used_pct"] == pytest.approx(want[name]["rows_used_pct"])
        assert got[f"usage/{name}/gini_count"] == pytest.approx(want[name]["gini_count"])
        assert got[f"usage/{name}/rows_ever_used_pct"] == pytest.approx(ever[name]["rows_used_pct"])
    tracker.close()
    assert all(layer.usage is None for layer in layers.values())


def test_training_usage_state_carries_rows_ever_used():
    layers = _shared_layers()
    tracker = TrainingUsage(layers, shared=True)
    x = torch.randn(2, 3, 16)
    before = _window(layers, [x], tracker)
    state = tracker.state_dict()
    again = TrainingUsage(layers, shared=True)  # a resumed run
    again.load_state_dict(state)
    after = _window(layers, [torch.randn(1, 1, 16)], again)
    for name in again.names:
        key = f"usage/{name}/rows_ever_used_pct"
        assert after[key] >= before[key] > after[f"usage/{name}/rows_used_pct"]
    with pytest.raises(ValueError, match="block_0"):
        TrainingUsage({"block_0": layers["block_0"]}, shared=False).load_state_dict(state)


@pytest.mark.parametrize("sort", [False, True], ids=["index_add", "sort"])
def test_training_counts_compile_into_one_graph(sort):
    """A host sync or a data-dependent shape in the count update would break the graph,
    and ``fullgraph=True`` makes a break an error. Both ways of counting (the GPU's sort,
    the CPU's index_add_) give bincount's counts."""
    layer = ProductKeyMemory(16, MemoryConfig(n_keys=8, heads=2, topk=4))
    layer.track_usage(training=True)
    counter = layer.usage = RowCounts(layer.config.n_rows, sort=sort)
    x = torch.randn(3, 5, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    compiled(x).sum().backward()
    indices, _ = layer.lookup(x)
    want = 2 * torch.bincount(indices.flatten(), minlength=layer.config.n_rows)
    assert torch.equal(counter.counts, want)


def test_device_statistics_match_the_float_ones_row_by_row():
    counts = torch.tensor([[0, 3, 1, 0, 4], [2, 2, 2, 2, 2], [0, 0, 7, 0, 0]])  # [3, 5]
    assert kl_uniform(counts).tolist() == pytest.approx([kl_from_uniform(c) for c in counts])
    assert gini_coefficient(counts).tolist() == pytest.approx([gini(c) for c in counts])
    assert gini_coefficient(counts)[1] == 0 and kl_uniform(counts)[2] == pytest.approx(math.log(5))


def test_training_counts_and_statistics_never_read_back_to_the_host():
    """On the meta device any read of a value (``int(t)``, ``.item()``, ``bincount``'s
    size) fails: the per-step update and the log step's statistics run there."""
    cfg = MemoryConfig(n_keys=8, heads=2, topk=2)
    with torch.device("meta"):
        values = MemoryValues(cfg.n_rows, 16)
        layers = {f"block_{i}": ProductKeyMemory(16, cfg, values) for i in (0, 2)}
    tracker = TrainingUsage(layers, shared=True)
    for counter in [*tracker.counters, RowCounts(cfg.n_rows, "meta", sort=True)]:
        counter.update(torch.zeros(6, 4, dtype=torch.int64, device="meta"))
    reduced = []
    stats = tracker.collect(all_reduce=reduced.append)  # a stand-in for dist.all_reduce
    assert stats.is_meta and stats.shape == (3, len(TRAINING_STATS))
    assert [tuple(t.shape) for t in reduced] == [(2, cfg.n_rows)]  # one reduction, layers only


@pytest.mark.parametrize("n_rows", [1, 7, 4096])
def test_sorted_counts_match_bincount_on_skewed_reads(n_rows):
    # Runs of one row, rows never read at either end, the last row read: the widths of
    # the runs between row boundaries are the counts.
    g = torch.Generator().manual_seed(n_rows)
    reads = torch.randint(0, min(n_rows, 3), (40, 8), generator=g)
    reads[0, 0] = n_rows - 1
    for sort in (True, False):
        counter = RowCounts(n_rows, sort=sort)
        counter.update(reads)
        counter.update(reads[:5])
        want = torch.bincount(reads.flatten(), minlength=n_rows)
        want += torch.bincount(reads[:5].flatten(), minlength=n_rows)
        assert torch.equal(counter.counts, want)
    with pytest.raises(ValueError, match="n_rows must be positive, got n_rows=0"):
        RowCounts(0)
