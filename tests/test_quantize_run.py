"""Quantized value tables in models and runs: MemoryValues.quantize_, the quantized
checkpoint (rebuilt packed on load), `memlayers quantize`, eval and generate of a quantized
run, and the refusals (training, overwriting, quantizing twice)."""

import json

import pytest
import torch
from test_eval import TINY_BIOS  # a ~30k-parameter Memory+ run on 30 bios people

from memlayers.checkpoint import CheckpointError, consolidate, load_model_from_checkpoint
from memlayers.cli import main as cli_main
from memlayers.config import load_config
from memlayers.eval import evaluate, load_run
from memlayers.generate import generate
from memlayers.memory import MemoryConfig, MemoryValues, ProductKeyMemory
from memlayers.ops.quantized import dequantize_rows
from memlayers.quantize import quantize_run, quantize_tables_, table_nbytes
from memlayers.train import train

FAST_EVAL = dict(max_qa=20, max_val_tokens=2000, progress=False, write=False)


def _layer():
    torch.manual_seed(0)
    values = MemoryValues(64, 24)
    layer = ProductKeyMemory(16, MemoryConfig(n_keys=8, heads=2, topk=4, v_dim=24), values)
    return layer, values


@pytest.mark.parametrize("bits", [8, 4])
def test_memory_values_quantize_(bits):
    layer, values = _layer()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        before = layer(x)
        w = values.weight.detach().clone()
    float_bytes = values.nbytes
    values.quantize_(bits)
    assert set(values.state_dict()) == {"qdata", "qscales"}
    assert not list(values.parameters())
    assert values.nbytes < float_bytes / (3 if bits == 8 else 6)
    # The table is within half a step of the float one (tests/test_quantized.py: the bound),
    # so the layer's output moves by little.
    err = (dequantize_rows(values.quantized) - w).abs().max()
    assert err <= values.qscales.float().max() / 2
    layer.eval(), values.eval()
    with torch.no_grad():
        after = layer(x)
    assert (after - before).abs().max() < (0.02 if bits == 8 else 0.2) * before.abs().max()
    assert f"int{bits}" in repr(values)


def test_training_a_quantized_table_is_refused():
    layer, values = _layer()
    values.quantize_(8)
    with pytest.raises(ValueError, match="eval mode only"):
        layer(torch.randn(2, 16))  # train mode
    layer.eval(), values.eval()
    with pytest.raises(ValueError, match="forward only"):
        layer(torch.randn(2, 16))  # grad enabled: the router's weights want a gradient
    with pytest.raises(AttributeError, match="quantized .*no float weight to train"):
        _ = values.weight  # what an optimizer or an export reads
    with pytest.raises(ValueError, match="quantized already"):
        values.quantize_(4)


def test_meta_build_lays_out_the_packed_buffers_and_init_fills_them():
    with torch.device("meta"):
        values = MemoryValues(64, 13)
    values.quantize_(4, 4)
    assert values.qdata.is_meta and values.qdata.shape == (64, 7)
    assert values.qscales.shape == (64, 4)
    values.to_empty(device="cpu")
    values.init_weights()
    assert not dequantize_rows(values.quantized).any()  # a zero table, no garbage


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("quantize") / "run"
    train(load_config([], [*TINY_BIOS, f"run_dir={run}"]))
    return run


@pytest.fixture(scope="module")
def int8_run(run_dir):
    return quantize_run(run_dir, 8, progress=False)


