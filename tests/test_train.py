"""Trainer: config loading, exact resume, checkpoints (save/load/corruption), NaN stop,
run-directory layout, the optimizer groups and schedule."""

import builtins
import errno
import io
import json
import math
import os
import re
import shutil

import pytest
import torch

from memlayers.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_from_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from memlayers.cli import main as cli_main
from memlayers.config import TrainArgs, load_config
from memlayers.logger import rows_used_pct
from memlayers.model import build_model
from memlayers.optim import (
    OptimArgs,
    build_optimizer,
    clip_grad_norm_,
    lr_multiplier,
    set_lr,
)
from memlayers.run import RunError
from memlayers.train import NonFiniteLossError, train

# A ~20k-parameter Memory+ model on a small synthetic stream: a step takes milliseconds.
TINY = [
    "data.dataset=synthetic", "model.preset=tiny-memory+", "model.dim=32",
    "model.n_layers=3", "model.n_heads=2", "model.n_kv_heads=1",
    "model.memory_layers=[0,2]", "model.memory.n_keys=8",
    "model.memory.heads=2", "model.memory.topk=4", "model.max_seq_len=32",
    "data.seq_len=16", "data.batch_size=4", "data.synthetic.vocab_size=64",
    "data.synthetic.n_tokens=20000", "optim.warmup_steps=1", "eval_every=0", "eval_batches=2",
    "logging.progress=false", "logging.tensorboard=false", "logging.plot=false",
    "logging.every=1", "checkpoint.keep=0",
]  # fmt: skip


# One step: no warmup (a set optim.warmup_steps must be shorter than the run).
ONE_STEP = ["steps=1", "optim.warmup_steps=0", "final_eval=false"]


def tiny_args(run_dir, *overrides) -> TrainArgs:
    return load_config([], [*TINY, f"run_dir={run_dir}", *overrides])


# ---- exact resume --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        [],  # sparse value Adam
        ["optim.value_optimizer=adamw", "grad_accum=2", "model.memory.value_dropout=0.2"],
        # running query statistics are buffers: saved, restored, compared below
        ["model.memory.query_batch_norm=true", "model.memory.balance_loss=0.5"],
        # a bf16 table with its fp32 master copy (optimizer state), in both checkpoint layouts
        ["model.memory.value_dtype=bf16", "optim.value_master_split=false"],
        [
            "model.memory.value_dtype=bf16",
            "optim.value_master_split=false",
            "checkpoint.format=dcp",
        ],
        # the same master split into the table and int16 remainders (the default), both layouts
        ["model.memory.value_dtype=bf16"],
        ["model.memory.value_dtype=bf16", "checkpoint.format=dcp"],
        # a bf16 table alone: its stochastic rounding repeats (the bits follow the step)
        ["model.memory.value_dtype=bf16", "optim.value_master=false"],
        # the memory layers' own AdamW groups (optim.memory_lr) save and load as the rest
        ["optim.memory_lr=1e-2"],
        # lookups that read an int8 copy of the table: not saved, rebuilt on load
        ["model.memory.value_dtype=bf16", "model.memory.value_read=int8"],
    ],
    ids=[
        "sparse-adam",
        "adamw-accum-dropout",
        "query-batch-norm-balance-loss",
        "bf16-values-master",
        "bf16-values-master-dcp",
        "bf16-values-split-master",
        "bf16-values-split-master-dcp",
        "bf16-values-stochastic",
        "memory-lr",
        "bf16-values-int8-reads",
    ],
)
def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path, extra):
    full = train(tiny_args(tmp_path / "a", "steps=6", "checkpoint.every=3", *extra))
    resumed = train(
        tiny_args(tmp_path / "b", "steps=6", "checkpoint.every=3", *extra),
        resume=str(tmp_path / "a" / "checkpoints" / "step_000003"),
    )
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[3:]]  # bitwise
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in full[3:]]
    a = load_model_from_checkpoint(tmp_path / "a")
    b = load_model_from_checkpoint(tmp_path / "b")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_resume_latest_in_the_same_run_dir(tmp_path):
    full = train(tiny_args(tmp_path / "a", "steps=4", "checkpoint.every=2"))
    run = tmp_path / "b"
    train(tiny_args(run, "steps=4", "checkpoint.every=2"))
    shutil.rmtree(run / "checkpoints" / "step_000004")
    (run / "checkpoints" / "latest").write_text("step_000002\n")
    resumed = train(tiny_args(run, "steps=4", "checkpoint.every=2"), resume="latest")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[2:]]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [
        1,
        2,
        3,
        4,
    ]  # records after the checkpoint were rewritten, not doubled


def test_a_fresh_run_into_a_finished_one_is_refused_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_args(run, "steps=2"))
    before = {p: (run / p).read_bytes() for p in ("metrics.jsonl", "config.yaml")}
    with pytest.raises(RunError, match=rf"{run} already holds a run.*--resume.*--overwrite"):
        train(tiny_args(run, "steps=3"))
    assert {p: (run / p).read_bytes() for p in before} == before  # nothing touched
    assert resolve_checkpoint(run).name == "step_000002"
    argv = ["train", *TINY, f"run_dir={run}", "steps=3", "final_eval=false"]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and "Traceback" not in err
    assert cli_main([*argv, "--overwrite"]) == 0  # the old run's files are gone
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000003"]
    with pytest.raises(SystemExit):  # one way at a time
        cli_main([*argv, "--resume-from", str(run), "--resume"])
    assert cli_main([*argv, "--overwrite", "--resume"]) == 2
    assert "--resume continues the run in run_dir: not with --overwrite" in capsys.readouterr().err


