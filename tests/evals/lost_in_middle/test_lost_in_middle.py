"""Lost-in-the-middle suite: gold placement, distractors, KV objects, controls, scoring, paired tests, settings,
length safety, and a small real run on SmolLM2 (resume included). The subprocess kill test is in
test_lost_in_middle_run.py (slow)."""

from __future__ import annotations

import json
import re
import uuid

import pytest

from evals.core.errors import RunDirError, SettingsError, TooLongError
from evals.lost_in_middle.kv import kv_user_text, make_kv
from evals.lost_in_middle.suite import GOLD, LitmSettings, LitmSuite, execute, parse_positions, qa_user_text
from evals.lost_in_middle.passages import Distractors, PassagePool, allowed, load_qa, place_gold, select_questions
from evals.core.scoring import answer_match, normalize_squad
from evals.core.stats import mcnemar_exact

SMALL_CORPUS = ("corpora/sqlite/about.txt", "corpora/sqlite/arch.txt", "corpora/sqlite/lockingv3.txt",
                "corpora/python/faq_general.txt")


@pytest.fixture(scope="module")
def qa(repo_root):
    return load_qa(repo_root / "corpora/qa/qa.jsonl")


@pytest.fixture(scope="module")
def pool(repo_root):
    return PassagePool.from_paths([repo_root / "corpora/sqlite", repo_root / "corpora/python"])


@pytest.fixture(scope="module")
def small_pool(repo_root):
    return PassagePool.from_paths([repo_root / p for p in SMALL_CORPUS])


@pytest.fixture(scope="module")
def target(smollm2):
    from evals.core.targets import wrap

    return wrap(smollm2)


# ---------------------------------------------------------------- positions and placement


def test_positions_keywords_and_integers():
    assert parse_positions("first,middle,last", 10) == (0, 4, 9)  # the paper's 10-document positions
    assert parse_positions("first,middle,last", 20) == (0, 9, 19)
    assert parse_positions("all", 5) == (0, 1, 2, 3, 4)
    assert parse_positions("0,4,9", 10) == (0, 4, 9)
    assert parse_positions([9, "first"], 10) == (0, 9)


@pytest.mark.parametrize("spec, needle", [("12", "0..9 for 10 documents"), ("middel", "'middel' is unknown"),
                                          ("", "empty")])
def test_bad_positions_name_the_input(spec, needle):
    with pytest.raises(SettingsError, match=re.escape(needle)):
        parse_positions(spec, 10)


def test_gold_is_exactly_at_every_position_and_only_the_gold_moves(qa, pool):
    item = qa[0]
    distractors = Distractors(pool).random(item, 9, seed=1)
    for p in range(10):
        docs = place_gold(distractors, GOLD, p)
        assert len(docs) == 10 and docs[p] == GOLD and docs.count(GOLD) == 1
        assert [d for d in docs if d != GOLD] == distractors  # same distractors, same order
        texts = [item.gold_passage if d == GOLD else pool.passages[d] for d in docs]
        text = qa_user_text(item.question, texts)
        gold_line = next(line for line in text.splitlines() if " ".join(item.gold_passage.split()) in line)
        assert gold_line.startswith(f"Document [{p + 1}] ")
        assert text.count("Document [") == 10


def test_suite_prompts_share_the_prefix_up_to_the_gold(qa, small_pool, target):
    """Token level: the gold-last prompt (the group's base) equals each cell's prompt up to its gold document,
    so the decoder recomputes only from the gold on."""
    s = LitmSettings(task="qa", docs=(6,), positions="all", orderings="none", distractors="random", questions=2)
    suite = LitmSuite(s, target, qa, small_pool, "cfg")
    cells = [c for c in suite.cells() if c["kind"] == "position"]
    group = suite.prepare([c for c in cells if c["qid"] == cells[0]["qid"]])
    assert len(group.jobs) == 6
    tok = target.llm.tokenizer
    for job in group.jobs:
        p = job.cell["position"]
        assert job.row["recipe"]["docs"][p] == GOLD
        text = tok.decode(job.ids)
        before_gold = text[: text.index(f"Document [{p + 1}]")]
        shared = next((i for i, (a, b) in enumerate(zip(job.ids, group.base)) if a != b), len(job.ids))
        assert len(tok.decode(job.ids[:shared])) >= len(before_gold) - 2


# ---------------------------------------------------------------- distractors


