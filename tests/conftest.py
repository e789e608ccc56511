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


@pytest.fixture(scope="session")
def tiny_mistral4_dir(tmp_path_factory):
    """A random Mistral-Small-4-shaped model (Mistral3 + Mistral4 MoE text + Pixtral vision), saved as BF16.

    Saved in several shards (HF layout: language_model.model.*) with 64 routed experts per layer, so
    that the experts dominate the weights as they do in the real 119B model.
    """
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Mistral4Config, PixtralVisionConfig

    text = Mistral4Config(
        vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=64, num_experts_per_tok=4,
        kv_lora_rank=32, q_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
        max_position_embeddings=1024,
    )
    vision = PixtralVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=64, patch_size=8, head_dim=32)
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=10, spatial_merge_size=2)
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("tiny_mistral4") / "bf16"
    model.save_pretrained(path, max_shard_size="1MB")
    return path
