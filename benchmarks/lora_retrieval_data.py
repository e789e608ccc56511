"""Synthetic retrieval examples for `ragkit finetune`: a fact hidden in a short window of one corpus's text, a
question about it, the answer as the assistant's turn (docs/lora.md, the worked example).

Facts are passcodes and key -> value pairs phrased several ways (the needle suite's phrasings among them),
at a uniformly drawn depth of a window of WINDOW words taken from the corpus's .txt files. The worked example
evaluates on another genre (novels, corpora/austen), so what is learned must be the task, not the text.

    python benchmarks/lora_retrieval_data.py --corpus corpora/python --count 3000 --window 30 --out runs/lora/train.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTIONS = (
    "Some important facts are hidden in the following text. Read it carefully; a question about them follows.",
    "Read the text below. One sentence in it holds a fact you will be asked about.",
    "The document below contains a piece of information that matters. Find it.",
)
WORDS = ("amber", "brisk", "cobalt", "dusty", "ember", "frosty", "golden", "hollow", "ivory", "jade", "keen",
         "lunar", "misty", "noble", "olive", "polar", "quiet", "rusty", "silent", "tidal")
NOUNS = ("anchor", "badger", "canyon", "dagger", "falcon", "garden", "harbor", "island", "jackal", "kettle",
         "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "raven", "saddle", "tunnel", "willow")


def fact(rng: random.Random) -> tuple[str, str, str]:
    """(sentence to hide, question, answer) of one random fact."""
    kind = rng.randrange(4)
    code = str(rng.randint(10000, 99999))
    key = f"{rng.choice(WORDS)}-{rng.choice(NOUNS)}"
    if kind == 0:
        return (f"The secret passcode is {code}. Remember it.", "What is the secret passcode?",
                f"The secret passcode is {code}.")
    if kind == 1:
        return (f"The access code for the {rng.choice(NOUNS)} vault is {code}.",
                "What is the access code mentioned in the text?", f"The access code is {code}.")
    if kind == 2:
        return (f"One of the special magic numbers for {key} is: {code}.",
                f"What is the special magic number for {key} mentioned in the text?",
                f"The special magic number for {key} is {code}.")
    return (f"The value stored under the key {key} is {code}.", f"Which value is stored under the key {key}?",
            f"The value stored under {key} is {code}.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="corpora/python", help="folder of .txt files for the filler text")
    p.add_argument("--count", type=int, default=3000, help="examples to write")
    p.add_argument("--window", type=int, default=120, help="words of filler text per example")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSONL file to write")
    args = p.parse_args()
    words = " ".join(f.read_text(encoding="utf-8", errors="replace")
                     for f in sorted(Path(args.corpus).rglob("*.txt"))).split()
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for _ in range(args.count):
            start = rng.randrange(len(words) - args.window)
            window = words[start : start + args.window]
            sentence, question, answer = fact(rng)
            at = rng.randint(0, len(window))
            context = " ".join([*window[:at], sentence, *window[at:]])
            user = f"{rng.choice(INSTRUCTIONS)}\n\n{context}\n\n{question}"
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    print(f"{args.count} examples from {len(words)} words of {args.corpus} -> {out}")


if __name__ == "__main__":
    main()
