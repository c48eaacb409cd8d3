"""Family members added from outside the package, one registration each (the README's "What a change
touches" rows that say "nothing else"): a trunk, an lr schedule, a loader and a converter."""
import csv
from pathlib import Path

import torch
from torch import nn

from mclfir_dist.config import ShardBuildConfig
from mclfir_dist.data import LOADERS, Loader, build_eval_loader, build_train_loader
from mclfir_dist.data.converters import CONVERTERS, Converter
from mclfir_dist.data.shards import build_shards, read_csv_samples
from mclfir_dist.model.trunks import register_trunk
from mclfir_dist.methods.optim import SCHEDULES


class TinyTrunk(nn.Module):
    """Two strided convolutions: a feature map of 16 channels."""
    out_channels = 16

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


register_trunk("tiny_cnn", lambda cut, image_size: TinyTrunk(), label="Tiny CNN")


@SCHEDULES.register("halving", label="halves over the increment")
def halving(cfg, step: int, steps: int) -> float:
    return 0.5 ** (step / max(1, steps))


BATCHES = {"train": 0}


def _counting_train(cfg, manifest, columns, rank, world, seed, device=None, start_batch=0):
    """The torch loader's batches, counted (the count shows this loader was the one used)."""
    names = [manifest.attributes[c] for c in columns]
    for batch in build_train_loader(cfg, manifest, names, rank, world, seed, "torch", device, start_batch):
        BATCHES["train"] += 1
        yield batch


def _counting_eval(cfg, manifest, split, rank, world, device=None):
    return build_eval_loader(cfg, manifest, split, rank, world, loader="torch", device=device)


LOADERS.register("counting", label="the torch loader, counted")(
    Loader(lambda: (True, "always available"), _counting_train, _counting_eval, exact_resume=True))


def _flat_csv(root, out, image_root=None, cfg=None, attribute_prefix=""):
    """root/labels.csv: filename + one column per attribute."""
    rows = list(csv.DictReader(open(Path(root) / "labels.csv")))
    attributes = [c for c in rows[0] if c != "filename"]
    samples, _ = read_csv_samples(Path(root) / "labels.csv", image_root or root, attributes)
    cfg = cfg or ShardBuildConfig(min_value_count=2)
    return build_shards(samples, attributes, out, cfg, source={"type": "flat_csv", "root": str(root)})


CONVERTERS.register("flat_csv")(Converter(_flat_csv, "a folder with labels.csv (filename + attribute columns)", 2))
