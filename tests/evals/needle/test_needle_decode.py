"""evals/core/decode.py: batched greedy decoding of a group's cells answers exactly like one cell at a time and like
one plain generate() call per prompt (the real embedded SmolLM2 on CPU; a SmolLM2-shaped model on CUDA)."""

from __future__ import annotations

import pytest

from evals.core.decode import MAX_PREFILL_CHUNK, GreedyDecoder, activation_bytes_per_token, default_batch_size
from evals.needle.haystack import Estimator, Frame, Recipe, SentencePool, fit_prompt, measure
from evals.needle.needles import make_needle
from evals.core.targets import wrap

MAX_NEW = 16


@pytest.fixture(scope="module")
def target(smollm2):
    return wrap(smollm2)


@pytest.fixture(scope="module")
def group(target, repo_root):
    """A needle group as the runner builds it: the group's control prompt (``base``), cells at three depths that
    share it up to their needle, and a cell of another needle and length that shares only the chat template's
    head; with each prompt's plain generate() answer."""
    pool = SentencePool.from_paths([repo_root / "corpora" / "sqlite"])
    est = Estimator(target.codec, pool)
    prompts, base = [], None
    for kind, seed, length, depths in (("passcode", 1, 256, (0, 50, 100)), ("kv-words", 2, 192, (60,))):
        needle = make_needle(kind, seed)
        frame = Frame(needle.instruction, needle.question, needle.answer_prefix)
        for depth in depths:
            prompts.append(fit_prompt(target.codec, pool, frame, needle.sentences, (depth,), length, MAX_NEW, est).ids)
        if base is None:
            built = fit_prompt(target.codec, pool, frame, needle.sentences, (50,), length, MAX_NEW, est)
            base = measure(target.codec, pool, frame, needle.sentences, Recipe(built.recipe.pool_ids, [None])).ids
            prompts.append(base)
    naive = [target.generate_naive(ids, MAX_NEW) for ids in prompts]
    return prompts, base, naive


def _answers(target, prompts, base, batch_size, max_new=MAX_NEW):
    decoder = GreedyDecoder(target.model, target.eos_ids, max_new, batch_size=batch_size)
    out = {d.index: d for d in decoder.run_group(prompts, base)}
    assert sorted(out) == list(range(len(prompts)))
    return out


def test_batched_answers_equal_batch_one_and_generate(target, group):
    """Rows of different lengths and shared prefixes, in a full and a partial batch (5 cells: 4 + 1)."""
    prompts, base, naive = group
    assert len({len(p) for p in prompts}) > 2
    one = _answers(target, prompts, base, 1)
    four = _answers(target, prompts, base, 4)
    assert sum(d.reused_tokens for d in four.values()) > len(base)  # the prefix was still shared
    for i in range(len(prompts)):
        assert four[i].reused_tokens == one[i].reused_tokens
        assert four[i].computed_tokens == one[i].computed_tokens == len(prompts[i]) - one[i].reused_tokens
        assert one[i].new_ids == naive[i], i
        assert four[i].new_ids == naive[i], i


def test_rows_that_end_early_keep_their_answers_and_each_row_stops_at_max_new_tokens(target, group):
    """With a budget of 10 tokens some rows reach EOS mid-batch (and leave it) while their neighbours run to 10."""
    prompts, base, naive = group
    budget = 10
    expected = [a[:budget] for a in naive]  # greedy is prefix-consistent; generate_naive drops the EOS
    assert any(len(a) < budget for a in expected) and any(len(a) == budget for a in expected)
    got = _answers(target, prompts, base, 8, budget)
    assert [got[i].new_ids for i in range(len(prompts))] == expected


@pytest.mark.parametrize("batch_size", [1, 4])
def test_computed_tokens_add_up_to_the_prompt_tokens_the_model_was_fed(target, group, batch_size):
    """Counted at the model's input (a forward hook): the shared prefix is computed once, on the first cell that
    needs each stretch of it, and that cell's row says so; rows still split every prompt into reused + computed."""
    prompts, base, _ = group
    fed = []
    hook = target.model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].shape[1]),
                                                  with_kwargs=True)
    try:  # no decode steps: every forward is prefill
        rows = list(GreedyDecoder(target.model, target.eos_ids, 0, batch_size=batch_size).run_group(prompts, base))
    finally:
        hook.remove()
    assert sum(d.computed_tokens for d in rows) == sum(fed) < sum(len(p) for p in prompts)
    assert all(d.reused_tokens + d.computed_tokens == len(prompts[d.index]) for d in rows)
    assert rows[0].reused_tokens == 0  # the first cell finds an empty cache


