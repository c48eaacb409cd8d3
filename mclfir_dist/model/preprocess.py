"""Image preprocessing shared by training, evaluation and exported models (torch and torchvision only)."""
from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise():
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(image_size: int, resize: int):
    """uint8 C x H x W -> resize the shorter side to `resize`, centre-crop `image_size`, normalise."""
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size), normalise()])


def preprocess(image: torch.Tensor, config: dict) -> torch.Tensor:
    """A decoded uint8 image (C x H x W, grey or RGB(A)) -> the model's normalised input."""
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return eval_transform(config["image_size"], config["resize"])(image[:3])
