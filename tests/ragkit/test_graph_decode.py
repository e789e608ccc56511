"""ragkit/graph_decode.py: greedy steps on a static cache give generate()'s tokens — the real SmolLM2 on CPU (the
same steps run eagerly there), and on CUDA replayed as a CUDA graph inside LocalLLM and the runner's batches."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, GenerationConfig

from ragkit import attention, graph_decode


def _generate(model, ids, max_new, eos):
    with torch.inference_mode():
        x = torch.tensor([ids], device=model.device)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def prompts(smollm2):
    return [smollm2.encode_prompt(smollm2.chat_prompt(q)) for q in
            ("Name three colours.", "What is 2 + 2? Answer with a number.", "Write a haiku about the sea. " * 3)]


def test_batch_one_equals_generate_and_stops_after_eos(smollm2, prompts):
    model = smollm2.model
    ids = prompts[0]
    want = _generate(model, ids, 12, [10**6])
    assert graph_decode.greedy(model, ids, 12, [10**6]) == want
    eos = want[4]  # a token it does produce: generate stops after it and returns it
    cut = _generate(model, ids, 12, [eos])
    assert cut[-1] == eos and len(cut) < 12
    assert graph_decode.greedy(model, ids, 12, [eos]) == cut
    assert graph_decode.greedy(model, ids, 1, [10**6]) == want[:1]
    kept = model._ragkit_decode  # the static cache of this bucket is kept and refilled for the next prompt
    assert graph_decode.greedy(model, prompts[1], 12, [10**6]) == _generate(model, prompts[1], 12, [10**6])
    assert model._ragkit_decode is kept and kept.slots == graph_decode.BUCKET


def test_left_padded_rows_decode_like_one_generate_each(smollm2, prompts):
    """Three prompts of different lengths in one static batch, as the runner builds it."""
    model = smollm2.model
    steps = 10
    width = max(len(p) for p in prompts)
    caches, first = [], []
    with torch.inference_mode():
        for ids in prompts:
            cache = DynamicCache(config=model.config)
            logits = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1).logits
            caches.append(cache)
            first.append(int(logits[0, -1].argmax()))
    keys, values = graph_decode.buffers_like(caches[0], len(prompts), width + steps)
    for r, (ids, cache) in enumerate(zip(prompts, caches)):
        for k, v, layer in zip(keys, values, cache.layers):
            k[r, :, width - len(ids):width], v[r, :, width - len(ids):width] = layer.keys[0], layer.values[0]
    dec = graph_decode.StaticDecode(model, keys, values, [len(p) for p in prompts], width, first)
    got = [[t] for t in first]
    for tokens in dec.steps(steps - 1):
        for row, t in zip(got, tokens):
            row.append(t)
    assert not dec.captured and dec.steps_run == steps - 1  # eager on a CPU
    for ids, row in zip(prompts, got):
        assert row == _generate(model, ids, steps, [10**6])


@pytest.mark.parametrize("slots", [40, 3 * attention.DECODE_CHUNK])  # one reduction; split into chunks
def test_grouped_decode_attention_equals_sdpa_with_the_mask(slots):
    torch.manual_seed(0)
    q = torch.randn(3, 8, 1, 16)
    k, v = torch.randn(3, 2, slots, 16), torch.randn(3, 2, slots, 16)
    mask = torch.rand(3, 1, 1, slots) > 0.3
    mask[..., 0] = True
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(attention.decode_attention(q, k, v, mask, 0.3), want)


def test_only_plain_greedy_on_one_gpu_takes_the_static_path(smollm2):
    assert graph_decode.plain_greedy(GenerationConfig(do_sample=False))
    assert not graph_decode.plain_greedy(GenerationConfig(do_sample=True))
    assert not graph_decode.plain_greedy(GenerationConfig(repetition_penalty=1.2))
    assert not graph_decode.supported(smollm2.model)  # a CPU model keeps generate()
    assert not smollm2._static


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_steps_answer_like_generate(smollm2_shape, dtype):
    """A SmolLM2-shaped random Llama on CUDA, switched as LocalLLM switches a CUDA model: the graph is captured and
    answers like generate() (all prompts in float32; random bf16 weights make near-tied logits, so there one of
    three may differ)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**smollm2_shape)).to("cuda", dtype).eval()
    assert graph_decode.supported(model) and attention.use_lower_right(model)
    eos = [smollm2_shape["eos_token_id"]]
    gen = torch.Generator().manual_seed(1)
    same = 0
    for n in (17, 300, 2000):
        ids = torch.randint(3, smollm2_shape["vocab_size"], (n,), generator=gen).tolist()
        model.set_attn_implementation("sdpa")
        want = _generate(model, ids, 24, eos)
        model.set_attn_implementation(attention.NAME)
        same += graph_decode.greedy(model, ids, 24, eos) == want
    assert same == 3 if dtype == torch.float32 else same >= 2
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([ids], device="cuda"), cache=cache, use_cache=True, logits_to_keep=1)
    keys, values = graph_decode.buffers_like(cache, 1, len(ids) + 8)
    for k, v, layer in zip(keys, values, cache.layers):
        k[:, :, :len(ids)], v[:, :, :len(ids)] = layer.keys, layer.values
    dec = graph_decode.StaticDecode(model, keys, values, [len(ids)], len(ids), [want[0]])
    got = [t[0] for t in dec.steps(8)]
    assert dec.captured and (got == want[1:9] or dtype == torch.bfloat16)
