"""Data preparation, the step a run takes before it trains: make sure the shard sets exist (built
once, by the main process), check every shard against its manifest, and choose the loader."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List

from ..config import RunConfig
from ..data import choose_loader
from ..data.manifest import Manifest
from ..data.shard_sets import attribute_manifests, check_shard_sets
from ..data.shards import ensure_shards
from .cluster import check_shard_roots
from .runtime import Runtime

log = logging.getLogger("mclfir")


@dataclass
class PreparedData:
    manifests: List[Manifest]                 # every shard set the run reads
    attribute_manifest: Dict[str, Manifest]   # attribute -> its shard set
    skipped_shards: Dict[str, list]           # shards left out (data.skip_bad_shards), for results.json
    loader: str                               # data.LOADERS name
    loader_reason: str


def prepare_data(cfg: RunConfig, runtime: Runtime) -> PreparedData:
    from ..data import remote
    remote.configure(cfg.data.cache_dir, cfg.data.remote_retries, cfg.data.cache_max_gb)
    if runtime.is_main:
        ensure_shards(cfg.data.shards, cfg.data.build)
    runtime.barrier()   # the other ranks read the manifest once it is written
    check_shard_roots([cfg.data.shards] + [inc.shards for inc in cfg.train.increments if inc.shards])
    manifests, by_attribute = attribute_manifests(cfg)
    skipped = check_shard_sets(manifests, ("train", cfg.eval.split), cfg.data.skip_bad_shards)
    loader, why = choose_loader(cfg.data)
    log.info("loader: %s (%s)", loader, why)
    return PreparedData(manifests, by_attribute, skipped, loader, why)
