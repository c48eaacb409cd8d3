"""Can the deployed index stay after an increment? For each old attribute, three mAPs on the eval split:

  reembedded      queries and gallery embedded by the new model          (a)
  deployed_index  queries by the new model, gallery by the previous one  (b): the index as deployed
  previous        queries and gallery by the previous model              (c)

a - c is the forgetting; b - c is what serving the old index with the new model costs (Shen et al.,
CVPR 2020, call the b setting backward-compatible retrieval). The previous increment's eval embeddings
are kept as `checkpoints/eval_embeddings_NN.pt` so that a resumed run measures the same thing."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..runfolder.layout import RunFolder
from ..utils.io import atomic_torch_save
from .metrics import SplitEmbeddings, mean_average_precision

log = logging.getLogger("mclfir")
FORMAT = "mclfir-eval-embeddings/1"


def snapshot(groups: Sequence[Tuple[object, SplitEmbeddings]]) -> Dict[str, dict]:
    """{attribute: {keys, emb (N x D)}} of an evaluation pass."""
    return {a: {"keys": list(se.keys), "emb": se.emb[:, h].clone()}
            for _, se in groups for h, a in enumerate(se.attributes)}


def snapshot_path(run_dir: str | Path, index: int) -> Path:
    return RunFolder(run_dir).eval_embeddings(index)


def save_snapshot(run_dir: str | Path, index: int, snap: Dict[str, dict]) -> None:
    atomic_torch_save(snapshot_path(run_dir, index), {"format": FORMAT, "increment": index, "attributes": snap})


def load_snapshot(run_dir: str | Path, index: int) -> Optional[Dict[str, dict]]:
    path = snapshot_path(run_dir, index)
    if index < 0 or not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # a damaged file only costs this increment's compatibility rows
        log.warning("%s does not load (%s): no compatibility figures for the next increment", path, e)
        return None
    return data["attributes"] if data.get("format") == FORMAT else None


def _rows(pos: Dict[str, int], wanted: Sequence[str]) -> torch.Tensor:
    return torch.tensor([pos[k] for k in wanted], dtype=torch.long)


def compatibility(previous: Dict[str, dict], groups, split: str, chunk: int = 256) -> Dict[str, dict]:
    """Per old attribute (in both `previous` and this pass): the three mAPs, their differences, the drift."""
    out: Dict[str, dict] = {}
    for manifest, se in groups:
        for h, attribute in enumerate(se.attributes):
            if attribute not in previous:
                continue
            old = previous[attribute]
            new_pos = {k: i for i, k in enumerate(se.keys)}
            old_pos = {k: i for i, k in enumerate(old["keys"])}
            both = new_pos.keys() & old_pos.keys()
            sets = manifest.eval_set(split, attribute)
            q = [k for k in sets["query"] if k in both]
            c = [k for k in sets["candidate"] if k in both]
            if not q or not c:
                continue
            col = manifest.attribute_index(attribute)
            nq, nc = _rows(new_pos, q), _rows(new_pos, c)
            new_q, new_c = se.emb[nq, h], se.emb[nc, h]
            old_q, old_c = old["emb"][_rows(old_pos, q)], old["emb"][_rows(old_pos, c)]
            lab_q, lab_c = se.labels[nq, col], se.labels[nc, col]
            a = mean_average_precision(new_q, lab_q, new_c, lab_c, chunk)["map"]
            b = mean_average_precision(new_q, lab_q, old_c, lab_c, chunk)["map"]
            p = mean_average_precision(old_q, lab_q, old_c, lab_c, chunk)["map"]
            drift = 1 - torch.nn.functional.cosine_similarity(new_c.float(), old_c.float(), dim=1).mean()
            out[attribute] = {"reembedded": a, "deployed_index": b, "previous": p, "forgetting": a - p,
                              "stale_index_cost": b - p, "embedding_drift": float(drift),
                              "unchanged": bool(torch.equal(new_c, old_c) and torch.equal(new_q, old_q))}
    return out
