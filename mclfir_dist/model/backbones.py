"""Trunk modules, with nothing but torch and torchvision (and the EfficientNet-Lite package for that
trunk) behind them, so an exported model loads without this project's training stack.

- `ResNetTrunk`: a torchvision ResNet cut after layer3 (the paper's cut) or full.
- `EfficientNetLiteTrunk`: EfficientNet-Lite0 feature extractor (`efficientnet_lite_pytorch`).
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torchvision
from torch import nn

RESNET_CHANNELS = {"resnet18": (256, 512), "resnet34": (256, 512), "resnet50": (1024, 2048), "resnet101": (1024, 2048)}


class ResNetTrunk(nn.Module):
    def __init__(self, name: str, cut: str):
        super().__init__()
        r = getattr(torchvision.models, name)(weights=None)
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
        self.layer1, self.layer2, self.layer3 = r.layer1, r.layer2, r.layer3
        self.layer4 = r.layer4 if cut == "full" else None
        self.out_channels = RESNET_CHANNELS[name][1 if cut == "full" else 0]

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
            raise ValueError(f"ResNet trunk weights do not match: {len(missing)} missing, e.g. {missing[:3]}")

    def torchvision_state(self) -> dict:
        """The trunk's weights under torchvision's ResNet names (conv1, bn1, layer1...): they load into
        `torchvision.models.<name>()` with strict=False."""
        out = {}
        for k, v in self.state_dict().items():
            if k.startswith("stem."):
                index, rest = k[len("stem."):].split(".", 1)
                out[f"{'conv1' if index == '0' else 'bn1'}.{rest}"] = v
            else:
                out[k] = v
        return out


class EfficientNetLiteTrunk(nn.Module):
    out_channels = 1280

    def __init__(self, image_size: int, drop_connect: float = -1.0):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet
        rate = {} if drop_connect < 0 else {"drop_connect_rate": drop_connect}   # -1: the package's 0.2
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size, **rate)
        self.net._fc = nn.Identity()  # classifier unused; keep it out of the optimizer and EMA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)

    def load_pretrained(self, path: str) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"EfficientNet-Lite0 weights {path} do not match: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")

    def torchvision_state(self) -> dict:
        return self.net.state_dict()   # the efficientnet_lite_pytorch package's own names

    def load_torchvision_state(self, state: dict) -> None:
        missing, unexpected = self.net.load_state_dict(state, strict=False)   # strict=False: no _fc weights
        if missing or unexpected:
            raise ValueError(f"EfficientNet-Lite0 trunk weights do not match: {len(missing)} missing, e.g. "
                             f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}")


# name -> (cut, image size) -> trunk module (untrained). The training registry (trunks.TRUNKS) builds
# its entries from this table, and exported models are rebuilt from it: one entry serves both.
BACKBONES: Dict[str, Callable[[str, int], nn.Module]] = {
    **{name: (lambda cut, size, name=name: ResNetTrunk(name, cut)) for name in RESNET_CHANNELS},
    "efficientnet_lite0": lambda cut, size: EfficientNetLiteTrunk(size),
}


def export_state(trunk: nn.Module) -> dict:
    """The trunk's weights as exported: under torchvision's (or its package's) names where the trunk says
    how (`torchvision_state`), else its own state_dict names."""
    return trunk.torchvision_state() if hasattr(trunk, "torchvision_state") else trunk.state_dict()


def load_export_state(trunk: nn.Module, state: dict) -> None:
    """Inverse of export_state."""
    if hasattr(trunk, "load_torchvision_state"):
        trunk.load_torchvision_state(state)
    else:
        trunk.load_state_dict(state)


def build_backbone(name: str, cut: str, image_size: int) -> Tuple[nn.Module, int]:
    """An untrained trunk by name and its output channels."""
    if name not in BACKBONES:
        raise ValueError(f"unknown trunk {name!r} (known: {', '.join(BACKBONES)})")
    trunk = BACKBONES[name](cut, image_size)
    return trunk, trunk.out_channels