def test_resume_drops_a_partial_last_metrics_line(tmp_path):
    run = tmp_path / "run"
    train(tiny_args(run, "steps=4", "checkpoint.every=2"))
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # a crash mid-write
    train(tiny_args(run, "steps=6", "checkpoint.every=2"), resume="latest")
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    metrics.write_text("\n".join(["{oops", *lines]) + "\n")  # damage is not a crash
    with pytest.raises(ValueError, match=rf"{metrics}:1: not a JSON record"):
        train(tiny_args(run, "steps=8", "checkpoint.every=2"), resume="latest")


def test_resume_finds_the_newest_verified_checkpoint(tmp_path):
    """A crash between renaming step_000004 into place and pointing ``latest`` at it
    leaves ``latest`` stale (or, for a first checkpoint, missing); a corrupted newest
    checkpoint gives way to the newest one that verifies."""
    full = train(tiny_args(tmp_path / "a", "steps=4", "checkpoint.every=2"))
    run = tmp_path / "b"
    train(tiny_args(run, "steps=4", "checkpoint.every=2"))
    ck = run / "checkpoints"
    (ck / "latest").write_text("step_000002\n")
    assert resolve_checkpoint(run).name == "step_000004"
    (ck / "latest").unlink()
    assert resolve_checkpoint(run).name == "step_000004"
    weights = ck / "step_000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    (ck / ".tmp-step_000006-999").mkdir()  # a crashed save's leftovers
    resumed = train(tiny_args(run, "steps=4", "checkpoint.every=2"), resume="latest")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[2:]]  # from step 2
    assert not list(ck.glob(".tmp-*"))  # swept by the next save


def test_resuming_an_earlier_checkpoint_sets_the_newer_ones_aside(tmp_path, capsys):
    """A rewind (--resume-from an earlier checkpoint of the same run, here with another
    rate and length) is another line of training: the abandoned newer checkpoints must not
    win as the run's newest (eval, generate, --resume) nor be pruned before the new ones;
    they are moved aside with the metrics, and the config trained with so far is kept."""
    run = tmp_path / "run"
    train(tiny_args(run, "steps=6", "checkpoint.every=2", "checkpoint.keep=2"))
    ck = run / "checkpoints"
    old_config = (run / "config.yaml").read_text()
    capsys.readouterr()
    args = tiny_args(run, "steps=5", "checkpoint.every=2", "checkpoint.keep=2", "optim.lr=1e-4")
    resumed = train(args, resume=str(ck / "step_000004"))
    assert [r["step"] for r in resumed] == [5]
    assert resolve_checkpoint(run).name == "step_000005" == (ck / "latest").read_text().strip()
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_000004", "step_000005"]
    aside = ck / "abandoned_after_step_000004"
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step_000006"]
    kept = (aside / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(x)["step"] for x in kept) == 6
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
    assert (run / "config.until_step_000004.yaml").read_text() == old_config
    out = capsys.readouterr().out
    assert f"the newer ones (and the metrics up to them) are set aside in {aside}" in out
    assert "resumed with a changed config (config.until_step_000004.yaml" in out
    assert "optim.lr: 0.003 -> 0.0001; steps: 6 -> 5" in out
    # the same rewind again: a folder of its own; a plain resume changes nothing of that
    train(args, resume=str(ck / "step_000004"))
    assert sorted(p.name for p in (ck / "abandoned_after_step_000004-2").iterdir()) == [
        "metrics.jsonl", "step_000005",
    ]  # fmt: skip
    capsys.readouterr()
    train(tiny_args(run, "steps=6", "checkpoint.every=2", "checkpoint.keep=2",
                    "optim.lr=1e-4"), resume="latest")  # fmt: skip
    out = capsys.readouterr().out
    assert "set aside" not in out and "optim.lr" not in out and "steps: 5 -> 6" in out
    assert len(list(ck.glob("abandoned_after_*"))) == 2
    train(tiny_args(run, "steps=2"), overwrite=True)  # a fresh start clears all of it
    assert not list(run.glob("config.until_*")) and not list(ck.glob("abandoned_*"))


def test_another_runs_checkpoint_does_not_start_into_a_run_dir_holding_a_run(tmp_path):
    train(tiny_args(tmp_path / "other", "steps=2", "checkpoint.every=2"))
    run = tmp_path / "run"
    train(tiny_args(run, "steps=4", "checkpoint.every=2"))
    before = {p: (run / p).read_bytes() for p in ("metrics.jsonl", "config.yaml")}
    other = str(tmp_path / "other" / "checkpoints" / "step_000002")
    with pytest.raises(RunError, match=rf"{run} already holds a run"):
        train(tiny_args(run, "steps=4"), resume=other)
    assert {p: (run / p).read_bytes() for p in before} == before
    assert resolve_checkpoint(run).name == "step_000004"
    with pytest.raises(ValueError, match="overwrite would delete the run in .* that the resume"):
        train(tiny_args(run, "steps=6"), resume="latest", overwrite=True)
    resumed = train(tiny_args(run, "steps=3", "checkpoint.every=2"), resume=other, overwrite=True)
    assert [r["step"] for r in resumed] == [3]  # the old run's files are gone
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000003"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [3]


def test_a_refused_resume_leaves_the_runs_tokenizer(tmp_path):
    bios = ["data.dataset=bios", "data.bios.n_people=20", "data.seq_len=16"]
    run = tmp_path / "run"
    train(tiny_args(run, "steps=2", "checkpoint.every=2", *bios))
    (run / "tokenizer.json").write_text("the run's own")
    with pytest.raises(CheckpointError, match="holds fp32 value tables"):
        train(tiny_args(run, "steps=4", "model.memory.value_dtype=bf16", *bios), resume="latest")
    assert (run / "tokenizer.json").read_text() == "the run's own"


# ---- checkpoints ---------------------------------------------------------------------------