def test_random_distractors_never_contain_a_gold_answer(qa, pool):
    d = Distractors(pool)
    for item in qa:
        ids = d.random(item, 19, seed=3)
        assert len(set(ids)) == 19
        for i in ids:
            assert not answer_match(pool.passages[i], item.answers), (item.id, pool.passages[i][:80])
            assert pool.passages[i] not in item.gold_passage
    assert d.random(qa[5], 19, seed=3) == d.random(qa[5], 19, seed=3) != d.random(qa[5], 19, seed=4)


def test_hard_distractors_are_the_most_similar_allowed_passages(qa, small_pool, embedder, tmp_path):
    import numpy as np

    d = Distractors(small_pool, embedder, tmp_path)
    vectors = d.embeddings()
    assert list(tmp_path.glob("passages-*.npy"))  # cached for the next run
    items = [q for q in qa if q.gold_doc in ("sqlite/arch.txt", "sqlite/lockingv3.txt")][:4]
    for item in items:
        ids = d.hard(item, 9)
        q = np.asarray(embedder.get_query_embedding(item.question), dtype="float32")
        sims = vectors @ q
        assert list(sims[ids]) == sorted(sims[ids], reverse=True)  # most similar first
        excluded = [i for i in range(len(small_pool.passages)) if not allowed(small_pool.passages[i], item)]
        assert excluded and not set(excluded) & set(ids)  # the gold passage and answer-bearing ones are out
        best_allowed = [i for i in np.argsort(-sims) if i not in excluded][:9]
        assert ids == [int(i) for i in best_allowed]
        for i in ids:
            assert not answer_match(small_pool.passages[i], item.answers)
    again = Distractors(small_pool, embedder, tmp_path)  # from the cache file
    assert again.hard(items[0], 9) == d.hard(items[0], 9)


def test_too_few_distractors_is_an_error(qa, small_pool):
    with pytest.raises(SettingsError, match="possible distractors"):
        Distractors(small_pool).random(qa[0], len(small_pool.passages), seed=1)


# ---------------------------------------------------------------- key-value retrieval


def test_kv_objects_are_seeded_distinct_uuids():
    a = make_kv(25, seed=1, item=0)
    assert a == make_kv(25, seed=1, item=0) and a != make_kv(25, seed=2, item=0) != make_kv(25, seed=1, item=1)
    keys = [k for k, _ in a.pairs]
    assert len(set(keys)) == 25
    for k, v in a.pairs:
        assert uuid.UUID(k).version == 4 and uuid.UUID(v).version == 4
    assert json.loads(a.json()) == dict(a.pairs)
    text = kv_user_text(a, 7)
    assert text.endswith(f'Key: "{a.key(7)}"\nCorresponding value:')
    assert text.count(a.key(7)) == 2 and a.value(7) in text


def test_kv_scoring():
    obj = make_kv(5, seed=1, item=0)
    value = obj.value(2)
    assert answer_match(f'The value is "{value}".', [value])
    assert answer_match(value.upper(), [value])
    assert not answer_match(obj.value(3), [value])
    assert not answer_match(value[:-4], [value])  # a truncated UUID is wrong
    assert not answer_match(obj.key(2), [value])  # echoing the key is wrong


# ---------------------------------------------------------------- controls and scoring


def test_closed_book_and_oracle_prompts(qa):
    item = qa[10]
    closed = qa_user_text(item.question, [])
    assert "Document" not in closed and item.question in closed and "search results" not in closed
    oracle = qa_user_text(item.question, [item.gold_passage])
    assert oracle.count("Document [") == 1
    assert f"Document [1] {' '.join(item.gold_passage.split())}" in oracle


def test_squad_normalized_substring_match():
    assert normalize_squad("The  “Monty Python’s Flying Circus”!") == "monty pythons flying circus"
    assert answer_match("It was named after Monty Python's Flying Circus.", ["“Monty Python’s Flying Circus”"])
    assert answer_match("It is generated by the LEMON parser generator", ["Lemon parser generator"])
    assert answer_match("In parse.y", ["parse.y"])
    assert not answer_match("1000 tests", ["100"])  # whole words only
    assert not answer_match("", ["x"]) and not answer_match("anything", [""])


def test_mcnemar_exact():
    t = mcnemar_exact([True] * 10 + [False] * 2 + [True] * 5, [False] * 10 + [True] * 2 + [True] * 5)
    assert (t.n, t.a_only, t.b_only) == (17, 10, 2)
    assert t.p_value == pytest.approx(0.03857, abs=1e-5)  # 2 * P(X <= 2), X ~ Bin(12, 0.5)
    assert mcnemar_exact([True, False], [True, False]).p_value == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])


