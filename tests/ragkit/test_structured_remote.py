"""OpenAICompatibleLLM structured answers: the schema goes out as response_format, what comes back is validated.

The server here is tests/flaky_proxy.py (a real process answering a fixed stand-in text, which no schema
accepts): the client must refuse it with the raw text rather than return a half-parsed object.
"""

from __future__ import annotations

import pytest
from llama_index.core.prompts import PromptTemplate
from pydantic import BaseModel
from test_remote import STAND_IN, flaky_server, stand_in_llm

from ragkit.structured import StructuredOutputError


class Answer(BaseModel):
    answer: str


def test_an_answer_that_is_not_the_schemas_object_is_an_error_with_the_raw_text():
    with flaky_server() as (url, _):
        llm = stand_in_llm(url)
        with pytest.raises(StructuredOutputError, match=f"not one JSON object.*Raw text: '{STAND_IN}'") as err:
            llm.structured_predict(Answer, PromptTemplate("Say {what}."), what="hi")
        assert err.value.raw == STAND_IN


def test_the_schema_is_sent_as_response_format():
    with flaky_server() as (url, _):
        args = stand_in_llm(url)._request_args(10, {"json_schema": Answer})
    sent = args["extra_body"]["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["schema"] == Answer.model_json_schema()