def _model_and_opt(seed=0):
    args = tiny_args("unused")
    args.model.vocab_size = 64
    model = build_model(args.model.to_config(), seed=seed, sparse_values=True)
    return model, build_optimizer(model, OptimArgs()), args.model.to_config()


def test_save_load_identical_logits(tmp_path):
    model, opt, cfg = _model_and_opt(seed=0)
    x = torch.randint(0, 64, (2, 16))
    model(x).sum().backward()
    opt.step()  # non-trivial optimizer state
    save_checkpoint(tmp_path, 7, model, opt, {"note": "hi"}, cfg.to_dict())
    other, other_opt, _ = _model_and_opt(seed=1)
    assert not torch.equal(other(x), model(x))
    state = load_checkpoint(tmp_path, other, other_opt)
    assert state["step"] == 7 and state["note"] == "hi"
    assert torch.equal(other(x), model(x))
    assert torch.equal(load_model_from_checkpoint(tmp_path)(x), model(x))
    assert (tmp_path / "latest").read_text().strip() == "step_000007"
    assert not list(tmp_path.glob(".tmp-*"))  # nothing left of the atomic write


def test_consolidate_from_the_command_line(tmp_path, capsys):
    model, opt, cfg = _model_and_opt(seed=0)
    x = torch.randint(0, 64, (2, 16))
    save_checkpoint(tmp_path / "src", 3, model, opt, {"note": "hi"}, cfg.to_dict())
    assert cli_main(["consolidate", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    assert "step_000003" in capsys.readouterr().out
    assert torch.equal(load_model_from_checkpoint(tmp_path / "dst")(x), model(x))
    assert load_checkpoint(tmp_path / "dst", model)["note"] == "hi"  # trainer state kept
    assert cli_main(["consolidate", str(tmp_path / "nothing"), str(tmp_path / "d2")]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_filesystem_errors_are_one_error_line(tmp_path, capsys):
    model, opt, cfg = _model_and_opt()
    save_checkpoint(tmp_path / "src", 3, model, opt, None, cfg.to_dict())
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory\n")
    train_into_file = ["train", *TINY, f"run_dir={a_file}", *ONE_STEP]
    for argv in (train_into_file, ["consolidate", str(tmp_path / "src"), str(a_file)]):
        assert cli_main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(a_file) in err and err.count("\n") == 1
    with pytest.raises(OSError):  # --debug shows the traceback
        cli_main(["--debug", *train_into_file])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_run_dir_is_one_error_line(tmp_path, capsys):
    run = tmp_path / "ro"
    run.mkdir()
    run.chmod(0o500)
    try:
        assert cli_main(["train", *TINY, f"run_dir={run}", *ONE_STEP]) == 1
    finally:
        run.chmod(0o700)
    assert capsys.readouterr().err.startswith("error: Permission denied")


def _refuse_writes_under(monkeypatch, root, code: int) -> None:
    """Creating or writing anything under ``root`` (``root`` included) fails with ``code``,
    as in a read-only directory or file system. chmod can't simulate that for root, who
    ignores it (CI runs as root); patched: open for writing and mkdir, for those paths only."""
    root = os.path.abspath(root)
    real_open, real_mkdir = builtins.open, os.mkdir

    def check(path) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            p = os.path.abspath(os.fsdecode(path))
            if p == root or p.startswith(root + os.sep):
                raise OSError(code, os.strerror(code), p)

    def open_(file, mode="r", *args, **kwargs):
        if set(mode) & set("wax+"):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        check(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)  # pathlib's
    monkeypatch.setattr(os, "mkdir", mkdir)  # Path.mkdir's and os.makedirs'


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS], ids=["EACCES", "EROFS"])
@pytest.mark.parametrize("exists", [True, False], ids=["read-only-dir", "in-read-only-parent"])
def test_an_unwritable_run_dir_is_one_error_line_also_as_root(
    tmp_path, capsys, monkeypatch, code, exists
):
    """The read-only test above, where root can run it too: the first write into the run
    directory (or its creation) fails, and the CLI says so in one line naming the path."""
    run = tmp_path / "ro"
    if exists:
        run.mkdir()
    _refuse_writes_under(monkeypatch, run, code)
    argv = ["train", *TINY, f"run_dir={run}", *ONE_STEP]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: {re.escape(os.strerror(code))}: {re.escape(str(run))}\S*\n", err)
    with pytest.raises(OSError) as raised:  # --debug shows the traceback
        cli_main(["--debug", *argv])
    assert raised.value.errno == code


def test_keep_prunes_old_checkpoints(tmp_path):
    model, opt, _ = _model_and_opt()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, opt, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000003", "step_000004"]


@pytest.mark.parametrize(
    "damage, message",
    [
        ("flip", "sha256"),
        ("truncate", "bytes"),
        ("delete", "missing"),
        ("meta", "meta.json"),
        ("latest", "points to"),
        ("latest-elsewhere", "not followed"),
        ("nothing", "no checkpoint"),
    ],
)
def test_corrupted_or_missing_checkpoint_is_a_clear_error(tmp_path, damage, message):
    model, opt, _ = _model_and_opt()
    path = save_checkpoint(tmp_path / "ck", 5, model, opt)
    weights = path / "model.safetensors"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "delete":
        (path / "optimizer.pt").unlink()
    elif damage == "meta":
        (path / "meta.json").write_text("{not json")
    elif damage == "latest":
        shutil.rmtree(path)
        (tmp_path / "ck" / "latest").write_text("step_000009\n")
    elif damage == "latest-elsewhere":  # a copied run whose pointer leads back to the old one
        (tmp_path / "ck" / "latest").write_text(f"{path}\n")
    target = tmp_path / ("empty" if damage == "nothing" else "ck")
    target.mkdir(exist_ok=True)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(target, model, opt)


def test_unverified_garbage_still_fails_clearly(tmp_path):
    model, opt, _ = _model_and_opt()
    path = save_checkpoint(tmp_path, 1, model, opt, checksum=False)
    size = (path / "model.safetensors").stat().st_size
    (path / "model.safetensors").write_bytes(b"\x00" * size)  # same size, no checksum
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path, model, opt)


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    model, opt, _ = _model_and_opt()
    save_checkpoint(tmp_path, 1, model, opt)
    args = tiny_args("unused", "model.dim=48")
    args.model.vocab_size = 64
    with pytest.raises(CheckpointError, match="cannot load"):
        load_checkpoint(tmp_path, build_model(args.model.to_config()))


