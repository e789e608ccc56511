"""Haystack genre as an axis: built-in genres with licences, --haystack parsing, stable hashes for the default,
genre coordinates only in multi-genre runs, and the report's genre verdict."""

from __future__ import annotations

import pandas as pd
import pytest

from evals.core.errors import SettingsError
from evals.needle.haystack import GENRES, SentencePool, haystack_sets
from evals.needle.suite import NeedleSettings, settings_from_args
from evals.needle.report import genre_lines
from evals.core.spec import config_hash


@pytest.mark.parametrize("genre", sorted(GENRES))
def test_every_builtin_genre_has_a_notice_and_enough_prose(repo_root, genre):
    for path in GENRES[genre]:
        notice = (repo_root / path / "NOTICE").read_text()
        assert "Licence" in notice or "licence" in notice
        assert "wikipedia" not in notice.lower()
    pool = SentencePool.from_paths([repo_root / p for p in GENRES[genre]])
    assert len(pool.sentences) > 2000  # enough for an 8k prompt from many different starts


@pytest.mark.parametrize("items,expected", [
    (["docs"], {"docs": GENRES["docs"]}),
    (["corpora/sqlite", "corpora/python"], {"docs": GENRES["docs"]}),
    (["docs", "novels", "noise"], {k: GENRES[k] for k in ("docs", "novels", "noise")}),
    (["corpora/sqlite"], {"custom": ("corpora/sqlite",)}),
    (["noise"], {"noise": GENRES["noise"]}), (["corpora/austen"], {"novels": GENRES["novels"]}),
    (["books=corpora/austen,corpora/noise", "docs"], {"books": ("corpora/austen", "corpora/noise"),
                                                       "docs": GENRES["docs"]}),
])
def test_haystack_items_name_sets(items, expected):
    assert haystack_sets(items) == expected


@pytest.mark.parametrize("items,message", [
    (["docs", "docs"], "twice"), (["my set=x"], "must be a word"), ([], "empty"),
    (["docs", "corpora/sqlite", "corpora/python"], "also named"),
])
def test_bad_haystack_items_name_the_problem(items, message):
    with pytest.raises(SettingsError, match=message):
        haystack_sets(items)


def test_the_default_genre_keeps_the_configuration_hash_of_older_runs():
    old = config_hash(NeedleSettings(lengths="1k,2k,4k").hashed())
    assert old == "591e305a42a60a93"  # pinned in tests/evals/needle/test_haystack_start.py too
    s, _ = settings_from_args(["--lengths", "1k,2k,4k", "--haystack", "docs"])
    assert config_hash(s.hashed()) == old
    two, _ = settings_from_args(["--lengths", "1k,2k,4k", "--haystack", "docs", "novels"])
    assert two.haystack == ("docs", "novels") and config_hash(two.hashed()) != old


def _rows(found_a: list[bool], found_b: list[bool]) -> pd.DataFrame:
    rows = []
    for genre, found in (("docs", found_a), ("novels", found_b)):
        rows += [{"mode": "context", "genre": genre, "length": 1024, "seed": i, "depth": 50.0, "kind": "needle",
                  "found": f} for i, f in enumerate(found)]
    return pd.DataFrame(rows)


def test_report_says_first_when_genres_disagree():
    lines = genre_lines(_rows([True] * 12, [False] * 10 + [True] * 2))
    assert lines[0].startswith("**Genres disagree significantly**") and "docs 12/12 vs novels 2/12" in lines[0]
    assert genre_lines(_rows([True] * 6, [True] * 5 + [False]))[0].startswith("Genres agree within chance")
    assert genre_lines(_rows([True], [True])[lambda d: d["genre"] == "docs"]) == []
