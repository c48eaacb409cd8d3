"""The evaluation pass of a training run: embed each shard set's eval split with the heads seen so
far, score mAP per attribute, the reference baselines (random embeddings, untrained trunk) and
the retrieval grids. The maths (mAP, continual metrics) lives in evaluate.py."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torchvision.io import write_png

from ..config import RunConfig
from ..data import build_eval_loader
from ..data.manifest import Manifest
from ..model.preprocess import IMAGENET_MEAN, IMAGENET_STD
from ..runfolder.layout import RunFolder
from .metrics import (SplitEmbeddings, embed_split, evaluate_heads, pooled_feature_map, query_candidate_rows,
                      random_embedding_map)
from .record import retrieval_grid
from .split_cache import SplitCache

log = logging.getLogger("mclfir")


class Evaluator:
    def __init__(self, cfg: RunConfig, runtime, manifests: Sequence[Manifest], attribute_manifest: Dict[str, Manifest],
                 loader: str, run_dir: Path):
        self.cfg, self.runtime, self.loader, self.run_dir = cfg, runtime, loader, run_dir
        self.manifests, self.attribute_manifest = list(manifests), attribute_manifest
        for manifest in self.manifests:
            manifest.query_draw = cfg.eval.query_draw
        self.cache = SplitCache(cfg.eval.cache_mb)

    def _attributes_of(self, manifest: Manifest) -> List[str]:
        return [a for a, m in self.attribute_manifest.items() if m.root == manifest.root]

    def embeddings(self, model, attributes: Sequence[str], split: Optional[str] = None
                   ) -> List[Tuple[Manifest, SplitEmbeddings]]:
        """[(manifest, its eval split embedded under the heads of its attributes)] per shard set."""
        split = split or self.cfg.eval.split
        groups = []
        for manifest in self.manifests:
            own = self._attributes_of(manifest)
            attrs = [a for a in attributes if a in own]
            if not attrs and (attributes or not own):
                continue
            loader = self.cache.batches(
                (str(manifest.root), split),
                lambda: build_eval_loader(self.cfg.data, manifest, split, self.runtime.rank, self.runtime.world,
                                          loader=self.loader, device=self.runtime.device))
            groups.append((manifest, embed_split(model, loader, attrs, self.runtime.device)))
        return groups

    def evaluate(self, model, attributes: Sequence[str], split: Optional[str] = None):
        """(mAP per attribute, details per attribute, eval seconds, embedding groups) on `split` (default:
        eval.split); each group's `skipped` lists the images that did not decode."""
        split = split or self.cfg.eval.split
        groups = self.embeddings(model, attributes, split)
        started = time.time()
        details: Dict[str, dict] = {}
        for manifest, embeddings in groups:
            details.update(evaluate_heads(manifest, split, embeddings, self.cfg.eval.query_chunk))
        details = {a: details[a] for a in attributes}
        seconds = sum(e.seconds for _, e in groups) + (time.time() - started)
        return {a: d["map"] for a, d in details.items()}, details, seconds, groups

    def baselines(self, model) -> Tuple[Dict[str, float], Dict[str, float]]:
        """(random-embedding mAP, untrained-trunk pooled-feature mAP) per attribute, before any training;
        the second is empty unless eval.frozen_baseline."""
        split, chunk = self.cfg.eval.split, self.cfg.eval.query_chunk
        random_map: Dict[str, float] = {}
        frozen_map: Dict[str, float] = {}
        for manifest, embeddings in self.embeddings(model, []):
            attrs = self._attributes_of(manifest)
            random_map.update(random_embedding_map(manifest, split, embeddings, attrs, self.cfg.model.embed_dim,
                                                   seed=self.cfg.train.seed, chunk=chunk))
            if self.cfg.eval.frozen_baseline:
                frozen_map.update(pooled_feature_map(manifest, split, embeddings, attrs, chunk))
        log.info("random-embedding mAP: %s", {a: round(100 * v, 2) for a, v in random_map.items()})
        if self.cfg.eval.frozen_baseline:
            log.info("untrained-trunk pooled-feature mAP: %s", {a: round(100 * v, 2) for a, v in frozen_map.items()})
        return random_map, frozen_map

    def retrieval_grids(self, manifest: Manifest, embeddings: SplitEmbeddings, index: int, sink) -> None:
        """Top-k PNGs per attribute (blue = query, green = same value, red = miss), to disk and TensorBoard."""
        cfg = self.cfg.eval
        if cfg.grid_queries <= 0:
            return
        for h, attribute in enumerate(embeddings.attributes):
            queries, candidates = query_candidate_rows(manifest, cfg.split, attribute, embeddings)
            queries = queries[:cfg.grid_queries]
            if len(queries) == 0 or len(candidates) == 0:
                continue
            column = manifest.attribute_index(attribute)
            scores = embeddings.emb[queries, h] @ embeddings.emb[candidates, h].t()
            top = candidates[scores.topk(min(cfg.grid_topk, len(candidates)), dim=1).indices]
            keys = {embeddings.keys[i] for i in queries.tolist() + top.flatten().tolist()}
            images = self._raw_images(manifest, keys)
            query_images = torch.stack([images[embeddings.keys[i]] for i in queries.tolist()])
            top_images = torch.stack([torch.stack([images[embeddings.keys[j]] for j in row]) for row in top.tolist()])
            match = embeddings.labels[top, column] == embeddings.labels[queries, column][:, None]
            names = manifest.values(attribute)
            value = lambda i: names[i] if i >= 0 else "?"   # noqa: E731
            grid = retrieval_grid(query_images, top_images, match,
                                  query_values=[value(int(v)) for v in embeddings.labels[queries, column]],
                                  cand_values=[[value(int(v)) for v in row] for row in embeddings.labels[top, column]])
            sink.image(f"retrieval/{attribute}", grid, index)
            out = RunFolder(self.run_dir).grids / f"increment_{index:02d}_{attribute}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            write_png(grid, str(out))

    def _raw_images(self, manifest: Manifest, keys: set) -> Dict[str, torch.Tensor]:
        loader = build_eval_loader(self.cfg.data, manifest, self.cfg.eval.split, 0, 1, keys=keys)
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        out = {}
        for batch in loader:
            for key, img in zip(batch["keys"], batch["images"]):
                out[key] = ((img * std + mean).clamp(0, 1) * 255).to(torch.uint8)
        return out
