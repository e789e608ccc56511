"""The Tekken tokenizer family on a tiny random Mistral-Small-4 (real vocabulary, mistral-common's Tekken file):
LocalLLM counts exactly the ids mistral-common's own encoder (transformers' MistralCommonBackend) gives, with and
without reasoning; a template without a reasoning mode is refused before the weights load."""

from __future__ import annotations

import pytest

from ragkit import LocalLLM, reasoning
from ragkit.errors import InvalidSettingError

HAYSTACK = ("The SQLite library reads the whole page before it answers. Ein Satz auf Deutsch, mit Umlauten: "
            "äöü. 数字 12345 and a path /usr/lib/x86_64.\n\nA second paragraph, after a blank line.")


@pytest.fixture(scope="module")
def tekken_llm(tiny_mistral4_tekken_dir):
    return LocalLLM(tiny_mistral4_tekken_dir, max_new_tokens=4)


@pytest.fixture(scope="module")
def mistral_common(tiny_mistral4_tekken_dir):
    from transformers import MistralCommonBackend

    return MistralCommonBackend.from_pretrained(tiny_mistral4_tekken_dir)


def _reference(mistral_common, messages, effort):
    return mistral_common.apply_chat_template(messages, reasoning_effort=effort, tokenize=True, return_dict=False)


def test_tekken_directory_loads_with_the_real_vocabulary_and_a_reasoning_template(tekken_llm):
    tok = tekken_llm.tokenizer
    assert type(tok).__name__ != "MistralCommonBackend"  # it would encode "[INST]" in text as plain pieces
    assert len(tok) == 131072 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert "reasoning_effort" in tok.chat_template
    assert tok.convert_tokens_to_ids(reasoning.END_THINK) == 23


@pytest.mark.parametrize("effort", [None, "none", "high"])
def test_prompt_ids_equal_mistral_commons_own_encoding(tiny_mistral4_tekken_dir, tekken_llm, mistral_common, effort):
    llm = LocalLLM.from_pretrained_objects(tekken_llm.model, tekken_llm.tokenizer, reasoning_effort=effort)
    for messages in ([{"role": "user", "content": HAYSTACK}],
                     [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": HAYSTACK}]):
        from llama_index.core.base.llms.types import ChatMessage

        chat = [ChatMessage(role=m["role"], content=m["content"]) for m in messages]
        ids = llm.encode_prompt(llm.chat_prompt(chat))
        assert ids == _reference(mistral_common, messages, effort)
        assert llm.count_tokens(chat) == len(ids)


def test_reasoning_high_is_one_setting_token_apart_from_none(tekken_llm, mistral_common):
    """The length budget counts the template's own tokens: the [MODEL_SETTINGS] block is in both prompts."""
    prompts = {}
    for effort in ("none", "high"):
        llm = LocalLLM.from_pretrained_objects(tekken_llm.model, tekken_llm.tokenizer, reasoning_effort=effort)
        prompts[effort] = llm.encode_prompt(llm.chat_prompt(HAYSTACK))
        assert llm.chat_prompt(HAYSTACK).startswith(f'<s>[MODEL_SETTINGS]{{"reasoning_effort": "{effort}"}}')
    none, high = prompts["none"], prompts["high"]
    assert len(none) == len(high) and sum(a != b for a, b in zip(none, high)) == 1


def test_thinking_is_split_off_by_its_token_ids(tekken_llm):
    tok = tekken_llm.tokenizer
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = enc("[THINK]The needle said 4812, so[/THINK]The passcode is 4812.") + [tok.eos_token_id]
    r = reasoning.split(tok, ids[:-1])
    assert r.answer == "The passcode is 4812." and r.closed
    assert r.reasoning_tokens == len(enc("[THINK]The needle said 4812, so[/THINK]"))
    assert r.raw == "[THINK]The needle said 4812, so[/THINK]The passcode is 4812."
    unclosed = reasoning.split(tok, enc("[THINK]The needle said 4812"))
    assert unclosed.answer == "" and not unclosed.closed
    assert unclosed.reasoning_tokens == len(enc("[THINK]The needle said 4812"))
    plain = reasoning.split(tok, enc("The passcode is 4812."))
    assert plain.answer == "The passcode is 4812." and plain.reasoning_tokens == 0


def test_local_llm_in_reasoning_mode_answers_without_the_thinking(tekken_llm):
    llm = LocalLLM.from_pretrained_objects(tekken_llm.model, tekken_llm.tokenizer, reasoning_effort="high",
                                           max_new_tokens=6)
    ids = llm.generate_ids(llm.encode_prompt(llm.chat_prompt("Say hi.")), max_new_tokens=6)
    assert llm.complete("Say hi.").text == reasoning.split(llm.tokenizer, ids).answer


def test_a_template_without_reasoning_mode_is_refused_before_the_weights_load(tiny_mistral_dir, tmp_path):
    import shutil

    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_mistral_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(InvalidSettingError, match=r"has no reasoning mode .*--reasoning"):
        LocalLLM(no_weights, reasoning_effort="high")


def test_an_unknown_effort_is_named(tekken_llm):
    with pytest.raises(InvalidSettingError, match=r"reasoning effort 'medium' is unknown; choose one of none, high"):
        LocalLLM.from_pretrained_objects(tekken_llm.model, tekken_llm.tokenizer, reasoning_effort="medium")


def test_a_saved_tekken_directory_loads_without_mistral_common(tiny_mistral4_tekken_dir, mistral_common):
    """A GPU host without mistral-common (or tiktoken) reads the directory's tokenizer.json and chat template and
    gets exactly mistral-common's ids; only converting a bare tekken.json needs mistral-common."""
    import json
    import subprocess
    import sys

    code = ("import json, sys; sys.modules['mistral_common'] = None; sys.modules['tiktoken'] = None\n"
            "from ragkit.loading import load_tokenizer\n"
            f"tok = load_tokenizer(__import__('pathlib').Path({str(tiny_mistral4_tekken_dir)!r}))\n"
            f"print(json.dumps(tok.apply_chat_template([{{'role': 'user', 'content': {HAYSTACK!r}}}], tokenize=True, "
            "return_dict=False)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = json.loads(done.stdout.strip().splitlines()[-1])
    assert ids == _reference(mistral_common, [{"role": "user", "content": HAYSTACK}], None)
