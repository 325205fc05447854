"""Bad data inputs fail at the boundary with the option and its value in the message,
instead of training on an empty stream or evaluating an empty QA set (review findings 1,
2, 4 and 7): the packed loader, dataset loading, the corpus build, bios and facts
configs, and QA evaluation."""

import json

import numpy as np
import pytest

from memlayers.config import load_config
from memlayers.data.bios import BiosConfig, build_bios
from memlayers.data.corpus import PACKAGES, SOURCES, build, parse_sources
from memlayers.data.datasets import FactsArgs
from memlayers.data.facts import Fact, render_facts
from memlayers.data.loader import DataArgs, PackedLoader, load_dataset
from memlayers.eval.knowledge import _qa_summary, qa_eval
from memlayers.eval.validation import EvalError
from memlayers.files import sha256_file

# ---- the packed loader and load_dataset (finding 1) ----------------------------------------


@pytest.mark.parametrize("n_tokens", [0, 1, 100], ids=["empty", "one-token", "short"])
def test_loader_refuses_a_stream_shorter_than_one_global_batch(n_tokens):
    # 0 tokens once gave n_seq = -1, batches_per_epoch = -1 and endless [0, T] batches
    with pytest.raises(ValueError, match=rf"^{n_tokens} tokens make 0 sequences.*seq_len=128"):
        PackedLoader(np.zeros(n_tokens, np.uint16), batch_size=16, seq_len=128)


def test_load_dataset_refuses_an_empty_train_stream():
    empty = {"empty": lambda args: (np.zeros(0, np.uint16), np.zeros(5, np.uint16), 10, None)}
    with pytest.raises(ValueError, match="dataset empty: no training tokens"):
        load_dataset(DataArgs(dataset="empty"), empty)
    # an empty validation stream stays allowed (training then skips validation)
    ok = {"ok": lambda args: (np.ones(5, np.uint16), np.zeros(0, np.uint16), 10, None)}
    assert load_dataset(DataArgs(dataset="ok"), ok).val.size == 0


# ---- the corpus build (finding 2) ------------------------------------------------------------


@pytest.mark.parametrize(
    "sources, match",
    [
        ("", r"no corpus sources in sources=''"),
        (" , ", r"no corpus sources in sources=' , '"),
        ([], r"no corpus sources"),
        ("wiki,wiki", r"names 'wiki' more than once"),
        (["wiki", "wiki"], r"names 'wiki' more than once"),
    ],
    ids=["empty", "commas", "empty-list", "repeated", "repeated-list"],
)
def test_parse_sources_refuses_empty_and_repeated_lists(sources, match):
    with pytest.raises(ValueError, match=match):
        parse_sources(sources)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"val_frac": 1.5}, r"val_frac.* must be in \[0, 1\), got 1.5"),
        ({"val_frac": 1.0}, r"val_frac.* must be in \[0, 1\), got 1.0"),
        ({"val_frac": -0.1}, r"val_frac.* must be in \[0, 1\), got -0.1"),
        ({"tokenizer": "bpe-8k"}, r"tokenizer.* must be bpe-<vocab>.*got 'bpe-8k'"),
        ({"tokenizer": "bpe-100"}, r"tokenizer.*vocab.*>= 258.*got 'bpe-100'"),
        ({"sources": ""}, r"no corpus sources"),
    ],
    ids=["val-frac-1.5", "val-frac-1", "val-frac-negative", "bpe-8k", "bpe-too-small", "empty"],
)
def test_build_refuses_bad_options_before_fetching(tmp_path, kwargs, match):
    args = {"sources": "wiki", "tokenizer": "bpe-300", "val_frac": 0.01, **kwargs}
    with pytest.raises(ValueError, match=match):
        build(args["sources"], args["tokenizer"], tmp_path, args["val_frac"], progress=False)
    assert list(tmp_path.iterdir()) == []  # nothing fetched, no (hidden) corpus folder


