"""Trainer fixes from a review: a DCP resume trains at the current optimizer settings and
refuses other optimizer groups as the single-file one does; a resume on another number of
ranks continues at the same place of the data; config values that used to fail late
(seq_len past max_seq_len, a warmup as long as the run, a bad device or data seed) are
refused before anything is written; logged tokens after a grad_accum change; validation
on exactly one global batch; no gradient work in the chunked loss under no_grad."""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import TINY, tiny_args

import memlayers.loss as loss_module
import memlayers.train as train_module
from memlayers.checkpoint import CheckpointError
from memlayers.cli import main as cli_main
from memlayers.config import check_warmup, load_config
from memlayers.data.loader import PackedLoader
from memlayers.loss import linear_cross_entropy
from memlayers.train import reseed_rng, train

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def _metrics(run) -> list[dict]:
    rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


# ---- 1. a DCP resume: the current optimizer settings; other groups refused -------------------


def test_a_dcp_resume_trains_at_the_current_optimizer_settings(tmp_path, monkeypatch):
    """DCP loads the saved param_groups (lr, base_lr, weight_decay, betas, eps) with the
    moments; the resumed run must train at the config's, as the single-file load does."""
    base = ["optim.schedule=constant", "optim.warmup_steps=0", "checkpoint.every=2"]
    new = ["optim.lr=1e-2", "optim.weight_decay=0.5", "optim.beta1=0.8", "optim.eps=1e-6"]
    losses = {}
    for fmt in ("dcp", "safetensors"):
        run = tmp_path / fmt
        train(tiny_args(run, "steps=2", f"checkpoint.format={fmt}", *base))
        seen, set_lr = [], train_module.set_lr

        def spy(optimizer, *args, seen=seen, set_lr=set_lr):
            mult = set_lr(optimizer, *args)
            seen.append([dict(g) for g in optimizer.optimizers["adamw"].param_groups])
            return mult

        monkeypatch.setattr(train_module, "set_lr", spy)
        resumed = train(
            tiny_args(run, "steps=4", f"checkpoint.format={fmt}", *base, *new), resume="latest"
        )
        monkeypatch.undo()
        assert [r["step"] for r in resumed] == [3, 4]
        for groups in seen:  # every resumed step
            assert [g["name"] for g in groups] == ["decay", "no_decay"]
            for g in groups:
                assert g["lr"] == g["base_lr"] == 1e-2, (fmt, g["name"], g["lr"])
                assert g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6, fmt
            assert [g["weight_decay"] for g in groups] == [0.5, 0.0], fmt
        losses[fmt] = [r["loss"] for r in resumed]
    assert losses["dcp"] == losses["safetensors"]  # the same state, the same settings


@pytest.mark.parametrize("fmt", ["dcp", "safetensors"])
@pytest.mark.parametrize(
    "before, after, message",
    [
        ([], ["optim.memory_lr=1e-5"], r"groups \['decay', 'no_decay'\].*optim.memory_lr"),
        (["optim.value_optimizer=adamw"], [], r"holds \['adamw'\].*optim.value_optimizer"),
        ([], ["optim.value_optimizer=adamw"], r"expected \['adamw'\].*optim.value_optimizer"),
    ],
    ids=["memory-lr-added", "adamw-to-sparse", "sparse-to-adamw"],
)
def test_a_resume_into_other_optimizer_groups_is_refused_naming_the_key(
    tmp_path, fmt, before, after, message
):
    """Before: DCP crashed on a missing param-group key (memory_lr), or resumed silently
    with the table's moments restarted (adamw -> sparse_adam). Now both layouts refuse it,
    before anything is written in the new run directory."""
    train(tiny_args(tmp_path / "a", "steps=2", f"checkpoint.format={fmt}", *before))
    ckpt = str(tmp_path / "a" / "checkpoints" / "step_000002")
    run = tmp_path / "b"
    with pytest.raises(CheckpointError, match="does not fit the optimizer: .*" + message):
        train(tiny_args(run, "steps=4", f"checkpoint.format={fmt}", *after), resume=ckpt)
    assert not (run / "config.yaml").exists() and not (run / "metrics.jsonl").exists()


@pytest.mark.parametrize("fmt", ["dcp", "safetensors"])
def test_a_resume_into_a_rowwise_second_moment_is_refused(tmp_path, fmt):
    """sparse_adam -> sparse_adam_rowwise keeps the optimizers and groups but not the
    moments' shape: DCP failed deep in its load with a BaseException (CheckpointException)
    that escaped the CLI's error handling; now refused as the single-file load does."""
    train(tiny_args(tmp_path / "a", "steps=2", f"checkpoint.format={fmt}"))
    ckpt = str(tmp_path / "a" / "checkpoints" / "step_000002")
    after = ["optim.value_optimizer=sparse_adam_rowwise"]
    with pytest.raises((CheckpointError, ValueError), match=r"rowwise_v=True"):
        train(tiny_args(tmp_path / "b", "steps=4", f"checkpoint.format={fmt}", *after), resume=ckpt)


