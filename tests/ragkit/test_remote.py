"""OpenAICompatibleLLM against real HTTP servers on loopback.

The fast tests talk to tests/ragkit/flaky_proxy.py (a real process that injects faults and, without an upstream,
answers with a fixed stand-in completion: they test transport behaviour, not answers). The slow tests start
``transformers serve`` with the embedded SmolLM2 and compare its greedy answers with in-process LocalLLM.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai  # noqa: F401  (imported here so the fail-fast timings below measure the connection only)
import pytest
from llama_index.core.llms import ChatMessage

from ragkit.errors import BadServerResponseError, RagkitError, ServerRequestError, ServerUnavailableError
from ragkit.remote import OpenAICompatibleLLM
from ragkit.serving import LocalServer, free_port

PROXY = Path(__file__).with_name("flaky_proxy.py")
STAND_IN = "stand-in answer"


@contextmanager
def flaky_server(*flags: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start tests/ragkit/flaky_proxy.py on a free port; yields (base_url, process); always killed."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(PROXY), "--port", str(port), *flags])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("tests/ragkit/flaky_proxy.py did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1", proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def posts(base_url: str) -> int:
    root = base_url.removesuffix("/v1")
    return json.loads(urllib.request.urlopen(f"{root}/stats", timeout=5).read())["posts"]


def stand_in_llm(base_url: str, **kw) -> OpenAICompatibleLLM:
    """The client with the embedded SmolLM2 tokenizer (the stand-in server has no model of its own)."""
    return OpenAICompatibleLLM(base_url, "stand-in", tokenizer="default", max_new_tokens=8, **kw)


# ---------------------------------------------------------------- fail fast at construction


def test_nothing_listening_fails_fast_with_the_url_in_the_message():
    url = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.perf_counter()
    with pytest.raises(ServerUnavailableError, match="127.0.0.1") as err:
        OpenAICompatibleLLM(url, "x", tokenizer="default")
    assert time.perf_counter() - t0 < 5
    assert "docs/serving.md" in str(err.value)


def test_base_url_that_is_not_an_openai_api_root_fails_fast():
    with flaky_server() as (url, _):
        with pytest.raises(ServerUnavailableError, match="not an OpenAI-compatible API root"):
            OpenAICompatibleLLM(url.removesuffix("/v1") + "/api", "stand-in", tokenizer="default")


def test_no_base_url_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv("RAGKIT_BASE_URL", raising=False)
    with pytest.raises(ServerRequestError, match="RAGKIT_BASE_URL"):
        OpenAICompatibleLLM()


def test_unknown_model_name_lists_the_served_ones():
    with flaky_server() as (url, _):
        with pytest.raises(ServerRequestError, match="serves: stand-in"):
            OpenAICompatibleLLM(url, "mistral-small", tokenizer="default")


def test_without_a_local_tokenizer_or_tokenize_endpoint_it_asks_for_one():
    with flaky_server() as (url, _):
        with pytest.raises(ServerRequestError, match="tokenizer="):
            OpenAICompatibleLLM(url, "stand-in")


def test_base_url_and_model_come_from_the_environment(monkeypatch):
    with flaky_server() as (url, _):
        monkeypatch.setenv("RAGKIT_BASE_URL", url.removesuffix("/v1"))  # a bare host gets /v1
        llm = OpenAICompatibleLLM(tokenizer="default")
        assert (llm.base_url, llm.model_name, llm.context_window) == (url, "stand-in", 8192)


# ---------------------------------------------------------------- retries and failures mid-run


def test_http_500_is_retried_with_backoff_until_it_answers():
    with flaky_server("--fault", "500", "--times", "2") as (url, _):
        llm = stand_in_llm(url, max_retries=3)
        assert llm.complete("Hello").text == STAND_IN
        assert posts(url) == 3


def test_http_500_beyond_the_retry_budget_raises_unavailable():
    with flaky_server("--fault", "500", "--times", "-1") as (url, _):
        llm = stand_in_llm(url, max_retries=2)
        t0 = time.perf_counter()
        with pytest.raises(ServerUnavailableError, match="HTTP 500"):
            llm.complete("Hello")
        assert posts(url) == 3
        assert time.perf_counter() - t0 < 10  # backoff 0.5 s + 1 s, bounded


def test_a_request_that_times_out_is_retried():
    with flaky_server("--fault", "slow", "--delay", "4", "--times", "1") as (url, _):
        llm = stand_in_llm(url, timeout=1.0, max_retries=2)
        assert llm.complete("Hello").text == STAND_IN
        assert posts(url) == 2


def test_a_dropped_connection_is_retried():
    with flaky_server("--fault", "drop", "--times", "1") as (url, _):
        assert stand_in_llm(url).complete("Hello").text == STAND_IN
        assert posts(url) == 2


def test_server_killed_mid_run_raises_unavailable_within_bounded_time():
    with flaky_server() as (url, proc):
        llm = stand_in_llm(url, max_retries=2)
        assert llm.complete("first").text == STAND_IN
        proc.kill()
        proc.wait()
        t0 = time.perf_counter()
        with pytest.raises(ServerUnavailableError, match="Lost the server"):
            llm.complete("second")
        assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("fault", ["malformed", "empty"])
def test_malformed_or_empty_response_is_a_distinct_error(fault):
    with flaky_server("--fault", fault, "--times", "1") as (url, _):
        llm = stand_in_llm(url)
        with pytest.raises(BadServerResponseError):
            llm.complete("Hello")
        assert llm.complete("Hello").text == STAND_IN  # the next call is fine: nothing sticky


def test_error_classes_are_distinct():
    assert not issubclass(BadServerResponseError, ServerUnavailableError)
    assert not issubclass(ServerUnavailableError, BadServerResponseError)


# ---------------------------------------------------------------- token counts


def test_usage_prompt_tokens_are_compared_with_the_local_count_per_call():
    with flaky_server("--usage-prompt-tokens", "40") as (url, _):
        llm = stand_in_llm(url)
        extra = llm.complete("Hello").additional_kwargs
        local = llm.count_tokens([ChatMessage(role="user", content="Hello")])
        assert extra["prompt_tokens"] == local
        assert extra["server_prompt_tokens"] == 40
        assert extra["prompt_tokens_mismatch"] == 40 - local


def test_usage_missing_from_the_response_leaves_the_mismatch_unknown():
    with flaky_server() as (url, _):
        extra = stand_in_llm(url).complete("Hello").additional_kwargs
        assert extra["server_prompt_tokens"] is None and extra["prompt_tokens_mismatch"] is None


def test_counts_come_from_the_servers_tokenize_endpoint_when_no_tokenizer_is_local():
    from ragkit import models

    tok_dir = models.local_dir(models.resolve_llm("default"))
    with flaky_server("--tokenizer", str(tok_dir), "--max-model-len", "2048") as (url, _):
        remote = OpenAICompatibleLLM(url, "stand-in", max_new_tokens=8)
        local = stand_in_llm(url)
        assert remote.tokenizer is None and remote.tokenizer_source.endswith("/tokenize")
        assert remote.context_window == 2048  # vLLM reports max_model_len with every /tokenize answer
        messages = [ChatMessage(role="user", content="Where is the needle?")]
        assert remote.count_tokens("Where is the needle?") == local.count_tokens("Where is the needle?")
        assert remote.count_tokens(messages) == local.count_tokens(messages)
        assert remote.encode_prompt(local.chat_prompt(messages)) == local.encode_prompt(local.chat_prompt(messages))
        reply = remote.chat(messages)  # templated by the server: /v1/chat/completions
        assert reply.message.content == STAND_IN
        assert reply.additional_kwargs["prompt_tokens"] == local.count_tokens(messages)
        with pytest.raises(RagkitError, match="tokenizer="):
            remote.chat_prompt("hi")


@pytest.mark.slow  # transformers parses a GGUF tokenizer slowly (minutes on the shared CPU)
def test_a_gguf_tokenizer_is_read_from_the_file_without_converting_the_model(tmp_path, monkeypatch):
    from ragkit import models

    converted_dir = models.local_dir(models.resolve_llm("default"))
    with flaky_server() as (url, _):
        converted = OpenAICompatibleLLM(url, "stand-in", tokenizer=str(converted_dir))
        monkeypatch.setenv("RAGKIT_CACHE_DIR", str(tmp_path / "empty-cache"))  # no converted copy to fall back on
        from_gguf = OpenAICompatibleLLM(url, "stand-in", tokenizer=str(models.default_llm_path()), context_window=2048)
        assert from_gguf.tokenizer_source.endswith(".gguf")
        text = "The passcode is 4417. What is the passcode?"
        assert from_gguf.count_tokens(text) == converted.count_tokens(text)
        assert from_gguf.encode_prompt(converted.chat_prompt(text)) == converted.encode_prompt(converted.chat_prompt(text))
    assert not (tmp_path / "empty-cache").exists()  # nothing was dequantized


def test_prompt_that_does_not_fit_is_refused_before_sending():
    from ragkit.errors import ContextWindowExceededError

    with flaky_server() as (url, _):
        llm = stand_in_llm(url, context_window=64)
        with pytest.raises(ContextWindowExceededError):
            llm.complete("word " * 100)
        assert posts(url) == 0


# ---------------------------------------------------------------- a real server: transformers serve + SmolLM2

PROMPTS = ["What is the capital of France?", "Name three primary colors.", "The passcode is 4417. What is the passcode?"]


@pytest.fixture(scope="module")
def served_smollm2() -> Iterator[LocalServer]:
    with LocalServer("default", threads=1, startup_timeout=300) as server:
        yield server


@pytest.mark.slow
def test_greedy_answers_through_the_server_equal_in_process_answers(served_smollm2):
    from ragkit.llm import LocalLLM

    local = LocalLLM("default", max_new_tokens=24)
    remote = OpenAICompatibleLLM(served_smollm2.base_url, max_new_tokens=24)
    assert remote.model_name == served_smollm2.model_name and remote.context_window == local.context_window
    for prompt in PROMPTS:
        mine, theirs = local.complete(prompt), remote.complete(prompt)
        assert theirs.text == mine.text, prompt
        extra = theirs.additional_kwargs
        assert extra["prompt_tokens"] == mine.additional_kwargs["prompt_tokens"] == extra["server_prompt_tokens"]
        assert extra["prompt_tokens_mismatch"] == 0
        assert extra["completion_tokens"] == mine.additional_kwargs["completion_tokens"]
    ids = local.encode_prompt(local.chat_prompt(PROMPTS[0]))
    assert remote.complete_ids(ids).text == local.complete(PROMPTS[0]).text


@pytest.mark.slow
def test_streaming_through_the_server_ends_with_the_complete_answer(served_smollm2):
    remote = OpenAICompatibleLLM(served_smollm2.base_url, max_new_tokens=24)
    chunks = list(remote.stream_complete(PROMPTS[0]))
    assert "".join(c.delta for c in chunks) == chunks[-1].text == remote.complete(PROMPTS[0]).text
    assert chunks[-1].additional_kwargs["prompt_tokens_mismatch"] == 0


@pytest.mark.slow
def test_500s_in_front_of_the_real_server_are_retried_to_the_real_answer(served_smollm2):
    direct = OpenAICompatibleLLM(served_smollm2.base_url, max_new_tokens=16).complete(PROMPTS[2]).text
    upstream = served_smollm2.base_url.removesuffix("/v1")
    with flaky_server("--fault", "500", "--times", "2", "--upstream", upstream) as (url, _):
        llm = OpenAICompatibleLLM(url, served_smollm2.model_name, max_new_tokens=16)
        assert llm.complete(PROMPTS[2]).text == direct
        assert posts(url) == 3


@pytest.mark.slow
def test_killing_the_real_server_raises_unavailable(served_smollm2):  # last: it kills the module's server
    llm = OpenAICompatibleLLM(served_smollm2.base_url, max_new_tokens=4, max_retries=1)
    assert llm.complete("Hi").text
    served_smollm2.kill()
    with pytest.raises(ServerUnavailableError, match="Lost the server"):
        llm.complete("Hi again")


def test_pipeline_query_runs_on_the_served_llm(tmp_path, embedder):
    """Pipeline's context assembly counts with the served model's tokenizer; the answer comes from the server."""
    from ragkit.pipeline import Pipeline

    doc = tmp_path / "vacuum.txt"
    doc.write_text("The VACUUM command rebuilds the database file, repacking it into a minimal amount of disk space.")
    with flaky_server("--usage-prompt-tokens", "7") as (url, _):
        llm = stand_in_llm(url, context_window=512)
        pipeline = Pipeline(tmp_path / "index", llm=llm, embed_model=embedder)
        pipeline.ingest([doc], show_progress=False)
        answer = pipeline.query("What does VACUUM do?")
        assert answer.text == STAND_IN and answer.completion_tokens == 2
        assert answer.prompt_tokens == llm.count_tokens(pipeline.assemble("What does VACUUM do?",
                                                                          pipeline.retrieve("What does VACUUM do?")).messages)
        assert posts(url) == 1
