"""The MCL-FIR model: one shared trunk, one head per attribute (a ModuleDict), freezing."""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from .heads import AttributeHead
from .trunks import build_trunk


def compile_module(module: nn.Module, mode: str = "default", **options) -> None:
    """module.compile() in place (state_dict keys unchanged); `options` go to torch.compile."""
    module.compile(mode=None if mode == "default" else mode, **options)


class MCLFIRModel(nn.Module):
    def __init__(self, trunk: nn.Module, trunk_channels: int, head_channels: int = 256, embed_dim: int = 128,
                 trunk_bn: str = "train"):
        super().__init__()
        self.trunk_bn = trunk_bn
        self.trunk = trunk
        self.trunk_channels = trunk_channels
        self.head_channels, self.embed_dim = head_channels, embed_dim
        self.heads = nn.ModuleDict()
        self.frozen: List[str] = []
        self.train_trunk = True
        self.compile_options: dict = {}   # how trunk and heads were compiled (new heads too); {} = not compiled

    def compile_in_place(self, mode: str = "default", backend: str = "inductor") -> None:
        """torch.compile the trunk and every head (present and future) without changing state_dict keys.
        mode: torch.compile's (reduce-overhead = CUDA graphs, for launch-bound small batches)."""
        self.compile_options = {"mode": mode, "backend": backend}
        for module in [self.trunk, *self.heads.values()]:
            compile_module(module, **self.compile_options)

    @property
    def attributes(self) -> List[str]:
        return list(self.heads.keys())

    def add_head(self, attribute: str) -> AttributeHead:
        if attribute in self.heads:
            raise ValueError(f"head '{attribute}' exists already")
        head = AttributeHead(self.trunk_channels, self.head_channels, self.embed_dim)
        reference = next(self.trunk.parameters())
        head.to(reference.device)
        if reference.dim() == 4 and reference.is_contiguous(memory_format=torch.channels_last) \
                and not reference.is_contiguous():
            head.to(memory_format=torch.channels_last)   # the model is channels-last: so is every new head
        if self.compile_options:
            compile_module(head, **self.compile_options)
        self.heads[attribute] = head
        return head

    def configure(self, train_heads: Iterable[str], frozen_heads: Iterable[str], train_trunk: bool) -> None:
        """State the trainable set from scratch: only `train_heads` (and the trunk if `train_trunk`) get
        gradients; frozen heads run in eval mode, and so does a trunk that does not train."""
        train_heads, self.frozen = set(train_heads), list(frozen_heads)
        for name, head in self.heads.items():
            head.requires_grad_(name in train_heads)
        self.trunk.requires_grad_(train_trunk)
        self.train_trunk = train_trunk
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for a in self.frozen:
            self.heads[a].eval()
        if not self.train_trunk:
            self.trunk.eval()   # a trunk that does not learn keeps its BatchNorm statistics too
        elif self.trunk_bn == "frozen":
            # small fine-tuning batches would overwrite the pretrained statistics with noisy ones
            for m in self.trunk.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, images: torch.Tensor, task: torch.Tensor, attributes: Sequence[str],
                task_counts: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed row i with the head of attributes[task[i]].

        task_counts: rows per task, known on the host (the batch's task tensor on the CPU); with it, rows
        are routed by a stable sort of `task` and host-known slices, so no shape depends on device values
        (no device sync). Without it they are counted here, which reads `task` back from the device.
        Returns (embeddings B x D, pooled trunk features B x C, trunk feature map)."""
        fmap = self.trunk(images)
        if task_counts is None:
            task_counts = torch.bincount(task, minlength=len(attributes)).tolist()
        rows_total = images.shape[0]
        present = [(t, n) for t, n in enumerate(task_counts) if n]
        if len(present) == 1 and present[0][1] == rows_total:   # one head for the whole batch
            emb = self.heads[attributes[present[0][0]]](fmap)
        else:
            order = torch.argsort(task, stable=True)   # rows of task 0, then task 1, ...
            emb = fmap.new_zeros(rows_total, self.embed_dim)
            start = 0
            for t, n in enumerate(task_counts):
                if n:
                    rows = order[start:start + n]
                    emb = emb.index_copy(0, rows, self.heads[attributes[t]](fmap.index_select(0, rows)).to(emb.dtype))
                start += n
        return emb, fmap.mean(dim=(2, 3)), fmap

    @torch.no_grad()
    def embed_all(self, images: torch.Tensor, attributes: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B x len(attributes) x D embeddings, B x C pooled features) for evaluation."""
        fmap = self.trunk(images)
        embs = [self.heads[a](fmap) for a in attributes]
        stacked = torch.stack(embs, dim=1) if embs else fmap.new_zeros(images.shape[0], 0, self.embed_dim)
        return stacked, fmap.mean(dim=(2, 3))


def build_model(cfg: ModelConfig, image_size: int, device: Optional[torch.device] = None,
                channels_last: Optional[bool] = None) -> MCLFIRModel:
    """The model as training starts it; with `device`, moved there (and SyncBatchNorm-converted if asked).
    channels_last: the runtime's resolved choice (None: only an explicit model.channels_last=true)."""
    trunk, channels = build_trunk(cfg, image_size)
    model = MCLFIRModel(trunk, channels, cfg.head_channels, cfg.embed_dim, cfg.trunk_bn)
    if device is None:
        return model
    model = model.to(device)
    if channels_last is None:
        channels_last = cfg.channels_last is True
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_batchnorm:
        model = convert_sync_batchnorm(model, device.type == "cuda")
    return model


def convert_sync_batchnorm(model: nn.Module, on_gpu: bool) -> nn.Module:
    if not on_gpu:
        raise ConfigError("model.sync_batchnorm=true needs GPUs: PyTorch's SyncBatchNorm only works on CUDA "
                          "modules. Set model.sync_batchnorm=false for CPU runs.")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