# ---- NaN -----------------------------------------------------------------------------------


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import memlayers.model as model_mod

    real, calls = model_mod.linear_cross_entropy, []

    def poisoned(h, weight, targets):
        calls.append(1)
        loss = real(h, weight, targets)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(model_mod, "linear_cross_entropy", poisoned)
    run = tmp_path / "run"
    # Flags are read at log and checkpoint steps: the NaN of step 5 is caught at step 6,
    # before step 6 is checkpointed.
    with pytest.raises(NonFiniteLossError, match=r"step 5 \(checked at step 6.*step_000004"):
        train(tiny_args(run, "steps=8", "checkpoint.every=2", "logging.every=4"))
    assert resolve_checkpoint(run).name == "step_000004"
    assert not (run / "checkpoints" / "step_000006").exists()


def test_weights_past_max_weight_stop_the_run_with_a_finite_loss(tmp_path):
    # A finite loss with blown-up weights (e.g. 1e11 at loss = ln V) went on before; here
    # a threshold below the healthy weights trips at the first check.
    run = tmp_path / "run"
    with pytest.raises(
        NonFiniteLossError,
        match=r"weights diverged: \|.+\| reaches .* > max_weight=0.001 at step 2",
    ):
        train(tiny_args(run, "steps=4", "logging.every=2", "max_weight=1e-3"))
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").glob("step_*"))
    train(tiny_args(tmp_path / "off", "steps=2", "max_weight=0"))  # 0: off


def test_largest_weight_names_the_parameter():
    from memlayers.train import largest_weight

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    with torch.no_grad():
        model[1].bias[1] = -1e11
    assert largest_weight(model) == (pytest.approx(1e11), "1.bias")


# ---- config and CLI ------------------------------------------------------------------------


def test_config_precedence_defaults_preset_yaml_cli(tmp_path):
    yaml = tmp_path / "exp.yaml"
    yaml.write_text("steps: 7\nmodel:\n  preset: tiny-dense\n  dim: 64\noptim:\n  lr: 0.5\n")
    args = load_config([yaml], ["optim.lr=0.25"])
    assert args.steps == 7 and args.optim.lr == 0.25  # YAML, then CLI
    assert args.model.dim == 64 and args.model.n_layers == 6  # YAML over the preset
    assert args.model.memory_layers == [] and args.checkpoint.every == 250  # preset, defaults


def test_vocab_size_comes_from_the_data_as_a_new_config():
    from memlayers.config import with_vocab

    args = load_config([], ["model.preset=tiny-memory+"])
    assert args.model.vocab_size is None  # not the preset's: the dataset's
    with pytest.raises(ValueError, match="vocab_size is unset"):
        args.model.to_config()
    filled = with_vocab(args, 300)
    assert filled.model.to_config().vocab_size == 300 and args.model.vocab_size is None
    with pytest.raises(ValueError, match="vocab_size"):
        load_config([], ["model.vocab_size=0"])


def test_presets_bring_their_value_lr_and_the_yaml_and_cli_override_it(tmp_path):
    assert load_config([], ["model.preset=tiny-memory+"]).optim.value_lr == 3e-2
    assert load_config([], ["model.preset=134m-memory+"]).optim.value_lr == 1e-3  # paper
    yaml = tmp_path / "exp.yaml"
    yaml.write_text("model:\n  preset: tiny-memory\noptim:\n  value_lr: 0.01\n")
    assert load_config([yaml]).optim.value_lr == 0.01
    assert load_config([yaml], ["optim.value_lr=0.02"]).optim.value_lr == 0.02


def test_paper_memory_presets_step_their_tables_with_bf16_moments(tmp_path):
    # The paper sizes' memory tables: bf16 moments (presets.PRESET_OPTIM); the tiny presets
    # and the tables-free paper presets keep the OptimArgs default; the YAML and CLI win.
    def opt(*cli, files=()):
        return load_config(list(files), list(cli)).optim.value_optimizer

    for preset in ("134m-memory+", "134m-memory", "373m-memory+"):
        assert opt(f"model.preset={preset}") == "sparse_adam_bf16"
    for preset in ("tiny-memory+", "134m-dense", "134m-peer"):
        assert opt(f"model.preset={preset}") == "sparse_adam"
    assert opt("model.preset=134m-memory+", "optim.value_optimizer=sparse_adam") == "sparse_adam"
    yaml = tmp_path / "exp.yaml"
    yaml.write_text("model:\n  preset: 134m-memory+\noptim:\n  value_optimizer: sparse_adam\n")
    assert opt(files=[yaml]) == "sparse_adam"


@pytest.mark.parametrize(
    "old, want",
    [
        ("model:\n  memory:\n    value_lr: 0.005\noptim:\n  value_lr: null\n", 0.005),
        ("model:\n  memory:\n    value_lr: 0.005\noptim:\n  value_lr: 0.007\n", 0.007),
        ("optim:\n  value_lr: null\n", 3e-2),  # null meant "the model's": the preset's
    ],
    ids=["saved-run", "both-set", "null"],
)
def test_config_from_before_optim_value_lr_is_upgraded(tmp_path, old, want):
    """A run's config.yaml from before: value_lr in model.memory, optim.value_lr null."""
    yaml = tmp_path / "config.yaml"
    yaml.write_text(old)
    args = load_config([yaml])
    assert args.optim.value_lr == want and not hasattr(args.model.memory, "value_lr")


