"""Held-out loss of a `ragkit finetune` run's split, on the base and with the trained adapter (docs/lora.md).

The run's own log scores the held-out split only with the adapter; this scores the same split (rebuilt from
OUT/finetune.json: same data, template, cut and seeded split) on the base model too, both loaded through
LocalLLM, so "the loss went down" is measured on examples the adapter never trained on.

    python benchmarks/lora_heldout_loss.py runs/lora/run --out benchmarks/results/lora_smollm2_cpu/heldout_loss.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ragkit import LocalLLM
from ragkit.files import sha256_file
from ragkit.finetune import FinetuneSettings, held_out_loss, read_examples, training_split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a finished `ragkit finetune` --out directory")
    p.add_argument("--out", type=Path, help="JSON file to write (default: print only)")
    args = p.parse_args()
    recorded = json.loads((args.run / "finetune.json").read_text())["settings"]
    data_sha256 = recorded.pop("data_sha256")
    s = FinetuneSettings(**recorded, out=str(args.run))
    if sha256_file(Path(s.data)) != data_sha256:
        raise SystemExit(f"{s.data} is not the data {args.run} was trained on (sha256 differs)")
    load = ({"quantization": "nf4", "compute_dtype": s.dtype} if s.quant == "nf4" else {"dtype": s.dtype})
    result: dict = {"run": str(args.run), "settings": recorded, "load": load}
    for name, adapter in (("base", None), ("adapter", args.run / "adapter")):
        start = time.perf_counter()
        llm = LocalLLM(s.model, device_map="cpu", adapter=adapter, **load)
        tok = llm.tokenizer
        _, held_out, _ = training_split(read_examples(s.data), tok, s)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        result[f"{name}_loss"] = round(held_out_loss(llm.model, held_out, s.batch_size, pad, "cpu"), 6)
        result[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
        result["held_out_examples"] = len(held_out)
        del llm
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
