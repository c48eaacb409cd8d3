"""Use an exported model with torch and torchvision only (no accelerate, deepspeed, DALI, webdataset).

`mclfir export --run RUN --out DIR` writes `DIR/model.safetensors` (trunk under torchvision's names,
one head per attribute) and `DIR/config.json` (trunk, cut, image size, resize, normalisation,
attributes, head sizes). Then, in plain PyTorch:

    from mclfir_dist.retrieval.portable import load_exported, preprocess
    model = load_exported("DIR")                 # eval mode
    x = preprocess(torchvision.io.decode_image("shirt.jpg"), model.config)   # 3 x S x S float
    emb = model(x[None])["sleeve_length"]        # 1 x 128, L2-normalised

Only this file and `model/heads.py`, `model/backbones.py` and `model/preprocess.py` are imported.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from torch import nn

from ..model.backbones import build_backbone, load_export_state
from ..model.heads import AttributeHead
from ..model.preprocess import IMAGENET_MEAN, IMAGENET_STD, eval_transform, normalise, preprocess

__all__ = ["EXPORT_FORMAT", "IMAGENET_MEAN", "IMAGENET_STD", "ExportedModel", "eval_transform", "load_exported",
           "normalise", "preprocess"]

EXPORT_FORMAT = "mclfir-export/1"


class ExportedModel(nn.Module):
    """Trunk + one head per attribute; forward(images) -> {attribute: B x D L2-normalised embeddings}."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.trunk, channels = build_backbone(config["trunk"], config["cut"], config["image_size"])
        self.heads = nn.ModuleDict({a: AttributeHead(channels, config["head_channels"], config["embed_dim"])
                                    for a in config["attributes"]})

    @property
    def attributes(self) -> List[str]:
        return list(self.heads)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, attributes: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
        fmap = self.trunk(images)
        return {a: self.heads[a](fmap) for a in (attributes or self.attributes)}


def load_exported(directory: str | Path, device: str | torch.device = "cpu") -> ExportedModel:
    from safetensors.torch import load_file
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{directory / 'config.json'}: format {config.get('format')!r}, expected {EXPORT_FORMAT}")
    model = ExportedModel(config)
    state = load_file(str(directory / "model.safetensors"))
    try:
        load_export_state(model.trunk, {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")})
        model.heads.load_state_dict({k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")})
    except (RuntimeError, ValueError) as e:   # missing, extra or mis-shaped tensors: never a half-loaded model
        raise ValueError(f"{directory / 'model.safetensors'} does not match {directory / 'config.json'}: "
                         f"{str(e).splitlines()[0]}") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{directory / 'model.safetensors'}: tensor '{bad[0]}' holds NaN or inf")
    return model.eval().to(device)
