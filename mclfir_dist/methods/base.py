"""The training-method interface. The engine asks a method, at every increment, for a plan
(which heads train, which are frozen, how many steps, the encoder's lr scale, whether the model
is rebuilt), then calls its hooks around the steps. Everything method-specific lives behind it.

To add a method, subclass `Method` and register it (from any module, no package file edited):

    from mclfir_dist.methods import METHODS, Method

    @METHODS.register("mine", label="My method")
    class Mine(Method):
        ...

and train with `train.method=mine`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Protocol, Sequence, Tuple

import torch
from torch import nn

from ..config import RunConfig
from ..registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from ..model.mclfir import MCLFIRModel


class MethodRuntime(Protocol):
    """What a method may use of the run it trains in (training's Runtime is one): methods sit below training
    and never import it."""
    device: torch.device   # where batches and the model live
    rank: int
    world: int


@dataclass
class IncrementPlan:
    """What one increment trains. Stated from scratch every increment: nothing carries over."""
    index: int
    name: str
    train_heads: List[str]            # heads that get gradients (added if missing)
    frozen_heads: List[str]           # heads kept fixed (eval mode, no gradients)
    steps: int
    encoder_lr_scale: float           # encoder lr = optim.lr x this; 0 = the trunk does not train
    rebuild_model: bool = False       # start from a freshly built (pretrained) model
    skip: bool = False                # nothing is trained or evaluated at this increment

    @property
    def train_encoder(self) -> bool:
        return self.encoder_lr_scale > 0

    @property
    def evaluated_heads(self) -> List[str]:
        return self.frozen_heads + [a for a in self.train_heads if a not in self.frozen_heads]


@dataclass
class StepOutput:
    """What the student produced for one batch, handed to `Method.distillation`."""
    batch: dict                       # the loader's batch (CPU tensors)
    images: torch.Tensor              # the batch's images on the device
    embeddings: torch.Tensor          # rows x D
    pooled: torch.Tensor              # rows x C pooled trunk features
    feature_map: torch.Tensor         # rows x C x H x W


@dataclass
class LossTerm:
    name: str
    weight: float
    value: torch.Tensor


@dataclass
class IncrementContext:
    plan: IncrementPlan
    old_attributes: List[str] = field(default_factory=list)   # attributes of earlier increments


class Method:
    """Defaults are plain fine-tuning: new heads train, old heads are frozen, the encoder trains."""

    # The static baseline that `mclfir report` puts every run's training cost against (static-final: its
    # last retraining; static-cumulative: all of them).
    static_reference = False
    # `mclfir tune`'s default search space for this method ({config key: {log|uniform|int: [lo, hi]} or
    # {choices: [...]}}); a plug-in method declares its own the same way
    tune_space = {"optim.lr": {"log": [1e-4, 4e-3]}, "optim.first_encoder_lr_scale": {"log": [0.02, 1.0]},
                  "optim.encoder_lr_scale": {"log": [0.02, 1.0]}}

    def __init__(self, cfg: RunConfig, runtime: MethodRuntime):
        self.cfg, self.runtime = cfg, runtime

    # -- the plan ---------------------------------------------------------------------------
    def plan(self, index: int, name: str, new_attributes: Sequence[str], old_attributes: Sequence[str]
             ) -> IncrementPlan:
        o = self.cfg.optim
        return IncrementPlan(index, name, list(new_attributes), list(old_attributes),
                             self.cfg.train.steps_per_increment,
                             o.first_encoder_lr_scale if index == 0 else o.encoder_lr_scale)

    # -- hooks ------------------------------------------------------------------------------
    def setup(self, model: "MCLFIRModel") -> None:
        """Once, after the model is built and before any checkpoint is loaded."""

    def begin_increment(self, ctx: IncrementContext, model: "MCLFIRModel", resuming: bool) -> None:
        """Before the increment's heads are added; `resuming`: continuing inside it from a partial checkpoint."""

    def distillation(self, ctx: IncrementContext, model: "MCLFIRModel", out: StepOutput) -> List[LossTerm]:
        """Extra loss terms of this step (the engine adds weight x value to the InfoNCE loss)."""
        return []

    def after_step(self, model: "MCLFIRModel") -> None:
        """After every optimizer step (the unwrapped model)."""

    def end_increment(self, ctx: IncrementContext, model: "MCLFIRModel") -> None:
        """After the increment's last step, before evaluation."""

    def log_values(self) -> Dict[str, float]:
        """Extra scalars for the step log and trackers (e.g. the teacher's current decay)."""
        return {}

    # -- state ------------------------------------------------------------------------------
    def modules(self) -> List[nn.Module]:
        """Modules the method owns (kept identical on every rank, saved in checkpoints)."""
        return []

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass

    def rows_to_distil(self) -> int:
        """Rows of each batch that distillation sees: the anchor half sees every doublet once."""
        b = self.cfg.data.batch_doublets
        return b if self.cfg.loss.kd_anchors_only else 2 * b


METHODS: Registry[type] = Registry("training method", "train.method")


def build_method(cfg: RunConfig, runtime: MethodRuntime) -> Method:
    return METHODS.get(cfg.train.method)(cfg, runtime)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A snapshot that never trains: no gradients, eval mode (BatchNorm uses running statistics)."""
    snapshot = copy.deepcopy(module)
    snapshot.requires_grad_(False)
    return snapshot.eval()


def distil_rows(out: StepOutput, rows: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return out.images[:rows], out.pooled[:rows], out.feature_map[:rows]
