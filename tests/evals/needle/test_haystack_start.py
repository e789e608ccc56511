"""``--haystack-start``: ``fixed`` keeps every prompt and configuration hash of runs made before it existed;
``seed`` gives each seed its own haystack text, still token-exact and still rebuildable from its recipe."""

from __future__ import annotations

import json

import pytest

from evals.core.decode import common_prefix
from evals.core.errors import SettingsError
from evals.needle.haystack import STARTS, Estimator, Frame, Recipe, SentencePool, measure, start_sentence
from evals.needle.suite import NeedleSettings, build_cell, execute, haystack_paths, settings_from_args
from evals.needle.needles import make_needle
from evals.core.spec import Cell, config_hash
from evals.core.targets import LLMCodec, wrap

OLD_RUN = "benchmarks/results/regress_smollm2_h200/nf4-10/niah10"  # made on an H200 before the flag existed


# ---------------------------------------------------------------- configuration hash


def test_default_settings_keep_the_configuration_hash_of_older_runs():
    """Pinned before --haystack-start was added: old run directories must still resume and still compare."""
    s = NeedleSettings(lengths="1k,2k,4k")
    assert "haystack_start" not in s.hashed()
    assert config_hash(s.hashed()) == "591e305a42a60a93"
    # the README's first run (docs/needle.md) was made with this config and the default haystack's fingerprint
    assert config_hash({**s.hashed(), "pool": "23ca5d478b511f10"}) == "2a64186be7da8db5"


def test_a_committed_old_run_keeps_its_configuration(repo_root):
    meta = json.loads((repo_root / OLD_RUN / "run.json").read_text())
    settings = {k: v for k, v in meta["settings"].items() if k not in ("recipe_version", "pool")}
    s = NeedleSettings(**settings)
    assert config_hash({**s.hashed(), "pool": meta["settings"]["pool"]}) == meta["config"]


def test_the_setting_is_a_flag_and_a_bad_value_names_it():
    s, _ = settings_from_args(["--lengths", "1k", "--haystack-start", "seed"])
    assert s.haystack_start == "seed" and s.hashed()["haystack_start"] == "seed"
    assert config_hash(s.hashed()) != config_hash(NeedleSettings(lengths="1k").hashed())
    with pytest.raises(SettingsError, match="--haystack-start 'random' is unknown; choose fixed or seed"):
        NeedleSettings(lengths="1k", haystack_start="random")


# ---------------------------------------------------------------- prompts (the runs' codec; no generation)


@pytest.fixture(scope="module")
def codec(smollm2) -> LLMCodec:
    return LLMCodec(smollm2)


@pytest.fixture(scope="module")
def pool(repo_root) -> SentencePool:
    return SentencePool.from_paths([repo_root / "corpora" / "sqlite"])


def _cell(length: int, seed: int, depth: float | None) -> Cell:
    return Cell("needle", "test", {"mode": "context", "length": length, "seed": seed, "depth": depth,
                                   "needle": "passcode", "kind": "control" if depth is None else "needle"})


