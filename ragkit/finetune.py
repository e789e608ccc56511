"""Train a LoRA adapter (QLoRA on an NF4 base, or LoRA on a bf16/fp32 one) from a JSONL of chat examples.

Each line is ``{"messages": [{"role": ..., "content": ...}, ...]}``; the conversation is rendered with the
model's own chat template (the one LocalLLM prompts with) and the loss is taken on assistant tokens only.
A seeded held-out split is scored at every ``eval_every`` steps and at the end. Training resumes from its last
checkpoint after a kill (even SIGKILL) to the same loss curve as an uninterrupted run: a checkpoint holds the
adapter, the optimizer and scheduler, the RNG state and the loss history, and is renamed into place whole;
the data order of a step depends on the seed and the step alone. The adapter is written as a PEFT directory
(``OUT/adapter``) that ``LocalLLM(adapter=...)`` and ``--adapter`` load. See docs/lora.md.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ragkit import loading, models
from ragkit.errors import FinetuneError
from ragkit.files import fsync_path, sha256_file

IGNORE = -100  # label of a token the loss skips
ROLES = ("system", "user", "assistant")


class FinetuneSettings(BaseModel):
    """Everything that decides the trained adapter (run control: ``resume``, ``progress``)."""

    model_config = ConfigDict(extra="forbid")

    data: str
    out: str
    model: str = "default"
    quant: Literal["nf4", "none"] = "nf4"
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # compute dtype (nf4) or weights dtype (none)
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lr: float = Field(2e-4, gt=0)
    warmup: int = Field(10, ge=0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    max_tokens: int = Field(512, ge=16)
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    eval_every: int = Field(50, ge=1)
    save_every: int = Field(25, ge=1)
    seed: int = 0
    device: str | None = None  # None: cuda when present, else cpu
    resume: bool = False
    progress: bool = True

    def hashed(self) -> dict[str, Any]:
        """The settings a resumed run must share with the one it continues (the data by its sha256)."""
        return {**self.model_dump(exclude={"resume", "progress", "device", "out"}),
                "data_sha256": sha256_file(Path(self.data))}


def settings(**kw: Any) -> FinetuneSettings:
    """FinetuneSettings, with a validation failure as a FinetuneError that names the setting."""
    try:
        return FinetuneSettings(**kw)
    except ValidationError as exc:
        bad = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise FinetuneError(f"finetune settings: {bad}") from None


# ---------------------------------------------------------------- data


def read_examples(path: str | Path) -> list[list[dict[str, str]]]:
    """The ``messages`` of every line of a JSONL file; FinetuneError names the file, line and fault."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"training data {path}: no such file; pass a JSONL file of {{\"messages\": [...]}} lines")
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"training data {path}, line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FinetuneError(f"{where}: not JSON ({exc})") from None
            messages = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(messages, list) or not messages:
                raise FinetuneError(f"{where}: needs a non-empty \"messages\" list of {{role, content}}")
            for m in messages:
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise FinetuneError(f"{where}: each message needs a role ({', '.join(ROLES)}) and a string content")
            if not any(m["role"] == "assistant" for m in messages):
                raise FinetuneError(f"{where}: no assistant message, so nothing to learn from")
            examples.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if len(examples) < 2:
        raise FinetuneError(f"training data {path}: {len(examples)} example(s); at least 2 are needed")
    return examples


def encode_example(tokenizer: Any, messages: list[dict[str, str]], max_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids of the templated conversation and their labels: the ids on assistant turns (their text and
    end-of-turn tokens as the template writes them), IGNORE elsewhere; cut at ``max_tokens``."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise FinetuneError("the model's chat template does not render a conversation's turns as prefixes of "
                                "each other, so assistant tokens cannot be told apart; use a model whose template does")
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = [], []
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [bos] and \
            enc["input_ids"][:1] != [bos]:
        ids, labels = [bos], [IGNORE]  # as LocalLLM.encode_prompt: one BOS, never two
    for tok, (start, _) in zip(enc["input_ids"], enc["offset_mapping"]):
        ids.append(tok)
        labels.append(tok if any(a <= start < b for a, b in spans) else IGNORE)
    return ids[:max_tokens], labels[:max_tokens]


def split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train and held-out indices: a seeded shuffle, at least one held out when ``fraction`` > 0."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(n * fraction)) if fraction > 0 else 0
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def _batch(rows: list[tuple[list[int], list[int]]], pad: int) -> dict[str, Any]:
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


Rows = list[tuple[list[int], list[int]]]  # (token ids, labels) per example


def training_split(examples: list[list[dict[str, str]]], tokenizer: Any, s: FinetuneSettings) -> tuple[Rows, Rows, int]:
    """(train rows, held-out rows, examples dropped for keeping no assistant token within ``max_tokens``)."""
    encoded = [encode_example(tokenizer, m, s.max_tokens) for m in examples]
    usable = [row for row in encoded if any(t != IGNORE for t in row[1])]
    train_idx, eval_idx = split(len(usable), s.eval_fraction, s.seed)
    return [usable[i] for i in train_idx], [usable[i] for i in eval_idx], len(encoded) - len(usable)


def held_out_loss(model: Any, rows: Rows, batch_size: int, pad: int, device: str) -> float:
    """Mean loss per assistant token of ``rows`` (the model is left in eval mode)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(rows), batch_size):
            batch = {n: t.to(device) for n, t in _batch(rows[k : k + batch_size], pad).items()}
            n_tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
            total += float(model(**batch).loss) * n_tokens
            count += n_tokens
    return total / max(count, 1)


def batch_indices(step: int, n_train: int, batch_size: int, seed: int) -> list[int]:
    """The training rows of ``step`` (0-based): epoch e's rows in a permutation seeded by (seed, e)."""
    import torch

    per_epoch = math.ceil(n_train / batch_size)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return order[k * batch_size : (k + 1) * batch_size]


# ---------------------------------------------------------------- checkpoints


def _checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    return sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if root.is_dir() else []


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        fsync_path(f)
    fsync_path(path, directory=True)


def _save_checkpoint(out: Path, step: int, peft_model: Any, optimizer: Any, scheduler: Any,
                     history: list[dict[str, Any]], keep: int = 2) -> None:
    """Write the state after ``step`` steps into a temp directory, fsync it, rename it into place."""
    import torch

    root = out / "checkpoints"
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, tmp / "state.pt")
    (tmp / "history.json").write_text(json.dumps({"step": step, "history": history}))
    _fsync_dir(tmp)
    os.replace(tmp, root / f"step-{step}")
    fsync_path(root, directory=True)
    for old in _checkpoints(out)[:-keep]:
        shutil.rmtree(old)


