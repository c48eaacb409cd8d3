"""`mclfir serve` under load, on localhost, bounded (prints numbers, asserts nothing, stops by itself).

    python -m mclfir_dist.bench.serve [--run runs/debug] [--sizes 10000,100000] [--concurrency 1,8,32]
                                      [--requests 256] [--uploads 64] [--out docs/results/serve]

For each catalogue size, a flat index of random L2-normalised vectors is written with the run's model
identity, so uploads are embedded by the run's real model. `mclfir serve` is started on a free localhost
port; at each concurrency, threads send key queries (the index's vectors) and image uploads (the run's
own image size) and the p50 / p95 latency and queries/s are measured. Side by side: the same queries
through `Retriever.search` in this process (no HTTP: the service's overhead is the ratio), and the CLI's
per-query cost (`mclfir search --key`, a fresh process that loads the model each time).
The load generator shares the machine's cores with the server: on a 2-core box both compete.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from ..retrieval.index import INDEX_FORMAT, build_index
from ..runfolder.layout import RunFolder
from ..utils.io import atomic_write_json, atomic_write_text


def fake_index(folder: Path, n: int, attributes: List[str], hashes: Dict[str, str], dim: int, seed: int = 0) -> None:
    """An `mclfir index` folder of n random items (labels: 4 values per attribute), written like the real one."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for a in attributes:
        v = rng.standard_normal((n, dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        import faiss
        faiss.write_index(build_index(v), str(folder / f"{a}.faiss"))
    atomic_write_text(folder / "keys.txt", "".join(f"item_{i:07d}\n" for i in range(n)))
    atomic_write_text(folder / "locations.txt", "\n" * n)
    atomic_write_json(folder / "labels.json", {a: [f"v{int(x)}" for x in rng.integers(0, 4, n)] for a in attributes})
    atomic_write_json(folder / "index.json", {"format": INDEX_FORMAT, "kind": "flat", "params": {
        "nlist": 0, "nprobe": 16, "hnsw_m": 32, "ef_search": 64}, "attributes": {a: {"vectors": n} for a in attributes},
        "model_hash": hashes, "items": n, "embeddings": "(random, bench)", "embed": {}})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(run: str, index: Path) -> Tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mclfir_dist.cli", "serve", "--run", run, "--index", str(index),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mclfir serve exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("mclfir serve did not start within 120 s")


def multipart(fields: dict, image: bytes = b"") -> Tuple[bytes, dict]:
    b = uuid.uuid4().hex
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n{v}\r\n'.encode() for n, v in fields.items()]
    if image:
        parts.append(f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n\r\n'.encode()
                     + image + b"\r\n")
    return b"".join(parts) + f"--{b}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={b}"}


def load(port: int, bodies: List[Tuple[bytes, dict]], concurrency: int) -> dict:
    """Send every body once, `concurrency` at a time (keep-alive connections); latency per request."""
    latencies: List[float] = []
    failures = [0]
    lock, cursor = threading.Lock(), iter(range(len(bodies)))

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                break
            t = time.perf_counter()
            conn.request("POST", "/search", body=bodies[i][0], headers=bodies[i][1])
            r = conn.getresponse()
            r.read()
            with lock:
                latencies.append(time.perf_counter() - t)
                failures[0] += r.status != 200
        conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(latencies, time.perf_counter() - started, failures[0])


def summary(latencies: List[float], seconds: float, failures: int = 0) -> dict:
    ms = np.array(latencies) * 1000
    return {"n": len(latencies), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2), "qps": round(len(latencies) / seconds, 1),
            "failures": failures}


def jpegs(count: int, size: int) -> List[bytes]:
    from PIL import Image
    rng = np.random.default_rng(1)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def in_process(run: str, index: Path, keys: List[str], images: List[bytes], attribute: str, k: int) -> dict:
    from ..retrieval.api import Retriever
    r = Retriever.from_run(run, index)
    r.search(keys[0], attribute, k)   # first call reads the index
    out = {}
    for name, queries in (("key", keys), ("upload", images)):
        lat = []
        t0 = time.perf_counter()
        for q in queries:
            t = time.perf_counter()
            r.search(q, attribute, k)
            lat.append(time.perf_counter() - t)
        out[name] = summary(lat, time.perf_counter() - t0)
    return out


def cli_cost(run: str, index: Path, key: str, attribute: str, k: int, repeats: int = 3) -> dict:
    lat = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mclfir_dist.cli", "search", "--run", run, "--index", str(index),
                        "--key", key, "--attribute", attribute, "--k", str(k)], check=True, capture_output=True)
        lat.append(time.perf_counter() - t)
    return summary(lat, sum(lat))