def test_old_value_lr_key_on_the_command_line_names_the_new_one():
    with pytest.raises(ValueError, match=r"optim\.value_lr=0\.01"):
        load_config([], ["model.memory.value_lr=0.01"])
    with pytest.raises(ValueError, match=r"optim\.value_lr must be finite and > 0"):
        load_config([], ["optim.value_lr=0"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=inf", "optim.lr must be finite and > 0, got inf"),
        ("optim.value_lr=inf", "optim.value_lr must be finite and > 0, got inf"),
        ("optim.memory_lr=inf", "optim.memory_lr must be finite and > 0"),
        ("optim.weight_decay=nan", "optim.weight_decay must be finite and >= 0, got nan"),
        ("optim.grad_clip=nan", "optim.grad_clip must be finite and >= 0, got nan"),
        ("optim.value_weight_decay=inf", "optim.value_weight_decay must be finite and >= 0"),
        ("checkpoint.enabled=false", "final_eval=true evaluates the last checkpoint, but"),
    ],
)
def test_non_finite_rates_and_a_final_eval_without_checkpoints_are_refused(override, message):
    # nan would turn clipping off or the weights to nan; the eval would fail after the run
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config([], [override])
    load_config([], ["checkpoint.enabled=false", "final_eval=false"])  # no eval: fine


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "lrr"),
        ("steps=many", "steps"),
        ("steps=0", "steps"),
        ("optim.value_optimizer=sgd", "value_optimizer"),
        ("model.preset=huge", "preset"),
        ("dtype=fp8", "dtype"),
        ("data.batch_size=-1", "batch_size"),
        ("logging.usage=sometimes", "usage"),
        ("model.memory.value_dtype=fp16", "value_dtype"),
    ],
)
def test_bad_config_is_a_value_error_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config([], [override])


