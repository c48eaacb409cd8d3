"""Where everything of a run lives, by name. `RunFolder(path)` gives each file's path; nothing else in the
package spells these names."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

RESULTS = "results.json"       # the record (record.py), rewritten atomically after every increment
CONFIG = "config.yaml"         # the effective config, what `--resume RUN` reads
SUMMARY = "summary.md"         # the tables of a finished run
CHECKPOINTS = "checkpoints"    # increment_NN.pt, partial.pt, per-rank files, eval embeddings
TENSORBOARD = "tensorboard"
GRIDS = "grids"                # retrieval grids (PNG)
LOCK = ".lock"                 # who is writing the run now (training/lock.py)
# what a finished or started run holds (not the lock: an empty folder with only a lock is no run)
RUN_FILES = (CHECKPOINTS, RESULTS, SUMMARY, TENSORBOARD, GRIDS, CONFIG)


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def __init__(self, root) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def results(self) -> Path:
        return self.root / RESULTS

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def grids(self) -> Path:
        return self.root / GRIDS

    def eval_embeddings(self, index: int) -> Path:
        """The deployed gallery's embeddings after increment `index` (evaluation/compatibility.py)."""
        return self.checkpoints / f"eval_embeddings_{index:02d}.pt"

    def is_run(self) -> bool:
        """Has training written here (checkpoints or results)?"""
        return self.checkpoints.exists() or self.results.exists()

    def existing(self) -> list:
        """The run's own files and folders that exist (what `--overwrite` removes)."""
        return [self.root / name for name in RUN_FILES if (self.root / name).exists()]

    def read_results(self) -> dict:
        """results.json as data (FileNotFoundError / ValueError naming the file)."""
        try:
            text = self.results.read_text()
        except FileNotFoundError:
            raise FileNotFoundError(f"no {RESULTS} in {self.root}") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.results}: not JSON ({e})") from None
