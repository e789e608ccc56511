"""The committed corpora and QA set: licences, text format, and QA rows that match their documents."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

CORPORA = Path(__file__).resolve().parents[1] / "corpora"
SOURCES = {
    "sqlite": ("sqlite3-doc", "public domain"),
    "python": ("python3.11-doc", "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2"),
}
QA_FIELDS = {"id", "question", "answers", "gold_doc", "gold_passage"}


def _docs(source: str) -> list[Path]:
    return sorted((CORPORA / source).glob("*.txt"))


def _qa_rows() -> list[dict]:
    lines = (CORPORA / "qa" / "qa.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_each_source_has_a_notice_with_package_licence_and_converter(source: str) -> None:
    package, licence = SOURCES[source]
    notice = (CORPORA / source / "NOTICE").read_text(encoding="utf-8")
    assert f"Debian package {package} " in notice
    assert licence in notice
    assert "corpora/build.py" in notice


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_documents_are_nonempty_utf8_with_a_title_line_and_blank_line_blocks(source: str) -> None:
    docs = _docs(source)
    assert len(docs) >= 50, f"only {len(docs)} documents in corpora/{source}: run corpora/build.py"
    for doc in docs:
        text = doc.read_bytes().decode("utf-8")  # strict: raises on invalid UTF-8
        title, blank, body = text.partition("\n\n")
        assert title.strip() and "\n" not in title, f"{doc.name}: first line must be the title"
        assert blank and len(body.split()) >= 50, f"{doc.name}: no body text"
        assert text.endswith("\n") and not text.endswith("\n\n"), doc.name
        assert "\n\n\n" not in text and "\r" not in text, f"{doc.name}: blocks must be one blank line apart"


def test_python_corpus_stays_under_8_mb() -> None:
    assert sum(doc.stat().st_size for doc in _docs("python")) < 8_000_000


def test_qa_rows_have_the_schema_and_unique_ids() -> None:
    rows = _qa_rows()
    assert len(rows) >= 150
    for row in rows:
        assert set(row) == QA_FIELDS, row.get("id")
        assert all(isinstance(row[k], str) and row[k].strip() for k in QA_FIELDS - {"answers"}), row["id"]
        assert row["answers"] and all(isinstance(a, str) and a.strip() for a in row["answers"]), row["id"]
        assert 40 <= len(row["gold_passage"].split()) <= 150, row["id"]
    ids = [row["id"] for row in rows]
    assert len(set(ids)) == len(ids), "duplicate ids"
    per_source = {s: sum(row["gold_doc"].startswith(f"{s}/") for row in rows) for s in SOURCES}
    assert min(per_source.values()) >= 0.3 * len(rows), per_source


def test_every_answer_is_in_its_passage_and_every_passage_in_its_gold_doc() -> None:
    texts: dict[str, str] = {}
    for row in _qa_rows():
        doc = CORPORA / row["gold_doc"]
        assert doc.is_file(), f"{row['id']}: gold doc {row['gold_doc']} does not exist"
        text = texts.setdefault(row["gold_doc"], doc.read_text(encoding="utf-8"))
        for answer in row["answers"]:
            assert answer in row["gold_passage"], f"{row['id']}: answer {answer!r} not in its passage"
        assert row["gold_passage"] in text, f"{row['id']}: passage not found verbatim in {row['gold_doc']}"
        start = text.index(row["gold_passage"])
        end = start + len(row["gold_passage"])
        assert text[start - 2 : start] == "\n\n" and text[end : end + 1] == "\n", (
            f"{row['id']}: the passage must be whole blocks of {row['gold_doc']}"
        )


def test_the_demo_question_of_the_issue_is_in_the_qa_set() -> None:
    rows = [row for row in _qa_rows() if row["question"] == "What is a hot journal in SQLite?"]
    assert [row["gold_doc"] for row in rows] == ["sqlite/lockingv3.txt"]


def _build_module():
    spec = importlib.util.spec_from_file_location("corpora_build", CORPORA / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_html_to_text_keeps_prose_and_code_and_drops_navigation() -> None:
    html = """<html><head><title>Page Title</title><script>var x = 1;</script></head><body>
    <div class="menu mainmenu"><ul><li><a href="index.html">Home</a></ul></div>
    <h1>Page Title</h1>
    <p>First   sentence,
    wrapped over
    lines.<p>Second paragraph.
    <ul><li>one<li>two</ul>
    <ol><li>first<li>second</ol>
    <table><tr><th>Name<th><th>Value<tr><td>a<td><td>1</table>
    <pre>
      def f():

          return 1
    </pre>
    <div class="fancy_toc"><a href="#x">1. Overview</a></div>
    <p align="center"><small><i>This page last modified on 2022</i></small></p>
    </body></html>"""
    title, body = _build_module().html_to_text(html)
    assert title == "Page Title"
    assert body.split("\n\n") == [
        "First sentence, wrapped over lines.",
        "Second paragraph.",
        "- one",
        "- two",
        "1. first",
        "2. second",
        "Name | Value",
        "a | 1",
        "def f():\n    return 1",
    ]
