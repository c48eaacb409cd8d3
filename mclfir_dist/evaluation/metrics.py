"""Evaluation: embeddings -> per-attribute mAP (vectorised), and the continual-learning metrics.

AP of a query = mean over its relevant candidates of precision at their rank; candidates are
ranked by descending score with ties broken by candidate order (a stable sort). A query with no
relevant candidate has no AP and is left out of the mean (counted in `queries_without_relevant`).
"""
from __future__ import annotations

import logging
import math
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np
import torch

from ..data.manifest import Manifest
from ..utils.distributed import gather_objects

log = logging.getLogger(__name__)


def average_precision(q_emb: torch.Tensor, q_lab: torch.Tensor, c_emb: torch.Tensor, c_lab: torch.Tensor,
                      chunk: int = 256) -> torch.Tensor:
    """AP of every query (NaN where no candidate is relevant). No Python loop over candidates."""
    q_emb, c_emb = q_emb.float(), c_emb.float()
    c_lab = c_lab.to(q_emb.device)
    out = torch.empty(q_emb.shape[0], dtype=torch.float64)
    ranks = torch.arange(1, c_emb.shape[0] + 1, dtype=torch.float64, device=q_emb.device)
    for s in range(0, q_emb.shape[0], chunk):
        scores = q_emb[s:s + chunk] @ c_emb.t()
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        rel = (c_lab[order] == q_lab[s:s + chunk, None].to(q_emb.device)).double()
        hits = rel.cumsum(dim=1)
        n_rel = rel.sum(dim=1)
        ap = (hits / ranks * rel).sum(dim=1) / n_rel
        out[s:s + chunk] = torch.where(n_rel > 0, ap, torch.full_like(ap, float("nan"))).cpu()
    return out


def mean_average_precision(q_emb, q_lab, c_emb, c_lab, chunk: int = 256) -> Dict[str, float]:
    ap = average_precision(q_emb, q_lab, c_emb, c_lab, chunk)
    valid = ~torch.isnan(ap)
    return {"map": float(ap[valid].mean()) if valid.any() else float("nan"),
            "queries": int(valid.sum()), "queries_without_relevant": int((~valid).sum())}


@dataclass
class SplitEmbeddings:
    keys: List[str]
    labels: torch.Tensor        # N x A_total
    emb: torch.Tensor           # N x H x D (H = attributes asked for)
    pooled: torch.Tensor        # N x C pooled trunk features
    attributes: List[str]
    seconds: float
    skipped: List[str] = field(default_factory=list)   # keys whose image did not decode (every rank)


@torch.no_grad()
def embed_split(model, loader, attributes: Sequence[str], device: torch.device) -> SplitEmbeddings:
    """Embed this rank's slice, then gather every rank's rows (sorted by key, so identical everywhere)."""
    t0 = time.time()
    was_training = model.training
    model.eval()
    keys, labels, embs, pooled, skipped = [], [], [], [], []
    for batch in loader:
        skipped += batch.get("skipped", [])
        if not batch["keys"]:
            continue
        e, p = model.embed_all(batch["images"].to(device, non_blocking=True), attributes)
        embs.append(e.float().cpu())
        pooled.append(p.float().cpu())
        labels.append(batch["labels"])
        keys += batch["keys"]
    model.train(was_training)
    local = (keys, torch.cat(labels) if labels else torch.zeros(0, 0, dtype=torch.long),
             torch.cat(embs) if embs else torch.zeros(0), torch.cat(pooled) if pooled else torch.zeros(0), skipped)
    gathered = gather_objects(local)
    all_skipped = sorted(k for p in gathered for k in p[4])
    parts = [p for p in gathered if len(p[0])]
    all_keys = [k for p in parts for k in p[0]]
    order = sorted(range(len(all_keys)), key=all_keys.__getitem__)
    idx = torch.tensor(order, dtype=torch.long)
    return SplitEmbeddings([all_keys[i] for i in order], torch.cat([p[1] for p in parts])[idx],
                           torch.cat([p[2] for p in parts])[idx], torch.cat([p[3] for p in parts])[idx],
                           list(attributes), time.time() - t0, all_skipped)


def query_candidate_rows(manifest: Manifest, split: str, attribute: str, se: "SplitEmbeddings"):
    """Rows of `se` that are `attribute`'s queries and candidates in `split` (manifest.query_draw applied)."""
    pos = {k: i for i, k in enumerate(se.keys)}
    sets = manifest.eval_set(split, attribute)
    q = [pos[k] for k in sets["query"] if k in pos]
    c = [pos[k] for k in sets["candidate"] if k in pos]
    if manifest.query_draw:
        values = se.labels[:, manifest.attribute_index(attribute)].tolist()
        q, c = redraw_queries(q, c, values, manifest.query_draw, attribute)
    return torch.tensor(q, dtype=torch.long), torch.tensor(c, dtype=torch.long)


def redraw_queries(queries: Sequence[int], candidates: Sequence[int], values: Sequence[int], draw: int,
                   attribute: str):
    """Choose the queries again among the same images: per value as many as the stored draw has, the rest
    candidates. Seeded by (draw, attribute), so every run and `mclfir eval` with the same draw agree."""
    rng = np.random.default_rng([draw, zlib.crc32(attribute.encode())])
    wanted = Counter(values[i] for i in queries)
    pool: Dict[int, List[int]] = {}
    for i in sorted(list(queries) + list(candidates)):
        pool.setdefault(values[i], []).append(i)
    new_q, new_c = [], []
    for v in sorted(pool):
        rows = pool[v]
        perm = rng.permutation(len(rows))
        new_q += [rows[j] for j in perm[:wanted.get(v, 0)]]
        new_c += [rows[j] for j in perm[wanted.get(v, 0):]]
    return sorted(new_q), sorted(new_c)


