"""Readers of extractive-QA data: SQuAD v1.1 JSON (whole file, or split by articles) and JSON Lines.

Formats:
    ``squad``: every question of a SQuAD v1.1 file (``{"data": [{"title", "paragraphs": [{"context", "qas":
    [{"id", "question", "answers": [{"text", "answer_start"}]}]}]}]}``).
    ``squad-train`` / ``squad-dev``: the same file split by articles: the last ``dev_articles`` articles are the
    dev split, the others the training split (deterministic, so the two never share a context).
    ``jsonl``, ``csv``, ``parquet``, ``arrow`` (a ``datasets`` ``save_to_disk`` directory): one record ``{"id",
    "question", "context", "answers"}`` per line or row, ``answers`` as ``[{"text", "answer_start"}]`` or as the
    Hugging Face SQuAD's ``{"text": [...], "answer_start": [...]}`` (fields renamed by the recipe's ``columns``).
    ``None``: ``.json`` -> ``squad``, a directory / ``.jsonl`` / ``.csv`` / ``.parquet`` -> that table format.

What is an error and what is not (the reader does not know the split, so it only rejects what no split can use):
    * a missing or mistyped field, an empty context or question, a duplicate id -> ``DataError`` naming the file
      and the record (SQuAD: the question id, or its article/paragraph/question position; JSONL: the line);
    * an ``answer_start`` whose text does not match the context, and a question without answers, are kept:
      training skips them (counted in ``Encoded.skipped``) and evaluation scores answer texts, so only a
      question without any answer is an error there (see ``QaTask.encode``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.data.readers import Location, read_json
from compressor.data.tables import RECORD_FORMATS, read_records, table_format
from compressor.errors import DataError

FORMATS = ("squad", "squad-train", "squad-dev", *RECORD_FORMATS)


@dataclass(frozen=True)
class QaExample:
    """One question over one context.

    Attributes:
        id: the question id.
        question, context: the texts.
        answers: reference answers ``(text, answer_start)``; ``answers[0]`` is the training target.
        where: ``"<file> [record <id>]"`` for error messages.
    """

    id: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]
    where: str

    def answer_ok(self, i: int = 0) -> bool:
        """Whether answer ``i``'s ``answer_start`` points at its text in the context."""
        text, start = self.answers[i]
        return start >= 0 and self.context[start : start + len(text)] == text


def resolve_format(path: Path, fmt: str | None) -> str:
    if fmt is None:
        suffix = Path(path).suffix.lower()
        if suffix == ".json":
            return "squad"
        table = table_format(path)
        if table is not None:
            return table
        raise DataError(path, f"cannot tell the QA format from the extension '{suffix}'; set the task's "
                              f"'format' to one of {', '.join(FORMATS)}")
    if fmt not in FORMATS:
        raise DataError(path, f"unknown QA format '{fmt}'; expected one of {', '.join(FORMATS)}")
    return fmt


def read_qa(path: Path, fmt: str | None = None, dev_articles: int = 5, encoding: str | None = None) -> list[QaExample]:
    """Read one split of QA data (see the module docstring for formats and error policy).

    ``encoding``: the file's text encoding (``None``: the split's, set by ``DataStore``; UTF-8 by default)."""
    path = Path(path)
    fmt = resolve_format(path, fmt)
    if fmt in RECORD_FORMATS:
        examples = [_table_record(path, loc, obj) for loc, obj in read_records(path, fmt, encoding)]
    else:
        examples = _read_squad(path, fmt, dev_articles, encoding)
    seen: dict[str, str] = {}
    for ex in examples:
        if ex.id in seen:
            raise DataError(path, f"duplicate question id '{ex.id}' (first at {seen[ex.id]}, again at {ex.where})")
        seen[ex.id] = ex.where
    return examples


def _read_squad(path: Path, fmt: str, dev_articles: int, encoding: str | None = None) -> list[QaExample]:
    doc = read_json(path, encoding)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(path, "expected a SQuAD v1.1 object with a 'data' list of articles")
    articles = doc["data"]
    if fmt in ("squad-train", "squad-dev"):
        if not 0 < dev_articles < len(articles):
            raise DataError(path, f"format '{fmt}' holds out the last dev_articles={dev_articles} article(s) as "
                                  f"dev, but the file has {len(articles)} article(s); set the qa option "
                                  f"'dev_articles' between 1 and {len(articles) - 1}")
        cut = len(articles) - dev_articles
        chosen = range(cut) if fmt == "squad-train" else range(cut, len(articles))
    else:
        chosen = range(len(articles))
    out: list[QaExample] = []
    for a in chosen:
        article = articles[a]
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise DataError(path, "article must be an object with a 'paragraphs' list", record=f"data[{a}]")
        for p, para in enumerate(article["paragraphs"]):
            where = f"data[{a}].paragraphs[{p}]"
            if not isinstance(para, dict):
                raise DataError(path, "paragraph must be an object", record=where)
            context = para.get("context")
            if not isinstance(context, str) or not context.strip():
                raise DataError(path, "field 'context' must be a non-empty string", record=where)
            qas = para.get("qas")
            if not isinstance(qas, list):
                raise DataError(path, "field 'qas' must be a list", record=where)
            for q, qa in enumerate(qas):
                out.append(_question(path, f"{where}.qas[{q}]", qa, context))
    return out


def _table_record(path: Path, loc: Location, obj: dict[str, Any]) -> QaExample:
    context = obj.get("context")
    if not isinstance(context, str) or not context.strip():
        raise loc.error("field 'context' must be a non-empty string")
    answers = obj.get("answers")
    if isinstance(answers, dict) and isinstance(answers.get("text"), list) \
            and isinstance(answers.get("answer_start"), list):  # the Hugging Face SQuAD shape
        if len(answers["text"]) != len(answers["answer_start"]):
            raise loc.error(f"answers has {len(answers['text'])} text(s) but {len(answers['answer_start'])} "
                            "answer_start(s)")
        obj = {**obj, "answers": [{"text": t, "answer_start": a}
                                  for t, a in zip(answers["text"], answers["answer_start"])]}
    if loc.line is not None:
        return _question(path, f"line {loc.line}", obj, context, line=loc.line)
    return _question(path, f"row {loc.record}", obj, context)


def _question(path: Path, pos: str, qa: Any, context: str, line: int | None = None) -> QaExample:
    def fail(message: str, record: str) -> DataError:
        return DataError(path, message, line=line, record=None if line is not None else record)

    if not isinstance(qa, dict):
        raise fail("question must be an object", pos)
    qid = qa.get("id")
    if not isinstance(qid, (str, int)) or isinstance(qid, bool) or str(qid) == "":
        raise fail("field 'id' must be a non-empty string", pos)
    qid = str(qid)
    record = f"{qid} at {pos}" if line is None else qid
    question = qa.get("question")
    if not isinstance(question, str) or not question.strip():
        raise fail("field 'question' must be a non-empty string", record)
    raw = qa.get("answers", [])
    if not isinstance(raw, list):
        raise fail("field 'answers' must be a list", record)
    answers = []
    for j, ans in enumerate(raw):
        if not (isinstance(ans, dict) and isinstance(ans.get("text"), str) and ans["text"]
                and isinstance(ans.get("answer_start"), int) and not isinstance(ans["answer_start"], bool)):
            raise fail(f"answers[{j}] must be {{'text': non-empty string, 'answer_start': int}}, got {ans!r}", record)
        answers.append((ans["text"], ans["answer_start"]))
    where = f"{path}:{line} (id {qid})" if line is not None else f"{path} [record {record}]"
    return QaExample(id=qid, question=question, context=context, answers=tuple(answers), where=where)
