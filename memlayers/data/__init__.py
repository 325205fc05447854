"""Data: tokenizers, the pretraining corpus, the bios benchmark, real facts, QA files.

Importing this package loads numpy only; the corpus, facts and dataset table
(memlayers/data/datasets.py) modules are imported on use.
"""

from memlayers.data.bios import BiosConfig, BiosData, build_bios
from memlayers.data.qa import QAFormatError, read_qa_jsonl, write_qa_jsonl
from memlayers.data.tokenizer import (
    BPETokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    WordTokenizer,
    load_tokenizer,
)

__all__ = [
    "BPETokenizer",
    "BiosConfig",
    "BiosData",
    "QAFormatError",
    "SentencePieceTokenizer",
    "Tokenizer",
    "WordTokenizer",
    "build_bios",
    "load_tokenizer",
    "read_qa_jsonl",
    "write_qa_jsonl",
]
