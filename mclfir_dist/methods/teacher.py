"""The EMA teacher of the encoder: never trained by gradient, updated after every optimizer step
with one fused multi-tensor lerp over all parameters; buffers (BN statistics) are copied with one
fused copy per dtype. The update count lives on the host, so an update never waits for the device,
and the tensor lists are built once per increment, so an update costs a handful of kernel launches
and no Python walk over the modules.

Warm-up (`warmup_steps` = w > 0): a linear ramp of the decay, d_n = d * min(1, n / w) for the
n-th update (n = 0, 1, ...): the teacher starts as the student and reaches the full decay d after
w updates; it tracks the student closely while the student still moves fast."""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn


class _UpdateLists:
    """The teacher's and the student's tensors, paired and grouped for the fused ops."""

    def __init__(self, teacher: nn.Module, student: nn.Module):
        self.student = student
        self.t_params, self.s_params = list(teacher.parameters()), list(student.parameters())
        if len(self.s_params) != len(self.t_params):   # checked here: zip would truncate silently
            raise RuntimeError(f"teacher and student encoders differ: {len(self.t_params)} vs "
                               f"{len(self.s_params)} parameters")
        # a student cast to another dtype (DeepSpeed bf16) is converted at every update
        self.same_dtype = all(s.dtype == t.dtype for s, t in zip(self.s_params, self.t_params))
        # foreach ops take one dtype per call: BN's float statistics and its long counters apart
        groups: Dict[Tuple[torch.dtype, torch.dtype], Tuple[List[torch.Tensor], List[torch.Tensor]]] = {}
        t_bufs, s_bufs = list(teacher.buffers()), list(student.buffers())
        if len(s_bufs) != len(t_bufs):
            raise RuntimeError(f"teacher and student encoders differ: {len(t_bufs)} vs {len(s_bufs)} buffers")
        for t, s in zip(t_bufs, s_bufs):
            ts, ss = groups.setdefault((t.dtype, s.dtype), ([], []))
            ts.append(t)
            ss.append(s)
        self.buffer_groups = list(groups.values())


class EMATeacher(nn.Module):
    def __init__(self, encoder: nn.Module, decay: float = 0.999, warmup_steps: int = 0):
        super().__init__()
        self.module = copy.deepcopy(encoder)   # a compiled encoder's copy is compiled on its own weights
        self.module.requires_grad_(False)
        self.module.eval()
        self.decay, self.warmup_steps = decay, warmup_steps
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.updates = 0   # host copy of num_updates: reading the buffer would sync with the device
        self._lists: Optional[_UpdateLists] = None

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

    def forget_tensor_lists(self) -> None:
        """Call when the student's or the teacher's tensors may have been replaced (a new increment's
        prepare, a .to()): the next update lists them again."""
        self._lists = None

    def _apply(self, fn, *args, **kwargs):   # .to() / .cuda() may replace the teacher's buffers
        self._lists = None
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def update(self, encoder: nn.Module) -> None:
        """theta_T <- d * theta_T + (1 - d) * theta_S, from the unwrapped student encoder."""
        lists = self._lists
        if lists is None or lists.student is not encoder:
            lists = self._lists = _UpdateLists(self.module, encoder)
        student = lists.s_params if lists.same_dtype else [s.to(t.dtype) for s, t in zip(lists.s_params,
                                                                                         lists.t_params)]
        torch._foreach_lerp_(lists.t_params, student, 1.0 - self.current_decay())
        for t_bufs, s_bufs in lists.buffer_groups:
            torch._foreach_copy_(t_bufs, s_bufs)
        self.updates += 1
        self.num_updates.fill_(self.updates)   # a launch, not a sync: the buffer is never read back per step

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "num_updates"
        if key in state_dict:
            self.updates = int(state_dict[key])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)
