"""Usage statistics: rows used, KL from uniform, Gini; against hand-computed values."""

import math

import pytest
import torch

from memlayers import MemoryConfig, MemoryUsage, ProductKeyMemory
from memlayers.usage import gini, kl_from_uniform


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
