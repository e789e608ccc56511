"""Ingestion throughput: ragkit's pipeline vs raw ``SentenceTransformer.encode`` on the same chunks.

Measured on the committed corpora (SQLite + Python docs), repeated and interleaved (pipeline, raw,
pipeline, raw, ...) so that load from other processes hits both alike. Each run reports wall time
and process CPU time (all threads); on a shared machine the CPU-time ratios are the steadier ones.

- pipeline: ``Ingestor.ingest`` of all files into a fresh FAISS store (read, split, embed, store).
- raw: ``SentenceTransformer.encode(chunks, batch_size=32, normalize_embeddings=True)`` on exactly
  the chunk texts the pipeline produced (no reading, splitting or storing).
- splitting: ragkit's ``TokenChunker`` on the same documents, and, once, LlamaIndex's
  ``SentenceSplitter`` (chunk_size 254 with the same tokenizer) for comparison.

Targets (issue 3): pipeline throughput >= 0.9x raw encode; splitting < 20% of embedding time.

    python benchmarks/ingest_throughput.py                 # whole corpora/, 3 repeats
    python benchmarks/ingest_throughput.py --repeats 1 --max-files 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def timed(fn):  # type: ignore[no-untyped-def]
    """(result, wall seconds, process CPU seconds) of ``fn()``."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def machine() -> dict:
    import faiss
    import llama_index.core
    import sentence_transformers
    import tokenizers
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "cpu": cpu, "cores_visible": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sentence_transformers": sentence_transformers.__version__, "tokenizers": tokenizers.__version__,
                     "llama_index_core": llama_index.core.__version__, "faiss": faiss.__version__},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=ROOT / "corpora")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-files", type=int, default=None, help="only the first N files (sorted)")
    ap.add_argument("--out", type=Path, default=RESULTS / "ingest_throughput.json")
    args = ap.parse_args()

    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.schema import Document

    from ragkit.embed import SentenceTransformerEmbedding
    from ragkit.ingest import Ingestor
    from ragkit.readers import discover, read_parts
    from ragkit.store import FaissVectorStore

    info = machine()
    embedder = SentenceTransformerEmbedding("default")
    files, _ = discover([args.corpus])
    files = files[: args.max_files] if args.max_files else files
    docs = [Document(id_=str(f), text=p.text) for f in files for p in read_parts(f)]
    chars = sum(len(d.text) for d in docs)
    print(f"{len(files)} files, {chars / 1e6:.2f} M chars; load avg {os.getloadavg()}")

    def ingest_once():  # type: ignore[no-untyped-def]
        ingestor = Ingestor(embedder, FaissVectorStore.from_embedder(embedder))
        summary = ingestor.ingest(files, show_progress=False)
        return ingestor, summary

    # warm-up (first-call overheads), and the chunk texts the raw encoder will get
    ingestor, summary = ingest_once()
    nodes = ingestor.vector_store.get_nodes()
    texts = [n.get_content() for n in nodes]
    tokens = sum(len(e.ids) for e in ingestor.splitter.chunker.backend.encode_batch(texts))
    model = embedder.model

    li_splitter = SentenceSplitter(chunk_size=254, chunk_overlap=0,
                                   tokenizer=lambda t: embedder.tokenizer.encode(t, add_special_tokens=False))
    li_nodes, w4, c4 = timed(lambda: li_splitter.get_nodes_from_documents(docs))
    runs: dict[str, list[tuple[float, float]]] = {"pipeline": [], "raw_encode": [], "split_ragkit": []}

    def write(runs: dict[str, list[tuple[float, float]]]) -> None:
        med = {k: {"wall_s": statistics.median(x[0] for x in v), "cpu_s": statistics.median(x[1] for x in v),
                   "runs": [{"wall_s": round(a, 3), "cpu_s": round(b, 3)} for a, b in v]} for k, v in runs.items()}
        med["split_llamaindex_sentence_splitter"] = {"wall_s": w4, "cpu_s": c4, "chunks": len(li_nodes), "runs": 1}
        n = len(texts)
        result = {
            "benchmark": "ingest_throughput",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": info, "load_avg_at_end": os.getloadavg(),
            "corpus": {"files": len(files), "chars": chars, "chunks": n, "tokens_incl_special": tokens,
                       "chunk_tokens_max": ingestor.splitter.chunker.max_tokens},
            "repeats": len(runs["pipeline"]), "timings_median": med,
            "pipeline_chunks_per_s": n / med["pipeline"]["wall_s"], "pipeline_tokens_per_s": tokens / med["pipeline"]["wall_s"],
            "raw_chunks_per_s": n / med["raw_encode"]["wall_s"], "raw_tokens_per_s": tokens / med["raw_encode"]["wall_s"],
            "ratio_pipeline_vs_raw_wall": med["raw_encode"]["wall_s"] / med["pipeline"]["wall_s"],
            "ratio_pipeline_vs_raw_cpu": med["raw_encode"]["cpu_s"] / med["pipeline"]["cpu_s"],
            "split_over_embed_wall": med["split_ragkit"]["wall_s"] / med["raw_encode"]["wall_s"],
            "split_over_embed_cpu": med["split_ragkit"]["cpu_s"] / med["raw_encode"]["cpu_s"],
            "llamaindex_split_over_embed_wall": w4 / med["raw_encode"]["wall_s"],
            "llamaindex_split_over_embed_cpu": c4 / med["raw_encode"]["cpu_s"],
            "targets": {"ratio_pipeline_vs_raw": ">= 0.9", "split_over_embed": "< 0.2"},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "timings_median")}, indent=1))

    for r in range(args.repeats):
        _, w, c = timed(ingest_once)
        runs["pipeline"].append((w, c))
        _, w2, c2 = timed(lambda: model.encode(texts, batch_size=32, normalize_embeddings=True,
                                               convert_to_numpy=True, show_progress_bar=False))
        runs["raw_encode"].append((w2, c2))
        _, w3, c3 = timed(lambda: ingestor.splitter.chunker.split_many([d.text for d in docs]))
        runs["split_ragkit"].append((w3, c3))
        print(f"repeat {r + 1}: pipeline {w:.1f} s wall / {c:.1f} s cpu; raw encode {w2:.1f} / {c2:.1f}; "
              f"split {w3:.2f} / {c3:.2f}; load {os.getloadavg()[0]:.1f}")
        write(runs)  # after every repeat: an interrupted run still leaves its results

    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
