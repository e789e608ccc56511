"""Query latency (p50/p99, one query at a time) and recall@10 of ragkit's FAISS indexes, Flat vs HNSW.

Synthetic, clustered, L2-normalised vectors of dimension 384 (MiniLM's): points are drawn around
``--clusters`` centres in a ``--latent``-dimensional subspace mapped into 384 dimensions, plus a little
isotropic noise, so neighbourhoods look like an embedding space rather than uniform noise. Queries are
fresh draws from the same distribution. Ground truth: exact inner-product search (IndexFlatIP).

Indexes are built with ``ragkit.store.build_faiss_index`` (the store's own construction). The FAISS
search is timed directly at every size; at sizes up to ``--store-max`` the full
``FaissVectorStore.query`` (id mapping + docstore fetch of the nodes) is timed too.

    python benchmarks/query_latency.py                      # 10k, 100k, 1M (1M takes long on 2 cores)
    python benchmarks/query_latency.py --sizes 10000 100000 --out /tmp/q.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from evals.core.portable import portable_value
from ragkit.store import FaissVectorStore, build_faiss_index

RESULTS = Path(__file__).parent / "results"


class ClusteredVectors:
    """A fixed mixture of Gaussians in a low-dimensional subspace; ``draw`` samples normalised vectors."""

    def __init__(self, dim: int, clusters: int, latent: int, spread: float, noise: float, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim, self.noise, self.spread = dim, noise, spread
        self.centres = rng.standard_normal((clusters, latent)).astype(np.float32)
        self.basis = (rng.standard_normal((latent, dim)) / np.sqrt(latent)).astype(np.float32)

    def draw(self, n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.dim), dtype=np.float32)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            c = rng.integers(0, len(self.centres), m)
            z = self.centres[c] + self.spread * rng.standard_normal((m, self.centres.shape[1]), dtype=np.float32)
            x = z @ self.basis + self.noise * rng.standard_normal((m, self.dim), dtype=np.float32)
            faiss.normalize_L2(x)
            out[start:start + m] = x
        return out


def time_queries(search, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run one query at a time; returns (wall ms, process CPU ms, top-10 labels).

    The process's CPU time (all threads) does not grow when other processes take the cores, so it
    estimates a query's cost on a shared machine: an HNSW query runs on one thread (uncontended
    latency ~ its CPU time); a Flat query is split over the 2 threads (uncontended latency ~ half).
    """
    wall = np.empty(len(queries))
    cpu = np.empty(len(queries))
    labels = np.empty((len(queries), 10), dtype=np.int64)
    for i in range(len(queries)):
        q = queries[i:i + 1]
        c0, t0 = time.process_time(), time.perf_counter()
        labels[i] = search(q)
        wall[i] = (time.perf_counter() - t0) * 1e3
        cpu[i] = (time.process_time() - c0) * 1e3
    return wall, cpu, labels


def recall_at_10(labels: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(labels, truth)]))


def summary(timed: tuple[np.ndarray, np.ndarray, np.ndarray], truth: np.ndarray) -> dict:
    wall, cpu, labels = timed
    return {"p50_ms": round(float(np.percentile(wall, 50)), 4), "p99_ms": round(float(np.percentile(wall, 99)), 4),
            "cpu_p50_ms": round(float(np.percentile(cpu, 50)), 4), "cpu_p99_ms": round(float(np.percentile(cpu, 99)), 4),
            "recall_at_10": round(recall_at_10(labels, truth), 4), "queries": len(labels)}


def add_in_chunks(index: faiss.Index, data: np.ndarray, desc: str, chunk: int = 20_000,
                  budget_s: float | None = None) -> tuple[float, int]:
    """Add ``data`` chunk by chunk with a progress bar; stop early past ``budget_s``. Returns (s, added)."""
    t0 = time.perf_counter()
    end = 0
    for start in tqdm(range(0, len(data), chunk), desc=desc, unit="chunk", mininterval=5):
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            break
        end = min(start + chunk, len(data))
        index.add_with_ids(data[start:end], np.arange(start, end, dtype=np.int64))
    return time.perf_counter() - t0, end


def measure(rows: list[dict], search, queries: np.ndarray, truth: np.ndarray, threads: list[int], **what) -> None:
    """Time ``search`` once per FAISS thread count and append one row each."""
    for t in threads:
        faiss.omp_set_num_threads(t)
        row = what | {"threads": t} | summary(time_queries(search, queries), truth[:len(queries)])
        rows.append(row)
        print(row, flush=True)


