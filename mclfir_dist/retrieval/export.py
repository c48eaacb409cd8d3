"""`mclfir export`: a run's checkpoint -> a portable model (model.safetensors + config.json), and
optionally a `torch.export` program with a dynamic batch size. Load it with `portable.load_exported`."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Optional

import torch

from ..version import __version__
from ..model.backbones import export_state
from ..model.preprocess import IMAGENET_MEAN, IMAGENET_STD
from ..model.saved import load_run_model
from ..utils.io import atomic_write, atomic_write_text
from .portable import EXPORT_FORMAT, load_exported

log = logging.getLogger(__name__)


def export_run(run_dir: str | Path, out: str | Path, checkpoint: Optional[str] = None,
               torch_export: bool = False) -> Path:
    from safetensors.torch import save
    model, cfg, path = load_run_model(run_dir, checkpoint)
    out = Path(out)
    resize = int(round(cfg.data.image_size * cfg.data.resize_ratio))
    config = {"format": EXPORT_FORMAT, "trunk": cfg.model.trunk, "cut": cfg.model.cut, "trunk_channels":
              model.trunk_channels, "image_size": cfg.data.image_size, "resize": resize,
              "resize_ratio": cfg.data.resize_ratio, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
              "attributes": model.attributes, "head_channels": cfg.model.head_channels,
              "embed_dim": cfg.model.embed_dim, "source": {"run": str(run_dir), "checkpoint": str(path),
                                                           "mclfir_dist": __version__}}
    tensors = {f"trunk.{k}": v.contiguous() for k, v in export_state(model.trunk).items()}
    tensors.update({f"heads.{k}": v.contiguous() for k, v in model.heads.state_dict().items()})
    atomic_write(out / "model.safetensors", lambda f: f.write(save(tensors, metadata={"format": EXPORT_FORMAT})))
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    if torch_export:
        program = export_program(out)
        buffer = io.BytesIO()   # torch.export.save warns about any file object but a buffer or a .pt2 path
        torch.export.save(program, buffer)
        atomic_write(out / "model.pt2", lambda f: f.write(buffer.getvalue()))
    log.info("exported %s (%s) to %s", path, ", ".join(model.attributes), out)
    return out


def export_program(directory: Path):
    """torch.export of the exported model: images (B x 3 x S x S, B dynamic) -> B x A x D embeddings."""
    model = load_exported(directory)

    class Stacked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, images):
            return torch.stack(list(self.inner(images).values()), dim=1)

    size = model.config["image_size"]
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(Stacked().eval(), (example,), dynamic_shapes={"images": {0: batch}})
