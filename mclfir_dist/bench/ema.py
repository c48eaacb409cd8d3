"""What one EMA teacher update costs, side by side with the ways it was or could be done.

    python -m mclfir_dist.bench.ema [--trunk resnet50] [--cut layer3] [--device cpu|cuda] [--host-only]

  teacher.update   this package's: tensor lists built once, one foreach lerp over the parameters, one
                   foreach copy of the buffers per dtype, the count kept on the host (and filled into
                   its buffer without a sync)
  previous         the update before that: lists walked, parameters detached and cast at every update,
                   one foreach copy over mixed-dtype buffers
  loop             a plain per-parameter lerp_ loop (parameters only; copies no buffer)

With --host-only every tensor is cut to one element, so the arithmetic vanishes and what is timed is the
per-tensor host work (Python, dispatch): the floor of an update on a GPU, where the arithmetic itself is
short (ResNet-50 to layer3: 8.5 M parameters, ~0.1 GB of memory traffic, ~0.04 ms on an H100). On CPU
the foreach ops are loops over the tensors, not one fused kernel as on CUDA, so this floor is higher
than a GPU's. On `cuda` the device is synchronised before and after the timed updates.
"""
from __future__ import annotations

import argparse
import time

import torch

from ..config import ModelConfig
from ..methods.teacher import EMATeacher
from ..model.trunks import build_trunk


def previous_update(teacher, encoder, decay: float) -> None:
    """The update as it was before the tensor lists were cached (kept here as the baseline)."""
    with torch.no_grad():
        t_params, student = list(teacher.module.parameters()), list(encoder.parameters())
        s_params = [p.detach().to(t.dtype) for p, t in zip(student, t_params)]
        torch._foreach_lerp_(t_params, s_params, 1.0 - decay)
        t_bufs, s_bufs = list(teacher.module.buffers()), list(encoder.buffers())
        if t_bufs:
            torch._foreach_copy_(t_bufs, s_bufs)
        teacher.num_updates.fill_(teacher.updates + 1)


def loop_update(teacher, encoder, decay: float) -> None:
    with torch.no_grad():
        for t, s in zip(teacher.module.parameters(), encoder.parameters()):
            t.lerp_(s, 1.0 - decay)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trunk", default="resnet50")
    ap.add_argument("--cut", default="layer3", choices=["layer3", "full"])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--host-only", action="store_true", help="one element per tensor: time the host's work only")
    ap.add_argument("--updates", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    with torch.device(device):
        encoder, _ = build_trunk(ModelConfig(trunk=args.trunk, cut=args.cut, pretrained=False, weights=""),
                                 args.image_size)
    if args.host_only:
        encoder._apply(lambda t: t.flatten()[:1].clone())
    teacher = EMATeacher(encoder, decay=0.999)
    n_params = sum(1 for _ in encoder.parameters())
    n_buffers = sum(1 for _ in encoder.buffers())
    ways = {"teacher.update": lambda: teacher.update(encoder),
            "previous": lambda: previous_update(teacher, encoder, 0.999),
            "loop": lambda: loop_update(teacher, encoder, 0.999)}
    results = {}
    for name, update in ways.items():
        for _ in range(args.warmup):
            update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.updates):
            update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        results[name] = 1000 * (time.perf_counter() - start) / args.updates
    where = torch.cuda.get_device_name() if device.type == "cuda" else device.type
    print(f"bench.ema: {args.trunk} to {args.cut}, {n_params} parameters + {n_buffers} buffers, on {where}"
          f"{' (host only: one element per tensor)' if args.host_only else ''}, {args.updates} updates each")
    for name, ms in results.items():
        print(f"  {name:15s} {ms:8.3f} ms/update   previous/this {results['previous'] / ms:5.2f}")
    return results


if __name__ == "__main__":
    main()
