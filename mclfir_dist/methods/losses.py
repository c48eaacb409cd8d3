"""Doublet InfoNCE over the global batch, and the distillation terms.

Local-loss style (as open_clip's ClipLoss with local_loss=True): each rank scores its own
anchors against the embeddings gathered from every rank, so the similarity block is
n_local x n_global (linear in world size), and the negative pool grows with the world.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry
from ..utils.distributed import all_gather_no_grad, all_gather_with_grad


class DoubletInfoNCE(nn.Module):
    """L_i = -log( exp(s_i,p(i)/tau) / sum_{k != i} exp(s_i,k/tau) ), s = cosine.

    Only samples of the same task (attribute head) compete: embeddings of different heads live
    in different spaces. `mask_same_value` removes same-value samples other than p(i) from the
    denominator; `multi_positive` (SupCon) averages -log p over every same-value sample.
    """

    def __init__(self, temperature: float = 0.3, mask_same_value: bool = False, multi_positive: bool = False,
                 gather: bool = True, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.temperature = temperature
        self.mask_same_value, self.multi_positive = mask_same_value, multi_positive
        self.gather, self.rank, self.world_size = gather, rank, world_size

    def forward(self, emb: torch.Tensor, value: torch.Tensor, task: torch.Tensor, positive: torch.Tensor
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """emb: n x D (L2-normalised), value/task: n, positive: n (local row of each anchor's positive)."""
        n = emb.shape[0]
        if self.gather and self.world_size > 1:
            all_emb = all_gather_with_grad(emb)
            all_value = all_gather_no_grad(value)
            all_task = all_gather_no_grad(task)
            offset = self.rank * n
        else:
            all_emb, all_value, all_task, offset = emb, value, task, 0
        # fp32 whatever the autocast: a bf16 matmul here moves the loss by ~1e-2 at 128 rows
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return self._loss(emb.float(), all_emb.float(), value, task, all_value, all_task, positive, offset)

    def _loss(self, emb, all_emb, value, task, all_value, all_task, positive, offset):
        n = emb.shape[0]
        N = all_emb.shape[0]
        logits = emb @ all_emb.t() / self.temperature           # n x N
        cols = torch.arange(N, device=emb.device)
        self_idx = offset + torch.arange(n, device=emb.device)
        pos_idx = offset + positive
        is_self = cols[None, :] == self_idx[:, None]
        other_task = all_task[None, :] != task[:, None]
        same_value = (all_value[None, :] == value[:, None]) & ~other_task & ~is_self
        excluded = is_self | other_task
        if self.mask_same_value and not self.multi_positive:
            excluded = excluded | (same_value & (cols[None, :] != pos_idx[:, None]))
        logits = logits.masked_fill(excluded, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        if self.multi_positive:
            pos_mask = same_value.float()
            per_anchor = -(log_prob.masked_fill(~same_value, 0.0) * pos_mask).sum(1) / pos_mask.sum(1).clamp_min(1)
        else:
            per_anchor = -log_prob.gather(1, pos_idx[:, None]).squeeze(1)
        pool = (~excluded).sum(1).float().mean().detach()   # a tensor: reading it would sync with the device
        return per_anchor.mean(), {"negative_pool": pool, "global_batch": float(N)}


def feature_distillation(student_pooled: torch.Tensor, teacher_pooled: torch.Tensor) -> torch.Tensor:
    """MSE between pooled trunk features (the released code's KD)."""
    return F.mse_loss(student_pooled.float(), teacher_pooled.float())


def embedding_distillation(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """1 - cosine between old heads' embeddings of student and teacher features."""
    return (1.0 - (student_emb.float() * teacher_emb.float()).sum(-1)).mean()


@dataclass(frozen=True)
class Distillation:
    """A distillation target: `loss(student_pooled, student_fmap, teacher_fmap, old_heads)`.
    `needs_old_heads`: no term (and no teacher pass) while there are no frozen heads yet."""
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Sequence[nn.Module]], torch.Tensor]
    needs_old_heads: bool


DISTILLATIONS: Registry[Distillation] = Registry("distillation type", "loss.kd_type")


def old_head_distillation(student_fmap: torch.Tensor, teacher_fmap: torch.Tensor,
                          old_heads: Sequence[nn.Module]) -> torch.Tensor:
    """Mean over the frozen heads of embedding_distillation(head(student), head(teacher))."""
    return torch.stack([embedding_distillation(h(student_fmap), h(teacher_fmap)) for h in old_heads]).mean()


DISTILLATIONS.register("feature", label="pooled-feature MSE")(Distillation(
    lambda pooled, fmap, teacher_fmap, heads: feature_distillation(pooled, teacher_fmap.mean(dim=(2, 3))), False))
DISTILLATIONS.register("embedding", label="old-head embeddings")(Distillation(
    lambda pooled, fmap, teacher_fmap, heads: old_head_distillation(fmap, teacher_fmap, heads), True))
