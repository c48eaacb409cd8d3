"""The GPU code paths keep every tensor on the device, checked on machines without a GPU.

CI has no GPU, so a host tensor mixed into a CUDA op (a mask built on the host, an index made without
`device=`, a batch view not moved) would first fail on a GPU machine. torch's FakeTensorMode runs our
real code on fake CUDA tensors (shapes, dtypes and devices; no data, no driver) and raises the
device-mismatch error a GPU would. It cannot run backward (autograd needs a CUDA context), numbers or
streams: those run on a GPU machine (the CUDA tests here and scripts/gpu_check.sh).
"""
import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import ROOT, tiny_train_overrides
from mclfir_dist.configure import load_config
from mclfir_dist.data.loader_device import AugmentationDraws, apply_augmentation, transformed_together
from mclfir_dist.data.loader_torch import TransformSpec, eval_transform, train_transforms
from mclfir_dist.training import engine
from mclfir_dist.training.engine import step_loss
from mclfir_dist.methods.losses import DoubletInfoNCE
from mclfir_dist.methods import IncrementContext, build_method
from mclfir_dist.model.mclfir import build_model
from mclfir_dist.methods.optim import build_optimizer

CUDA = torch.device("cuda", 0)
SIDE = 32


def fake_cuda_mode() -> FakeTensorMode:
    # host tensors made outside the mode (a loader's batch) enter it as fake host tensors
    return FakeTensorMode(allow_non_fake_inputs=True)


def move_to_fake_cuda(module: nn.Module, mode: FakeTensorMode, channels_last: bool) -> nn.Module:
    """Module.to() cannot move fake parameters (it swaps tensors, which the mode's bookkeeping forbids):
    replace each parameter and buffer with a fake CUDA one, as build_model(device=cuda) would place them."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    with mode:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    moved = mode.from_tensor(p.detach()).to(CUDA)
                    if moved.dim() == 4:
                        moved = moved.contiguous(memory_format=memory_format)
                    sub._parameters[name] = nn.Parameter(moved, requires_grad=p.requires_grad)
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[name] = mode.from_tensor(b).to(CUDA)
    return module


def host_batch(doublets: int, heads: int, seed: int = 0) -> dict:
    """A training batch as the torch loader hands it over: every tensor on the host."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * doublets
    task = torch.arange(doublets) % heads
    return {"images": torch.randn(n, 3, SIDE, SIDE, generator=g),
            "teacher_images": torch.randn(n, 3, SIDE, SIDE, generator=g),
            "task": torch.cat([task, task]), "value": torch.randint(0, 3, (n,), generator=g),
            "keys": [f"k{i}" for i in range(n)]}


def assert_on_cuda(*tensors):
    for t in tensors:
        assert t.device.type == "cuda", t.device


@pytest.mark.parametrize("method,kd_type,loss_flags", [
    ("mclfir", "feature", []),
    ("mclfir", "embedding", ["loss.mask_same_value=true"]),
    ("mclfir", "feature", ["loss.multi_positive=true", "loss.kd_anchors_only=true"]),
    ("lwf", "feature", []),
    ("finetune", "feature", []),
])
def test_a_training_step_stays_on_the_device(tiny_shards, monkeypatch, method, kd_type, loss_flags):
    """step_loss (the engine's forward), the method's after-step update and AdamW's step, on CUDA tensors
    fed a host batch, with the old head distilled through (second increment of two heads each)."""
    cfg = load_config(ROOT / "configs/debug_cpu.yaml", tiny_train_overrides(tiny_shards) + [
        f"train.method={method}", f"loss.kd_type={kd_type}", "model.channels_last=true", *loss_flags,
        "train.increments=[{name: a, attributes: [colour]},{name: b, attributes: [garment_length, pattern]}]"])
    old, new = ["colour"], ["garment_length", "pattern"]
    model = build_model(cfg.model, SIDE)
    for a in old + new:
        model.add_head(a)
    runtime = SimpleNamespace(device=torch.device("cpu"), rank=0, world=1)
    method_ = build_method(cfg, runtime)
    method_.setup(model)
    plan = method_.plan(1, "b", new, old)
    ctx = IncrementContext(plan, old)
    method_.begin_increment(ctx, model, resuming=False)
    model.configure(plan.train_heads, plan.frozen_heads, plan.train_encoder)

    mode = fake_cuda_mode()
    for module in [model] + method_.modules():
        move_to_fake_cuda(module, mode, cfg.model.channels_last)
    runtime.device = CUDA
    loss_fn = DoubletInfoNCE(cfg.loss.temperature, cfg.loss.mask_same_value, cfg.loss.multi_positive)
    batch = host_batch(cfg.data.batch_doublets, len(plan.train_heads))
    # a count on the host has no fake counterpart (its values size the heads' slices): taken from the real batch
    counts = engine.rows_per_task(batch["task"], len(plan.train_heads))
    monkeypatch.setattr(engine, "rows_per_task", lambda task, heads: counts)
    with mode:
        loss, nce, terms, stats = step_loss(batch, model, model, method_, ctx, loss_fn, plan.train_heads, CUDA,
                                            cfg.model.channels_last)
        assert_on_cuda(loss, nce, *[t.value for t in terms])
        assert loss.shape == () and loss.dtype == torch.float32
        if method in ("mclfir", "lwf"):
            assert [t.name for t in terms] == ["kd"]   # the old head's distillation ran, on the device
        nonfinite = torch.zeros((), dtype=torch.bool, device=CUDA) | ~torch.isfinite(loss.detach())
        assert_on_cuda(nonfinite)

        optimizer = build_optimizer(cfg.optim, model.trunk, [model.heads[a] for a in plan.train_heads],
                                    plan.encoder_lr_scale)
        assert optimizer.defaults.get("fused"), "optim.implementation=auto takes fused AdamW on CUDA"
        for p in (p for g in optimizer.param_groups for p in g["params"]):
            p.grad = torch.zeros_like(p)   # backward cannot run on fake CUDA tensors
        optimizer.step()
        method_.after_step(model)          # MCL-FIR: the EMA update, foreach on the device
        assert_on_cuda(*[s for state in optimizer.state.values() for s in state.values() if s.dim() > 0])
        assert_on_cuda(*itertools.chain.from_iterable(m.parameters() for m in method_.modules()))


