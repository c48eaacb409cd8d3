"""Search latency and index build time over random L2-normalised vectors (prints numbers, asserts nothing).

    python -m mclfir_dist.bench.search [--sizes 100000,1000000] [--dim 128] [--queries 200] [--k 10]

For each catalogue size and index kind (flat = exact, ivf, hnsw): build seconds, single-query latency
(p50 / p95 over --queries one-at-a-time searches), batched throughput (all queries in one call), and
the approximate kinds' agreement with the exact one: recall@1 (does it find the catalogue item the
query was made from?) and recall@k (overlap of the top-k; low on random data, where the other
neighbours are near-ties of random vectors).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from ..retrieval.index import build_index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", default="flat,ivf,hnsw")
    args = ap.parse_args()
    import faiss
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {os.cpu_count()} cores, "
          f"dim {args.dim}, k {args.k}")
    print(f"{'vectors':>9} {'kind':5} {'build s':>8} {'p50 ms':>8} {'p95 ms':>8} {'batch q/s':>10} "
          f"{'recall@1':>8} {'recall@k':>8}")
    rng = np.random.default_rng(0)
    for n in [int(x) for x in args.sizes.split(",")]:
        base = rng.standard_normal((n, args.dim), dtype=np.float32)
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        # queries near catalogue items, as real queries are (random ones have no meaningful neighbours)
        queries = base[rng.choice(n, args.queries, replace=False)] + 0.02 * rng.standard_normal(
            (args.queries, args.dim), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        exact = None
        for kind in args.kinds.split(","):
            t0 = time.perf_counter()
            index = build_index(base, kind)
            build = time.perf_counter() - t0
            lat = []
            for q in queries:
                t0 = time.perf_counter()
                index.search(q[None], args.k)
                lat.append(1000 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            _, rows = index.search(queries, args.k)
            batch_qps = len(queries) / (time.perf_counter() - t0)
            if kind == "flat":
                exact = rows
            recall_k = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(rows, exact)])
            recall_1 = np.mean(rows[:, 0] == exact[:, 0])
            print(f"{n:>9} {kind:5} {build:8.2f} {np.percentile(lat, 50):8.3f} {np.percentile(lat, 95):8.3f} "
                  f"{batch_qps:10.0f} {recall_1:8.3f} {recall_k:8.3f}", flush=True)
            del index


if __name__ == "__main__":
    main()
