"""Validation inside an increment (eval.every_steps): the curve, the best state (train.select=best_val) and
early stopping (train.patience). Every rank scores the same gathered embeddings, so every rank takes the
same decisions without a collective of its own. Its state travels in partial checkpoints, so a resume
inside an increment keeps the best state seen before the kill."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

log = logging.getLogger("mclfir")


@dataclass
class Selection:
    every: int
    select: str = "last"
    patience: int = 0
    curve: List[List[float]] = field(default_factory=list)   # [steps done, val mAP]
    best: Optional[List[float]] = None                        # [steps done, val mAP]
    since_best: int = 0
    seconds: float = 0.0
    stopped_at: Optional[int] = None
    state: Optional[Dict[str, torch.Tensor]] = None           # CPU copy of the selected parameters and buffers

    def due(self, steps_done: int, steps: int) -> bool:
        return self.every > 0 and (steps_done % self.every == 0 or steps_done == steps)

    def observe(self, steps_done: int, score: float, model: torch.nn.Module, prefixes: List[str]) -> bool:
        """Record one evaluation; keep the state when it is the best so far. True: stop the increment."""
        self.curve.append([steps_done, score])
        if self.best is None or score > self.best[1]:
            self.best, self.since_best = [steps_done, score], 0
            if self.select == "best_val":
                self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
                              if k.startswith(tuple(prefixes))}
        else:
            self.since_best += 1
        if self.patience and self.since_best >= self.patience:
            self.stopped_at = steps_done
            return True
        return False

    def finish(self, model: torch.nn.Module, steps_done: int) -> None:
        """best_val: put the selected state back (the rest of the model is untouched)."""
        if self.select != "best_val" or self.state is None or self.best is None:
            return
        if self.best[0] != steps_done:
            model.load_state_dict(self.state, strict=False)
            log.info("train.select=best_val: keeping step %d (val mAP %.2f) over step %d (%.2f)", self.best[0],
                     100 * self.best[1], steps_done, 100 * self.curve[-1][1])

    def record(self) -> dict:
        return {"select": self.select, "every_steps": self.every, "patience": self.patience, "curve": self.curve,
                "kept_step": self.best[0] if self.select == "best_val" and self.best else None,
                "best_val_map": self.best[1] if self.best else None, "stopped_early_at": self.stopped_at}

    def state_dict(self) -> dict:
        return {"curve": self.curve, "best": self.best, "since_best": self.since_best, "seconds": self.seconds,
                "stopped_at": self.stopped_at, "state": self.state}

    def load_state_dict(self, saved: Optional[dict]) -> None:
        if saved:
            self.curve, self.best, self.since_best = saved["curve"], saved["best"], saved["since_best"]
            self.seconds, self.stopped_at, self.state = saved["seconds"], saved["stopped_at"], saved["state"]


def selected_prefixes(train_heads: List[str], train_encoder: bool) -> List[str]:
    """state_dict prefixes of what the increment trains: its heads, and the trunk when the encoder trains."""
    return [f"heads.{a}." for a in train_heads] + (["trunk."] if train_encoder else [])
