"""benchmarks/moment_structure.py: what a row, and a row x column, factor of Adam's second
moment explain."""

import pytest
import torch
from benchmark_scripts import load


@pytest.fixture(scope="module")
def ms():
    return load("moment_structure")


def test_a_factored_moment_is_explained_by_rows_and_columns_and_noise_by_neither(ms):
    g = torch.Generator().manual_seed(0)
    r = torch.rand(50, 1, generator=g) * 10 + 0.1
    c = torch.rand(1, 8, generator=g) * 3 + 0.5
    s = ms.structure(r * c)  # exactly rank one: the factored form is exact
    assert s["log_var_after_row_col"] == pytest.approx(0, abs=1e-12)
    assert s["step_error_factored"] == pytest.approx(0, abs=1e-6)  # fp32 inputs
    assert s["log_var_after_row"] > 0.05 and s["step_error_rowwise"] > 0.05
    assert s["profile_min"] < 1 < s["profile_max"]
    row_only = ms.structure(r.expand(50, 8).contiguous())
    assert row_only["step_error_rowwise"] == pytest.approx(0, abs=1e-12)
    assert row_only["profile_min"] == pytest.approx(1) == row_only["profile_max"]
    noise = ms.structure(torch.rand(50, 8, generator=g) + 0.01)  # no structure to find
    assert noise["log_var_after_row_col"] > 0.5 * noise["log_var"]


def test_untouched_rows_are_left_out_and_too_few_refused(ms):
    v = torch.ones(4, 3)
    v[1, 2] = 0  # a row never stepped has zeros: not in the statistics
    assert ms.structure(v)["rows"] == 3
    with pytest.raises(ValueError, match=r"fewer than two touched rows \(1\)"):
        ms.structure(torch.tensor([[1.0, 2.0], [0.0, 0.0]]))


def test_it_reads_a_checkpoints_value_moments_and_refuses_a_state_without(ms, tmp_path, capsys):
    sq = torch.rand(6, 4) + 0.1
    state = {"adamw": {"state": {0: {"exp_avg_sq": torch.rand(5, 5)}}},
             "values": {"state": {0: {"exp_avg_sq": sq, "exp_avg": sq}}}}  # fmt: skip
    assert list(ms.exp_avg_sq_tables(state)) == ["values/state/0/exp_avg_sq"]
    torch.save(state, tmp_path / "optimizer.pt")
    ms.main([str(tmp_path)])
    assert "values/state/0/exp_avg_sq (6, 4), 6 rows touched" in capsys.readouterr().out
    torch.save({"values": {"state": {0: {"exp_avg_sq": torch.rand(6)}}}}, tmp_path / "optimizer.pt")
    with pytest.raises(SystemExit, match="no per-element value second moment"):
        ms.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="no optimizer.pt in"):
        ms.main([str(tmp_path / "nope")])