@pytest.mark.parametrize(
    "text, message",
    [
        ("steps: 4\nmodel: {preset: tiny-dense\n", "not valid YAML"),
        ("- steps: 4\n", "a config's top level must map keys"),
    ],
    ids=["malformed", "list"],
)
def test_bad_yaml_is_one_error_line_naming_the_file(tmp_path, capsys, text, message):
    yaml = tmp_path / "exp.yaml"
    yaml.write_text(text)
    with pytest.raises(ValueError, match=rf"{yaml}: {message}"):
        load_config([yaml])
    assert cli_main(["train", str(yaml)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {yaml}: ") and err.count("\n") == 1


def test_cli_run_writes_the_documented_run_directory(tmp_path, capsys):
    run = tmp_path / "cli"
    overrides = [o for o in TINY if not o.startswith(("logging.", "eval_every"))]
    rc = cli_main(
        [
            "train",
            *overrides,
            f"run_dir={run}",
            "steps=4",
            "eval_every=2",
            "checkpoint.every=2",
            "logging.every=1",
        ]
    )
    assert rc == 0
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "tb",
        "loss.png",
        "usage.png",
        "checkpoints/latest",
        "checkpoints/step_000004/model.safetensors",
    ):
        assert (run / name).exists(), name
    saved = load_config([run / "config.yaml"])
    assert saved.steps == 4 and saved.model.vocab_size == 64  # resolved, vocab from data
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "tok_per_s", "grad_norm"} <= set(records[0])
    assert any("val_loss" in r for r in records)
    assert cli_main(["train", "optim.bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err


# ---- memory usage as a training signal -----------------------------------------------------


def _records(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_usage_statistics_are_logged_per_memory_layer_and_table(tmp_path):
    run = tmp_path / "run"
    # 1,024 rows read by 64 tokens × 2 layers × 2 rows a step: the table is partly used
    small = ["model.memory.n_keys=32", "model.memory.heads=1", "model.memory.topk=2"]
    train(tiny_args(run, "steps=4", "logging.every=2", "logging.plot=true", *small))
    steps = [r for r in _records(run) if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4]
    for r in steps:
        for name in ("block_0", "block_2", "shared_table"):
            used = r[f"usage/{name}/rows_used_pct"]
            ever = r[f"usage/{name}/rows_ever_used_pct"]
            assert 0 < used <= ever < 100, (name, used, ever)
            assert 0 < r[f"usage/{name}/kl_uniform_count"] < math.log(32**2)
            assert 0 < r[f"usage/{name}/gini_count"] < 1
        assert rows_used_pct(r) == r["usage/shared_table/rows_used_pct"]  # the progress line's
        assert {k.split("/")[1] for k in r if k.startswith("usage/")} == {
            "block_0", "block_2", "shared_table",
        }  # fmt: skip
    # more rows over four steps than over the last two
    assert (
        steps[1]["usage/shared_table/rows_ever_used_pct"]
        > steps[1]["usage/shared_table/rows_used_pct"]
    )
    assert (run / "loss.png").is_file() and (run / "usage.png").is_file()


@pytest.mark.parametrize(
    "overrides",
    [["logging.usage=false"], ["model.preset=tiny-dense", "model.memory_layers=[]"]],
    ids=["usage-off", "dense"],
)
def test_no_usage_statistics_without_usage_or_memory(tmp_path, overrides):
    run = tmp_path / "run"
    history = train(tiny_args(run, "steps=2", "logging.plot=true", *overrides))
    assert len(history) == 2 and all(math.isfinite(r["loss"]) for r in history)
    assert not [k for r in _records(run) for k in r if k.startswith("usage/")]
    assert (run / "loss.png").is_file() and not (run / "usage.png").exists()


def test_resume_continues_the_usage_statistics(tmp_path):
    """rows_ever_used_pct goes on from the checkpoint's rows (the trainer state holds
    them), so the resumed run logs what the uninterrupted one does."""
    small = ["model.memory.n_keys=32", "model.memory.heads=1", "model.memory.topk=2"]
    small += ["steps=5", "checkpoint.every=3"]
    full = train(tiny_args(tmp_path / "a", *small))
    resumed = train(
        tiny_args(tmp_path / "b", *small),
        resume=str(tmp_path / "a" / "checkpoints" / "step_000003"),
    )
    usage = [k for k in full[0] if k.startswith("usage/")]
    assert len(usage) == 12
    assert [[r[k] for k in usage] for r in resumed] == [[r[k] for k in usage] for r in full[3:]]
    ever = "usage/shared_table/rows_ever_used_pct"
    assert resumed[0][ever] > resumed[0]["usage/shared_table/rows_used_pct"]


# ---- optimizer -----------------------------------------------------------------------------


def test_param_groups_and_value_optimizer_choice():
    args = tiny_args("unused")
    args.model.vocab_size = 64
    model = build_model(args.model.to_config(), seed=0, sparse_values=True)
    opt = build_optimizer(model, OptimArgs(lr=0.01, value_lr=0.05))
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(opt.optimizers) == {"adamw", "values"}
    assert groups["values"]["params"] == [model.memory_values.weight]
    assert groups["values"]["lr"] == 0.05 and groups["values"]["weight_decay"] == 0.0
    # No decay: vectors, and the memory layers' keys and qk-norm gains (matrices that are
    # addresses and norm gains, not weights). Decay: every other matrix.
    mem = model.memory_layers()
    undecayed = {id(p) for m in mem for p in (m.router.keys, m.router.gain)}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert undecayed <= no_decay
    assert all(p.dim() < 2 or id(p) in undecayed for p in groups["no_decay"]["params"])
    assert all(p.dim() >= 2 and id(p) not in undecayed for p in groups["decay"]["params"])
    assert model.memory_values.sparse_grad
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))
    with pytest.raises(ValueError, match="sparse_values=False"):  # decided at build time
        build_optimizer(model, OptimArgs(value_optimizer="adamw"))
    model = build_model(args.model.to_config(), seed=0, sparse_values=False)
    dense = build_optimizer(model, OptimArgs(value_optimizer="adamw"))
    assert set(dense.optimizers) == {"adamw"} and not model.memory_values.sparse_grad
    assert {g["name"] for g in dense.param_groups} == {"decay", "no_decay", "values"}


def test_memory_lr_gives_the_memory_layers_groups_of_their_own():
    args = tiny_args("unused")
    args.model.vocab_size = 64
    model = build_model(args.model.to_config(), seed=0, sparse_values=True)
    opt = build_optimizer(model, OptimArgs(lr=0.01, value_lr=0.05, memory_lr=0.2))
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"decay", "no_decay", "memory_decay", "memory_no_decay", "values"}
    mem = model.memory_layers()
    own = {id(p) for m in mem for p in m.parameters()} - {id(model.memory_values.weight)}
    in_memory = {id(p) for n in ("memory_decay", "memory_no_decay") for p in groups[n]["params"]}
    assert in_memory == own  # every memory parameter but the table, nothing else
    assert {id(p) for m in mem for p in (m.router.keys, m.router.gain)} <= {
        id(p) for p in groups["memory_no_decay"]["params"]
    }  # keys and gains stay undecayed
    assert groups["memory_decay"]["weight_decay"] == OptimArgs().weight_decay
    assert groups["memory_decay"]["lr"] == 0.2 and groups["decay"]["lr"] == 0.01
    assert groups["values"]["lr"] == 0.05
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    mult = set_lr(opt, 1, 10, OptimArgs(warmup_steps=4))  # the schedule scales every group
    assert groups["memory_decay"]["lr"] == pytest.approx(0.2 * mult)
    # unset: the memory layers are in the body's groups, as before
    plain = {g["name"] for g in build_optimizer(model, OptimArgs()).param_groups}
    assert plain == {"decay", "no_decay", "values"}
    with pytest.raises(ValueError, match="optim.memory_lr must be finite and > 0"):
        OptimArgs(memory_lr=0.0).validate()


def test_memory_lr_leaves_a_retrofits_pretrained_mlp_in_the_body():
    from memlayers.retrofit import ParallelMemory, add_parallel_mlps_

    args = tiny_args("unused")
    args.model.vocab_size = 64
    model = add_parallel_mlps_(build_model(args.model.to_config(), seed=0, sparse_values=True))
    mlps = [m.mlp for m in model.modules() if isinstance(m, ParallelMemory)]
    assert mlps
    groups = {g["name"]: g for g in build_optimizer(model, OptimArgs(memory_lr=0.2)).param_groups}
    body = {id(p) for p in groups["decay"]["params"]}
    assert {id(p) for mlp in mlps for p in mlp.parameters()} <= body
    assert all(id(p) not in body for m in model.memory_layers() for p in m.router.parameters())


def test_resume_with_another_memory_lr_grouping_is_refused_naming_it(tmp_path):
    train(tiny_args(tmp_path / "a", "steps=2", "checkpoint.every=2"))
    ckpt = str(tmp_path / "a" / "checkpoints" / "step_000002")
    with pytest.raises(CheckpointError, match="does not fit the optimizer.*optim.memory_lr set"):
        train(tiny_args(tmp_path / "b", "steps=4", "optim.memory_lr=1e-2"), resume=ckpt)


