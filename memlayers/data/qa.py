"""Factual-QA records, their text, and their JSONL files.

A record is ``{"question": str, "answers": [str, ...]}``; optional keys: ``"context"``
(str, prepended to the question at evaluation) and any metadata (bios adds ``"person"``
and ``"attribute"``), kept as they are. Bios and facts build records with
:func:`qa_record` and train on :func:`qa_text`; evaluation conditions on
:func:`qa_prompt`, so the model is asked in the format it was trained on. The reader
validates every line of a JSONL file and names the line number of the first bad one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from memlayers.files import atomic_open


def qa_record(question: str, answer: str, **meta) -> dict:
    """``{"question": question, "answers": [answer], **meta}``."""
    return {"question": question, "answers": [answer], **meta}


def qa_prompt(question: str, context: str | None = None) -> str:
    """What a model is given to answer: the question, after the context if there is one."""
    return f"{context} {question}" if context else question


def qa_text(record: dict) -> str:
    """A record as training text: the prompt, one space, the first answer."""
    return f"{qa_prompt(record['question'], record.get('context'))} {record['answers'][0]}"


class QAFormatError(ValueError):
    """A QA JSONL line that is not a valid record."""


def validate_qa_record(rec: object, where: str = "record") -> dict:
    """Check one record's shape; returns it, raises :class:`QAFormatError` naming ``where``."""
    if not isinstance(rec, dict):
        raise QAFormatError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    q = rec.get("question")
    if not isinstance(q, str) or not q.strip():
        raise QAFormatError(f'{where}: "question" must be a non-empty string, got {q!r}')
    ans = rec.get("answers")
    if (
        not isinstance(ans, list)
        or not ans
        or not all(isinstance(a, str) and a.strip() for a in ans)
    ):
        raise QAFormatError(
            f'{where}: "answers" must be a non-empty list of non-empty strings, got {ans!r}'
        )
    if "context" in rec and not isinstance(rec["context"], str):
        raise QAFormatError(f'{where}: "context" must be a string, got {rec["context"]!r}')
    return rec


def read_qa_jsonl(path: str | Path) -> list[dict]:
    """All records of a QA JSONL file (blank lines skipped)."""
    path = Path(path)
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise QAFormatError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            out.append(validate_qa_record(rec, f"{path}:{lineno}"))
    if not out:
        raise QAFormatError(f"{path}: no QA records")
    return out


def write_qa_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Validate and write records, atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as f:
        for i, rec in enumerate(records):
            validate_qa_record(rec, f"record {i}")
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path
