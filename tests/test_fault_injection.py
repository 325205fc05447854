"""Fault injection: a training run killed at random points while it writes checkpoints
(several times over), resumed each time with ``--resume``, ends with the losses of a run
that was never interrupted.

The kill is ``os._exit`` — no cleanup, no flush, like ``kill -9`` — from inside the
trainer process, at the N-th call of a file-writing function the checkpoint goes through
(safetensors, ``torch.save``, ``os.replace``, fsync, ``write_atomic``), N drawn at random
(seeded), so it lands in the middle of a checkpoint: between its files, before its rename,
between the rename and ``latest``. Whatever is left on disk must be recoverable.
"""

import json
import os
import random
import subprocess
import sys

import pytest

# The trainer in a subprocess with its checkpoint writes counted; the KILL_AT-th call dies.
_KILLER = """
import os, sys
import torch
import memlayers.checkpoint as ck
import memlayers.files as files

kill_at, calls = int(os.environ["KILL_AT"]), [0]

def fatal(fn):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os._exit(137)  # as kill -9: no exception handlers, no atexit, no flush
        return fn(*args, **kwargs)
    return wrapped

ck.save_model = fatal(ck.save_model)
torch.save = fatal(torch.save)
os.replace = fatal(os.replace)
ck.fsync_file = fatal(ck.fsync_file)
ck.write_atomic = fatal(ck.write_atomic)
files.fsync_dir = fatal(files.fsync_dir)

from memlayers.cli import main
sys.exit(main(sys.argv[1:]))
"""

STEPS = 8
CONFIG = [
    "data.dataset=synthetic", "model.preset=tiny-memory+", "model.dim=32",
    "model.n_layers=3", "model.n_heads=2", "model.n_kv_heads=1",
    "model.memory_layers=[0,2]", "model.memory.n_keys=8", "model.memory.heads=2",
    "model.memory.topk=4", "model.max_seq_len=32", "data.seq_len=16", "data.batch_size=4",
    "data.synthetic.vocab_size=64", "data.synthetic.n_tokens=20000", "optim.warmup_steps=2",
    "eval_every=0", "final_eval=false", "logging.progress=false", "logging.tensorboard=false",
    "logging.plot=false", "logging.every=1", "checkpoint.every=1", "checkpoint.keep=2",
    f"steps={STEPS}", "device=cpu",
]  # fmt: skip


def _train(run_dir, kill_at: int) -> int:
    """Start, or continue what a killed run left: ``--resume`` once a checkpoint exists
    (step directories appear whole, by rename), ``--overwrite`` if none was finished."""
    flags = []
    if (run_dir / "checkpoints").is_dir() and list((run_dir / "checkpoints").glob("step_*")):
        flags = ["--resume"]
    elif run_dir.exists():
        flags = ["--overwrite"]
    argv = ["train", *CONFIG, f"run_dir={run_dir}", *flags]
    env = {**os.environ, "KILL_AT": str(kill_at), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, *argv], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    if proc.returncode not in (0, 137):
        pytest.fail(f"trainer failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.returncode


def _losses(run_dir) -> dict[int, float]:
    """Step -> loss, the last record of each step (a resumed run logs its steps again)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def test_kills_during_checkpoint_writes_resume_to_the_uninterrupted_losses(tmp_path):
    reference = tmp_path / "reference"
    assert _train(reference, kill_at=0) == 0  # call 0 never comes
    want = _losses(reference)
    assert sorted(want) == list(range(1, STEPS + 1))

    run, rng, kills = tmp_path / "killed", random.Random(14), 0
    # Each checkpoint makes about 9 counted calls: a kill point below 9 * STEPS lands inside
    # one of them.
    rc = _train(run, kill_at=rng.randint(10, 9 * STEPS))
    while rc == 137 and kills < 6:
        kills += 1
        rc = _train(run, kill_at=rng.randint(1, 30))
    while rc == 137:  # at most 6 kills: then run to the end
        rc = _train(run, kill_at=0)
    assert kills >= 3, f"only {kills} kills landed: the kill points missed the writes"
    assert _losses(run) == want  # bit-identical, step by step
    assert not list((run / "checkpoints").glob(".tmp-*")), "a crashed write was not swept"
