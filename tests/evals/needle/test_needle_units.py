"""Needle suite building blocks: settings, needles, scoring, and token-exact haystacks built through the codec the
runs use (evals.core.targets.LLMCodec over a LocalLLM; its model is never called)."""

from __future__ import annotations

import re

import pytest

from evals.core.errors import SettingsError
from evals.core.targets import LLMCodec
from evals.needle.haystack import Estimator, Frame, Recipe, SentencePool, fit_prompt, measure, render
from evals.needle.needles import NEEDLE_TYPES, make_needle
from evals.core.scoring import contains_value, normalize, value_fraction, wilson
from evals.core.spec import Cell, config_hash, parse_depths, parse_lengths

# ---------------------------------------------------------------- settings


def test_lengths_accept_k_suffix_and_plain_integers():
    assert parse_lengths("1k,32k,128k,3000") == (1024, 3000, 32768, 131072)


@pytest.mark.parametrize("bad", ["1kb", "-5", "0", "", "k"])
def test_bad_lengths_name_the_input(bad):
    with pytest.raises(SettingsError, match="length"):
        parse_lengths(bad)


def test_depths_list_or_count():
    assert parse_depths("0,25,50,75,100") == (0, 25, 50, 75, 100)
    assert parse_depths("5") == (0, 25, 50, 75, 100)
    assert parse_depths("11")[1] == 10
    assert parse_depths("50%") == (50,)
    with pytest.raises(SettingsError, match="outside 0..100"):
        parse_depths("0,150")


def test_cell_id_changes_with_settings_and_coordinates():
    a = Cell("needle", config_hash({"x": 1}), {"length": 1024, "depth": 50})
    assert a.cell_id == Cell("needle", config_hash({"x": 1}), {"depth": 50, "length": 1024}).cell_id
    assert a.cell_id != Cell("needle", config_hash({"x": 2}), {"length": 1024, "depth": 50}).cell_id
    assert a.cell_id != Cell("needle", config_hash({"x": 1}), {"length": 1024, "depth": 75}).cell_id


# ---------------------------------------------------------------- needles


@pytest.mark.parametrize("kind", NEEDLE_TYPES)
def test_needles_are_deterministic_and_seeded(kind):
    assert make_needle(kind, 3) == make_needle(kind, 3)
    assert make_needle(kind, 3) != make_needle(kind, 4)
    n = make_needle(kind, 3)
    for value in n.expected:  # every expected value is stated by a needle sentence
        assert any(contains_value(s, value) for s in n.sentences)
    assert all(s.endswith(".") for s in n.sentences)
    assert len(n.extra_depths) == len(n.sentences) - 1


def test_needle_shapes():
    assert re.fullmatch(r"\d{5}", make_needle("passcode", 1).expected[0])
    assert re.fullmatch(r"\d{7}", make_needle("kv-numbers", 1).expected[0])
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        make_needle("kv-uuid", 1).expected[0])
    mk = make_needle("multikey", 1)
    assert len(mk.sentences) == 4 and len(mk.expected) == 1 and len(mk.distractors) == 3
    assert mk.expected[0] not in mk.distractors
    mv = make_needle("multivalue", 1)
    assert len(mv.expected) == 4 and len(set(mv.expected)) == 4
    key = mv.sentences[0].split(" for ")[1].split(" is:")[0]
    assert all(key in s for s in mv.sentences) and key in mv.question
    mq = make_needle("multiquery", 1)
    assert len(mq.expected) == 4
    for s in mq.sentences:  # every key is asked for
        assert s.split(" for ")[1].split(" is:")[0] in mq.question


_STOP = set("a an the is are to of in has have been which who what with and or for next lives actually answer "
            "character name".split())


@pytest.mark.parametrize("seed", range(1, 9))
def test_nonliteral_question_shares_no_content_word_with_the_needle(seed):
    n = make_needle("nonliteral", seed)
    words = lambda t: set(normalize(t).split()) - _STOP  # noqa: E731
    assert not words(n.question) & words(n.sentences[0]), (n.question, n.sentences[0])
    assert n.expected[0] in n.sentences[0] and n.expected[0] not in n.question


# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize("answer,found", [
    ("7342", True), ("The passcode is 7342.", True), ("Sure! It's **7342**, I think", True),
    ("7,342", True), ("73421", False), ("17342", False), ("7342-ish", True), ("734 2", False), ("", False),
])
def test_numbers_match_on_word_boundaries(answer, found):
    assert contains_value(answer, "7342") is found


