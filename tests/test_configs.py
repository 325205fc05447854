"""The shipped config files: each loads, and a study file's variants resolve to the
models its comments and docs/usage.md describe (no training)."""

import dataclasses
from pathlib import Path

import pytest

from memlayers.compare import read_study, variant_args
from memlayers.config import check_warmup, load_config
from memlayers.report import parameter_report

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
BIOS_VOCAB = 3269  # the bios word vocabulary (docs/usage.md's variant table)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_shipped_config_loads(path, tmp_path):
    """A config trains as it is; a study file (a ``compare:`` section) with each of its
    variants, which name the model (alone it would be the default tiny preset, whose
    max_seq_len its data.seq_len passes). Its warmup fits its steps (the trainer's check)."""
    study = read_study(path)
    configs = (
        [variant_args(v, [str(path)], [], tmp_path) for v in study["variants"]]
        if study
        else [load_config([path])]
    )
    for args in configs:
        assert args.steps > 0
        check_warmup(args)


def _flops(spec: str, study: Path, tmp_path: Path) -> float:
    args = variant_args(spec, [str(study)], [], tmp_path)
    model = dataclasses.replace(args.model, vocab_size=BIOS_VOCAB)
    model.validate()
    return float(parameter_report(model, seq_len=args.data.seq_len)["train_flops_per_token"])


def test_the_headline_study_variants_resolve_at_the_compute_they_claim(tmp_path):
    study = Path(__file__).resolve().parent.parent / "configs/study_134m.yaml"
    variants = read_study(study)["variants"]
    base = _flops("134m-dense", study, tmp_path)
    ratios = {v: _flops(v, study, tmp_path) / base for v in variants}
    # dense at ~2x and ~4x its training FLOPs; every sparse variant at ~1x (matched active)
    assert ratios["134m-dense:model.n_layers=24"] == pytest.approx(2, rel=0.05)
    assert ratios["134m-dense:model.dim=1088:model.n_heads=16"] == pytest.approx(2, rel=0.05)
    assert ratios["134m-dense:model.n_layers=48"] == pytest.approx(4, rel=0.05)
    for v in ("134m-memory", "134m-memory+", "134m-moe", "134m-peer"):
        assert ratios[v] == pytest.approx(1, rel=0.05), v
    # a learning-rate variant is its model at another rate: the same FLOPs, only the rate
    lr_variants = [v for v in variants if ":optim.lr=" in v]
    assert len(lr_variants) >= 3
    for v in lr_variants:
        base_spec, lr = v.split(":optim.lr=")
        assert ratios[v] == ratios[base_spec], v
        args = variant_args(v, [str(study)], [], tmp_path)
        assert (
            args.optim.lr
            == float(lr)
            != variant_args(base_spec, [str(study)], [], tmp_path).optim.lr
        ), v
    # the variant without the usage levers really turns both off
    levers_off = "134m-memory+:model.memory.query_batch_norm=false:model.memory.balance_loss=0"
    assert levers_off in variants
    off = variant_args(levers_off, [str(study)], [], tmp_path).model.memory
    on = variant_args("134m-memory+", [str(study)], [], tmp_path).model.memory
    assert (on.query_batch_norm, on.balance_loss) == (True, 0.1)
    assert (off.query_batch_norm, off.balance_loss) == (False, 0.0)
