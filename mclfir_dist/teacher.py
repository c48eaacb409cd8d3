"""The EMA teacher of the encoder: never trained by gradient, updated after every optimizer step
with one fused multi-tensor lerp over all parameters; buffers (BN statistics) are copied in one
fused copy. The update count lives on the host, so an update never waits for the device.

Warm-up (`warmup_steps` = w > 0): a linear ramp of the decay, d_n = d * min(1, n / w) for the
n-th update (n = 0, 1, ...): the teacher starts as the student and reaches the full decay d after
w updates; it tracks the student closely while the student still moves fast."""
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
        self.updates = 0   # host copy of num_updates: reading the buffer would sync with the device

    def train(self, mode: bool = True):
        # BatchNorm of the teacher always uses its running statistics
        return super().train(False)

    def decay_at(self, n: int) -> float:
        if self.warmup_steps > 0:
            return self.decay * min(1.0, n / self.warmup_steps)
        return self.decay

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return self.decay_at(self.updates)

    @torch.no_grad()
    def update(self, encoder: nn.Module) -> None:
        """theta_T <- d * theta_T + (1 - d) * theta_S, from the unwrapped student encoder."""
        d = self.current_decay()
        t_params, student = list(self.module.parameters()), list(encoder.parameters())
        if len(student) != len(t_params):   # checked before zip, which would truncate silently
            raise RuntimeError(f"teacher and student encoders differ: {len(t_params)} vs {len(student)} parameters")
        s_params = [p.detach().to(t.dtype) for p, t in zip(student, t_params)]
        torch._foreach_lerp_(t_params, s_params, 1.0 - d)
        t_bufs, s_bufs = list(self.module.buffers()), list(encoder.buffers())
        if t_bufs:
            torch._foreach_copy_(t_bufs, s_bufs)
        self.updates += 1
        self.num_updates.fill_(self.updates)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "num_updates"
        if key in state_dict:
            self.updates = int(state_dict[key])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)
