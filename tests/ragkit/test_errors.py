"""Bad arguments a user can pass raise ragkit errors (never a bare ValueError) that name the input; causes are kept."""

from __future__ import annotations

import pytest

from ragkit.errors import IndexCorruptError, InvalidArgumentError, MemoryPlanError, RagkitError


def test_unknown_ordering_is_a_ragkit_error_listing_the_known_ones():
    from ragkit.context import get_ordering

    with pytest.raises(InvalidArgumentError, match=r"unknown ordering 'best'; choose one of score, reverse") as err:
        get_ordering("best")
    assert isinstance(err.value, RagkitError) and isinstance(err.value, ValueError)


def test_unknown_index_kind_names_the_valid_kinds():
    from ragkit.store import build_faiss_index

    with pytest.raises(InvalidArgumentError, match=r"unknown index kind 'annoy'; use 'flat', 'hnsw' or 'ivf'"):
        build_faiss_index("annoy", 8)


def test_headroom_is_a_memory_plan_error():
    from ragkit.placement import max_memory_with_headroom

    with pytest.raises(MemoryPlanError, match=r"headroom must be a fraction in \[0, 1\), got 1.5"):
        max_memory_with_headroom(1.5)


def test_a_damaged_manifest_keeps_its_cause(tmp_path):
    import json

    from ragkit.store import IndexDirectory

    directory = IndexDirectory(tmp_path / "ix")
    snap = directory.commit(lambda w: w.write_bytes("a.bin", b"x"), meta={})
    (snap.path / "manifest.json").write_text("{not json")
    with pytest.raises(IndexCorruptError, match="is not valid JSON") as err:
        directory.current()
    assert isinstance(err.value.__cause__, json.JSONDecodeError)

