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

from ..model.backbones import build_backbone, export_state, load_export_state
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


# config.json's sizes: (key, type, smallest, largest); past these a file cannot be a model this code wrote
SIZES = (("image_size", int, 1, 4096), ("resize", int, 1, 8192), ("head_channels", int, 1, 65536),
         ("embed_dim", int, 1, 65536))


def check_export_config(config, path: Path) -> dict:
    """config.json as a checkpoint's config is checked: every field a reader uses, typed and in range, before
    anything is built from it (an embed_dim of 200000 would allocate 160 GB)."""
    from ..model.backbones import BACKBONES
    from ..utils.names import check_attribute
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path}: format {got!r}, expected {EXPORT_FORMAT}")
    if config.get("trunk") not in BACKBONES or not isinstance(config.get("cut"), str):
        raise ValueError(f"{path}: trunk {config.get('trunk')!r} is not one of {', '.join(BACKBONES)}")
    for key, kind, low, high in SIZES:
        value = config.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"{path}: {key} must be an integer in [{low}, {high}], got {value!r}")
    attributes = config.get("attributes")
    if not isinstance(attributes, list) or not attributes or len(set(map(str, attributes))) != len(attributes):
        raise ValueError(f"{path}: attributes must be a non-empty list of distinct names")
    for a in attributes:
        check_attribute(a, f"{path}: attributes", ValueError)
    return config


def _check_shapes(config: dict, tensors: Path, path: Path) -> None:
    """Every tensor of the file has the name and shape a model built from config.json (on the meta device: no
    memory) expects, read from the file's header before any tensor is loaded."""
    from safetensors import safe_open
    with torch.device("meta"):
        meta = ExportedModel(config)
    expected = {f"trunk.{k}": tuple(v.shape) for k, v in export_state(meta.trunk).items()}
    expected.update({f"heads.{k}": tuple(v.shape) for k, v in meta.heads.state_dict().items()})
    with safe_open(str(tensors), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for name in sorted(set(expected) | set(found)):
        if expected.get(name) != found.get(name):
            raise ValueError(f"{tensors} does not match {path}: tensor '{name}' is {found.get(name)} in the file, "
                             f"{expected.get(name)} by the config")


def load_exported(directory: str | Path, device: str | torch.device = "cpu") -> ExportedModel:
    from safetensors.torch import load_file
    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{directory / 'config.json'}: not JSON ({e})") from None
    check_export_config(config, directory / "config.json")
    _check_shapes(config, directory / "model.safetensors", directory / "config.json")
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