def test_resume_with_another_table_dtype_is_refused_naming_it(tmp_path):
    # A checkpoint's fp32 tables must not be converted silently: the paper presets' default
    # became bf16, so a run begun in fp32 and resumed with a newer config would change.
    train(tiny_args(tmp_path / "a", "steps=2", "checkpoint.every=2"))
    ckpt = str(tmp_path / "a" / "checkpoints" / "step_000002")
    args = tiny_args(tmp_path / "b", "steps=4", "model.memory.value_dtype=bf16")
    with pytest.raises(CheckpointError, match="holds fp32 value tables.*value_dtype=fp32"):
        train(args, resume=ckpt)


def test_bf16_value_table_trains_on_cpu(tmp_path, capsys):
    # model.memory.value_dtype=bf16: the shared table (two layers, merged gradient) stays
    # bf16 through training and the checkpoint, the loss falls, rows move.
    args = tiny_args(tmp_path, "steps=8", "checkpoint.every=4", "model.memory.value_dtype=bf16")
    losses = [r["loss"] for r in train(args)]
    split = "value tables bf16 (fp32 master split: the table and a 16-bit remainder in the"
    assert split in capsys.readouterr().out
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    tables = [
        load_model_from_checkpoint(tmp_path / "checkpoints" / f"step_00000{s}").memory_values
        for s in (4, 8)
    ]
    assert all(t.weight.dtype == torch.bfloat16 for t in tables)
    assert (tables[0].weight != tables[1].weight).any(dim=1).any()
    assert load_config([], ["model.memory.value_dtype=bf16"]).model.memory.value_dtype == "bf16"


def test_lr_schedule():
    args = OptimArgs(warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_multiplier(1, 100, args) == pytest.approx(0.1)
    assert lr_multiplier(10, 100, args) == pytest.approx(1.0)
    assert lr_multiplier(55, 100, args) == pytest.approx(0.55)
    assert lr_multiplier(100, 100, args) == pytest.approx(0.1)
    lin = OptimArgs(warmup_steps=0, min_lr_ratio=0.0, schedule="linear")
    assert lr_multiplier(50, 100, lin) == pytest.approx(0.5)


def test_clip_grad_norm_counts_sparse_rows_once():
    dense = torch.nn.Parameter(torch.zeros(3))
    dense.grad = torch.tensor([3.0, 0.0, 0.0])
    table = torch.nn.Parameter(torch.zeros(5, 2))
    # an uncoalesced gradient: row 1 appears twice and sums to [0, 4]
    table.grad = torch.sparse_coo_tensor(
        [[1, 1]], torch.tensor([[0.0, 2.0], [0.0, 2.0]]), (5, 2), check_invariants=True
    )
    norm = clip_grad_norm_([dense, table], max_norm=1.0)
    assert norm.item() == pytest.approx(5.0)
    assert table.grad.to_dense()[1, 1].item() == pytest.approx(4.0 / 5.0, rel=1e-5)
    assert math.isclose(dense.grad[0].item(), 3.0 / 5.0, rel_tol=1e-5)


# ---- torchrun ------------------------------------------------------------------------------


@pytest.mark.gloo
def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path):
    """Rank r reads the r-th half of each global batch and gradients are averaged, so
    2 ranks × batch 4 train like 1 rank × batch 8 (up to summation order)."""
    import os
    import subprocess
    import sys

    # gloo ranks on the CPU (and the 1-rank run too), also on a machine with one GPU
    common = [o for o in TINY if not o.startswith("data.batch_size")] + ["steps=3", "device=cpu"]
    # 1,024 rows, 2 a token: each rank alone reads a far smaller share than both together
    common += ["model.memory.n_keys=32", "model.memory.heads=1", "model.memory.topk=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "memlayers",
        "train",
        *common,
        "data.batch_size=4",
        f"run_dir={tmp_path / 'two'}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 3 steps") == 1  # rank 0 alone reports
    one = train(load_config([], [*common, "data.batch_size=8", f"run_dir={tmp_path / 'one'}"]))
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    two = [r for r in two if "loss" in r]
    assert [r["step"] for r in two] == [1, 2, 3]
    usage = [k for k in one[0] if k.startswith("usage/")]
    assert len(usage) == 12
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        # the ranks' read counts are summed at log steps: the global batch's statistics
        # (up to a near-tie in the top-k flipping a read or two)
        for k in usage:
            assert a[k] == pytest.approx(b[k], abs=0.5 if k.endswith("_pct") else 0.01), k