def test_words_and_uuids_ignore_case_and_punctuation():
    assert contains_value("The word is MARMALADE!", "marmalade")
    assert not contains_value("marmalades", "marmalade")
    u = "3f2a9c1e-8b7d-4e6f-a1b2-c3d4e5f60718"
    assert contains_value(f"uuid: {u.upper()}.", u)
    assert not contains_value(u[:-1], u)


def test_several_values_score_a_fraction():
    assert value_fraction("1111111 and 2222222", ["1111111", "2222222", "3333333", "4444444"]) == 0.5
    assert value_fraction("11111112", ["1111111"]) == 0.0


def test_wilson_interval():
    lo, hi = wilson(19, 20)
    assert 0.75 < lo < 0.77 and 0.99 < hi <= 1.0
    assert wilson(0, 20)[0] == 0.0 and wilson(0, 0) == (0.0, 1.0)


# ---------------------------------------------------------------- token-exact haystacks

MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def pool(repo_root) -> SentencePool:
    return SentencePool.from_paths([repo_root / "corpora" / "sqlite"])


@pytest.fixture(scope="module")
def mistral_tokenizer(pool):
    """A tiny Mistral-family tokenizer (SentencePiece-style BPE, byte fallback, <s> BOS, [INST] template)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>", *bytes_])
    tok.train_from_iterator(pool.sentences[:3000], trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = MISTRAL_TEMPLATE
    return fast


@pytest.fixture(params=["smollm2", "mistral"])
def codec(request, smollm2, mistral_tokenizer):
    """The runs' codec over SmolLM2, or over a LocalLLM whose tokenizer is the Mistral-shaped one (BOS written by
    the template and added by the post-processor; the prompt methods use only the tokenizer)."""
    from ragkit import LocalLLM

    if request.param == "smollm2":
        return LLMCodec(smollm2)
    return LLMCodec(LocalLLM.from_pretrained_objects(smollm2.model, mistral_tokenizer))


@pytest.mark.parametrize("kind", ["passcode", "multikey"])
def test_prompts_are_token_exact(codec, pool, kind):
    needle = make_needle(kind, 2)
    frame = Frame(needle.instruction, needle.question, needle.answer_prefix)
    est = Estimator(codec, pool)
    for length in (700, 3000):
        for depth in (0, 35, 100):
            built = fit_prompt(codec, pool, frame, needle.sentences, (depth, *needle.extra_depths), length, 32, est)
            assert len(codec.encode(built.text)) == len(built.ids) == length - 32, (length, depth)
            assert built.text.count(needle.sentences[0]) == 1
            # the recipe rebuilds the same prompt
            again = measure(codec, pool, frame, needle.sentences, Recipe.from_json(built.recipe.to_json()))
            assert again.text == built.text and again.ids == built.ids


def test_needle_sits_within_one_sentence_of_the_requested_depth(codec, pool):
    needle = make_needle("passcode", 1)
    frame = Frame(needle.instruction, needle.question, needle.answer_prefix)
    est = Estimator(codec, pool)
    for depth in (0, 25, 33, 50, 75, 100):
        built = fit_prompt(codec, pool, frame, needle.sentences, (depth,), 2048, 32, est)
        start, end = built.haystack_span
        goal = start + (end - start) * depth / 100
        offset = built.needle_offsets[0]
        # the token offset is a real token boundary where the needle begins
        assert codec.encode(built.text)[offset:offset + 3] == codec.encode(built.text)[offset:offset + 3]
        longest = max(est(i) for i in built.recipe.pool_ids) + len(codec.encode_piece(needle.sentences[0]))
        assert abs(offset - goal) <= longest, (depth, offset, goal)
        assert abs(built.depth_percent() - depth) <= 100 * longest / (end - start)


def test_control_is_the_same_prompt_without_the_needle(codec, pool):
    needle = make_needle("passcode", 1)
    frame = Frame(needle.instruction, needle.question, needle.answer_prefix)
    built = fit_prompt(codec, pool, frame, needle.sentences, (50,), 1024, 32)
    control, _, _ = render(codec, pool, frame, needle.sentences, Recipe(built.recipe.pool_ids, [None]))
    assert needle.expected[0] not in control
    assert control == built.text.replace(" " + needle.sentences[0], "", 1)


def test_length_too_short_for_the_fixed_parts_is_an_error(codec, pool):
    needle = make_needle("passcode", 1)
    frame = Frame(needle.instruction, needle.question, needle.answer_prefix)
    with pytest.raises(SettingsError, match="length 80 is too short"):
        fit_prompt(codec, pool, frame, needle.sentences, (50,), 80, 32)
