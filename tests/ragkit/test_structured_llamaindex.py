"""LlamaIndex's structured-output API and Pipeline.query(output_cls=) on the embedded SmolLM2 under constraint."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Literal

import pytest
from llama_index.core.llms import ChatMessage
from llama_index.core.prompts import PromptTemplate
from pydantic import BaseModel, Field, create_model

from ragkit.pipeline import Pipeline
from ragkit.structured import StructuredOutputError

CORPORA = Path(__file__).resolve().parents[2] / "corpora"


class Song(BaseModel):
    title: str = Field(max_length=30)
    year: int = Field(ge=1900, le=2030)


class Person(BaseModel):
    name: str = Field(max_length=20)
    hobbies: list[str] = Field(min_length=2, max_length=2)


def test_structured_predict_returns_a_validated_model(smollm2):
    song = smollm2.structured_predict(Song, PromptTemplate("Name a song about {topic} and its year."), topic="rain")
    assert isinstance(song, Song)


def test_as_structured_llm_chat_answers_with_the_models_json(smollm2):
    sllm = smollm2.as_structured_llm(Person)
    response = sllm.chat([ChatMessage(role="user", content="Describe a person called Ann.")])
    assert isinstance(response.raw, Person)
    assert Person.model_validate_json(response.message.content) == response.raw


def test_async_and_streamed_structured_predict_give_the_same_object(smollm2):
    prompt = PromptTemplate("Name a song about {topic} and its year.")
    first = smollm2.structured_predict(Song, prompt, topic="the sea")
    assert asyncio.run(smollm2.astructured_predict(Song, prompt, topic="the sea")) == first
    assert list(smollm2.stream_structured_predict(Song, prompt, topic="the sea")) == [first]


def test_structured_predict_out_of_budget_raises_with_the_raw_text(smollm2):
    with pytest.raises(StructuredOutputError, match="ran out.*Raw text: '\\{") as err:
        smollm2.structured_predict(Person, PromptTemplate("Describe {who}."), llm_kwargs={"max_new_tokens": 5},
                                   who="a person")
    assert err.value.raw.startswith("{") and not err.value.raw.endswith("}")


def _sqlite_questions(n: int) -> list[dict]:
    rows = [json.loads(line) for line in (CORPORA / "qa" / "qa.jsonl").read_text().splitlines()]
    seen, picked = set(), []
    for row in rows:
        if row["gold_doc"].startswith("sqlite/") and row["gold_doc"] not in seen:
            seen.add(row["gold_doc"])
            picked.append(row)
    return picked[:n]


@pytest.fixture(scope="module")
def sqlite_pipeline(tmp_path_factory, embedder, smollm2):
    """An index over the gold pages of 10 corpora/qa SQLite questions, plus 5 other SQLite pages."""
    docs = tmp_path_factory.mktemp("sqlite")
    gold = {Path(q["gold_doc"]).name for q in _sqlite_questions(10)}
    others = [p.name for p in sorted((CORPORA / "sqlite").glob("*.txt")) if p.name not in gold][:5]
    for name in sorted(gold) + others:
        shutil.copy(CORPORA / "sqlite" / name, docs / name)
    pipeline = Pipeline(tmp_path_factory.mktemp("ix") / "ix", embed_model=embedder, llm=smollm2, top_k=3)
    pipeline.ingest([docs], show_progress=False)
    return pipeline


@pytest.mark.slow
@pytest.mark.parametrize("question", _sqlite_questions(10), ids=lambda q: q["id"])
def test_pipeline_query_with_output_cls_cites_a_retrieved_file(sqlite_pipeline, question):
    """The citation is bound to what was retrieved: the schema's source_file is an enum of the retrieved files.

    With a free-text source_file SmolLM2 writes prose there ("The answer to the question about the SQL"):
    the grammar guarantees the shape, the enum the content (docs/structured.md)."""
    names = sorted({Path(n.metadata["file_path"]).name for n in sqlite_pipeline.retrieve(question["question"])})
    cited = create_model("CitedFile", answer=(str, Field(max_length=150)),
                         source_file=(Literal[tuple(names)], Field(description="the file that holds the answer")))
    answer = sqlite_pipeline.query(question["question"], output_cls=cited)
    assert isinstance(answer.output, cited)
    assert cited.model_validate_json(answer.text) == answer.output
    retrieved = {Path(s.file).name for s in answer.sources}
    assert retrieved == set(names)
    assert answer.output.source_file in retrieved, (answer.output, retrieved)
