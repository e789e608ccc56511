"""`ragkit finetune` on the embedded SmolLM2 (CPU): assistant-only labels from the model's chat template, bad data
and output directories refused before the model loads, and a SIGKILLed run that resumes to the same loss curve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ragkit import FinetuneError, LocalLLM
from ragkit.finetune import IGNORE, encode_example, finetune, read_examples, settings, split


def _data(path, n=12):
    rows = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        rows.append({"messages": [{"role": "user", "content": f"Add {a} and {b}. Answer with the number."},
                                  {"role": "assistant", "content": f"The sum is {a + b}."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_labels_are_the_assistant_turns(smollm2_tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green."}]
    ids, labels = encode_example(smollm2_tokenizer, messages, 512)
    assert len(ids) == len(labels)
    learned = smollm2_tokenizer.decode([t for t in labels if t != IGNORE])
    assert learned == "Blue.<|im_end|>\nGreen.<|im_end|>\n"
    assert ids == smollm2_tokenizer(smollm2_tokenizer.apply_chat_template(messages, tokenize=False),
                                    add_special_tokens=False)["input_ids"]


def test_prompt_ids_match_what_local_llm_sends(smollm2_tokenizer, smollm2):
    """The prompt part of a training example is token for token what LocalLLM feeds the model at inference."""
    messages = [{"role": "user", "content": "What is the secret passcode?"},
                {"role": "assistant", "content": "The secret passcode is 12345."}]
    ids, labels = encode_example(smollm2_tokenizer, messages, 512)
    prompt = smollm2.encode_prompt(smollm2.chat_prompt("What is the secret passcode?"))
    assert ids[: len(prompt)] == prompt and all(t == IGNORE for t in labels[: len(prompt)])
    assert labels[len(prompt)] != IGNORE


def test_bad_data_is_named_with_its_line(tmp_path):
    with pytest.raises(FinetuneError, match=r"training data .*missing.jsonl: no such file"):
        read_examples(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   "{not json\n")
    with pytest.raises(FinetuneError, match=r"bad.jsonl, line 2: not JSON"):
        read_examples(bad)
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n' * 3)
    with pytest.raises(FinetuneError, match=r"line 1: no assistant message"):
        read_examples(bad)
    bad.write_text('{"messages": [{"role": "robot", "content": "hi"}]}\n')
    with pytest.raises(FinetuneError, match=r"line 1: each message needs a role \(system, user, assistant\)"):
        read_examples(bad)
    with pytest.raises(FinetuneError, match=r"finetune settings: rank: Input should be greater than or equal to 1"):
        settings(data=str(bad), out=str(tmp_path / "o"), rank=0)


def test_split_is_seeded_and_disjoint():
    train, held = split(100, 0.1, seed=3)
    assert len(held) == 10 and not set(train) & set(held) and sorted(train + held) == list(range(100))
    assert split(100, 0.1, seed=3) == (train, held) and split(100, 0.1, seed=4) != (train, held)


def test_out_directory_is_never_overwritten(tmp_path):
    data = _data(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FinetuneError, match=r"out is not empty and holds no finetune run"):
        finetune(settings(data=str(data), out=str(out)))
    assert (out / "keep.txt").read_text() == "mine"
    run = tmp_path / "run"
    run.mkdir()
    (run / "finetune.json").write_text(json.dumps({"settings": settings(data=str(data), out=str(run)).hashed()}))
    with pytest.raises(FinetuneError, match=r"already holds a finetune run; pass --resume"):
        finetune(settings(data=str(data), out=str(run)))
    with pytest.raises(FinetuneError, match=r"was trained with other settings \(differ: rank\)"):
        finetune(settings(data=str(data), out=str(run), rank=4, resume=True))
    _data(data, n=25)
    with pytest.raises(FinetuneError, match=r"was trained with other settings \(differ: data_sha256\)"):
        finetune(settings(data=str(data), out=str(run), resume=True))


def _command(data, out, *extra):
    return [sys.executable, "-m", "ragkit.cli", "finetune", str(data), "--out", str(out), "--quant", "none",
            "--dtype", "float32", "--max-steps", "6", "--batch-size", "2", "--save-every", "2", "--eval-every", "3",
            "--warmup", "2", "--lr", "1e-3", "--seed", "7", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _losses(out):
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_loss_curve(tmp_path):
    data = _data(tmp_path / "d.jsonl")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_command(data, whole), check=True, env=_env(), timeout=900, capture_output=True)
    proc = subprocess.Popen(_command(data, killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "step-2").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists()  # it died mid-run
    done = subprocess.run(_command(data, killed, "--resume"), env=_env(), timeout=900, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = _losses(whole), _losses(killed)
    assert [r["step"] for r in a] == list(range(1, 7)) == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), (ra, rb)
        assert rb.get("eval_loss") == pytest.approx(ra.get("eval_loss"), abs=1e-5)
    assert min(r["loss"] for r in a[3:]) < a[0]["loss"]  # it learned something
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (killed / "adapter" / f).is_file()
    llm = LocalLLM("default", dtype="float32", adapter=killed / "adapter")
    assert llm.adapters[0]["r"] == 8


def test_cli_refuses_bad_data_with_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    done = subprocess.run([sys.executable, "-m", "ragkit.cli", "finetune", str(bad), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "bad.jsonl, line 1: not JSON" in done.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_qlora_on_the_nf4_base_trains_an_adapter_that_loads_on_nf4(tmp_path):
    from safetensors.torch import load_file

    data = _data(tmp_path / "d.jsonl", n=8)
    adapter = finetune(settings(data=str(data), out=str(tmp_path / "q"), quant="nf4", dtype="float32", max_steps=2,
                                batch_size=2, save_every=2, eval_every=2, progress=False))
    rows = _losses(tmp_path / "q")
    assert [r["step"] for r in rows] == [1, 2] and all(0 < r["loss"] < 20 for r in rows) and "eval_loss" in rows[-1]
    trained = load_file(adapter / "adapter_model.safetensors")
    assert any(".lora_B." in k and t.abs().max() > 0 for k, t in trained.items())  # B starts at zero; it moved
    llm = LocalLLM("default", quantization="nf4", compute_dtype="float32", adapter=adapter)
    assert type(llm.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert llm.complete("Add 1 and 2. Answer with the number.", max_new_tokens=6).text
