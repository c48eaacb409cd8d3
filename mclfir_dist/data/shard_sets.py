"""The shard sets a run reads, found and checked before any training or evaluation."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from ..config import RunConfig
from ..errors import ShardError
from .manifest import Manifest
from .remote import redact

log = logging.getLogger("mclfir")


def attribute_manifests(cfg: RunConfig) -> Tuple[List[Manifest], Dict[str, Manifest]]:
    """The run's shard sets, and attribute -> its shard set (an increment may name its own: a run across datasets)."""
    loaded: Dict[str, Manifest] = {str(cfg.data.shards): Manifest.load(cfg.data.shards)}
    out: Dict[str, Manifest] = {}
    for inc in cfg.train.increments:
        root = inc.shards or str(cfg.data.shards)
        if root not in loaded:
            loaded[root] = Manifest.load(root)
        for a in inc.attributes:
            loaded[root].attribute_index(a)
            out[a] = loaded[root]
    return list(loaded.values()), out


def check_shard_sets(manifests: Sequence[Manifest], splits: Sequence[str], skip_bad: bool) -> Dict[str, list]:
    """Every shard's size and sample count against its manifest, before any training. A mismatch stops the
    run naming the shard, or (data.skip_bad_shards) leaves the shard out; the skips are returned for results.json."""
    skipped: Dict[str, list] = {}
    for manifest in manifests:
        for split in dict.fromkeys(splits):
            problems = manifest.verify(split)
            if not problems:
                continue
            where = f"{split}/{Path(manifest.root).name}"
            if not skip_bad:
                file, problem = problems[0]
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                named = f"{redact(manifest.remote)}{file}" if manifest.remote else Path(manifest.root) / file
                raise ShardError(f"{named}: {problem}{more}. Rebuild the shards, or set "
                                 f"data.skip_bad_shards=true to leave bad shards out")
            manifest.exclude([file for file, _ in problems])
            if not manifest.shard_files(split):
                raise ShardError(f"every {split} shard of {manifest.root} is damaged: {problems[0][1]}")
            skipped[where] = [{"file": file, "problem": problem} for file, problem in problems]
            log.warning("data.skip_bad_shards: leaving out %d %s shard(s) of %s: %s", len(problems), split,
                        manifest.root, "; ".join(f"{f}: {p}" for f, p in problems))
    return skipped