def _fresh_start_worker(rank, store_dir, phases):
    """One rank: ``memlayers train`` once per phase ``(argv, timing)``, in a new gloo group
    each time (the CLI destroys it). ``timing`` slows the ranks' run-directory checks:
    None, "late" or "overlap" (below). Writes ``[(rc or exception, stderr), ...]``: the
    test sees what every rank did."""
    import contextlib
    import time
    from datetime import timedelta
    from pathlib import Path
    from unittest import mock

    import torch.distributed as dist

    from memlayers.run import Run

    os.environ.update(RANK=str(rank), WORLD_SIZE="2")  # what torchrun sets
    torch.set_num_threads(1)
    check, results = Run.start_fresh, []

    def late(run, *args, **kwargs):  # rank 1 checks 2 s after rank 0
        time.sleep(2)
        return check(run, *args, **kwargs)

    def lists_late(run, *args, **kwargs):  # rank 1 lists checkpoints/ 1 s after finding it
        is_dir = Path.is_dir

        def found_late(path):
            found = is_dir(path)
            time.sleep(1 if found else 0)
            return found

        with mock.patch.object(Path, "is_dir", found_late):
            return check(run, *args, **kwargs)

    def deletes_late(run, *args, **kwargs):  # rank 0 deletes 0.5 s after checking
        rmtree = shutil.rmtree

        def rmtree_late(path):
            time.sleep(0.5)
            rmtree(path)

        with mock.patch.object(shutil, "rmtree", rmtree_late):
            return check(run, *args, **kwargs)

    timings = {None: (check, check), "late": (check, late), "overlap": (deletes_late, lists_late)}
    for i, (argv, timing) in enumerate(phases):
        # a rank left waiting (a barrier only the other reaches) fails in 60 s, not 30 min
        dist.init_process_group(
            "gloo", init_method=f"file://{store_dir}/store{i}", rank=rank, world_size=2,
            timeout=timedelta(seconds=60),
        )  # fmt: skip
        Run.start_fresh = timings[timing][rank]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = cli_main(argv)
            except Exception as e:  # e.g. gloo's "Connection closed by peer"
                rc = f"{type(e).__name__}: {e}"
        results.append((rc, err.getvalue()))
    Path(store_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.mark.gloo
def test_two_ranks_start_fresh_together(tmp_path):
    """A fresh 2-rank run checks the run directory on every rank before rank 0 writes in
    it (the barrier after the check): into an old run it is refused on both ranks with
    nothing touched; with --overwrite it replaces the old run, which rank 0 deletes only
    once rank 1, still listing checkpoints/, has checked; into a new directory a late rank
    1 does not mistake rank 0's first files for an old run."""
    import torch.multiprocessing as mp

    held, replaced, new = tmp_path / "held", tmp_path / "replaced", tmp_path / "new"
    train(tiny_args(held, "steps=3"))  # one process: safetensors step_000003
    (held / "notes.txt").write_text("not the trainer's\n")
    shutil.copytree(held, replaced)
    before = {p: p.read_bytes() for p in sorted(held.rglob("*")) if p.is_file()}
    argv = ["train", *TINY, "steps=2", "device=cpu", "final_eval=false"]
    phases = [
        ([*argv, f"run_dir={held}"], None),
        ([*argv, f"run_dir={replaced}", "--overwrite"], "overlap"),
        ([*argv, f"run_dir={new}"], "late"),
    ]
    store = tmp_path / "store"
    store.mkdir()
    mp.spawn(_fresh_start_worker, args=(str(store), phases), nprocs=2)
    ranks = [json.loads((store / f"rank{r}.json").read_text()) for r in (0, 1)]
    # per phase: (rank 0's, rank 1's) (rc, stderr)
    refused, overwritten, into_new = zip(*ranks, strict=True)

    one_line = rf"error: {re.escape(str(held))} already holds a run.*\n"
    assert all(rc == 1 and re.fullmatch(one_line, err) for rc, err in refused), refused
    assert {p: p.read_bytes() for p in sorted(held.rglob("*")) if p.is_file()} == before
    assert [rc for rc, _ in overwritten] == [0, 0], overwritten
    assert [rc for rc, _ in into_new] == [0, 0], into_new
    for run in (replaced, new):
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == [1, 2]
        assert load_config([run / "config.yaml"]).steps == 2
        assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_000002"]
        assert (resolve_checkpoint(run) / "dcp" / ".metadata").is_file()  # the 2-rank one
    assert (replaced / "notes.txt").read_text() == "not the trainer's\n"


def test_more_local_ranks_than_gpus_is_a_clear_error(monkeypatch):
    from memlayers.train import init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"local rank 1 needs cuda:1 but this machine has 1 GPU"):
        init_distributed("auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_log_records_count_the_allocators_retries_on_cuda(tmp_path):
    records = train(tiny_args(tmp_path, "steps=2", "device=cuda", "compile=false"))
    steps = [r for r in records if "tok_per_s" in r]
    assert steps and all(isinstance(r["alloc_retries"], int) for r in steps)
    assert all(r["alloc_retries"] >= 0 for r in steps)


def test_expandable_segments_set_before_cuda_starts_and_the_users_setting_stands(monkeypatch):
    """The trainer turns on the allocator's expandable segments (train.py says why), by
    the variable before CUDA starts, by the runtime call after; a user's own setting of
    either variable is left alone. CPU-only: CUDA's state is faked."""
    import memlayers.train as tr

    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        # set, then removed: monkeypatch records the variable and restores it (or its
        # absence) afterwards, so what expandable_segments() writes does not leak into
        # later tests (a delenv of an absent variable records nothing)
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert tr.expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"

    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # the user's choice
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
        monkeypatch.setenv(var, "expandable_segments:False")
        assert not tr.expandable_segments()
        assert os.environ[var] == "expandable_segments:False"
        monkeypatch.delenv(var)

    calls = []  # CUDA already started: the variable would be read no more
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    assert tr.expandable_segments()
    assert calls == ["expandable_segments:True"]
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


@pytest.mark.parametrize("walk", [False, True], ids=["reads", "reads-and-walk"])
def test_int8_reads_train_on_cpu_and_say_so(tmp_path, capsys, walk):
    # model.memory.value_read=int8 with an fp32 table: the start line says so, the loss
    # falls, and the checkpoint holds the float table alone (the copy is derived). With
    # grad_read=int8 too, the merged walk reads int8 output gradients.
    extra = ["model.memory.grad_read=int8"] if walk else []
    args = tiny_args(tmp_path, "steps=8", "checkpoint.every=8", "model.memory.value_read=int8",
                     *extra)  # fmt: skip
    losses = [r["loss"] for r in train(args)]
    out = capsys.readouterr().out
    assert "lookups read an int8 copy of the value tables" in out
    assert ("the value-gradient walk reads int8 output gradients" in out) == walk
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    model = load_model_from_checkpoint(tmp_path)
    assert model.memory_values.read == "int8"
    assert model.memory_values.grad_read == ("int8" if walk else "float")
    assert not any("read" in k or "qdata" in k for k in model.state_dict())
