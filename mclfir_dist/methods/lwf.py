"""LwF: distil the old heads' outputs from a frozen snapshot of the trunk as it was when the
increment began (the student's own view, no EMA)."""
from typing import Dict, List

import torch

from .losses import old_head_distillation
from .base import METHODS, IncrementContext, LossTerm, Method, StepOutput, distil_rows, frozen_copy


@METHODS.register("lwf", label="LwF")
class LwF(Method):
    tune_space = {**Method.tune_space, "loss.kd_weight": {"log": [0.1, 100.0]}}

    def setup(self, model) -> None:
        self.snapshot = None
        self.saved_snapshot = None   # from a partial checkpoint: the trunk as that increment began

    def begin_increment(self, ctx: IncrementContext, model, resuming: bool) -> None:
        self.snapshot = frozen_copy(model.trunk) if ctx.old_attributes else None
        if resuming and self.snapshot is not None and self.saved_snapshot is not None:
            self.snapshot.load_state_dict(self.saved_snapshot)
        self.saved_snapshot = None

    def distillation(self, ctx: IncrementContext, model, out: StepOutput) -> List[LossTerm]:
        if self.snapshot is None or self.cfg.loss.kd_weight <= 0:
            return []
        images, _, fmap = distil_rows(out, self.rows_to_distil())
        with torch.no_grad():
            target = self.snapshot(images)
        old_heads = [model.heads[a] for a in ctx.old_attributes]
        return [LossTerm("kd", self.cfg.loss.kd_weight, old_head_distillation(fmap, target, old_heads))]

    def modules(self):
        return [self.snapshot] if self.snapshot is not None else []

    def state_dict(self) -> Dict:
        return {"snapshot": self.snapshot.state_dict()} if self.snapshot is not None else {}

    def load_state_dict(self, state: Dict) -> None:
        self.saved_snapshot = state.get("snapshot")