# ---- 2. --resume on another number of ranks --------------------------------------------------


def test_the_data_position_maps_to_another_layout():
    """A position saved by 2 ranks × 4 continues at the same place of the sequence order
    for 1 rank × 8 (the same global batches), 1 rank × 4 (each in two halves) and 2 × 2;
    an old (epoch, batch) position too. seed, seq_len and the stream must be the same."""
    tokens = np.random.default_rng(0).integers(0, 50, 3000).astype(np.uint16)
    ranks = [PackedLoader(tokens, 4, 8, r, 2, seed=3) for r in (0, 1)]  # 46 batches an epoch
    for _ in range(50):  # into the second epoch
        for loader in ranks:
            next(loader)
    state = ranks[0].state_dict()
    # the 2-rank run's next global batches, in order of the sequence order
    upcoming = [torch.cat([next(loader)[0] for loader in ranks]) for _ in range(3)]
    stream = torch.cat(upcoming)  # [24, T]
    one_by_8 = PackedLoader(tokens, 8, 8, seed=3)
    one_by_8.load_state_dict(state)
    assert torch.equal(torch.cat([next(one_by_8)[0] for _ in range(3)]), stream)
    one_by_4 = PackedLoader(tokens, 4, 8, seed=3)
    one_by_4.load_state_dict(state)
    assert torch.equal(torch.cat([next(one_by_4)[0] for _ in range(6)]), stream)
    halves = [PackedLoader(tokens, 2, 8, r, 2, seed=3) for r in (0, 1)]
    for loader in halves:
        loader.load_state_dict(state)
    assert torch.equal(torch.cat([next(loader)[0] for _ in range(6) for loader in halves]), stream)
    old = {k: v for k, v in state.items() if k != "offset"} | {"batch": 50 - 46}
    from_old = PackedLoader(tokens, 8, 8, seed=3)
    from_old.load_state_dict(old)
    assert torch.equal(next(from_old)[0], upcoming[0])
    with pytest.raises(ValueError, match="seed=3 but this loader has seed=4"):
        PackedLoader(tokens, 8, 8, seed=4).load_state_dict(state)


def test_rng_reseeding_depends_on_seed_step_and_rank_alone():
    draws = {}
    for key in ((0, 2, 0), (0, 2, 0), (0, 2, 1), (0, 3, 0), (1, 2, 0)):
        reseed_rng(*key)
        draws.setdefault(key, []).append(torch.rand(4))
    assert torch.equal(*draws[(0, 2, 0)])
    firsts = [d[0] for d in draws.values()]
    assert all(not torch.equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1 :])


@pytest.mark.gloo
def test_a_two_rank_run_resumes_on_one_rank(tmp_path, capsys):
    """A job that lost a GPU: 2 gloo ranks × batch 4 (DCP checkpoints) train 4 steps; the
    step-2 checkpoint resumed with --resume on 1 process × batch 8 (the same global
    batch) trains steps 3-4 on the same data, so to the 2-rank losses up to summation
    order, and says that the resume is exact in data but not in random streams."""
    common = [o for o in TINY if not o.startswith("data.batch_size")]
    common += ["steps=4", "checkpoint.every=2", "device=cpu", "final_eval=false"]
    two = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "memlayers", "train", *common, "data.batch_size=4", f"run_dir={two}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    full = {r["step"]: r for r in _metrics(two)}
    # what the job left when it stopped after step 2 (its metrics up to step 2)
    cut = tmp_path / "cut"
    shutil.copytree(two, cut)
    shutil.rmtree(cut / "checkpoints" / "step_000004")
    (cut / "checkpoints" / "latest").write_text("step_000002\n")
    assert (cut / "checkpoints" / "step_000002" / "dcp" / ".metadata").is_file()
    capsys.readouterr()
    resumed = train(
        load_config([], [*common, "data.batch_size=8", f"run_dir={cut}"]), resume="latest"
    )
    out = capsys.readouterr().out
    assert "resumed on 1 rank(s) from a checkpoint of 2" in out
    assert "sequence 16 of epoch 0" in out  # 2 steps × 2 ranks × 4 sequences
    assert "exact in data, not in random streams" in out
    assert [r["step"] for r in resumed] == [3, 4]
    for r in resumed:
        assert r["loss"] == pytest.approx(full[r["step"]]["loss"], rel=1e-5), r["step"]
        assert r["grad_norm"] == pytest.approx(full[r["step"]]["grad_norm"], rel=1e-4)
        assert r["tokens"] == full[r["step"]]["tokens"]