def attribute_map(manifest: Manifest, split: str, se: SplitEmbeddings, attribute: str, emb: torch.Tensor,
                  chunk: int = 256) -> Dict[str, float]:
    """mAP of one attribute with per-image embeddings `emb` (N x D, rows as se.keys)."""
    col = manifest.attribute_index(attribute)
    q, c = query_candidate_rows(manifest, split, attribute, se)
    lab = se.labels[:, col]
    return mean_average_precision(emb[q], lab[q], emb[c], lab[c], chunk)


LEAKAGE_K = 10   # a shopper sees the first screen of results


def attribute_leakage(manifest: Manifest, split: str, se: SplitEmbeddings, attribute: str, emb: torch.Tensor,
                      k: int = LEAKAGE_K, chunk: int = 256) -> Dict[str, dict]:
    """How attribute-specific one head is. Over `attribute`'s queries (its eval set), ranked by `emb`: for each
    attribute the shard set labels, `share` = the mean share of the top-k candidates that have the query's
    value, and `chance` = the share of all candidates that do (what a random ranking gets). Queries without a
    value for that attribute are left out. The head's own attribute gives its precision@k."""
    q, c = query_candidate_rows(manifest, split, attribute, se)
    if len(q) == 0 or len(c) == 0:
        return {}
    e = emb.float()
    top = []
    for s in range(0, len(q), chunk):
        scores = e[q[s:s + chunk]] @ e[c].t()
        scores[q[s:s + chunk, None] == c[None, :]] = float("-inf")   # a query is never its own neighbour
        top.append(scores.topk(min(k, len(c)), dim=1).indices)
    top = torch.cat(top)
    out = {}
    for b in manifest.attributes:
        lab = se.labels[:, manifest.attribute_index(b)]
        ql, cl = lab[q], lab[c]
        known = ql >= 0
        if not known.any():
            continue
        share = (cl[top] == ql[:, None]).double().mean(dim=1)[known].mean()
        counts = torch.bincount(cl[cl >= 0], minlength=int(lab.max()) + 1).double()
        chance = (counts[ql[known]] / len(c)).mean()
        out[b] = {"share": round(float(share), 5), "chance": round(float(chance), 5)}
    return out


def evaluate_heads(manifest: Manifest, split: str, se: SplitEmbeddings, chunk: int = 256) -> Dict[str, dict]:
    """mAP per head, and its attribute leakage (`attribute_leakage`)."""
    return {a: {**attribute_map(manifest, split, se, a, se.emb[:, h], chunk),
                "leakage": attribute_leakage(manifest, split, se, a, se.emb[:, h], chunk=chunk)}
            for h, a in enumerate(se.attributes)}


def random_embedding_map(manifest: Manifest, split: str, se: SplitEmbeddings, attributes: Sequence[str],
                         dim: int = 128, seed: int = 0, chunk: int = 256) -> Dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    rnd = torch.nn.functional.normalize(torch.randn(len(se.keys), dim, generator=g), dim=1)
    return {a: attribute_map(manifest, split, se, a, rnd, chunk)["map"] for a in attributes}


def pooled_feature_map(manifest: Manifest, split: str, se: SplitEmbeddings, attributes: Sequence[str],
                       chunk: int = 256) -> Dict[str, float]:
    feats = torch.nn.functional.normalize(se.pooled, dim=1)
    return {a: attribute_map(manifest, split, se, a, feats, chunk)["map"] for a in attributes}


# ---- continual-learning view -------------------------------------------------------------

def continual_metrics(matrix: List[Dict[str, float]], learned_at: Dict[str, int]) -> Dict[str, object]:
    """From R[t][attr] (mAP of attr after increment t): average mAP, forgetting, BWT at the end."""
    T = len(matrix) - 1
    last = matrix[T]
    avg = float(np.mean(list(last.values()))) if last else float("nan")
    forgetting, bwt = {}, {}
    unknown = False
    for a, t_a in learned_at.items():
        if t_a >= T or a not in last:
            continue
        history = [matrix[t][a] for t in range(t_a, T) if a in matrix[t]]
        if not history:  # not evaluated in between (static_final_only): forgetting is unknown, not 0
            unknown = True
            continue
        forgetting[a] = max(history) - last[a]
        bwt[a] = last[a] - history[0]
    nan = float("nan")
    return {
        "average_map": avg,
        "forgetting": forgetting,
        "average_forgetting": nan if unknown else float(np.mean(list(forgetting.values()))) if forgetting else 0.0,
        "bwt": nan if unknown else float(np.mean(list(bwt.values()))) if bwt else 0.0,
    }


def dataset_maps(details: Dict[str, dict], dataset_of: Dict[str, str]) -> Dict[str, float]:
    """Per dataset: the query-count-weighted mean of its attributes' mAP (the ASEN protocol's dataset mAP)."""
    sums: Dict[str, List[float]] = {}
    for a, d in details.items():
        if d.get("queries") and not math.isnan(d["map"]):
            acc = sums.setdefault(dataset_of[a], [0.0, 0.0])
            acc[0] += d["map"] * d["queries"]
            acc[1] += d["queries"]
    return {name: total / count for name, (total, count) in sums.items() if count}