def bench_size(args, n: int, work: Path, model_info: dict) -> dict:
    index = work / f"index_{n}"
    fake_index(index, n, model_info["attributes"], model_info["hashes"], model_info["dim"])
    rng = np.random.default_rng(n)
    keys = [f"item_{i:07d}" for i in rng.choice(n, args.requests, replace=False)]
    images = jpegs(args.uploads, model_info["image_size"] * 2)
    a = model_info["attributes"][0]
    row = {"items": n, "attribute": a, "k": args.k, "http": {}}
    proc, port = start(args.run, index)
    try:
        key_bodies = [multipart({"key": q, "attributes": a, "k": args.k}) for q in keys]
        upload_bodies = [multipart({"attributes": a, "k": args.k}, im) for im in images]
        load(port, key_bodies[:8] + upload_bodies[:4], 1)   # warm-up
        for c in args.concurrency:
            row["http"][c] = {"key": load(port, key_bodies, c), "upload": load(port, upload_bodies, c)}
            print(f"{n:>7} items  concurrency {c:>2}: key p50 {row['http'][c]['key']['p50_ms']:7.1f} ms "
                  f"{row['http'][c]['key']['qps']:7.1f} q/s | upload p50 {row['http'][c]['upload']['p50_ms']:7.1f} ms "
                  f"{row['http'][c]['upload']['qps']:6.1f} q/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    row["in_process"] = in_process(args.run, index, keys, images, a, args.k)
    row["cli"] = cli_cost(args.run, index, keys[0], a, args.k, args.cli_repeats)
    return row


def model_info(run: str) -> dict:
    from ..model.saved import model_identity
    from ..model.saved import load_run_model
    model, cfg, _ = load_run_model(run)
    return {"attributes": list(model.attributes), "dim": cfg.model.embed_dim, "image_size": cfg.data.image_size,
            "hashes": {a: model_identity(model, a) for a in model.attributes}}


def report(rows: List[dict], meta: dict) -> str:
    lines = [f"# mclfir serve under load ({meta['machine']})", "",
             f"Run `{meta['run']}`, k = {meta['k']}, flat index of random vectors; {meta['requests']} key queries "
             f"and {meta['uploads']} uploads ({meta['upload_px']} px JPEGs) per level. Reproduce: `{meta['command']}`",
             "", "| items | query | path | concurrency | p50 ms | p95 ms | queries/s | vs in-process q/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for q in ("key", "upload"):
            base = r["in_process"][q]
            lines.append(f"| {r['items']:,} | {q} | in-process `Retriever.search` | 1 | {base['p50_ms']} | "
                         f"{base['p95_ms']} | {base['qps']} | 1.00 |")
            for c, levels in r["http"].items():
                m = levels[q]
                lines.append(f"| {r['items']:,} | {q} | HTTP | {c} | {m['p50_ms']} | {m['p95_ms']} | {m['qps']} | "
                             f"{m['qps'] / max(base['qps'], 1e-9):.2f} |")
        cli = r["cli"]
        lines.append(f"| {r['items']:,} | key | CLI `mclfir search` (a process per query) | 1 | {cli['p50_ms']} | "
                     f"{cli['p95_ms']} | {cli['qps']} | {cli['qps'] / max(r['in_process']['key']['qps'], 1e-9):.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/debug", help="a trained run (make demo)")
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=256, help="key queries per level")
    ap.add_argument("--uploads", type=int, default=64, help="image uploads per level")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--cli-repeats", type=int, default=3, help="`mclfir search` processes timed per size")
    ap.add_argument("--out", default="", help="write bench.json and bench.md here")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if not RunFolder(args.run).is_run():
        raise SystemExit(f"{args.run}: no trained run here (make demo, or --run RUN)")
    info = model_info(args.run)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mclfir_bench_serve_") as work:
        for n in [int(x) for x in args.sizes.split(",")]:
            rows.append(bench_size(args, n, Path(work), info))
    meta = {"machine": f"{os.cpu_count()} CPU cores", "run": args.run, "k": args.k, "requests": args.requests,
            "uploads": args.uploads, "upload_px": info["image_size"] * 2,
            "command": "python -m mclfir_dist.bench.serve " + " ".join(sys.argv[1:])}
    text = report(rows, meta)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(args.out) / "bench.json", {"meta": meta, "rows": rows})
        atomic_write_text(Path(args.out) / "bench.md", text)


if __name__ == "__main__":
    main()