def _load_checkpoint(ckpt: Path, peft_model: Any, optimizer: Any, scheduler: Any) -> tuple[int, list[dict]]:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(peft_model, load_file(ckpt / "adapter_model.safetensors"))
    state = torch.load(ckpt / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    meta = json.loads((ckpt / "history.json").read_text())
    return meta["step"], meta["history"]


def _open_out(s: FinetuneSettings) -> Path | None:
    """Create OUT (or check it on resume); the checkpoint to resume from, if any."""
    out = Path(s.out)
    record = out / "finetune.json"
    if record.exists():
        if not s.resume:
            raise FinetuneError(f"{out} already holds a finetune run; pass --resume to continue it, or choose "
                                "another --out (nothing was changed)")
        old, new = json.loads(record.read_text())["settings"], json.loads(json.dumps(s.hashed()))
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise FinetuneError(f"{out} was trained with other settings (differ: {', '.join(diff)}); resume with the "
                                "same settings, or choose another --out (nothing was changed)")
        ckpts = _checkpoints(out)
        return ckpts[-1] if ckpts else None
    if out.exists() and any(out.iterdir()):
        raise FinetuneError(f"{out} is not empty and holds no finetune run; choose another --out")
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"settings": s.hashed()}, indent=2) + "\n")
    return None


# ---------------------------------------------------------------- training


def finetune(s: FinetuneSettings) -> Path:
    """Train (or resume) the adapter that ``s`` describes; returns the PEFT directory ``OUT/adapter``."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from tqdm.auto import tqdm

    examples = read_examples(s.data)  # bad data fails before the model loads
    directory = models.local_dir(models.resolve_llm(s.model))
    resume_from = _open_out(s)
    out = Path(s.out)
    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = loading.load_tokenizer(directory)
    train, held_out, dropped = training_split(examples, tokenizer, s)
    if not train:
        raise FinetuneError(f"training data {s.data}: no example keeps an assistant token within {s.max_tokens} "
                            "tokens; raise --max-tokens")

    torch.manual_seed(s.seed)
    quantized = s.quant == "nf4"
    base = loading.load_model(directory, quantization="nf4" if quantized else None, compute_dtype=s.dtype,
                             dtype=None if quantized else s.dtype, device_map=device)
    if quantized:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    lora_config = LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=s.targets,
                             task_type="CAUSAL_LM", bias="none")
    try:
        peft_model = get_peft_model(base, lora_config)
    except ValueError as exc:
        raise FinetuneError(f"--targets {s.targets}: {exc}") from None
    params = [p for p in peft_model.parameters() if p.requires_grad]
    steps = s.max_steps or s.epochs * math.ceil(len(train) / s.batch_size)
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / (s.warmup + 1)) * max(0.0, 1 - k / steps))
    step, history = (0, [])
    if resume_from is not None:
        step, history = _load_checkpoint(resume_from, peft_model, optimizer, scheduler)
    _rewrite_log(out / "losses.jsonl", history)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    peft_model.train()
    bar = tqdm(total=steps, initial=step, desc=f"finetune {Path(s.data).name}", unit="step",
               disable=not s.progress, mininterval=5.0, dynamic_ncols=False)
    with open(out / "losses.jsonl", "a", encoding="utf-8") as log:
        while step < steps:
            start = time.perf_counter()
            rows = [train[i] for i in batch_indices(step, len(train), s.batch_size, s.seed)]
            batch = {n: t.to(device) for n, t in _batch(rows, pad).items()}
            loss = peft_model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens = int(batch["attention_mask"].sum())
            row: dict[str, Any] = {"step": step, "loss": round(float(loss), 6), "tokens": tokens,
                                   "lr": scheduler.get_last_lr()[0]}
            if held_out and (step % s.eval_every == 0 or step == steps):
                row["eval_loss"] = round(held_out_loss(peft_model, held_out, s.batch_size, pad, device), 6)
                peft_model.train()
            history.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}",
                            refresh=False)
            bar.update()
            if step % s.save_every == 0 or step == steps:
                _save_checkpoint(out, step, peft_model, optimizer, scheduler, history)
    bar.close()
    adapter = out / "adapter"
    shutil.rmtree(adapter, ignore_errors=True)
    peft_model.save_pretrained(adapter)
    summary = {"train_examples": len(train), "eval_examples": len(held_out),
               "dropped_examples": dropped, "steps": steps, "device": device,
               "train_tokens": sum(r["tokens"] for r in history),
               "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
               "eval_losses": [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return adapter


def _rewrite_log(path: Path, history: list[dict[str, Any]]) -> None:
    """The loss log as the checkpoint knows it (rows written after it, before a kill, are dropped)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    os.replace(tmp, path)
