"""frozen: the (pretrained) trunk never trains; each increment learns only its new heads."""
from typing import Sequence

from .base import METHODS, IncrementPlan, Method


@METHODS.register("frozen", label="Frozen trunk")
class Frozen(Method):
    tune_space = {"optim.lr": {"log": [1e-4, 4e-3]}}   # the trunk never trains: no encoder scale to tune

    def plan(self, index: int, name: str, new_attributes: Sequence[str], old_attributes: Sequence[str]
             ) -> IncrementPlan:
        plan = super().plan(index, name, new_attributes, old_attributes)
        plan.encoder_lr_scale = 0.0
        return plan
