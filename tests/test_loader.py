"""PackedLoader (packing, sharding, shuffling, exact resume) and the dataset registry."""

import numpy as np
import pytest
import torch

from memlayers.config import load_config
from memlayers.data.datasets import DATASETS, SyntheticArgs
from memlayers.data.loader import DataArgs, PackedLoader, load_dataset


def test_batches_are_shifted_windows_of_the_stream():
    tokens = np.arange(1000, dtype=np.uint16)
    loader = PackedLoader(tokens, batch_size=4, seq_len=10)
    x, y = next(loader)
    assert x.shape == y.shape == (4, 10) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # arange: the target is the next token
    assert all(int(row[0]) % 10 == 0 for row in x)  # sequences start on seq_len boundaries


def test_ranks_partition_each_global_batch_and_epochs_cover_everything():
    tokens = np.arange(2 * 3 * 7 * 8 + 1, dtype=np.uint32)  # 42 sequences of 8
    loaders = [PackedLoader(tokens, 3, 8, rank=r, world_size=2, seed=5) for r in range(2)]
    assert len(loaders[0]) == 7
    seen = []
    for _ in range(len(loaders[0])):
        starts = [set((next(ld)[0][:, 0] // 8).tolist()) for ld in loaders]
        assert not starts[0] & starts[1]
        seen += [*starts[0], *starts[1]]
    assert sorted(seen) == list(range(42))  # one epoch = every sequence once
    epoch1 = next(loaders[0])[0]
    assert loaders[0].epoch == 1
    assert not torch.equal(epoch1, PackedLoader(tokens, 3, 8, 0, 2, seed=5).__next__()[0])


def test_state_dict_resumes_exactly():
    tokens = np.random.default_rng(0).integers(0, 50, 5000).astype(np.uint16)
    a = PackedLoader(tokens, 4, 16, seed=3)
    for _ in range(90):  # past the first epoch (78 batches)
        next(a)
    b = PackedLoader(tokens, 4, 16, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        assert all(torch.equal(p, q) for p, q in zip(next(a), next(b), strict=True))
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(tokens, 4, 8, seed=3).load_state_dict(a.state_dict())


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedLoader(np.arange(50), batch_size=4, seq_len=16)


def test_synthetic_is_deterministic_and_learnable():
    args = DataArgs(synthetic=SyntheticArgs(vocab_size=40, n_tokens=4000))
    a, b = load_dataset(args), load_dataset(args)
    assert a.vocab_size == 40 and np.array_equal(a.train, b.train)
    rec = a.train.reshape(-1, 4)  # key v1 v2 v3
    assert (rec[:, 0] < 20).all() and (rec[:, 1:] >= 20).all()
    for key in np.unique(rec[:, 0]):  # the values of a key never change
        assert len({tuple(r) for r in rec[rec[:, 0] == key, 1:]}) == 1
    with pytest.raises(ValueError, match=r"Key 'vocab' not in 'SyntheticArgs'"):
        load_config(overrides=["data.dataset=synthetic", "data.synthetic.vocab=40"])


def test_text_dataset(tmp_path):
    (tmp_path / "a.txt").write_text("héllo\n")
    (tmp_path / "b.txt").write_text("world")
    ds = load_dataset(DataArgs(dataset="text", path=str(tmp_path), val_fraction=0.0))
    assert ds.vocab_size == 257 and ds.tokenizer.eos_id == 256
    assert ds.tokenizer.decode(ds.train) == "héllo\nworld"
    assert list(ds.train).count(256) == 2
    assert ds.tokenizer.encode("hé") == list("hé".encode())
    with pytest.raises(ValueError, match="data.path"):
        load_dataset(DataArgs(dataset="text"))


def test_dataset_table():
    def fn(args):
        return np.arange(int(args.path)), np.arange(3), 100, None

    table = {**DATASETS, "test-counting": fn}
    ds = load_dataset(DataArgs(dataset="test-counting", path="20"), table)
    assert len(ds.train) == 20 and ds.vocab_size == 100
    assert "test-counting" not in DATASETS  # the table is passed in, never mutated
    bad = {"test-bad": lambda a: (np.arange(10), np.arange(3), 5, None)}
    with pytest.raises(ValueError, match="vocab_size=5"):
        load_dataset(DataArgs(dataset="test-bad"), bad)
    with pytest.raises(ValueError, match="unknown data.dataset='nope'"):
        load_dataset(DataArgs(dataset="nope"))


def test_typed_options_and_the_old_options_error(tmp_path):
    args = load_config(overrides=["data.bios.n_people=50", "data.synthetic.vocab_size=64"])
    assert args.data.bios.n_people == 50 and args.data.bios.exposures == 36  # main job's
    assert args.data.synthetic.vocab_size == 64
    assert args.data.bios_compact.exposures == 100  # BiosConfig's default, own section
    with pytest.raises(ValueError, match="data.options is gone.*data.bios.n_people"):
        load_config(overrides=["data.options.n_people=50"])
    yaml = tmp_path / "old.yaml"
    yaml.write_text("data:\n  dataset: synthetic\n  options:\n    vocab_size: 64\n")
    with pytest.raises(ValueError, match="data.synthetic.vocab_size"):
        load_config([yaml])
    with pytest.raises(ValueError, match="data.facts.seed"):
        load_config(overrides=["data.dataset=facts", "data.options.seed=1"])
    with pytest.raises(ValueError, match="Key 'n_peple' not in 'BiosArgs'"):
        load_config(overrides=["data.bios.n_peple=3"])
    with pytest.raises(ValueError, match="Value 'many' of type 'str' could not be converted"):
        load_config(overrides=["data.bios.n_people=many"])
