"""Multi-document QA data: questions with gold passages, the corpus passage pool, and distractor selection.

The pool holds every paragraph (a blank-line separated block) of the corpora with 40 to 150 words of mostly
prose — the granularity of the gold passages in ``corpora/qa/qa.jsonl``. A passage may serve as a distractor
for a question only if the scorer would NOT credit it as an answer (no gold answer occurs in it, after
normalization) and it is not part of the gold passage.

``hard`` distractors are the allowed passages most similar to the question by the embedder (MiniLM vectors,
FAISS inner product = cosine), in order of decreasing similarity — the design of Liu et al. (2024), who used
Contriever. ``random`` distractors are a seeded sample of allowed passages. The list depends only on the
question (and seed), never on where the gold passage goes: across positions only the gold moves.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

import numpy as np

from evals.core.answers import field_match, first_object
from evals.core.errors import SettingsError
from evals.core.files import text_files
from evals.core.scoring import ANY, UUID, answer_match, normalize_squad, strict_match

MIN_WORDS, MAX_WORDS = 40, 150
DISTRACTORS = ("hard", "random")
T = TypeVar("T")


@dataclass(frozen=True)
class QAItem:
    """One question of corpora/qa/qa.jsonl."""

    id: str
    question: str
    answers: tuple[str, ...]
    gold_doc: str
    gold_passage: str


def load_qa(path: str | Path) -> list[QAItem]:
    """The QA file as items; a malformed line names its line number."""
    p = Path(path)
    if not p.is_file():
        raise SettingsError(f"QA file {str(p)!r} does not exist; the default is corpora/qa/qa.jsonl")
    items = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            items.append(QAItem(d["id"], d["question"], tuple(d["answers"]), d["gold_doc"], d["gold_passage"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SettingsError(f"{p}:{n} is not a QA row with id, question, answers, gold_doc, gold_passage "
                                f"({e}); fix or remove that line") from None
    if not items:
        raise SettingsError(f"QA file {str(p)!r} has no questions")
    return items


def select_questions(items: Sequence[QAItem], n: int, seed: int) -> list[QAItem]:
    """``n`` questions drawn without replacement by ``seed`` (the same seed always draws the same ones)."""
    if not 1 <= n <= len(items):
        raise SettingsError(f"--questions {n}: choose between 1 and {len(items)} (the QA file's size)")
    order = list(items)
    random.Random(f"questions:{seed}").shuffle(order)
    return order[:n]


def _is_prose(block: str) -> bool:
    words = block.split()
    return MIN_WORDS <= len(words) <= MAX_WORDS and sum(c.isalpha() for c in block) > 0.6 * len(block)


@dataclass(frozen=True)
class PassagePool:
    """Every prose paragraph of the corpus files (text as in the file), with its file and a fingerprint."""

    passages: tuple[str, ...]
    sources: tuple[str, ...]
    fingerprint: str

    @classmethod
    def from_paths(cls, paths: Sequence[str | Path]) -> PassagePool:
        files = text_files(paths, (".txt",), "corpus path {path!r} does not exist; give folders of .txt files")
        passages, sources = [], []
        for f in files:
            for block in f.read_text(encoding="utf-8", errors="replace").split("\n\n"):
                if _is_prose(block):
                    passages.append(block.strip())
                    sources.append(f"{f.parent.name}/{f.name}")
        if len(passages) < 30:
            raise SettingsError(f"corpus {[str(p) for p in paths]} has only {len(passages)} paragraphs of "
                                f"{MIN_WORDS}-{MAX_WORDS} words; give more text")
        digest = hashlib.sha256("\n\n".join(passages).encode()).hexdigest()[:16]
        return cls(tuple(passages), tuple(sources), digest)


def allowed(passage: str, item: QAItem) -> bool:
    """May ``passage`` be a distractor for ``item``: no gold answer in it, and not a piece of the gold passage."""
    if passage in item.gold_passage or item.gold_passage in passage:
        return False
    return not answer_match(passage, item.answers)


class Distractors:
    """Chooses distractor passages from a pool; embeddings (hard mode) are computed once and cached on disk."""

    def __init__(self, pool: PassagePool, embedder: Any = None, cache_dir: Path | None = None):
        self.pool, self.embedder, self.cache_dir = pool, embedder, cache_dir
        self._index: Any = None

    def random(self, item: QAItem, n: int, seed: int) -> list[int]:
        """``n`` allowed pool ids, a seeded sample (same item and seed: same list)."""
        order = list(range(len(self.pool.passages)))
        random.Random(f"distractors:{seed}:{item.id}").shuffle(order)
        return self._take(item, order, n)

    def hard(self, item: QAItem, n: int) -> list[int]:
        """The ``n`` allowed pool ids most similar to the question, most similar first."""
        index = self._faiss()
        query = np.asarray([self.embedder.get_query_embedding(item.question)], dtype="float32")
        _, ids = index.search(query, len(self.pool.passages))
        return self._take(item, [int(i) for i in ids[0] if i >= 0], n)

    def _take(self, item: QAItem, order: Sequence[int], n: int) -> list[int]:
        out = []
        for i in order:
            if allowed(self.pool.passages[i], item):
                out.append(i)
                if len(out) == n:
                    return out
        raise SettingsError(f"question {item.id} has only {len(out)} possible distractors, {n} are needed; "
                            "use fewer --docs or a larger corpus")

    def _faiss(self) -> Any:
        if self._index is None:
            import faiss

            vectors = self.embeddings()
            self._index = faiss.IndexFlatIP(vectors.shape[1])
            self._index.add(vectors)
        return self._index

    def embeddings(self) -> np.ndarray:
        """Normalized embeddings of the whole pool (cached as .npy keyed by pool fingerprint and embedder)."""
        if self.embedder is None:
            raise SettingsError("hard distractors need an embedder; pass one, or use --distractors random")
        name = hashlib.sha256(self.embedder.model_name.encode()).hexdigest()[:8]
        path = self.cache_dir / f"passages-{self.pool.fingerprint}-{name}.npy" if self.cache_dir else None
        if path is not None and path.exists():
            vectors = np.load(path)
            if vectors.shape[0] == len(self.pool.passages):
                return vectors
        texts = [" ".join(p.split()) for p in self.pool.passages]
        vectors = np.asarray(self.embedder.get_text_embedding_batch(texts, show_progress=True), dtype="float32")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, vectors)
            tmp.replace(path)
        return vectors


def place_gold(distractors: Sequence[T], gold: T, position: int) -> list[T]:
    """The documents of a prompt: the distractors in their order with the gold passage inserted at ``position``."""
    if not 0 <= position <= len(distractors):
        raise SettingsError(f"gold position {position} is outside 0..{len(distractors)}")
    docs = list(distractors)
    docs.insert(position, gold)
    return docs


def qa_scores(answer: str, golds: Sequence[str], task: str, json_field: str | None = None) -> dict[str, Any]:
    """Strict and lenient verdicts of a lost-in-the-middle answer: QA golds are aliases (one suffices, compared
    SQuAD-normalized); a key-value answer must commit to the asked UUID and claim no other one. ``json_field``:
    strict judges only that field of the answer's JSON object (a key-value one must equal the UUID); lenient
    reads the whole text either way."""
    lenient = answer_match(answer, golds)
    if json_field is not None:
        value = first_object(answer)
        field = value.get(json_field) if isinstance(value, dict) else None
        if task == "kv":
            found = field_match(value, {json_field: golds[0]})[1]
        else:
            found = isinstance(field, str) and any(strict_match(field, [g], ANY, normalize_squad).found for g in golds)
    elif task == "kv":
        found = strict_match(answer, golds, UUID).found
    else:
        found = any(strict_match(answer, [g], ANY, normalize_squad).found for g in golds)
    return {"score_strict": float(found), "found_strict": found, "score_lenient": float(lenient),
            "found_lenient": lenient}