# ---- 3. data.seq_len > model.max_seq_len -----------------------------------------------------


def test_seq_len_past_max_seq_len_is_refused_naming_both(tmp_path):
    with pytest.raises(ValueError, match=r"data.seq_len=64 exceeds model.max_seq_len=32"):
        load_config([], ["data.seq_len=64", "model.max_seq_len=32"])
    load_config([], ["data.seq_len=32", "model.max_seq_len=32"])  # equal: fine
    # the trainer checks the final model section again (model.hf: the pretrained one's),
    # before it writes anything in run_dir
    args = tiny_args(tmp_path / "run", "steps=2")
    args = replace(args, model=replace(args.model, max_seq_len=8))
    with pytest.raises(ValueError, match=r"data.seq_len=16 exceeds model.max_seq_len=8"):
        train(args)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_seq_len_past_a_pretrained_models_positions_is_refused_before_writing(tmp_path):
    """model.hf: max_seq_len is the pretrained model's, known once it is read."""
    transformers = pytest.importorskip("transformers")
    from memlayers.data.tokenizer import BPETokenizer

    hf = tmp_path / "tiny-llama"
    hf.mkdir()
    text = ["Ada Lovelace was born in London.", "The capital of France is Paris."]
    tok = BPETokenizer.train(text * 20, vocab_size=300, min_frequency=1)
    tok.save(hf / "tokenizer.json")
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=tok.vocab_size, max_position_embeddings=16,
        tie_word_embeddings=True,
    )  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf)
    run = tmp_path / "run"
    args = load_config(
        [],
        [
            f"model.hf={hf}", "model.memory_layers=[1]", "model.memory.n_keys=8",
            "model.memory.heads=2", "model.memory.topk=4", "data.dataset=bios",
            "data.bios.n_people=20", "data.bios.exposures=2", "data.seq_len=32",
            "data.batch_size=4", "steps=4", "optim.warmup_steps=1", "final_eval=false",
            "logging.progress=false", "logging.tensorboard=false", "logging.plot=false",
            f"run_dir={run}",
        ],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"data.seq_len=32 exceeds model.max_seq_len=16 \(the"):
        train(args)
    assert not (run / "config.yaml").exists() and not (run / "tokenizer.json").exists()
    # --overwrite of a run already there: refused before the old run is deleted
    run.mkdir(exist_ok=True)
    (run / "config.yaml").write_text("the run before\n")
    with pytest.raises(ValueError, match=r"data.seq_len=32 exceeds"):
        train(args, overwrite=True)
    assert (run / "config.yaml").read_text() == "the run before\n"


# ---- 4. optim.warmup_steps >= steps ----------------------------------------------------------


