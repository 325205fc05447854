"""The run directory: finding the run and checkpoint a path means, verifying once, the
progress the trainer records (and the fallback for checkpoints from before it)."""

import json

import pytest
import torch
from test_train import tiny_args

import memlayers.checkpoint as checkpoint
from memlayers.run import Run, RunError, load_run
from memlayers.train import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    train(tiny_args(run, "steps=4", "checkpoint.every=2"))
    return run


def test_run_finds_its_directory_and_checkpoints(run_dir):
    run = Run.of(run_dir / "checkpoints" / "step_000002")
    assert run.root == run_dir and run.config().steps == 4
    assert run.checkpoint() == run_dir / "checkpoints" / "step_000004"
    older = run.checkpoint(run_dir / "checkpoints" / "step_000002")
    assert run.eval_dir(older) == run_dir / "eval" / "step_000002"
    assert run.eval_dir(run.checkpoint()) == run_dir / "eval"
    with pytest.raises(RunError, match="no config.yaml"):
        Run.of(run_dir.parent)
    with pytest.raises(RunError, match="no such run directory"):
        Run.of(run_dir / "missing")


def test_progress_is_recorded_and_read(run_dir):
    meta = json.loads((run_dir / "checkpoints" / "step_000004" / "meta.json").read_text())
    assert meta["progress"]["tokens_trained"] == 4 * 4 * 16  # steps × batch × seq_len
    assert meta["progress"]["train_seconds"] > 0
    r = load_run(run_dir, device="cpu", need_tokenizer=False)
    assert (r.step, r.tokens_trained) == (4, 4 * 4 * 16)
    assert r.progress.train_seconds == meta["progress"]["train_seconds"]
    assert not r.model.training


def test_resume_continues_the_progress(tmp_path):
    train(tiny_args(tmp_path, "steps=2"))
    first = Run(tmp_path).checkpoint()
    seconds = json.loads((first / "meta.json").read_text())["progress"]["train_seconds"]
    train(tiny_args(tmp_path, "steps=4"), resume="latest")
    meta = json.loads((Run(tmp_path).checkpoint() / "meta.json").read_text())
    assert meta["progress"]["tokens_trained"] == 4 * 4 * 16
    assert meta["progress"]["train_seconds"] > seconds


def test_a_checkpoint_without_progress_still_loads(run_dir, tmp_path):
    """Checkpoints from before ``progress``: tokens from the step, no training time."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    r = load_run(run_dir, device="cpu", need_tokenizer=False)
    meta = json.loads((r.checkpoint / "meta.json").read_text())
    trainer = torch.load(r.checkpoint / "trainer.pt", weights_only=True)
    trainer.pop("step")
    checkpoint.save_checkpoint(old / "checkpoints", 4, r.model, None, trainer, meta["model_config"])
    assert "progress" not in json.loads(
        (old / "checkpoints" / "step_000004" / "meta.json").read_text()
    )
    o = load_run(old, device="cpu", need_tokenizer=False)
    assert (o.step, o.tokens_trained, o.progress.train_seconds) == (4, 4 * 4 * 16, None)


def test_load_run_verifies_the_files_once(run_dir, monkeypatch):
    calls = []
    real = checkpoint.sha256_file

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(checkpoint, "sha256_file", counting)
    load_run(run_dir, device="cpu", need_tokenizer=False)
    assert len(calls) == len(set(calls)) > 0  # every file it reads hashed, none twice
    # Serving never reads the optimizer state (twice the table for Adam): size-checked only;
    # offloaded, the table is not read whole either, so not hashed.
    assert {p.name for p in calls} == {"model.safetensors", "trainer.pt"}
    calls.clear()
    load_run(run_dir, device="cpu", need_tokenizer=False, offload=True)
    assert {p.name for p in calls} == {"trainer.pt"}


def test_a_serving_load_still_refuses_a_cut_optimizer_file(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    opt = Run(copy).checkpoint() / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:-1])
    with pytest.raises(checkpoint.CheckpointError, match="optimizer.pt has"):
        load_run(copy, device="cpu", need_tokenizer=False)
