"""evals/token_cache.py: prompt texts are tokenized once per run directory, also across a resume, and the
cached ids are exactly the codec's (the embedded SmolLM2's, real haystack text)."""

from __future__ import annotations

from evals.needle.haystack import Estimator, Frame, SentencePool, fit_prompt
from evals.needle.needles import make_needle
from evals.core.targets import LLMCodec, tokenizer_fingerprint
from evals.needle.token_cache import CachedCodec


def _fit(codec, pool, depth):
    needle = make_needle("passcode", 1)
    frame = Frame(needle.instruction, needle.question, needle.answer_prefix)
    return fit_prompt(codec, pool, frame, needle.sentences, (depth,), 1024, 16, Estimator(codec, pool))


def test_a_resumed_run_finds_every_prompt_already_tokenized(tmp_path, smollm2, repo_root):
    plain = LLMCodec(smollm2)  # the codec of the runs (its model is never called here)
    pool = SentencePool.from_paths([repo_root / "corpora" / "sqlite"])
    fp = tokenizer_fingerprint(smollm2.tokenizer)
    first = CachedCodec(plain, tmp_path / "tokens", fp)
    built = [_fit(first, pool, d) for d in (0, 50, 100)]
    assert [b.ids for b in built] == [_fit(plain, pool, d).ids for d in (0, 50, 100)]
    assert first.misses > 0 and first.hits > 0  # texts recur within a run (e.g. the final prompt of each fit)
    resumed = CachedCodec(plain, tmp_path / "tokens", fp)
    again = [_fit(resumed, pool, d) for d in (0, 50, 100)]
    assert [b.ids for b in again] == [b.ids for b in built] and [b.needle_offsets for b in again] == [
        b.needle_offsets for b in built]
    assert resumed.misses == 0 and resumed.hits == first.hits + first.misses
    other = CachedCodec(plain, tmp_path / "tokens", fp + "-other tokenizer")
    assert other.encode(built[0].text) == built[0].ids and other.misses == 1
