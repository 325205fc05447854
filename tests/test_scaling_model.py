"""The scaling model's arithmetic (benchmarks/scaling_model.py, docs/scaling.md): the
byte counts it is built from, against hand counts of the paper's 8B + 64M-row setting."""

import pytest
from benchmark_scripts import load


@pytest.fixture(scope="module")
def sm():
    return load("scaling_model")


def test_table_state_and_exchange_bytes(sm):
    m, card = sm.PAPER_8B, sm.CARDS["h100"]
    assert m.rows == 8192**2
    for moments, per_value in (("fp32", 2 + 8), ("bf16", 2 + 4)):
        r = sm.step_model(m, card, 1, 64, 16384, 4096, moments)
        # Every GPU of the group holds D / mp columns of every row with its moments.
        assert r["table_gb"] * 64 == pytest.approx(8192**2 * 4096 * per_value / 1e9)
    # Per layer: the bag all-gather from 63 peers (12 B a lookup), the outputs' columns
    # and their gradients (bf16), the partial score gradients (4 B a lookup).
    per_layer = 63 * 16384 * 128 * 12 + 2 * 16384 * 4096 * 2 * 63 / 64 + 63 * 16384 * 128 * 4
    assert r["mem_comm_gb"] == pytest.approx(3 * per_layer / 1e9)
    assert sm.step_model(m, card, 64, 1, 16384, 4096, "fp32")["mem_comm_gb"] == 0


def test_more_dp_adds_only_the_cross_node_all_reduce(sm):
    m, card = sm.PAPER_8B, sm.CARDS["h200"]
    small = sm.step_model(m, card, 2, 32, 16384, 4096, "bf16")
    large = sm.step_model(m, card, 8, 32, 16384, 4096, "bf16")
    for key in ("dense_ms", "search_ms", "lookup_ms", "opt_ms", "mem_comm_ms", "table_gb"):
        assert large[key] == pytest.approx(small[key])
    assert large["fsdp_ms"] > small["fsdp_ms"]
    assert large["tokens_per_s"] == pytest.approx(4 * small["tokens_per_s"])  # FSDP hidden


def test_check_reports_the_measured_two_gpu_gap(sm):
    text = sm.check()
    assert "measured 109.0 ms" in text and "unexplained" in text