def _fake_cache(root, n_docs=5):
    """A cache whose fetched ``wiki`` text matches the pinned archive: build never
    downloads."""
    (root / "text").mkdir(parents=True)
    text = root / "text" / "wiki.jsonl"
    with text.open("w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": f"Article {i}\n\nThe fox number {i} jumps."}) + "\n")
    pkg = PACKAGES[SOURCES["wiki"].package]
    entry = {"sha256": pkg.sha256, "text_sha256": sha256_file(text), "chars": 1, "documents": 5}
    (root / "manifest.json").write_text(json.dumps({"sources": {"wiki": entry}}))


def test_build_refuses_a_corpus_without_training_tokens(tmp_path):
    # every document lands in val: once an empty train.bin and "0 train tokens" success
    _fake_cache(tmp_path)
    with pytest.raises(ValueError, match=r"no training documents.*wiki.*val_frac=0.999999"):
        build("wiki", "bpe-300", tmp_path, 0.999999, progress=False)
    assert not (tmp_path / "corpus").exists()


# ---- empty held-out QA (finding 4) -----------------------------------------------------------


def test_bios_needs_a_held_out_person():
    # round(0.95 * 10) = 10: every person was a train-QA person, 0 held-out questions
    with pytest.raises(ValueError, match=r"qa_train_frac=0.95 leaves no held-out.*n_people=10"):
        BiosConfig(n_people=10, qa_train_frac=0.95)
    BiosConfig(n_people=10, qa_train_frac=0.94)  # round(9.4) = 9: one held out
    BiosConfig(n_people=10, qa_train_frac=0.95, compact=True)  # compact: no QA split


FACTS = [
    Fact("Iron", "element_symbol", "Fe", "t"),
    Fact("Gold", "element_symbol", "Au", "t"),
    Fact("France", "country_capital", "Paris", "t"),
]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"qa_train_frac": 1.0}, r"qa_train_frac must be in \[0, 1\), got 1.0"),
        ({"qa_train_frac": -0.5}, r"qa_train_frac must be in \[0, 1\), got -0.5"),
        ({"exposures": 0}, r"exposures must be >= 1, got 0"),
        ({"qa_exposures": -1}, r"qa_exposures must be >= 0, got -1"),
    ],
    ids=["frac-1", "frac-negative", "exposures-0", "qa-exposures-negative"],
)
def test_facts_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match="data.facts." + match):
        FactsArgs(**kwargs)
    with pytest.raises(ValueError, match=match):
        render_facts(FACTS, **kwargs)
    with pytest.raises(ValueError, match="data.facts." + match):
        load_config(
            overrides=["data.dataset=facts"] + [f"data.facts.{k}={v}" for k, v in kwargs.items()]
        )


def test_facts_needs_a_held_out_fact():
    with pytest.raises(ValueError, match=r"no held-out facts.*3 facts.*qa_train_frac=0.999999"):
        render_facts(FACTS, qa_train_frac=0.999999)
    assert len(render_facts(FACTS, qa_train_frac=0.0).qa_eval) == 3


def test_qa_eval_refuses_an_empty_set_before_touching_the_model():
    # once {'n': 0, 'exact_match': 0.0, ..., 'answer_nll_per_token': 0.0}: a perfect NLL
    with pytest.raises(EvalError, match="no QA records"):
        qa_eval(None, None, [])
    with pytest.raises(EvalError, match="no QA records"):
        _qa_summary([], [], [])


# ---- BiosConfig fields (finding 7) -----------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, bound",
    [
        ("qa_exposures", -1, ">= 0"),
        ("company_exposures", -2, ">= 0"),
        ("val_exposures", 0, ">= 1"),
        ("compact_attributes", 0, ">= 1"),
        ("compact_chunks", 0, ">= 1"),
        ("compact_values", 0, ">= 1"),
    ],
)
def test_bios_config_names_the_bad_field(field, value, bound):
    with pytest.raises(ValueError, match=rf"^{field} must be {bound}, got {value}\b"):
        BiosConfig(**{field: value})
    with pytest.raises(ValueError, match=rf"{field} must be {bound}, got {value}\b"):
        load_config(overrides=["data.dataset=bios", f"data.bios.{field}={value}"])