def test_chunked_prefill_answers_like_generate_and_bad_chunks_are_refused(target, group):
    prompts, base, naive = group
    decoder = GreedyDecoder(target.model, target.eos_ids, MAX_NEW, batch_size=1, prefill_chunk=50)
    got = {d.index: d.new_ids for d in decoder.run_group(prompts, base)}
    assert [got[i] for i in range(len(prompts))] == naive
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1, got 0"):
        GreedyDecoder(target.model, target.eos_ids, 4, prefill_chunk=0)


def test_default_batch_size_is_one_on_cpu_eight_on_cuda_and_bad_sizes_are_refused(target):
    assert default_batch_size("cpu") == 1 and default_batch_size("cuda:0") == 8
    assert GreedyDecoder(target.model, target.eos_ids, 4).batch_size == default_batch_size(target.model.device)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        GreedyDecoder(target.model, target.eos_ids, 4, batch_size=0)


@pytest.mark.parametrize("field, refusal", [("batch_size", "must be >= 1, got 0"),
                                           ("prefill_chunk", "must be >= 1 token, got 0")])
def test_decoding_run_control_leaves_cell_ids_and_bad_values_are_refused(capsys, field, refusal):
    """--batch-size and --prefill-chunk (how many cells decode together; how many prompt tokens one forward call
    feeds, which bounds a 256k prefill's activations) leave every cell id (configuration hash) as it was;
    nonsense values fail before any work."""
    from evals.lost_in_middle.suite import LitmSettings
    from evals.needle.suite import NeedleSettings, main

    flag = "--" + field.replace("_", "-")
    assert NeedleSettings(lengths="1k", **{field: 4}).hashed() == NeedleSettings(lengths="1k").hashed()
    assert LitmSettings(**{field: 4}).hashed() == LitmSettings().hashed()
    assert main(["--lengths", "1k", flag, "0"]) == 2
    assert f"{flag} {refusal}" in capsys.readouterr().err
    assert main(["--lengths", "1k", "--backend", "openai", flag, "2"]) == 2
    assert f"{flag} applies to the in-process backend" in capsys.readouterr().err


def test_prefill_is_one_call_on_cpu_and_the_cuda_estimate_covers_the_flagships_experts(target):
    """On a CPU the default feeds a stretch in one call (answers and timings as before); the activation estimate
    that sizes CUDA chunks counts a MoE's active experts; on an H200 beside the flagship's 63 GB of NF4 weights it
    still allows the 16k chunk the measurements used (their activation peak: 6.75 GiB)."""
    from transformers import AutoConfig

    from ragkit.models import shipped_config

    assert GreedyDecoder(target.model, target.eos_ids, 4).prefill_chunk is None
    per_token = activation_bytes_per_token(AutoConfig.from_pretrained(
        shipped_config("mistralai/Mistral-Small-4-119B-2603")))
    assert 6.75 * 2**30 / MAX_PREFILL_CHUNK < per_token < 1_000_000  # above what was measured: a safe estimate
    assert MAX_PREFILL_CHUNK * per_token < (139e9 - 63.2e9) / 4


@pytest.mark.gpu
def test_cuda_batch_of_8_answers_like_batch_one_in_fp32(smollm2_shape):
    """A SmolLM2-shaped random Llama on CUDA: 9 prompts (a full batch of 8, then 1) sharing a 1k-token prefix up
    to an insertion at different depths, with different lengths; batch 8 == batch 1 == generate()."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**smollm2_shape)).to("cuda", torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(3, smollm2_shape["vocab_size"], (1024,), generator=gen).tolist()
    prompts = [base]
    for j in range(8):
        cut = 128 * j
        insert = torch.randint(3, smollm2_shape["vocab_size"], (8 + 5 * j,), generator=gen).tolist()
        prompts.append(base[:cut] + insert + base[cut:1024 - 40 * (j % 3)])
    eos = [smollm2_shape["eos_token_id"]]
    runs = {}
    for bs in (1, 8):
        decoder = GreedyDecoder(model, eos, 12, batch_size=bs)
        runs[bs] = {d.index: d.new_ids for d in decoder.run_group(prompts, base)}
    assert GreedyDecoder(model, eos, 12).batch_size == 8  # the CUDA default
    with torch.inference_mode():
        for i, ids in enumerate(prompts):
            out = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=12, do_sample=False,
                                 eos_token_id=eos, pad_token_id=0)[0, len(ids):].tolist()
            reference = [t for t in out if t not in eos]
            assert runs[1][i] == reference, i
            assert runs[8][i] == reference, i
