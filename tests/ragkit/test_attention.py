"""ragkit/attention.py and ragkit/mla.py: the mask-free path for a prompt's tail on a cached prefix, and MLA decode
with ``kv_b_proj`` absorbed, give the outputs of transformers' own sdpa path (real SmolLM2 and a random tiny
Mistral-4 on CPU, float32)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Mistral4Config, Mistral4ForCausalLM

from ragkit import attention, mla


def _tail_on_prefix(model, ids: torch.Tensor, split: int):
    """Logits of ``ids[split:]`` fed on a cache holding ``ids[:split]``, and the mask layer 0's attention saw."""
    seen = []
    attn = model.model.layers[0].self_attn
    hook = attn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    try:
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :split], cache=cache, use_cache=True)
            logits = model(input_ids=ids[:, split:], cache=cache, use_cache=True).logits
    finally:
        hook.remove()
    return logits, seen[-1], cache


@pytest.fixture()
def smollm2_model(smollm2):
    """The shared SmolLM2, put back on transformers' sdpa after the test."""
    yield smollm2.model
    smollm2.model.set_attn_implementation("sdpa")


def test_tail_on_cached_prefix_equals_sdpa_without_building_a_mask(smollm2_model, smollm2):
    ids = torch.tensor([smollm2.encode_prompt(smollm2.chat_prompt("The quick brown fox. " * 30))])
    want, mask, _ = _tail_on_prefix(smollm2_model, ids, 97)
    assert mask is not None  # transformers' sdpa builds a query x key mask for this layout
    assert attention.use_lower_right(smollm2_model)
    got, mask, _ = _tail_on_prefix(smollm2_model, ids, 97)
    assert mask is None
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def test_needle_group_answers_unchanged_on_the_lower_right_path(smollm2_model, smollm2, repo_root):
    from evals.core.decode import GreedyDecoder
    from evals.core.targets import wrap

    target = wrap(smollm2)
    tail = smollm2.encode_prompt(smollm2.chat_prompt("Name the first word of this text. " * 12))
    prompts = [tail[:40] + tail[40 + k:] for k in (0, 3, 7)]
    want = [target.generate_naive(p, 12) for p in prompts]
    attention.use_lower_right(smollm2_model)
    got = {d.index: d.new_ids for d in GreedyDecoder(smollm2_model, target.eos_ids, 12, 1).run_group(prompts, tail)}
    assert [got[i] for i in range(3)] == want


def _tiny_mistral4(seed: int = 0) -> Mistral4ForCausalLM:
    config = Mistral4Config(
        vocab_size=200, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=16,
        q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=512,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return Mistral4ForCausalLM(config).eval()


def _greedy_steps(model, ids: torch.Tensor, steps: int, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Logits of the prompt's last position and of each of ``steps`` greedy decode steps on a DynamicCache."""
    out, cache = [], DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]
        for _ in range(steps):
            out.append(logits)
            tok = logits.argmax(-1, keepdim=True)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits = model(input_ids=tok, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]
    return out


def test_mla_tail_on_cached_prefix_equals_sdpa():
    model = _tiny_mistral4()
    ids = torch.randint(1, 200, (1, 90), generator=torch.Generator().manual_seed(1))
    want, mask, _ = _tail_on_prefix(model, ids, 61)
    assert mask is not None
    attention.use_lower_right(model)
    got, mask, cache = _tail_on_prefix(model, ids, 61)
    assert mask is None
    assert cache.layers[0].keys.shape[-1] == model.config.kv_lora_rank  # the cache holds the latent, not K
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()


def test_mla_absorbed_decode_equals_hf_decode_alone_and_in_a_left_padded_batch():
    ref, fast = _tiny_mistral4(), _tiny_mistral4()
    assert attention.use_lower_right(fast) and all(mla.is_absorbed(m) for m in (fast.model.layers[0].self_attn,))
    ids = torch.randint(1, 200, (1, 40), generator=torch.Generator().manual_seed(2))
    for a, b in zip(_greedy_steps(ref, ids, 8), _greedy_steps(fast, ids, 8)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()
    padded = torch.randint(1, 200, (2, 30), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(padded)
    mask[1, :11] = 0  # the second row is a shorter prompt, left-padded
    padded[1, :11] = 0
    for a, b in zip(_greedy_steps(ref, padded, 6, mask), _greedy_steps(fast, padded, 6, mask)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()


def test_two_attention_parts_merged_by_log_sum_exp_equal_one_softmax_over_all_keys():
    """The merge ragkit.attention's CUDA path uses (checked here with exact float64 parts on CPU)."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    k2, v2 = torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, 7, 8, generator=g,
                                                                                   dtype=torch.float64)

    def part(keys, values):
        s = q @ keys.transpose(-1, -2) / 8 ** 0.5
        return s.softmax(-1) @ values, s.logsumexp(-1)

    want = torch.nn.functional.scaled_dot_product_attention(q, torch.cat([k, k2], 2), torch.cat([v, v2], 2))
    got = attention.merge_by_lse(*part(k, v), *part(k2, v2))
    assert torch.allclose(got, want, atol=1e-12)