def store_search(kind: str, data: np.ndarray, ef_search: int, args: argparse.Namespace):
    """FaissVectorStore.query as a search function (FAISS + id mapping + docstore fetch of the 10 nodes)."""
    from llama_index.core.schema import TextNode
    from llama_index.core.vector_stores.types import VectorStoreQuery

    store = FaissVectorStore(embedder_name="synthetic", dimension=data.shape[1], kind=kind, hnsw_m=args.hnsw_m,
                             hnsw_ef_construction=args.ef_construction, hnsw_ef_search=ef_search)
    faiss.omp_set_num_threads(args.threads[0])
    for start in tqdm(range(0, len(data), 20_000), desc=f"store {kind} add", mininterval=5):
        end = min(start + 20_000, len(data))
        store.add([TextNode(id_=str(i), text=f"chunk {i}", embedding=data[i].tolist()) for i in range(start, end)])

    def search(q: np.ndarray) -> list[int]:
        return [int(i) for i in store.query(VectorStoreQuery(query_embedding=q[0].tolist(), similarity_top_k=10)).ids]

    return search


def run_size(n: int, gen: ClusteredVectors, queries: np.ndarray, args: argparse.Namespace, rows: list[dict]) -> None:
    print(f"\n== {n:,} vectors ==", flush=True)
    data = gen.draw(n, seed=1000 + n)
    faiss.omp_set_num_threads(args.threads[0])
    flat = build_faiss_index("flat", args.dim)
    add_in_chunks(flat, data, f"flat {n:,}")
    truth = flat.search(queries, 10)[1]
    nq_flat = min(len(queries), args.flat_queries)
    measure(rows, lambda q: flat.search(q, 10)[1][0], queries[:nq_flat], truth, args.threads,
            n=n, layer="faiss", index="flat", ef_search=None, build_s=None)
    del flat

    faiss.omp_set_num_threads(args.threads[0])
    hnsw = build_faiss_index("hnsw", args.dim, hnsw_m=args.hnsw_m, hnsw_ef_construction=args.ef_construction)
    build_s, added = add_in_chunks(hnsw, data, f"hnsw {n:,} (M={args.hnsw_m}, efC={args.ef_construction})",
                                   budget_s=args.build_budget_s)
    build_s = round(build_s, 1)
    if added < n:
        rows.append({"n": n, "layer": "faiss", "index": "hnsw", "incomplete": True, "added": added, "build_s": build_s})
        print(f"HNSW build stopped after {build_s} s with {added:,} of {n:,} vectors", flush=True)
        return
    for ef in args.ef_search:
        params = faiss.SearchParametersHNSW(efSearch=ef)
        measure(rows, lambda q: hnsw.search(q, 10, params=params)[1][0], queries, truth, args.threads,
                n=n, layer="faiss", index="hnsw", ef_search=ef, build_s=build_s)
    del hnsw

    if n <= args.store_max:
        nq = min(len(queries), args.store_queries)
        measure(rows, store_search("flat", data, 0, args), queries[:nq], truth, args.threads,
                n=n, layer="store", index="flat", ef_search=None, build_s=None)
        ef = pick_ef(rows, n, args.target_recall) or max(args.ef_search)
        measure(rows, store_search("hnsw", data, ef, args), queries[:nq], truth, args.threads,
                n=n, layer="store", index="hnsw", ef_search=ef, build_s=None)


def pick_ef(rows: list[dict], n: int, target: float) -> int | None:
    """Smallest efSearch whose raw-FAISS recall@10 reaches the target at size n."""
    ok = [r["ef_search"] for r in rows if r["n"] == n and r["layer"] == "faiss" and r["index"] == "hnsw"
          and not r.get("incomplete") and r["recall_at_10"] >= target]
    return min(ok) if ok else None


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"cpu": cpu, "cores_visible": os.cpu_count(), "platform": platform.platform(),
            "python": sys.version.split()[0], "faiss": faiss.__version__, "numpy": np.__version__,
            "load_avg_at_start": os.getloadavg()}