def test_question_sample_is_seeded(qa):
    a = select_questions(qa, 30, seed=1)
    assert a == select_questions(qa, 30, seed=1) != select_questions(qa, 30, seed=2)
    assert len({q.id for q in a}) == 30
    with pytest.raises(SettingsError, match="between 1 and 195"):
        select_questions(qa, 500, seed=1)


# ---------------------------------------------------------------- settings, length safety, a real run


@pytest.mark.parametrize("kw, needle", [
    ({"task": "rag"}, "--task 'rag' is unknown"),
    ({"orderings": "score,best_first"}, "--orderings best_first unknown; ragkit offers score, reverse"),
    ({"docs": "10,x"}, "--docs '10,x' must be a comma list"),
    ({"docs": "1"}, "at least 2"),
    ({"positions": "25"}, "--positions 25: a gold position must be 0..9 for 10 documents"),
    ({"distractors": "easy"}, "--distractors 'easy' is unknown"),
])
def test_bad_settings_name_the_input(kw, needle):
    with pytest.raises(SettingsError, match=re.escape(needle)):
        LitmSettings(**{"docs": (10,), "kv_pairs": (10,), **kw})


def test_cli_flags_win_over_the_suite_file(tmp_path):
    from evals.lost_in_middle.suite import settings_from_args

    cfg = tmp_path / "s.yaml"
    cfg.write_text("docs: 10\nquestions: 4\norderings: none\n")
    s = settings_from_args(["--config", str(cfg), "--questions", "7"])
    assert (s.docs, s.questions, s.orderings) == ((10,), 7, ())
    cfg.write_text("doc: 10\n")
    with pytest.raises(SettingsError, match="unknown settings"):
        settings_from_args(["--config", str(cfg)])


def test_too_long_configuration_is_refused_up_front_with_its_length(target, tmp_path):
    s = LitmSettings(task="qa", docs=(150,), positions="first", distractors="random", orderings="none",
                     questions=2, out=str(tmp_path / "run"), progress=False)
    with pytest.raises(TooLongError, match=r"context window of 8192 tokens: qa k=150: \d{5} tokens"):
        execute(s, target)
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_small_real_run_writes_every_output_and_resumes(target, tmp_path, repo_root):
    """SmolLM2, 2 questions, 3 documents, gold first/last, KV with 3 pairs, two orderings over a small corpus."""
    s = LitmSettings(task="both", docs=(3,), positions="first,last", kv_pairs=(3,), orderings="score,reverse",
                     questions=2, max_new_tokens=24, rag_top_k=4, corpus=tuple(str(repo_root / p) for p in SMALL_CORPUS),
                     out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), progress=False)
    out = execute(s, target)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    kinds = sorted((r["task"], r["kind"]) for r in rows)
    assert kinds.count(("qa", "closed_book")) == 2 and kinds.count(("qa", "oracle")) == 2
    assert kinds.count(("qa", "position")) == 4 and kinds.count(("kv", "position")) == 4
    assert sorted(r["ordering"] for r in rows if r["task"] == "rag") == ["reverse", "reverse", "score", "score"]
    for name in ("run.json", "summary.csv", "curve.png", "orderings.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "closed-book" in report and "| score | reverse |" in report
    for r in rows:
        assert r["found"] == answer_match(r["answer"], r["expected"])
        if r["task"] == "qa" and r["kind"] == "position":
            assert r["recipe"]["docs"][r["position"]] == GOLD
    # the reversed ordering shows the same chunks in the opposite order
    by_q = {}
    for r in rows:
        if r["task"] == "rag":
            by_q.setdefault(r["qid"], {})[r["ordering"]] = r["recipe"]["chunks"]
    for orders in by_q.values():
        assert orders["reverse"] == orders["score"][::-1]
    # resume: nothing left to do, nothing lost; other settings are refused
    s.resume = True
    execute(s, target)
    assert (out / "results.jsonl").read_text().count("\n") == len(rows)
    s2 = LitmSettings(**{**s.__dict__, "docs": (4,)})
    with pytest.raises(RunDirError, match="differ: docs"):
        execute(s2, target)
    assert (out / "results.jsonl").read_text().count("\n") == len(rows)
