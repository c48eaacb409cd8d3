"""Optimizer and learning-rate schedule of one increment.

Schedules are registered lr multipliers indexed by the increment's step (`SCHEDULES`); linear
warm-up applies to all of them. A global batch other than the config's reference is handled before
this (batch_scaling.py): the lr and step counts here are already the effective ones.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List

import torch
from torch import nn

from ..config import OptimConfig
from ..registry import Registry

Schedule = Callable[[OptimConfig, int, int], float]   # (cfg, step after warm-up, steps after warm-up) -> multiplier
SCHEDULES: Registry[Schedule] = Registry("schedule", "optim.schedule")


@SCHEDULES.register("cosine")
def cosine(cfg: OptimConfig, step: int, steps: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, steps))))


@SCHEDULES.register("step")
def step_decay(cfg: OptimConfig, step: int, steps: int) -> float:
    return cfg.gamma ** ((step + cfg.warmup_steps) // max(1, cfg.step_size))


@SCHEDULES.register("constant")
def constant(cfg: OptimConfig, step: int, steps: int) -> float:
    return 1.0


def lr_multiplier(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    schedule = SCHEDULES.get(cfg.schedule)

    def multiplier(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return schedule(cfg, step - cfg.warmup_steps, total_steps - cfg.warmup_steps)
    return multiplier


def kernel_options(implementation: str, params: List[torch.Tensor]) -> Dict[str, bool]:
    """AdamW's keyword for `optim.implementation`. Fused is one kernel per update where foreach launches
    several multi-tensor kernels; auto takes it on CUDA, where a 32-image step is bound by launches.
    Elsewhere auto leaves torch's default (a loop on CPU): the numbers of every published CPU run."""
    if implementation == "auto":
        on_cuda = bool(params) and all(p.is_floating_point() and p.device.type == "cuda" for p in params)
        return {"fused": True} if on_cuda else {}
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[implementation]


def build_optimizer(cfg: OptimConfig, trunk: nn.Module, heads: List[nn.Module],
                    encoder_lr_scale: float) -> torch.optim.Optimizer:
    """AdamW with two groups: the encoder (lr x encoder_lr_scale; absent when 0) and the heads in training."""
    lr = cfg.lr
    groups: List[Dict] = []
    if encoder_lr_scale > 0:
        groups.append({"params": [p for p in trunk.parameters() if p.requires_grad],
                       "lr": lr * encoder_lr_scale, "name": "encoder"})
    groups.append({"params": [p for head in heads for p in head.parameters()], "lr": lr, "name": "heads"})
    params = [p for g in groups for p in g["params"]]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay,
                             **kernel_options(cfg.implementation, params))


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps))
