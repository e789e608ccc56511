"""Retrieval hit@1/5/10 on corpora/qa/qa.jsonl with ragkit's defaults (MiniLM, 256-token chunks, Flat FAISS).

For each question the top 10 chunks are retrieved from an index of the whole ``corpora/`` directory.

- doc hit@k: a chunk of the gold document is among the top k.
- passage hit@k: a top-k chunk of the gold document overlaps the gold passage *and* contains one of
  the answer strings, i.e. the evidence itself was retrieved (the stricter measure).

    python benchmarks/retrieval_hit_at_k.py                       # builds the index in a temp dir
    python benchmarks/retrieval_hit_at_k.py --index ./demo-index  # reuses (updates) an index of corpora/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
KS = (1, 5, 10)


def judge(row: dict, hits: list, corpus: Path) -> tuple[int | None, int | None]:
    """Rank (1-based) of the first gold-document chunk and of the first evidence chunk, or None."""
    gold_file = str((corpus / row["gold_doc"]).resolve())
    text = Path(gold_file).read_text(encoding="utf-8")
    start = text.index(row["gold_passage"])
    end = start + len(row["gold_passage"])
    doc_rank = passage_rank = None
    for rank, hit in enumerate(hits, 1):
        meta = hit.node.metadata
        if str(Path(meta["file_path"]).resolve()) != gold_file:
            continue
        doc_rank = doc_rank or rank
        overlaps = meta["char_start"] < end and meta["char_end"] > start
        if passage_rank is None and overlaps and any(a in hit.node.get_content() for a in row["answers"]):
            passage_rank = rank
    return doc_rank, passage_rank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=ROOT / "corpora")
    ap.add_argument("--qa", type=Path, default=ROOT / "corpora" / "qa" / "qa.jsonl")
    ap.add_argument("--index", type=Path, default=None, help="index directory to build or reuse")
    ap.add_argument("--chunk-tokens", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "retrieval_hit_at_k.json")
    args = ap.parse_args()

    import llama_index.core
    import sentence_transformers
    import torch

    from ragkit.pipeline import Pipeline

    rows = [json.loads(line) for line in args.qa.read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        index = args.index or Path(tmp) / "index"
        pipeline = Pipeline(index, chunk_tokens=args.chunk_tokens)
        t0 = time.perf_counter()
        summary = pipeline.ingest([args.corpus], show_progress=True)
        ingest_s = time.perf_counter() - t0
        print(summary)
        counts = {k: {"doc": 0, "passage": 0} for k in KS}
        by_corpus: dict[str, dict[str, int]] = defaultdict(lambda: {"n": 0, "doc@5": 0, "passage@5": 0})
        misses = []
        t0 = time.perf_counter()
        for row in rows:
            hits = pipeline.retrieve(row["question"], top_k=max(KS))
            doc_rank, passage_rank = judge(row, hits, args.corpus)
            for k in KS:
                counts[k]["doc"] += doc_rank is not None and doc_rank <= k
                counts[k]["passage"] += passage_rank is not None and passage_rank <= k
            group = by_corpus[row["gold_doc"].split("/")[0]]
            group["n"] += 1
            group["doc@5"] += doc_rank is not None and doc_rank <= 5
            group["passage@5"] += passage_rank is not None and passage_rank <= 5
            if passage_rank is None or passage_rank > 5:
                misses.append({"id": row["id"], "question": row["question"], "doc_rank": doc_rank,
                               "passage_rank": passage_rank,
                               "top1": Path(hits[0].node.metadata["file_path"]).name if hits else None})
        query_s = time.perf_counter() - t0
        info = pipeline.info()
    n = len(rows)
    result = {
        "benchmark": "retrieval_hit_at_k",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(),
                    "versions": {"torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__,
                                 "llama_index_core": llama_index.core.__version__}},
        "setup": {"embedder": info["embedder"], "chunk_tokens": info["chunk_tokens"], "store": info.get("store_kind"),
                  "chunks": info["chunks"], "files": info["sources"], "questions": n},
        "doc_hit": {f"@{k}": counts[k]["doc"] / n for k in KS},
        "passage_hit": {f"@{k}": counts[k]["passage"] / n for k in KS},
        "by_corpus_at_5": {c: {"n": g["n"], "doc": g["doc@5"] / g["n"], "passage": g["passage@5"] / g["n"]}
                           for c, g in sorted(by_corpus.items())},
        "ingest_s": round(ingest_s, 1), "retrieve_ms_per_query": round(1000 * query_s / n, 1),
        "target": "hit@5 >= 0.8",
        "passage_misses_at_5": misses,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("setup", "doc_hit", "passage_hit", "by_corpus_at_5")}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
