"""`memlayers finetune`: sparse memory finetuning (only the top-t specific rows of the value
table move), full finetuning, LoRA (unchanged at step 0, merged on save), the new run
directory, and the refusals."""

import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_eval import TINY_BIOS as EVAL_TINY_BIOS

from memlayers.cli import main as cli_main
from memlayers.config import load_config
from memlayers.eval import evaluate
from memlayers.finetune import (
    FinetuneArgs,
    _background_counts,
    add_lora,
    document_ids,
    finetune,
    finetune_model,
    merge_lora_,
    specificity_scores,
    top_rows,
    top_rows_per_document,
)
from memlayers.memory import MemoryConfig
from memlayers.model import ModelConfig, build_model
from memlayers.optim import OptimArgs
from memlayers.run import load_run
from memlayers.train import train

VOCAB, T, B = 40, 16, 4
OPTIM = OptimArgs(lr=1e-2, value_lr=1e-1)

# tests/test_eval.py's ~30k-parameter Memory+ run on 30 bios people, no final eval: seconds.
TINY_BIOS = [*EVAL_TINY_BIOS, "final_eval=false"]


def _model(memory: bool = True, seed: int = 0, vocab: int = VOCAB, **memory_options):
    cfg = ModelConfig(
        dim=32, n_layers=2, n_heads=2, vocab_size=vocab, max_seq_len=64,
        memory_layers=[0, 1] if memory else [],
        memory=MemoryConfig(n_keys=16, heads=2, topk=4, **memory_options),
    )  # fmt: skip
    return build_model(cfg, seed=seed)


def _tokens(n: int, seed: int, lo: int = 0, hi: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, n)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_scores_prefer_rows_the_new_data_reads_and_the_background_does_not():
    counts = torch.tensor([10, 10, 0, 5, 1])  # the new batch's reads
    background = torch.tensor([0, 100, 0, 0, 3])  # reads over 100 background tokens
    score = specificity_scores(counts, background, 100)
    # row 1 is read as often as row 0 by the new data, but by every background token too
    assert score[0] > score[3] > score[1]
    assert score[2] == 0  # unread by the new data
    assert top_rows(counts, background, 100, 1).tolist() == [0]
    assert top_rows(counts, background, 100, 2).tolist() == [0, 3]
    # rows the new batch never read are never picked, however large t
    assert top_rows(counts, background, 100, 10).tolist() == [0, 1, 3, 4]


def test_background_counts_sequences_that_read_a_row_not_reads():
    model = _model()
    args = FinetuneArgs(background_batches=2)
    df, n_seq = _background_counts(model, _tokens(4000, 2), args, T, B)
    assert n_seq == 2 * B
    (df,) = df
    # a row can be read by many tokens of a sequence (and by both layers): counted once
    assert int(df.max()) == n_seq and int(df.min()) >= 0
    assert int(df.sum()) < n_seq * T * 2 * 2 * 4  # fewer than the reads


def test_kinds_of_background_give_each_row_its_lowest_idf():
    # Two kinds of 10 sequences each: row 0 read by every sequence of the first kind, row 1
    # by every one of the second, row 2 by none. In one mixed stream of 20 each common row
    # keeps idf log(21 / 11); scored apart each is as common as its own kind says: 0.
    counts = torch.tensor([5, 5, 5])
    by_kind = torch.tensor([[10, 0, 0], [0, 10, 0]])
    score = specificity_scores(counts, by_kind, [10, 10])
    assert score[0] == score[1] == 0 and score[2] > 0
    mixed = specificity_scores(counts, by_kind.sum(0), 20)
    assert (mixed[:2] > 0).all() and mixed[2] == score[2] * math.log(21) / math.log(11)
    assert top_rows(counts, by_kind, [10, 10], 1).tolist() == [2]
    # per document: the same idf
    indices, docs = torch.tensor([[0], [1], [2]]), torch.tensor([0, 0, 0])
    assert top_rows_per_document(indices, docs, by_kind, [10, 10], 1).tolist() == [2]


