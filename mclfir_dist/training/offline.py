"""Evaluate a run's last checkpoint on any shard set (the `mclfir eval` command)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from ..data import build_eval_loader
from ..data.manifest import Manifest
from ..data.shard_sets import check_shard_sets
from ..errors import ShardError
from .checkpoint import load_run_model
from ..utils.io import atomic_write, atomic_write_json
from ..evaluation.metrics import attribute_leakage, attribute_map, dataset_maps, embed_split, query_candidate_rows

log = logging.getLogger(__name__)


def _with_progress(batches, total: int, desc: str):
    """Batches as they come, with a progress bar (images, rate, ETA) on stderr."""
    with tqdm(total=total, unit="img", desc=desc) as bar:
        for batch in batches:
            bar.update(len(batch["keys"]) + len(batch.get("skipped", [])))
            yield batch


def _save_npy(path: Path, arr: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, arr))


def _export(out: Path, emb: torch.Tensor, labels: torch.Tensor, queries, candidates) -> None:
    """One attribute's query and candidate embeddings and labels as .npy (to recompute mAP independently)."""
    out.mkdir(parents=True, exist_ok=True)
    _save_npy(out / "query_emb.npy", emb[queries].numpy())
    _save_npy(out / "query_labels.npy", labels[queries].numpy())
    _save_npy(out / "cand_emb.npy", emb[candidates].numpy())
    _save_npy(out / "cand_labels.npy", labels[candidates].numpy())


def evaluate_run(run_dir: str, shards: str, split: str = "test", export: Optional[str] = None,
                 json_path: Optional[str] = None, skip_bad_shards: bool = False) -> dict:
    model, cfg, ckpt = load_run_model(run_dir)
    manifest = Manifest.load(shards)
    manifest.query_draw = cfg.eval.query_draw   # the run's own query draw, so its numbers are reproduced
    skipped_shards = check_shard_sets([manifest], [split], skip_bad_shards)
    attrs = [a for a in model.attributes if a in manifest.attributes]
    missing = [a for a in model.attributes if a not in manifest.attributes]
    if not attrs:
        raise ShardError(f"none of the run's attributes {model.attributes} is in {shards}")
    if missing:
        log.warning("attributes not in %s, skipped: %s", shards, missing)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    loader = build_eval_loader(cfg.data, manifest, split, 0, 1)
    se = embed_split(model, _with_progress(loader, manifest.count(split), f"embedding {split}"), attrs, device)
    out = {"run": str(run_dir), "checkpoint": str(ckpt), "shards": str(shards), "split": split, "map": {},
           "details": {},
           "skipped_shards": skipped_shards, "skipped_samples": {"count": len(se.skipped), "keys": se.skipped}}
    for h, a in enumerate(attrs):
        d = {**attribute_map(manifest, split, se, a, se.emb[:, h], cfg.eval.query_chunk),
             "leakage": attribute_leakage(manifest, split, se, a, se.emb[:, h], chunk=cfg.eval.query_chunk)}
        q, c = query_candidate_rows(manifest, split, a, se)
        out["map"][a], out["details"][a] = d["map"], d
        print(f"{a:24s} mAP {100 * d['map']:6.2f}  ({d['queries']} queries, {len(c)} candidates)")
        if export:
            _export(Path(export) / a, se.emb[:, h], se.labels[:, manifest.attribute_index(a)], q, c)
    out["average_map"] = float(np.mean(list(out["map"].values())))
    out["dataset_map"] = dataset_maps(out["details"], {a: Path(shards).name for a in attrs})[Path(shards).name]
    print(f"{'average':24s} mAP {100 * out['average_map']:6.2f}  (unweighted mean over attributes)")
    print(f"{'dataset':24s} mAP {100 * out['dataset_map']:6.2f}  (query-weighted, the ASEN protocol)")
    json_path = json_path or str(Path(run_dir) / f"eval_{Path(shards).name}_{split}.json")
    atomic_write_json(json_path, out)
    print(f"wrote {json_path}")
    return out
