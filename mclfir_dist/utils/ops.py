"""Counting the ops torch dispatches: each is a kernel launch on a GPU (or a few, for a multi-tensor op),
so the count is what bounds a small batch there, and it can be measured on CPU."""
from __future__ import annotations

import sys

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """`with OpCounter() as ops: ...` counts the ops that compute (views, which launch nothing, left out):
    `ops.total`, and `ops.optimizer` of them dispatched from torch.optim."""

    def __init__(self):
        super().__init__()
        self.total = self.optimizer = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.total += 1
            frame = sys._getframe(1)
            while frame is not None and "/torch/optim/" not in frame.f_code.co_filename.replace("\\", "/"):
                frame = frame.f_back
            self.optimizer += frame is not None
        return func(*args, **(kwargs or {}))
