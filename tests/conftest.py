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


@pytest.fixture(scope="module", params=["packed", "plain"])
def nf4_cpu_kernel(request) -> str:
    """Which bitsandbytes NF4 kernel a module's CPU tests run on; apply it with ``set_cpu_packing(model, ...)``.

    "packed": the AVX512-BF16 path bitsandbytes takes by itself on such CPUs (weights repacked at the first
    inference forward, bf16 matmul); skipped where the CPU lacks AVX512-BF16, since bitsandbytes never takes
    it there. "plain": the NF4 path every other CPU takes.
    """
    from ragkit.quant.nf4 import cpu_packing_available

    if request.param == "packed" and not cpu_packing_available():
        pytest.skip("packed NF4 CPU kernel: this CPU has no AVX512-BF16, so bitsandbytes never takes that path here")
    return request.param


@pytest.fixture(scope="session")
def embedder():
    """The embedded all-MiniLM-L6-v2 as ragkit's SentenceTransformerEmbedding, loaded once per session."""
    from ragkit.embed import SentenceTransformerEmbedding

    return SentenceTransformerEmbedding("default")


@pytest.fixture(scope="session")
def tiny_mistral4_dir(tmp_path_factory):
    """A random Mistral-Small-4-shaped model (Mistral3 + Mistral4 MoE text + Pixtral vision), saved as BF16.

    Saved in several shards (HF layout: language_model.model.*) with 16 routed experts (top-4) per layer
    that hold most of the weights, as they do in the real 119B model.
    """
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Mistral4Config, PixtralVisionConfig

    text = Mistral4Config(
        vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4,
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


@pytest.fixture(scope="session")
def tiny_mistral4_tekken_dir(tmp_path_factory):
    """A random Mistral-Small-4-shaped model (Mistral3 + Mistral4 MoE text + Pixtral vision) at the real vocabulary
    (131,072) with a reasoning Tekken tokenizer (ragkit.tekken.save_tokenizer: mistral-common's shipped Tekken
    vocabulary, [THINK]/[/THINK], reasoning_effort none|high), saved as Mistral's repositories ship it."""
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Mistral4Config, PixtralVisionConfig

    from ragkit import tekken

    text = Mistral4Config(
        vocab_size=131072, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
        kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=11,
    )
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=64, patch_size=8, head_dim=16)
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=10, spatial_merge_size=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_mistral4_tekken") / "model"
    Mistral3ForConditionalGeneration(config).save_pretrained(path)
    tekken.save_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def repo_root():
    """The checkout's root directory (corpora/, evals/, ...)."""
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded SmolLM2-135M-Instruct tokenizer (from ragkit's GGUF cache), without the model.

    Loaded as PreTrainedTokenizerFast: same tokenizer.json and chat template as LocalLLM's, but it loads in
    ~2 s where AutoTokenizer takes ~30 s on a busy 2-core machine.
    """
    from transformers import PreTrainedTokenizerFast

    from ragkit import models

    return PreTrainedTokenizerFast.from_pretrained(models.local_dir(models.resolve_llm("default")))


@pytest.fixture(scope="session")
def smollm2_shape():
    """SmolLM2-135M-Instruct's published shape (LlamaForCausalLM config kwargs), for random-weight models of its
    size where the embedded GGUF cannot go (GPU tests)."""
    return dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct as a LocalLLM (defaults: float32, CPU here), loaded once per session."""
    from ragkit import LocalLLM

    return LocalLLM("default")


def _tiny_chat_tokenizer():
    """A small byte-level BPE tokenizer trained here, shaped like Mistral's: "<s>" BOS added by the
    post-processor and written by the chat template too (the double-BOS trap)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["The capital of France is Paris. Tiny random models say odd things."] * 8, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST]{{ m['content'] }}[/INST]"
        "{% elif m['role'] == 'system' %}{{ m['content'] }}\n{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
        "{% endfor %}"
    )
    return fast


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory):
    """A random tiny MistralForCausalLM + Mistral-like tokenizer, saved with save_pretrained (safetensors)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = _tiny_chat_tokenizer()
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_mistral") / "model"
    MistralForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_mistral3_dir(tmp_path_factory):
    """A random tiny Mistral3ForConditionalGeneration with a mistral4 (MoE, MLA) text config and a tiny
    Pixtral vision tower, the shape of Mistral-Small-4, saved with save_pretrained + tokenizer."""
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Mistral4Config, PixtralVisionConfig

    tokenizer = _tiny_chat_tokenizer()
    text = Mistral4Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=32, patch_size=8)
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=10)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_mistral3") / "model"
    Mistral3ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pg_url():
    """A real Postgres 16 + pgvector server (pgserver's binaries) on 127.0.0.1, data in a throwaway directory."""
    import shutil
    import tempfile

    from ragkit.errors import RagkitError
    from ragkit.store.local_postgres import LocalPostgres

    root = tempfile.mkdtemp(prefix="ragkit-pg-")
    os.chmod(root, 0o711)  # as root the server runs as nobody, which must reach its data directory
    server = LocalPostgres(os.path.join(root, "data"), fsync=False)
    try:
        server.start()
    except (RagkitError, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"a local Postgres with pgvector cannot start here: {exc}")
    yield server.url
    server.stop()
    shutil.rmtree(root, ignore_errors=True)