def test_device_loader_augmentation_stays_on_the_device():
    """torch_gpu's transforms on decoded images already on CUDA (what decode_jpeg(device='cuda') returns):
    two image sizes, flips and the teacher's perspective view; and the eval transform."""
    spec = TransformSpec(SIDE)
    sizes = [(40 + 8 * (i % 2), 36) for i in range(6)]
    params = AugmentationDraws(spec).batch([(i, h, w) for i, (h, w) in enumerate(sizes)])
    params[0]["flip"], params[1]["flip"] = True, False   # both branches of the batched flip
    assert params[0]["coefficients"] is not None
    mode = fake_cuda_mode()
    with mode:
        images = [torch.empty(3, h, w, dtype=torch.uint8, device=CUDA) for h, w in sizes]
        views, teacher_views = apply_augmentation(images, params, spec, train_transforms(spec)[1])
        evaluated = transformed_together(images, eval_transform(spec))
        assert_on_cuda(views, teacher_views, evaluated)
        assert views.shape == teacher_views.shape == evaluated.shape == (6, 3, SIDE, SIDE)
        assert views.dtype == teacher_views.dtype == torch.float32


def test_fake_cuda_catches_a_host_tensor_in_a_device_op():
    """The check itself: a host mask applied to CUDA images fails here as it would on a GPU."""
    with fake_cuda_mode():
        images = torch.empty(4, 3, 8, 8, device=CUDA)
        mask = torch.tensor([True, False, True, False]).view(-1, 1, 1, 1)
        with pytest.raises(RuntimeError, match="device"):
            torch.where(mask, images.flip(-1), images)


def test_evaluation_embeds_on_the_device_and_hands_back_host_tensors():
    """embed_split with the model on CUDA, fed a host batch (torch loader) and a batch already on the
    device (torch_gpu): the embeddings come back on the host, where mAP is computed."""
    from mclfir_dist.config import ModelConfig
    from mclfir_dist.evaluation.metrics import embed_split
    model = build_model(ModelConfig(), SIDE)
    for a in ("colour", "pattern"):
        model.add_head(a)
    mode = fake_cuda_mode()
    move_to_fake_cuda(model, mode, channels_last=False)

    def batch(images, keys):
        return {"images": images, "labels": torch.zeros(len(keys), 2, dtype=torch.long), "keys": keys}
    host = batch(torch.randn(3, 3, SIDE, SIDE), ["c", "a", "b"])
    with mode:
        on_device = batch(torch.empty(2, 3, SIDE, SIDE, device=CUDA), ["e", "d"])
        se = embed_split(model, [host, on_device], ["colour", "pattern"], CUDA)
        assert se.keys == ["a", "b", "c", "d", "e"]
        assert se.emb.shape == (5, 2, model.embed_dim)
        assert se.emb.device.type == se.pooled.device.type == "cpu"
