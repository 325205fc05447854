"""Presets, Memory+ placement and the parameter / FLOP report."""

import pytest

from memlayers.presets import PAPER_SIZES, PRESETS, VARIANTS, get_preset, memory_plus_layers
from memlayers.report import format_report, parameter_report, peak_flops_of


def test_every_size_has_every_variant():
    for size in (*PAPER_SIZES, "tiny"):
        for variant in VARIANTS:
            assert f"{size}-{variant}" in PRESETS
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("7b-dense")


def test_memory_plus_placement():
    assert memory_plus_layers(24) == [4, 12, 20]  # the paper's blocks (docs/method.md §2)
    assert memory_plus_layers(12) == [2, 6, 10]  # 134M: interval 4
    assert memory_plus_layers(22) == [3, 11, 19]
    assert memory_plus_layers(6) == [1, 3, 5]  # interval shrunk to fit
    assert memory_plus_layers(24, interval=4) == [8, 12, 16]
    assert get_preset("373m-memory+").memory_layers == [4, 12, 20]
    with pytest.raises(ValueError, match="n_layers"):
        memory_plus_layers(8, interval=4)
    with pytest.raises(ValueError, match="n_memory"):
        memory_plus_layers(2)


def test_memory_plus_report_counts_the_table_as_parameters_only():
    cfg = get_preset("373m-memory+")
    rep = parameter_report(cfg, seq_len=2048)
    mem = cfg.memory
    table = mem.n_keys**2 * cfg.dim
    assert rep["memory_table"] == table  # one shared table, counted once
    assert rep["total"] > table and rep["non_embedding"] == rep["total"] - rep["embedding"]
    rows_read = 3 * mem.heads * mem.topk * cfg.dim
    assert rep["sparse_rows_read"] == rows_read
    assert rep["active_per_token"] == rep["non_embedding"] - table + rows_read
    assert rep["active_per_token"] < rep["total"] / 4

    # FLOPs grow with the table only through the key scoring (a dense matmul against the
    # keys), never by 2 × the table: 4x the rows adds 2 × the extra key parameters.
    big = get_preset("373m-memory+")
    big.memory.n_keys = 2048
    rep_big = parameter_report(big, seq_len=2048)
    assert rep_big["memory_table"] == 4 * table
    extra_keys = 3 * mem.heads * 2 * (2048 - 1024) * (cfg.dim // 4)  # 3 layers, k_dim/2 each
    assert rep_big["flops_per_token"] - rep["flops_per_token"] == 2 * extra_keys
    assert rep["train_flops_per_token"] == 3 * rep["flops_per_token"]


def test_dense_and_moe_reports():
    dense = parameter_report(get_preset("134m-dense"), seq_len=1024)
    assert dense["active_per_token"] == dense["non_embedding"]
    cfg = get_preset("134m-dense")
    expected = 2 * (dense["non_embedding"] + cfg.vocab_size * cfg.dim) + 4 * 12 * 768 * 1024
    assert dense["flops_per_token"] == expected
    assert 130e6 < dense["total"] < 140e6  # the paper's 134M
    moe = parameter_report(get_preset("134m-moe"), seq_len=1024)
    assert moe["moe_experts"] == 16 * 12 * 3 * 768 * 2048
    assert moe["active_per_token"] == moe["non_embedding"] - moe["moe_experts"] * 15 // 16
    # the baselines slightly exceed the memory model's parameters (docs/method.md §4)
    memory_plus = parameter_report(get_preset("134m-memory+"))["total"]
    assert moe["total"] > memory_plus
    assert parameter_report(get_preset("134m-peer"))["total"] > memory_plus


def test_format_report_lists_counts():
    text = format_report(parameter_report(get_preset("tiny-memory+")), "tiny-memory+")
    assert "memory_table" in text and "active_per_token" in text and "2,097,152" in text


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756.5e12),
        ("NVIDIA H100 NVL", 835.5e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA H200 NVL", 835.5e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_flops_tells_the_h100_kinds_apart(name, peak):
    # The PCIe and NVL cards' names contain "H100"/"H200": matched first, or their MFU
    # would be read against the SXM card's peak (too low by up to 24%).
    assert peak_flops_of(name) == peak