def test_background_counts_by_kind_splits_the_batches():
    model = _model()
    args = FinetuneArgs(background_batches=4)
    kinds = [_tokens(4000, 2, 0, VOCAB // 2), _tokens(4000, 3, VOCAB // 2)]
    df, n_seq = _background_counts(model, kinds, args, T, B)
    assert n_seq == [2 * B, 2 * B]  # half the batches each
    (df,) = df
    assert df.shape == (2, model.memory_values.n_rows)
    alone, n = _background_counts(model, kinds[1:], FinetuneArgs(background_batches=2), T, B)
    assert n == 2 * B and torch.equal(alone[0], df[1])  # each kind as if read alone


@pytest.mark.parametrize("steps", [1, 3])
def test_sparse_memory_changes_only_top_t_rows_of_the_value_table(steps):
    model, t = _model(), 7
    before = _snapshot(model)
    # new data from one half of the vocabulary, background from the other: specific rows
    new, bg = _tokens(2000, 1, 0, VOCAB // 2), _tokens(4000, 2, VOCAB // 2)
    args = FinetuneArgs(steps=steps, top_t=t, background_batches=4)
    done = finetune_model(model, new, args, T, B, OPTIM, bg)
    after = model.state_dict()
    assert done.rows_updated == [t] * steps  # the batch reads far more than t rows
    for name, w in before.items():
        if name != "memory_values.weight":
            assert torch.equal(w, after[name]), name  # bit-identical
    changed = (before["memory_values.weight"] != after["memory_values.weight"]).any(1)
    assert 0 < int(changed.sum()) <= done.rows_touched <= steps * t


@pytest.mark.parametrize("method", ["sparse-memory", "lora"])
def test_frozen_batch_normed_routers_keep_their_statistics(method):
    """query_batch_norm (the paper's memory+ presets): the frozen routers route by their
    running statistics, which stay bit-identical, like every tensor but what is trained."""
    model = _model(query_batch_norm=True)
    with torch.no_grad():  # running statistics of a trained run: not the init's 0 and 1
        for r in (m.router for m in model.memory_layers()):
            r.query_mean.normal_(0, 0.1)
            r.query_var.uniform_(0.5, 2.0)
    before = _snapshot(model)
    new, bg = _tokens(2000, 1, 0, VOCAB // 2), _tokens(4000, 2, VOCAB // 2)
    args = FinetuneArgs(method=method, steps=3)
    if method == "sparse-memory":
        args = replace(args, top_t=7, background_batches=4)
    done = finetune_model(model, new, args, T, B, OPTIM, bg)
    after = model.state_dict()
    trained = {"sparse-memory": ("memory_values.weight",),
               "lora": ("attention.w", "ffn.w1.weight", "ffn.w2.weight")}[method]  # fmt: skip
    for name, w in before.items():
        if not any(t in name for t in trained):
            assert torch.equal(w, after[name]), name  # router buffers included
    if method == "sparse-memory":
        changed = (before["memory_values.weight"] != after["memory_values.weight"]).any(1)
        assert 0 < int(changed.sum()) <= done.rows_touched <= 3 * 7


def test_sparse_memory_keeps_each_step_to_its_rows():
    """Per step: the rows that move are exactly the rows kept in that step's gradient (lazy
    Adam: a row picked at step 1 does not drift at step 2 on its momentum)."""
    model, t = _model(), 5
    new, bg = _tokens(2000, 1, 0, VOCAB // 2), _tokens(4000, 2, VOCAB // 2)
    seen = []
    for step in range(2):
        w0 = model.memory_values.weight.detach().clone()
        finetune_model(model, new, FinetuneArgs(steps=1, top_t=t, seed=step), T, B, OPTIM, bg)
        seen.append((w0 != model.memory_values.weight).any(1).nonzero().squeeze(1))
    assert all(0 < len(rows) <= t for rows in seen)


def test_documents_end_at_eos_and_at_each_batch_row():
    eos = 9
    x = torch.tensor([[1, 9, 2, 3, 9, 4], [5, 6, 9, 9, 7, 8]])
    assert document_ids(x, eos).tolist() == [0, 0, 1, 1, 1, 2, 3, 3, 3, 4, 5, 5]


def test_per_document_rows_are_each_documents_own_best():
    # Two documents of two tokens each, two reads a token. Row 5 is read by both (3 of
    # document 0's 4 reads, 1 of document 1's): the batch-wide choice of one row takes it
    # for both; per document, document 1 gets row 7, its own most specific.
    indices = torch.tensor([[5, 5], [5, 2], [7, 7], [7, 5]])
    docs = torch.tensor([0, 0, 1, 1])
    background = torch.zeros(10, dtype=torch.int64)
    counts = torch.bincount(indices.reshape(-1), minlength=10)
    assert top_rows(counts, background, 100, 1).tolist() == [5]
    assert top_rows_per_document(indices, docs, background, 100, 1).tolist() == [5, 7]
    assert top_rows_per_document(indices, docs, background, 100, 2).tolist() == [2, 5, 7]
    # a row every background sequence reads scores 0: last in its document
    background[7] = 100
    assert top_rows_per_document(indices, docs, background, 100, 1).tolist() == [5]
    # never more than t a document, never a row a document did not read
    got = top_rows_per_document(indices, docs, background, 100, 10)
    assert got.tolist() == [2, 5, 7]


def test_sparse_memory_per_document_trains_each_documents_rows():
    model, t, eos = _model(), 3, VOCAB - 1
    before = model.memory_values.weight.detach().clone()
    new = _tokens(2000, 1, 0, VOCAB // 2)
    new[::8] = eos  # documents of 8 tokens: two a batch row of 16
    bg = _tokens(4000, 2, VOCAB // 2)
    args = FinetuneArgs(steps=2, top_t=t, background_batches=4, per_document=True)

    def evaluate(step, model):  # reads of another shape between steps: not the batch's
        model.eval()
        model(torch.zeros(1, 5, dtype=torch.long))

    done = finetune_model(model, new, args, T, B, OPTIM, bg, after_step=evaluate, eos_id=eos)
    # up to t rows for each of a batch's documents (3 per row of 16 tokens: cut ones too)
    assert all(t < n <= 3 * B * t for n in done.rows_updated)
    changed = (before != model.memory_values.weight).any(1)
    assert 0 < int(changed.sum()) <= done.rows_touched
    with pytest.raises(ValueError, match="needs method 'sparse-memory' and an eos_id"):
        finetune_model(_model(), new, args, T, B, OPTIM, bg)


def test_every_token_of_a_file_longer_than_a_batch_is_a_target():
    """A data file of 2.3 batches: the targets of the first epoch (3 steps) hold every one
    of its tokens (token i is the id i here); a stream cut to one batch never got to the
    tail of the file."""
    n = 150  # > B * T + 1 = 65
    model, targets = _model(memory=False, vocab=n), []

    def keep(module, args, kwargs):
        targets.append(kwargs["targets"])

    model.register_forward_pre_hook(keep, with_kwargs=True)
    finetune_model(model, np.arange(n), FinetuneArgs(method="full", steps=3), T, B, OPTIM)
    assert set(torch.cat(targets).reshape(-1).tolist()) == set(range(n))


def test_full_changes_every_parameter():
    model = _model()
    before = _snapshot(model)
    finetune_model(model, _tokens(2000, 1), FinetuneArgs(method="full", steps=1), T, B, OPTIM)
    after = model.state_dict()
    unchanged = [k for k, w in before.items() if torch.equal(w, after[k])]
    assert not unchanged


def test_lora_starts_at_the_base_model_and_merges_into_it():
    model = _model()
    x = torch.from_numpy(_tokens(2 * T, 3)).view(2, T)
    names = set(model.state_dict())
    with torch.no_grad():
        base = model(x)
        adapters = add_lora(model, rank=4, alpha=8.0)
        lora = {id(p) for a in adapters for p in (a.lora_a, a.lora_b)}
        assert all(p.requires_grad == (id(p) in lora) for p in model.parameters())
        assert torch.equal(model(x), base)  # B = 0: the adapted model is the base, exactly
        for a in adapters:
            a.lora_b.normal_(0, 0.1)
        adapted = model(x)
        assert (adapted - base).abs().max() > 1e-2
        merge_lora_(model)
        assert set(model.state_dict()) == names  # a plain model again
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)


def test_lora_trains_only_adapters_then_saves_merged():
    model = _model()
    frozen = {k: v for k, v in _snapshot(model).items() if "attention" not in k}
    args = FinetuneArgs(method="lora", steps=2, rank=2)
    finetune_model(model, _tokens(2000, 1), args, T, B, OPTIM)
    after = model.state_dict()
    # the value table, router, norms, embeddings: untouched; only adapted linears move
    for k, w in frozen.items():
        if not k.endswith(("ffn.w1.weight", "ffn.w2.weight")):
            assert torch.equal(w, after[k]), k
    assert not torch.equal(frozen["layers.0.ffn.w2.weight"], after["layers.0.ffn.w2.weight"])


def test_sparse_memory_on_a_dense_model_is_refused():
    with pytest.raises(ValueError, match="no memory layers"):
        finetune_model(_model(memory=False), _tokens(2000, 1), FinetuneArgs(), T, B, OPTIM,
                       _tokens(2000, 2))  # fmt: skip


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(method="adapters"), "method must be one of"),
        (dict(top_t=0), "top_t must be a positive int"),
        (dict(steps=0), "steps must be a positive int"),
        (dict(rank=-1), "rank must be a positive int"),
    ],
    ids=["bad-method", "t-zero", "no-steps", "negative-rank"],
)
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        FinetuneArgs(**bad).validate()


@pytest.mark.parametrize(
    "method, options, background, named",
    [
        ("full", dict(top_t=5), None, "--top-t=5"),
        ("lora", dict(background_batches=2), None, "--background-batches=2"),
        ("full", {}, "bg.txt", "--background='bg.txt'"),
        ("sparse-memory", dict(rank=4), None, "--rank=4"),
        ("sparse-memory", dict(alpha=2.0), None, "--alpha=2.0"),
        ("lora", dict(per_document=True), None, "--per-document=True"),
    ],
    ids=["top-t-full", "bg-batches-lora", "background-full", "rank-sparse", "alpha-sparse",
         "per-document-lora"],
)  # fmt: skip
def test_options_of_another_method_are_refused_before_loading(
    tmp_path, method, options, background, named
):
    args = FinetuneArgs(method=method, **options)
    # no run there: the options are refused before anything is read
    with pytest.raises(ValueError, match=f"method '{method}' does not use {re.escape(named)}"):
        finetune(tmp_path / "no-run", tmp_path / "new.txt", args, background)


# ---- the run directory and the command -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    args = load_config([], [*TINY_BIOS, f"run_dir={root / 'run'}", "device=cpu"])
    train(args)
    from memlayers.data.datasets import bios_from_args

    docs = bios_from_args(args.data).documents(6)
    data = root / "new.txt"
    data.write_text("\n".join(docs) + "\n\n")
    return root / "run", data


@pytest.mark.parametrize("method", ["sparse-memory", "full", "lora"])
def test_cli_writes_a_loadable_run_and_refuses_to_overwrite(tiny_run, tmp_path, method, capsys):
    run, data = tiny_run
    out = tmp_path / "ft"
    argv = ["finetune", str(run), "--data", str(data), "--method", method, "--steps", "2",
            "--out", str(out)]  # fmt: skip
    if method == "sparse-memory":
        argv += ["--top-t", "5"]
    assert cli_main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    loaded = load_run(out, "cpu")
    assert loaded.step == 8 + 2
    record = json.loads((out / "finetune.json").read_text())
    assert record["method"] == method and len(record["losses"]) == 2
    if method == "sparse-memory":
        assert all(0 < r <= 5 for r in record["rows_updated"])
    evaluate(out, max_qa=5, max_val_tokens=500, progress=False, write=False)
    assert cli_main(argv) == 1
    assert "is not empty: pass --overwrite" in capsys.readouterr().err
    assert cli_main([*argv, "--overwrite"]) == 0


def test_cli_errors_are_one_line(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [
        (
            ["--data", str(tmp_path / "missing.txt")],
            f"--data {tmp_path / 'missing.txt'}: no such file",
        ),
        (["--data", str(empty)], f"--data {empty}: no text"),
        (["--data", str(data), "--background", str(empty)], f"--background {empty}: no text"),
        (
            ["--data", str(data), "--background", str(tmp_path / "nobg.txt")],
            f"--background {tmp_path / 'nobg.txt'}: no such file",
        ),
        (["--data", str(data), "--top-t", "0"], "top_t must be a positive int"),
        (
            ["--data", str(data), "--method", "lora", "--top-t", "5"],
            "method 'lora' does not use --top-t=5",
        ),
    ]
    for extra, match in cases:
        assert cli_main(["finetune", str(run), "--out", str(tmp_path / "o"), *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error:") and match in err and err.count("\n") == 1
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        cli_main(["finetune", str(run), "--data", str(data), "--method", "adapters"])
    assert not (tmp_path / "o").exists()


def test_library_refuses_the_source_as_out(tiny_run):
    run, data = tiny_run
    with pytest.raises(ValueError, match="overlaps the source run"):
        finetune(run, data, out=run / "ft")