def test_fixed_rebuilds_every_prompt_of_a_committed_old_run(codec, repo_root):
    """An H200 run made before the flag: with the default, the same cells (same ids) get the same prompts."""
    meta = json.loads((repo_root / OLD_RUN / "run.json").read_text())
    s = NeedleSettings(**{k: v for k, v in meta["settings"].items() if k not in ("recipe_version", "pool")})
    pool = SentencePool.from_paths(haystack_paths(s.haystack))
    assert pool.fingerprint == meta["settings"]["pool"]
    est = Estimator(codec, pool)
    rows = [json.loads(x) for x in (repo_root / OLD_RUN / "results.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["length"] == 1024 and r["seed"] in (1, 2)]
    assert len(rows) == 12
    for r in rows:
        cell = Cell("needle", meta["config"], {k: r[k] for k in ("mode", "length", "seed", "depth", "needle", "kind")})
        assert cell.cell_id == r["cell_id"]
        _, _, built = build_cell(codec, pool, est, s, cell)
        assert {**built.recipe.to_json(), "pool": pool.fingerprint} == r["recipe"]
        assert len(built.ids) == r["prompt_tokens"] and built.needle_offsets[:1] == r.get("needle_offsets", [])[:1]


def test_seed_start_gives_each_seed_its_own_haystack_and_fixed_the_same(codec, pool):
    est = Estimator(codec, pool)
    texts = {}
    for how in STARTS:
        s = NeedleSettings(lengths="1k", haystack=("corpora/sqlite",), haystack_start=how)
        for seed in (1, 2, 3):
            needle, _, built = build_cell(codec, pool, est, s, _cell(1024, seed, None))  # the seed's control
            assert needle.expected[0] not in built.text
            texts[how, seed] = built.text
    assert texts["fixed", 1] == texts["fixed", 2] == texts["fixed", 3]
    assert len({texts["seed", n] for n in (1, 2, 3)}) == 3
    # the start is drawn from the seed only: the same seed reads the same text again (and at every length)
    assert start_sentence("seed", 2, pool) == start_sentence("seed", 2, pool) != start_sentence("seed", 3, pool)
    assert start_sentence("fixed", 2, pool) == 0


def test_seed_start_is_token_exact_keeps_the_depth_and_rebuilds_from_its_recipe(codec, pool):
    # a seed whose haystack starts near the pool's end, so the fill wraps around to its first sentences
    seed = next(n for n in range(1, 10_000) if start_sentence("seed", n, pool) > len(pool.sentences) - 10)
    s = NeedleSettings(lengths="1k", haystack=("corpora/sqlite",), haystack_start="seed")
    est = Estimator(codec, pool)
    for length in (700, 3000):
        control = build_cell(codec, pool, est, s, _cell(length, seed, None))[2]
        for depth in (0, 50, 100):
            needle, frame, built = build_cell(codec, pool, est, s, _cell(length, seed, depth))
            assert len(codec.encode(built.text)) == len(built.ids) == length - 32, (length, depth)
            assert built.recipe.pool_ids[0] == start_sentence("seed", seed, pool)
            assert built.text.count(needle.sentences[0]) == 1
            longest = max(est(i) for i in built.recipe.pool_ids) + len(codec.encode_piece(needle.sentences[0]))
            start, end = built.haystack_span
            assert abs(built.depth_percent() - depth) <= 100 * longest / (end - start), (length, depth)
            # the seed's control is the same haystack: it shares the prompt up to (about) the needle
            assert common_prefix(built.ids, control.ids) >= built.needle_offsets[0] - 1
            again = measure(codec, pool, frame, needle.sentences, Recipe.from_json(built.recipe.to_json()))
            assert again.text == built.text and again.ids == built.ids
        assert max(built.recipe.pool_ids) >= len(pool.sentences)  # it did wrap
        assert pool.sentences[0] in built.text


# ---------------------------------------------------------------- a real run (embedded SmolLM2, CPU)


@pytest.mark.slow  # 8 cells + 8 plain generate() calls: ~200 s on the shared, loaded 2-core machine
def test_seed_start_run_answers_like_generate_on_every_cell(smollm2, repo_root, tmp_path):
    """Prefix sharing per (length, seed) stays exact: each cell's answer equals one plain generate() on the
    prompt rebuilt from its recipe, and each cell reused its own seed's haystack prefix."""
    target = wrap(smollm2)
    s = NeedleSettings(lengths="448", depths="0,50,100", seeds="1,2", haystack=("corpora/sqlite",),
                       haystack_start="seed", max_new_tokens=16, out=str(tmp_path / "run"), progress=False)
    out = execute(s, target)
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert json.loads((out / "run.json").read_text())["settings"]["haystack_start"] == "seed"
    pool = SentencePool.from_paths([repo_root / "corpora" / "sqlite"])
    firsts = set()
    for r in rows:
        needle = make_needle(r["needle"], r["seed"])
        frame = Frame(needle.instruction, needle.question, needle.answer_prefix)
        ids = measure(target.codec, pool, frame, needle.sentences, Recipe.from_json(r["recipe"])).ids
        assert len(ids) == r["prompt_tokens"]
        assert target.decode(target.generate_naive(ids, 16)) == r["answer"], r["cell_id"]
        firsts.add((r["seed"], r["recipe"]["pool_ids"][0][0]))
        if r["kind"] == "needle" and r["depth"] > 0:  # grouped with its own seed's control, not another seed's
            assert r["reused_tokens"] >= r["needle_offset"] - 1, r
    assert len(firsts) == 2 and len({first for _, first in firsts}) == 2  # one haystack per seed
