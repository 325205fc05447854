"""Defects a review of the CLI, config, logger, report and the throughput guard found
(session 32), each with the case that failed before its fix."""

import json
import sys

import pytest
import torch
from benchmark_scripts import load

from memlayers import get_preset
from memlayers.cli import main as cli_main
from memlayers.config import load_config, save_config
from memlayers.report import parameter_report


def test_a_config_path_holding_an_equals_sign_is_a_file(tmp_path, capsys):
    # compare names a variant's folder "134m-dense_optim.lr=5e-4": its config.yaml was
    # taken for an override (Key '…/134m-dense_optim' not in 'TrainArgs').
    folder = tmp_path / "tiny-dense_optim.lr=5e-4"
    folder.mkdir()
    save_config(load_config([], ["model.preset=tiny-dense", "optim.lr=5e-4"]), folder / "c.yaml")
    assert cli_main(["train", str(folder / "c.yaml"), "steps=7", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "steps: 7" in printed and "lr: 0.0005" in printed


@pytest.mark.parametrize(
    "value, want",
    [("1e-3", "1e-3"), ("0755", "0755"), ("yes", "yes"), ("12:30", "12:30")],
)
def test_text_overrides_keep_their_text(value, want):
    # Parsed as YAML first: run_dir=1e-3 went to '0.001', 0755 to '493', yes to 'True'.
    assert load_config([], [f"run_dir={value}"]).run_dir == want
    args = load_config([], ["data.dataset=text", f"data.path=2024.10{value}"])
    assert args.data.path == f"2024.10{value}"


def test_integer_overrides_read_base_ten_and_null_still_clears():
    assert load_config([], ["logging.every=010"]).logging.every == 10  # YAML: octal 8
    assert load_config([], ["model.hf=null"]).model.hf is None


def test_list_override_without_brackets_and_unknown_dataset_are_named():
    with pytest.raises(ValueError, match=r"model.memory_layers takes a list: .*=\[1,2\]"):
        load_config([], ["model.memory_layers=1,2"])
    with pytest.raises(ValueError, match="unknown data.dataset='bogus'"):
        load_config([], ["data.dataset=bogus"])  # before: passed until training started


def test_a_command_line_preset_over_a_file_with_a_model_is_refused(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(load_config([], ["model.preset=tiny-memory+"]), path)
    # Before: the file's model (every field) stayed, labelled tiny-dense.
    with pytest.raises(ValueError, match=r"model.preset=tiny-dense on the command line"):
        load_config([path], ["model.preset=tiny-dense"])
    assert load_config([path], ["model.preset=tiny-memory+"]).model.memory_layers


@pytest.mark.parametrize(
    "device", ["gpu", "cuda:x"] + ([] if torch.cuda.is_available() else ["cuda"])
)
def test_a_bad_device_for_a_run_is_one_error_line(device, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "model.preset=tiny-dense", "data.dataset=synthetic", "steps=1",
            "final_eval=false", "logging.progress=false", f"run_dir={run}",
            "device=cpu"]  # the run only feeds eval/quantize's --device check  # fmt: skip
    assert cli_main(argv) == 0
    for cmd in (["eval", str(run)], ["quantize", str(run), "--bits", "8"]):
        assert cli_main([*cmd, "--device", device]) == 1, cmd  # before: a traceback
        assert "device" in capsys.readouterr().err


def test_moe_training_flops_count_the_capacity_factor():
    cfg = get_preset("tiny-moe")
    one = parameter_report(cfg)
    cfg.moe.capacity_factor = 2.0
    two = parameter_report(cfg)
    experts = two["moe_experts"] // cfg.moe.n_experts  # one expert per MoE block
    assert two["flops_per_token"] == one["flops_per_token"]  # inference: top-1
    assert two["train_flops_per_token"] - one["train_flops_per_token"] == 3 * 2 * experts


def test_tensorboard_gets_the_wall_clock_as_walltime_not_a_scalar(tmp_path):
    from memlayers.logger import LoggingArgs, RunLogger

    calls = []

    class FakeWriter:
        def add_scalar(self, key, value, step, walltime=None):
            calls.append((key, step, walltime))

    args = LoggingArgs(progress=False, tensorboard=False)
    log = RunLogger(tmp_path, args, total_steps=2, start_step=0, enabled=True)
    log.tb = FakeWriter()
    log.log_step({"step": 1, "loss": 1.0, "tok_per_s": 10.0})
    assert {k for k, _, _ in calls} == {"loss", "tok_per_s"}  # before: "time" as float32
    assert all(w is not None and abs(w - json.loads(
        (tmp_path / "metrics.jsonl").read_text())["time"]) < 1e-6 for _, _, w in calls)  # fmt: skip


# ---- the throughput guard ---------------------------------------------------------------


@pytest.fixture
def bench(tmp_path, monkeypatch):
    module = load("bench_train")
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    return module


def test_a_preset_that_ran_before_and_fails_now_is_a_regression(bench, tmp_path):
    blob = {"card": "h100", "date": "2026-01-01", "rows": [
        {"preset": "a", "tokens_per_s": 100.0, "batch": "8x1024", "overrides": []},
        {"preset": "b", "error": "OOM", "batch": "8x1024", "overrides": []},
    ]}  # fmt: skip
    (tmp_path / "train_h100_20260101.md").write_text(f"<!-- bench_train {json.dumps(blob)} -->")
    prev = bench.previous_result("h100", exclude=None)
    assert ("b", (), "8x1024") not in prev  # a failed row is nobody's baseline
    failed = {"preset": "a", "error": "OOM", "batch": "8x1024", "overrides": []}
    lines = bench.guard([failed], prev)
    assert any("REGRESSION" in x and "a failed" in x for x in lines)  # before: "no earlier"


@pytest.mark.parametrize(
    "name, card",
    [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"),
     ("NVIDIA H100 NVL", "h100-nvl"), ("NVIDIA H200", "h200"), ("NVIDIA H200 NVL", "h200-nvl"),
     ("NVIDIA A100-SXM4-80GB", "a100")],
)  # fmt: skip
def test_cards_of_other_peaks_get_results_of_their_own(bench, name, card):
    assert bench.card_of(name) == card  # before: every H100 was "h100"


def test_steps_not_past_the_warmup_are_refused(bench, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--steps", "6", "--warmup", "15"])
    with pytest.raises(SystemExit, match="--steps=6 must exceed --warmup=15"):
        bench.main()
