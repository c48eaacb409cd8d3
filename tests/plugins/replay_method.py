"""A training method written outside the package: keep one batch per old attribute and replay it
through that attribute's frozen head (InfoNCE), beside the new attribute's loss. It only imports
mclfir_dist's public interface. Named in a config (`plugins: [replay_method]`) or declared as an
entry point of group `mclfir_dist.plugins`, it makes `train.method=replay_one_batch` valid and adds
its own typed config section, `replay.*`."""
from dataclasses import dataclass, field
from typing import Dict, List

import torch

from mclfir_dist.data.pairing import positive_index
from mclfir_dist.methods.losses import DoubletInfoNCE
from mclfir_dist.methods import METHODS, IncrementContext, LossTerm, Method, StepOutput
from mclfir_dist.registry import CONFIG_SECTIONS

NAME = "replay_one_batch"


@CONFIG_SECTIONS.register("replay")
@dataclass
class ReplayConfig:
    weight: float = field(default=1.0, metadata={"help": "Weight of each replayed attribute's InfoNCE term."})


@METHODS.register(NAME, label="Replay (one stored batch per old attribute)")
class ReplayOneBatch(Method):
    def setup(self, model) -> None:
        self.stored: Dict[str, Dict[str, torch.Tensor]] = {}
        self.last_batch = None
        self.replayed_steps = 0
        self.loss = DoubletInfoNCE(self.cfg.loss.temperature)

    def distillation(self, ctx: IncrementContext, model, out: StepOutput) -> List[LossTerm]:
        self.last_batch = out.batch
        terms = []
        for attribute, batch in self.stored.items():
            images = batch["images"].to(out.images.device)
            emb = model.heads[attribute](model.trunk(images))
            task = torch.zeros(emb.shape[0], dtype=torch.long, device=emb.device)
            value = batch["value"].to(emb.device)
            nce, _ = self.loss(emb, value, task, positive_index(emb.shape[0], emb.device))
            terms.append(LossTerm(f"replay_{attribute}", self.cfg.replay.weight, nce))
        self.replayed_steps += bool(terms)
        return terms

    def end_increment(self, ctx: IncrementContext, model) -> None:
        rows = self.last_batch["task"] == 0   # the rows of the increment's first attribute
        keep = {"images": self.last_batch["images"][rows], "value": self.last_batch["value"][rows]}
        self.stored[ctx.plan.train_heads[0]] = keep

    def state_dict(self) -> Dict:
        return {"stored": self.stored}

    def load_state_dict(self, state: Dict) -> None:
        self.stored = state["stored"]
