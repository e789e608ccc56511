"""Store writes and queries: pgvector (exact, HNSW) on a real local Postgres vs ragkit's FAISS (flat, HNSW).

The chunks of ``--corpus`` are embedded once with the embedded MiniLM (time reported apart); ``--synthetic N``
adds N random normalized 384-d chunks. Each store then gets the same nodes: write rate (chunks/s, the
store's add + commit, embedding excluded), query latency p50/p95 at top 10 for ``--queries`` queries
(embeddings of held-out chunk texts, i.e. realistic queries), recall@10 against FAISS flat (exact).

    python benchmarks/pgvector_vs_faiss.py --corpus corpora/sqlite --out benchmarks/results/pgvector_vs_faiss.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.schema import Document, TextNode
from llama_index.core.vector_stores.types import VectorStoreQuery
from tqdm import tqdm

from ragkit.chunking import TokenSentenceSplitter
from ragkit.embed import SentenceTransformerEmbedding
from ragkit.store import FaissVectorStore
from ragkit.store.local_postgres import LocalPostgres
from ragkit.store.pgvector import StoreState, open_pg_store


def embed_corpus(corpus: Path, embedder: SentenceTransformerEmbedding) -> tuple[list[TextNode], float]:
    docs = [Document(id_=str(p), text=p.read_text(errors="replace"), metadata={"file_path": str(p)})
            for p in sorted(corpus.rglob("*.txt"))]
    splitter = TokenSentenceSplitter(embedder.tokenizer, embedder.max_seq_length)
    started = time.perf_counter()
    nodes = IngestionPipeline(transformations=[splitter, embedder], disable_cache=True).run(
        documents=docs, show_progress=True)
    return list(nodes), time.perf_counter() - started


def synthetic(n: int, dim: int, seed: int = 0) -> list[TextNode]:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return [TextNode(id_=f"syn{i}", text=f"synthetic chunk {i}", embedding=v[i].tolist(),
                     metadata={"file_path": f"syn{i // 100}"}) for i in range(n)]


def time_queries(store, queries: list[list[float]]) -> tuple[list[float], list[list[str]]]:
    times, ids = [], []
    for q in queries:
        t = time.perf_counter()
        r = store.query(VectorStoreQuery(query_embedding=q, similarity_top_k=10))
        times.append(time.perf_counter() - t)
        ids.append([n.node_id for n in r.nodes])
    return times, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("corpora/sqlite"))
    ap.add_argument("--synthetic", type=int, default=0)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pgvector_vs_faiss.json")
    args = ap.parse_args()

    embedder = SentenceTransformerEmbedding("default")
    nodes, embed_s = embed_corpus(args.corpus, embedder)
    n_corpus = len(nodes)
    rng = np.random.default_rng(1)
    held_out = rng.choice(n_corpus, size=min(args.queries, n_corpus), replace=False)
    queries = [nodes[i].embedding for i in held_out]
    nodes += synthetic(args.synthetic, embedder.dimension)

    results: dict[str, dict] = {}
    root = tempfile.mkdtemp(prefix="ragkit-pgbench-")
    os.chmod(root, 0o711)
    with LocalPostgres(Path(root) / "data") as pg:  # fsync on, as a real server
        for name in ("faiss_flat", "faiss_hnsw", "pgvector_exact", "pgvector_hnsw"):
            started = time.perf_counter()
            if name.startswith("faiss"):
                store = FaissVectorStore.from_embedder(embedder, kind=name.split("_")[1])
                store.add(nodes)
            else:
                store = open_pg_store(f"{pg.url}?table={name}&index={name.split('_')[1]}", embedder.identity,
                                      embedder.dimension)
                store.load_state()
                store.add(nodes)
                store.commit_state(StoreState())
            write_s = time.perf_counter() - started
            time_queries(store, queries[:10])  # warm-up
            times, ids = time_queries(store, tqdm(queries, desc=name))
            ms = np.array(times) * 1e3
            results[name] = {"write_s": write_s, "chunks_per_s": len(nodes) / write_s,
                             "query_p50_ms": float(np.percentile(ms, 50)), "query_p95_ms": float(np.percentile(ms, 95)),
                             "query_ms": [round(float(x), 4) for x in ms], "ids": ids}
    exact = results["faiss_flat"]["ids"]
    for r in results.values():
        r["recall_at_10_vs_faiss_flat"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(r.pop("ids"), exact)]))
    import faiss
    from importlib.metadata import version

    out = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "faiss": faiss.__version__,
        "llama-index-vector-stores-postgres": version("llama-index-vector-stores-postgres"),
        "pgserver": version("pgserver"), "postgres": "16.2 (pgserver)", "corpus": str(args.corpus),
        "corpus_chunks": n_corpus, "synthetic_chunks": args.synthetic, "chunks": len(nodes),
        "embed_s": embed_s, "embed_chunks_per_s": n_corpus / embed_s, "queries": len(queries), "top_k": 10,
        "hnsw": {"faiss": "ragkit defaults", "pgvector": "m=16, ef_construction=64, ef_search=40"},
        "stores": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    for name, r in results.items():
        print(f"{name:15} {r['chunks_per_s']:9.0f} chunks/s  p50 {r['query_p50_ms']:7.2f} ms  "
              f"p95 {r['query_p95_ms']:7.2f} ms  recall@10 {r['recall_at_10_vs_faiss_flat']:.3f}")


if __name__ == "__main__":
    main()
