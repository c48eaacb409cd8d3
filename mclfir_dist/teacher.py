"""The EMA teacher of the encoder: never trained by gradient, updated after every optimizer step
with one fused multi-tensor lerp over all parameters; buffers (BN statistics) are copied."""
from __future__ import annotations

import copy


import torch
from torch import nn


class EMATeacher(nn.Module):
    def __init__(self, encoder: nn.Module, decay: float = 0.999, warmup_steps: int = 0):
        super().__init__()
        self.module = copy.deepcopy(encoder)
        self.module.requires_grad_(False)
        self.module.eval()
        self.decay, self.warmup_steps = decay, warmup_steps
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True):
        # BatchNorm of the teacher always uses its running statistics
        return super().train(False)

    def current_decay(self) -> float:
        n = int(self.num_updates)
        if self.warmup_steps > 0:
            return min(self.decay, (1 + n) / (self.warmup_steps + n))
        return self.decay

    @torch.no_grad()
    def update(self, encoder: nn.Module) -> None:
        """theta_T <- d * theta_T + (1 - d) * theta_S, from the unwrapped student encoder."""
        d = self.current_decay()
        t_params = list(self.module.parameters())
        s_params = [p.detach().to(t.dtype) for p, t in zip(encoder.parameters(), t_params)]
        if len(s_params) != len(t_params):
            raise RuntimeError("teacher and student encoders have different parameter lists")
        torch._foreach_lerp_(t_params, s_params, 1.0 - d)
        for tb, sb in zip(self.module.buffers(), encoder.buffers()):
            tb.copy_(sb)
        self.num_updates += 1

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)