def test_a_set_warmup_as_long_as_the_run_is_refused_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "big"
    config = next(p for p in CONFIGS if p.name == "373m_memory_plus.yaml")  # warmup 1000
    rc = cli_main(["train", str(config), "steps=500", f"run_dir={run}", "device=cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and "optim.warmup_steps=1000 >= steps=500" in err, err
    assert not run.exists()
    # == steps too: the peak only at the last step, no decay
    for steps in (2, 3):
        args = tiny_args(tmp_path / "t", f"steps={steps}", "optim.warmup_steps=3")
        with pytest.raises(ValueError, match=rf"optim.warmup_steps=3 >= steps={steps}"):
            train(args)
    assert not (tmp_path / "t").exists()
    check_warmup(tiny_args(tmp_path / "t", "steps=4", "optim.warmup_steps=3"))
    check_warmup(tiny_args(tmp_path / "t", "steps=1", "optim.warmup_steps=0"))  # no warmup


def test_an_unset_warmup_is_fitted_to_a_shorter_run():
    """The default (50; a preset's) becomes a tenth of a run it would outlast; a set one
    stays as it is (and the trainer refuses it when too long)."""
    assert load_config([], ["steps=1000"]).optim.warmup_steps == 50
    assert load_config([], ["steps=51"]).optim.warmup_steps == 50
    assert load_config([], ["steps=50"]).optim.warmup_steps == 5
    assert load_config([], ["steps=4"]).optim.warmup_steps == 0
    assert load_config([], ["steps=4", "optim.warmup_steps=2"]).optim.warmup_steps == 2
    assert load_config([], ["steps=4", "optim.warmup_steps=50"]).optim.warmup_steps == 50


# ---- 5. logged tokens after a grad_accum change ----------------------------------------------


def test_logged_tokens_after_a_resume_that_changes_grad_accum(tmp_path):
    run = tmp_path / "run"
    train(tiny_args(run, "steps=2", "checkpoint.every=2"))
    train(tiny_args(run, "steps=4", "grad_accum=2"), resume="latest")
    per_step = 4 * 16  # batch × seq_len
    tokens = {r["step"]: r["tokens"] for r in _metrics(run)}
    assert tokens == {1: per_step, 2: 2 * per_step, 3: 4 * per_step, 4: 6 * per_step}
    meta = json.loads((run / "checkpoints" / "step_000004" / "meta.json").read_text())
    assert meta["progress"]["tokens_trained"] == tokens[4]


# ---- 6. validation on exactly one global batch -----------------------------------------------


@pytest.mark.parametrize("n_val, validated", [(65, True), (64, False)])
def test_validation_runs_on_exactly_one_global_batch(
    tmp_path, monkeypatch, capsys, n_val, validated
):
    """The loader takes B × T × world + 1 tokens (4 × 16 × 1 + 1: the last is a target
    only); with fewer the run says why it does not validate."""
    load_dataset = train_module.load_dataset

    def one_batch_of_val(args):
        data = load_dataset(args)
        return data._replace(val=data.val[:n_val])

    monkeypatch.setattr(train_module, "load_dataset", one_batch_of_val)
    history = train(tiny_args(tmp_path, "steps=2"))
    out = capsys.readouterr().out
    assert ("val_loss" in history[-1]) == validated
    note = "no validation: the validation split has 64 tokens, one global batch needs 65"
    assert (note in out) == (not validated), out


# ---- 7. the chunked loss under no_grad ---------------------------------------------------------


def test_no_gradient_work_under_no_grad(monkeypatch):
    """Under no_grad the Function's needs_input_grad still follows requires_grad: it used to
    compute (and hold) every chunk's gradient for nothing."""
    calls = {"grad": 0, "loss": 0}
    chunk_grad, chunk_loss = loss_module._chunk_grad, loss_module._chunk_loss

    def counted_grad(*args):
        calls["grad"] += 1
        return chunk_grad(*args)

    def counted_loss(*args):
        calls["loss"] += 1
        return chunk_loss(*args)

    monkeypatch.setattr(loss_module, "_chunk_grad", counted_grad)
    monkeypatch.setattr(loss_module, "_chunk_loss", counted_loss)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 8, generator=g, requires_grad=True)
    w = torch.randn(30, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 30, (10,), generator=g)
    with_grad = linear_cross_entropy(h, w, t, chunk=4)
    assert calls == {"grad": 3, "loss": 0}
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            without = linear_cross_entropy(h, w, t, chunk=4)
        assert calls == {"grad": 3, "loss": 3}, context
        calls["loss"] = 0
        assert torch.equal(without, with_grad.detach())
        assert without.grad_fn is None


# ---- 8. device, 9. data.seed ---------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("device=cuda:x", "device must be auto, cpu or cuda[:N], got device='cuda:x'"),
        ("device=cuda:-1", "device must be auto, cpu or cuda[:N], got device='cuda:-1'"),
        ("device=gpu", "device must be auto, cpu or cuda[:N], got device='gpu'"),
        ("data.seed=-1", "data.seed must be an int >= 0, got data.seed=-1"),
    ],
)
def test_bad_device_and_data_seed_are_refused_naming_the_key(override, message):
    with pytest.raises(ValueError, match=r"^" + re.escape(message)):
        load_config([], [override])


def test_good_devices_and_seeds_pass():
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:3"):
        assert load_config([], [f"device={device}"]).device == device
    assert load_config([], ["data.seed=7"]).data.seed == 7


@pytest.mark.parametrize("fmt", ["dcp", "safetensors"])
def test_a_checkpoint_without_optimizer_state_leaves_the_optimizer_fresh(tmp_path, fmt):
    """Saved without an optimizer (for inference; by one process for a distributed run to
    start from): the single-file load refused it, DCP loaded it with the optimizer fresh
    and said nothing. Both load it now, and say so."""
    from memlayers.checkpoint import load_checkpoint, save_checkpoint, save_distributed_checkpoint
    from memlayers.model import build_model
    from memlayers.optim import OptimArgs, build_optimizer
    from memlayers.presets import get_preset

    cfg = get_preset("tiny-memory+")
    model = build_model(cfg, seed=0, sparse_values=True)
    save = save_distributed_checkpoint if fmt == "dcp" else save_checkpoint
    save(tmp_path / "run", 1, model, None, {}, cfg.to_dict())
    other = build_model(cfg, seed=1, sparse_values=True)
    opt = build_optimizer(other, OptimArgs(), impl="torch")
    assert load_checkpoint(tmp_path / "run", other, opt)["optimizer_fresh"] is True
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    # fresh: no state, or zero moments (DCP makes AdamW's state to load into by a step of
    # zero gradients at lr 0: its step count reads 1)
    for opt_ in opt.optimizers.values():
        for st in opt_.state.values():
            assert not st["exp_avg"].any() and not st["exp_avg_sq"].any()
    assert load_checkpoint(tmp_path / "run", other)["optimizer_fresh"] is False
