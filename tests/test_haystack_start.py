"""``--haystack-start``: ``fixed`` keeps every prompt and configuration hash of runs made before it existed;
``seed`` gives each seed its own haystack text, still token-exact and still rebuildable from its recipe."""

from __future__ import annotations

import json

import pytest

from evals.needle import NeedleSettings
from evals.spec import config_hash

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