def test_quantize_cli_writes_a_run_that_evaluates(run_dir, tmp_path, capsys):
    out = tmp_path / "int4"
    assert cli_main(["quantize", str(run_dir), "--bits", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "value table: 8,192 bytes -> 1,152 bytes (int4, group 32" in printed
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "tokenizer.json"]
    ckpt = out / "checkpoints" / "step_000008"
    meta = json.loads((ckpt / "meta.json").read_text())
    q = meta["quantization"]
    assert (q["bits"], q["group"], q["table_bytes_before"], q["table_bytes_after"]) == (
        4, 32, 8192, 64 * (16 + 2)
    )  # fmt: skip
    assert "sha256" in meta["files"]["model.safetensors"]
    assert not list(tmp_path.glob(".tmp-*"))
    model = load_model_from_checkpoint(out)
    assert model.memory_values.bits == 4 and table_nbytes(model) == 1152
    r = evaluate(out, **FAST_EVAL)
    assert r["value_table"] == {"format": "int4", "group": 32, "bytes": 1152}


def test_quantized_eval_is_close_and_counts_the_same_parameters(run_dir, int8_run):
    ref = evaluate(run_dir, **FAST_EVAL)
    r = evaluate(int8_run.out, **FAST_EVAL)
    assert ref["value_table"] == {"format": "float32", "group": None, "bytes": 8192}
    assert r["value_table"]["format"] == "int8" and r["value_table"]["bytes"] == 64 * 34
    assert r["params"] == ref["params"] and r["step"] == ref["step"]
    assert r["tokens_trained"] == ref["tokens_trained"]
    assert r["perplexity"]["loss"] == pytest.approx(ref["perplexity"]["loss"], rel=1e-3)
    assert r["knowledge"]["bits"] == pytest.approx(ref["knowledge"]["bits"], rel=0.05, abs=5)


def test_generate_quantized_run_and_on_the_fly(run_dir, int8_run):
    prompt = "Which city was"
    float_text = generate(str(run_dir), prompt, 8, device="cpu")
    q_text = generate(str(int8_run.out), prompt, 8, device="cpu")
    fly = generate(str(run_dir), prompt, 8, device="cpu", quantized=8)
    assert q_text == fly  # the same quantization, saved or done here
    assert len(float_text) == 1 and isinstance(q_text[0], str)
    with pytest.raises(ValueError, match="quantized already"):
        generate(str(int8_run.out), prompt, 8, device="cpu", quantized=4)
    with pytest.raises(ValueError, match="needs quantized"):
        generate(str(run_dir), prompt, 8, device="cpu", group=32)


def test_refusals(run_dir, int8_run, tmp_path, capsys):
    # An existing non-empty --out, without --overwrite; the source run itself.
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli_main(["quantize", str(run_dir), "--bits", "8", "--out", str(out)]) == 1
    assert "is not empty: pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert cli_main(["quantize", str(run_dir), "--bits", "8", "--out", str(run_dir)]) == 1
    assert "overlaps the source run" in capsys.readouterr().err
    args = ["quantize", str(run_dir), "--bits", "8", "--out", str(out), "--overwrite"]
    assert cli_main(args) == 0
    assert not (out / "keep.txt").exists() and (out / "checkpoints" / "latest").is_file()
    assert not list(tmp_path.glob(".old-*"))
    # Bad bits and groups: argparse's usage error, one error line.
    with pytest.raises(SystemExit):
        cli_main(["quantize", str(run_dir), "--bits", "3"])
    capsys.readouterr()
    assert cli_main(["quantize", str(run_dir), "--bits", "4", "--group", "5"]) == 1
    assert "4-bit groups must be even" in capsys.readouterr().err
    # Quantizing twice; resuming training from a quantized run.
    assert cli_main(["quantize", str(int8_run.out), "--bits", "4"]) == 1
    assert "quantized already (8-bit)" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="training cannot resume from it"):
        train(load_config([], [*TINY_BIOS, f"run_dir={int8_run.out}", "steps=9"]), resume="latest")


def test_group_and_out_are_refused_before_the_checkpoint_is_read(run_dir, tmp_path, monkeypatch):
    # Hashing every file and loading the model come after the checks that need neither.
    import memlayers.quantize as quantize

    def read(*a, **k):
        pytest.fail("the checkpoint was read before the arguments were checked")

    monkeypatch.setattr(quantize, "verify_checkpoint", read)
    monkeypatch.setattr(quantize, "model_from_checkpoint", read)
    out = tmp_path / "q"
    with pytest.raises(ValueError, match="4-bit groups must be even .*got group=3"):
        quantize_run(run_dir, 4, group=3, out=out, progress=False)
    with pytest.raises(ValueError, match="group must be a positive int .*got group=0"):
        quantize_run(run_dir, 8, group=0, out=out, progress=False)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_run(run_dir, 3, out=out, progress=False)
    with pytest.raises(ValueError, match="overlaps the source run"):
        quantize_run(run_dir, 8, out=run_dir / "q", progress=False)
    assert not out.exists()


def test_consolidate_keeps_the_quantization(int8_run, tmp_path):
    dst = consolidate(int8_run.out, tmp_path / "single")
    assert json.loads((dst / "meta.json").read_text())["quantization"]["bits"] == 8
    a = load_run(int8_run.out, "cpu").model.memory_values
    b = load_model_from_checkpoint(dst).memory_values
    assert torch.equal(a.qdata, b.qdata) and torch.equal(a.qscales, b.qscales)


def test_quantize_tables_needs_a_table():
    with pytest.raises(ValueError, match="no memory value table"):
        quantize_tables_(torch.nn.Linear(2, 2), 8)