def write_markdown(result: dict, path: Path) -> None:
    a, m = result["args"], result["machine"]
    def load(xs: list[float]) -> str:
        return ", ".join(f"{x:.1f}" for x in xs)

    lines = [
        "# Query latency and recall@10: Flat vs HNSW",
        "",
        f"- Date: {result['date']}; produced by `python benchmarks/query_latency.py {' '.join(result['argv'])}`.",
        f"- Machine: {m['cpu']}, {m['cores_visible']} cores shared with other jobs (load average 1/5/15 min at "
        f"start {load(m['load_avg_at_start'])}, at end {load(result['load_avg_at_end'])}); {m['platform']}; "
        f"faiss {m['faiss']}, numpy {m['numpy']}, Python {m['python']}.",
        f"- Data: synthetic clustered vectors, dim {a['dim']}: {a['clusters']} cluster centres in a "
        f"{a['latent']}-dim subspace (spread {a['spread']}, isotropic noise {a['noise']}), L2-normalised; "
        f"{a['queries']} queries from the same distribution. Top-10, one query at a time. "
        f"HNSW: M={a['hnsw_m']}, efConstruction={a['ef_construction']}. Recall@10 against exact search (IndexFlatIP).",
        "- p50/p99: wall-clock per query. CPU: the process's CPU time per query (all threads), which other "
        "processes on the shared cores do not inflate. `threads`: faiss.omp_set_num_threads.",
        "- layer `faiss`: the index alone; layer `store`: `FaissVectorStore.query` (FAISS + id mapping + "
        "docstore fetch of the 10 nodes) with its default query_threads=1, so its `threads` column "
        "only changes the thread count outside the query.",
        "",
        "| vectors | layer | index | efSearch | threads | p50 ms | p99 ms | CPU p50 ms | recall@10 | build s |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if r.get("incomplete"):
            lines.append(f"| {r['n']:,} | faiss | hnsw | - | - | build stopped at the time budget: {r['added']:,} vectors "
                         f"in {r['build_s']} s | | | | |")
            continue
        lines.append(f"| {r['n']:,} | {r['layer']} | {r['index']} | {r['ef_search'] or '-'} | {r['threads']} | "
                     f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['cpu_p50_ms']:.3f} | {r['recall_at_10']:.3f} | "
                     f"{r['build_s'] if r['build_s'] is not None else '-'} |")
    lines += ["", f"Target (issue 3): p50 < 5 ms at 100k with recall@10 >= {a['target_recall']}.", ""]
    for n in sorted({r["n"] for r in result["rows"]}):
        ef = pick_ef(result["rows"], n, a["target_recall"])
        if ef is None:
            lines.append(f"- {n:,}: no efSearch tried reaches recall@10 >= {a['target_recall']}.")
            continue
        hits = [r for r in result["rows"] if r["n"] == n and r["layer"] == "faiss" and r.get("ef_search") == ef]
        flats = [r for r in result["rows"] if r["n"] == n and r["layer"] == "faiss" and r["index"] == "flat"]
        desc = "; ".join(f"{r['threads']} thread(s): p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms "
                         f"(recall {r['recall_at_10']:.3f})" for r in hits)
        fdesc = "; ".join(f"{r['threads']} thread(s) p50 {r['p50_ms']:.3f} ms" for r in flats)
        lines.append(f"- {n:,}: smallest efSearch with recall@10 >= {a['target_recall']} is {ef}: {desc}. Flat: {fdesc}.")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--clusters", type=int, default=10_000)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--spread", type=float, default=0.7)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--flat-queries", type=int, default=200, help="fewer for Flat: it is slow at 1M")
    p.add_argument("--store-queries", type=int, default=300)
    p.add_argument("--store-max", type=int, default=100_000, help="time FaissVectorStore.query up to this size")
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="FAISS OpenMP thread counts to time")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    p.add_argument("--build-budget-s", type=float, default=None, help="stop an HNSW build after this many seconds")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--out", type=Path, default=RESULTS / "query_latency.json")
    args = p.parse_args()

    gen = ClusteredVectors(args.dim, args.clusters, args.latent, args.spread, args.noise)
    queries = gen.draw(args.queries, seed=7)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "argv": portable_value(sys.argv[1:]),
              "args": portable_value({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}),
              "rows": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for n in args.sizes:
        run_size(n, gen, queries, args, result["rows"])
        result["load_avg_at_end"] = os.getloadavg()
        args.out.write_text(json.dumps(result, indent=1))  # partial results survive a long 1M run
        write_markdown(result, args.out.with_suffix(".md"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