def test_bios_without_qa_or_company_documents_builds():
    # 0 is a legitimate ablation for both: no mixed-in QA, no company documents
    plain = build_bios(20, 2, qa_exposures=0, company_exposures=0)
    full = build_bios(20, 2)
    assert 0 < plain.tokens.size < full.tokens.size
    assert plain.qa_eval == full.qa_eval and plain.val_tokens.size > 0


# ---- questions and answers of real facts in a corpus run ------------------------------------


class _WordTok:
    """Whitespace words as ids 1..; EOS 0."""

    eos_id = 0

    def encode_batch(self, texts):
        return [[len(w) for w in t.split()] for t in texts]


@pytest.mark.parametrize("share", [0.25, 0.5, 0.9])
def test_mixed_documents_make_their_share_of_the_stream(share):
    from memlayers.data.datasets import mix_documents

    stream = np.full(1000, 7, dtype=np.uint16)
    docs = ["a bb", "ccc dddd eeeee", "ffffff"]
    out = mix_documents(stream, _WordTok(), docs, share, seed=1)
    assert out.dtype == np.uint16
    assert (out[:1000] == 7).all()  # the corpus first, untouched
    block = out[1000:]
    assert block[-1] == 0  # whole documents, each ended by EOS
    docs_out = [tuple(d) for d in np.split(block, np.flatnonzero(block == 0) + 1) if len(d)]
    assert set(docs_out) == {(1, 2, 0), (3, 4, 5, 0), (6, 0)}
    # at least the share, by less than one document more
    assert len(block) / len(out) >= share
    assert (len(block) - 4) / (len(out) - 4) < share
    assert (mix_documents(stream, _WordTok(), docs, share, seed=1) == out).all()


def test_mixed_documents_refuse_what_cannot_mix():
    from memlayers.data.datasets import mix_documents

    stream = np.zeros(10, dtype=np.uint16)
    with pytest.raises(ValueError, match="no documents"):
        mix_documents(stream, _WordTok(), [], 0.5)
    with pytest.raises(ValueError, match=r"in \(0, 1\), got 1.0"):
        mix_documents(stream, _WordTok(), ["a"], 1.0)
    # an id past the stream's dtype is refused, not wrapped
    with pytest.raises(ValueError, match="token id 300 does not fit the stream's uint8"):
        mix_documents(np.zeros(10, dtype=np.uint8), _WordTok(), ["a" * 300], 0.5)


@pytest.mark.parametrize(
    "opt, named",
    [("data.corpus.facts_qa=1.0", "data.corpus.facts_qa must be in [0, 1), got 1.0"),
     ("data.corpus.facts_qa_share=0", "data.corpus.facts_qa_share must be in (0, 1), got 0"),
     ("data.corpus.facts_qa_seed=-1", "data.corpus.facts_qa_seed must be >= 0, got -1")],
)  # fmt: skip
def test_a_corpus_runs_facts_options_are_checked_by_name(opt, named):
    with pytest.raises(ValueError) as e:
        load_config([], ["data.dataset=corpus", opt])
    assert named in str(e.value)


def test_a_config_saved_before_the_facts_mix_is_the_same_config(tmp_path):
    # runs saved before data.corpus.facts_qa existed mixed in no facts: not a change (it
    # would make compare retrain every finished run and every resume set the config aside)
    from omegaconf import OmegaConf

    from memlayers.config import config_changes, to_yaml

    args = load_config([], ["data.dataset=corpus"])
    saved = OmegaConf.to_container(OmegaConf.create(to_yaml(args)))
    for k in ("facts_qa", "facts_qa_share", "facts_qa_seed"):
        del saved["data"]["corpus"][k]
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
    assert config_changes(path, args) == []
    mixed = load_config([], ["data.dataset=corpus", "data.corpus.facts_qa=0.5"])
    assert config_changes(path, mixed) == ["data.corpus.facts_qa: <absent> -> 0.5"]
    other = load_config([], ["data.dataset=corpus", "optim.lr=0.125"])
    assert any(c.startswith("optim.lr: ") for c in config_changes(path, other))
