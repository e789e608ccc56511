"""Shared test setup: markers for slow and GPU tests, offline hub, shared real models."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")
    parser.addoption("--run-gpu", action="store_true", help="run tests marked gpu (needs CUDA)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--run-slow")
    run_gpu = config.getoption("--run-gpu")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow"))
        if "gpu" in item.keywords:
            if not run_gpu:
                item.add_marker(pytest.mark.skip(reason="gpu: run with --run-gpu"))
            else:
                import torch

                if not torch.cuda.is_available():
                    item.add_marker(pytest.mark.skip(reason="gpu: no CUDA device"))


@pytest.fixture(scope="session")
def embedder():
    """The embedded all-MiniLM-L6-v2 as ragkit's SentenceTransformerEmbedding, loaded once per session."""
    from ragkit.embed import SentenceTransformerEmbedding

    return SentenceTransformerEmbedding("default")
