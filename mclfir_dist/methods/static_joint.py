"""static_joint: the static baseline. At every increment, retrain from the initial (pretrained)
model on every attribute seen so far, with the step budget of all increments so far (times
`train.static_steps_factor`), and the first increment's encoder lr scale (each retraining is a fresh start).

`train.static_final_only`: retrain only at the last increment; the earlier retrainings' cost is
estimated from its measured seconds per step (and marked as estimated in results and reports)."""
from typing import Sequence

from ..config import ConfigError
from .base import METHODS, IncrementPlan, Method


@METHODS.register("static_joint", label="Static (joint retraining)")
class StaticJoint(Method):
    tune_space = {"optim.lr": {"log": [1e-4, 4e-3]}, "optim.first_encoder_lr_scale": {"log": [0.02, 1.0]}}
    static_reference = True   # reports put every run's cost against this one's

    def setup(self, model) -> None:
        shard_sets = {inc.shards or self.cfg.data.shards for inc in self.cfg.train.increments}
        if len(shard_sets) > 1:
            raise ConfigError("train.method=static_joint trains all attributes in one batch stream: "
                              "it needs every increment on the same shard set (train.increments[i].shards)")

    def plan(self, index: int, name: str, new_attributes: Sequence[str], old_attributes: Sequence[str]
             ) -> IncrementPlan:
        last = index == len(self.cfg.train.increments) - 1
        return IncrementPlan(index, name, list(old_attributes) + list(new_attributes), [],
                             round(self.cfg.train.static_steps_factor * self.cfg.train.steps_per_increment * (index + 1)),
                             self.cfg.optim.first_encoder_lr_scale,
                             rebuild_model=True, skip=self.cfg.train.static_final_only and not last)
