"""The process runtime: Accelerate set-up, seeding, logging and keeping ranks in step.

Everything that depends on how the job was launched (one process, DDP, DeepSpeed; CPU or GPU)
is decided here, so the training loop only asks `runtime.<thing>`.
"""
from __future__ import annotations

import logging
import os
import random
import sys
from datetime import timedelta
from typing import Iterable, List

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError, RunConfig
from ..runfolder.layout import TENSORBOARD
from ..utils.cpu import bf16_units
from ..utils.distributed import backend as process_group_backend
from .cluster import check_launcher, init_restarted_group, my_view
from ..utils.distributed import broadcast_buffers, gather_objects

log = logging.getLogger("mclfir")


def setup_logging(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors and plain types (loads with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def resolve_precision(configured: str, launcher: str | None, device_type: str = "cpu",
                      units: tuple = ()) -> tuple:
    """(precision, why). Precedence: an explicit config value (file or override) > the launcher's
    `--mixed_precision` (ACCELERATE_MIXED_PRECISION) > bf16 on a CPU with bf16 matrix units > no."""
    launcher = (launcher or "").lower() or None
    if configured != "auto":
        if launcher and launcher != configured:
            return configured, f"train.mixed_precision={configured} (overrides the launcher's {launcher})"
        return configured, f"train.mixed_precision={configured}"
    if launcher:
        return launcher, f"the launcher's --mixed_precision {launcher} (train.mixed_precision=auto)"
    if device_type == "cpu" and units:
        return "bf16", f"train.mixed_precision=auto on a CPU with bf16 matrix units ({', '.join(units)})"
    if device_type == "cpu":
        return "no", "train.mixed_precision=auto: this CPU has no bf16 matrix units (amx_bf16, avx512_bf16)"
    return "no", "train.mixed_precision=auto and no launcher setting"


def resolve_channels_last(configured, precision: str) -> tuple:
    """(channels_last, why). auto: on wherever training runs in reduced precision (bf16 convolutions on a GPU's
    tensor cores or a CPU's AMX units want NHWC: 1.7x on an H200, 1.2x over bf16 alone on an AMX CPU)."""
    if configured != "auto":
        return bool(configured), f"model.channels_last={str(bool(configured)).lower()}"
    on = precision in ("bf16", "fp16")
    return on, f"model.channels_last=auto with precision {precision}"


def build_trackers(cfg: RunConfig, run_dir) -> list:
    """Accelerate trackers named in train.trackers; TensorBoard writes to RUN_DIR/tensorboard."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, TensorBoardTracker
    from accelerate.utils import imports
    trackers = []
    for name in cfg.train.trackers:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"config key 'train.trackers': unknown tracker {name!r} "
                              f"(Accelerate knows {', '.join(sorted(LOGGER_TYPE_TO_CLASS))})")
        available = getattr(imports, f"is_{name}_available", None)
        if available is not None and not available():
            raise ConfigError(f"config key 'train.trackers': {name} is not installed (pip install {name})")
        trackers.append(TensorBoardTracker(TENSORBOARD, str(run_dir)) if name == "tensorboard" else name)
    return trackers


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed on CPU JIT-compiles a shared-memory all-reduce when its comm starts (deepspeed_shm_comm: about
    50 s on 2 cores on a fresh machine, and again whenever the interpreter's paths change). Only DeepSpeed
    inference's all-reduce uses it, which training never calls; marked unavailable, DeepSpeed skips the build
    (deepspeed 0.19: comm/torch.py build_shm_op)."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_accelerator(cfg: RunConfig, run_dir=None):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
    check_launcher()
    init = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_init_timeout_s))
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init.backend = "gloo"  # without it DeepSpeed-on-CPU ranks each believe they are rank 0 of 1
    init_restarted_group(init.backend or ("nccl" if torch.cuda.is_available() else "gloo"), init.timeout)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=True)
    # Without CUDA, Accelerate only wraps models in DDP (MULTI_CPU) when told cpu=True; otherwise
    # `--multi_gpu` on a CPU box initialises gloo but leaves every rank training alone.
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if use_deepspeed and not torch.cuda.is_available():
        skip_deepspeed_shm_build()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    precision, why = resolve_precision(cfg.train.mixed_precision, os.environ.get("ACCELERATE_MIXED_PRECISION"),
                                       device_type, bf16_units() if device_type == "cpu" else ())
    acc = Accelerator(mixed_precision=precision, kwargs_handlers=[init, ddp],
                      cpu=not torch.cuda.is_available() and not use_deepspeed,
                      log_with=build_trackers(cfg, run_dir) if run_dir is not None else None,
                      project_dir=str(run_dir) if run_dir is not None else None)
    acc.precision_reason = why
    if acc.num_processes > 1 and acc.distributed_type.value == "NO":
        raise RuntimeError(f"{acc.num_processes} processes but Accelerate chose no distributed wrapper")
    if acc.num_processes > 1:
        dist.set_timeout(timedelta(seconds=cfg.train.dist_step_timeout_s))
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is not None and int(plugin.zero_stage) == 3:
        raise ConfigError("DeepSpeed ZeRO stage 3 is not supported: the EMA teacher must read full encoder "
                          "parameters after each step and ZeRO-3 shards them. Use ZeRO stage 1 or 2.")
    return acc


def make_deterministic() -> None:
    """Bit-reproducible kernels on CUDA (and CPU): needed for exact resume on a GPU."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # before cuBLAS starts
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


class Runtime:
    """One per process: the accelerator and what follows from it (rank, world, device, backend)."""

    def __init__(self, cfg: RunConfig, run_dir=None):
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        if cfg.train.deterministic:
            make_deterministic()
        self.acc = build_accelerator(cfg, run_dir)
        self.is_main = self.acc.is_main_process
        setup_logging(self.is_main)
        self.precision = str(self.acc.mixed_precision)
        log.info("precision: %s (%s)", self.precision, self.acc.precision_reason)
        self.channels_last, why = resolve_channels_last(cfg.model.channels_last, self.precision)
        log.info("channels_last: %s (%s)", str(self.channels_last).lower(), why)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.device = self.acc.device
        self.deepspeed = getattr(self.acc.state, "deepspeed_plugin", None)
        self.views = [my_view()]   # every rank's host and node, once cluster.check_run_dir has gathered them

    @property
    def backend(self) -> str:
        name = process_group_backend()
        return f"deepspeed-zero{self.deepspeed.zero_stage}/{name}" if self.deepspeed is not None else name

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def release_prepared(self) -> None:
        """Drop what accelerate prepared (the DDP/DeepSpeed wrapper); the next increment prepares anew. On a GPU
        through Accelerator.free_memory, whose gc.collect lets the device cache return the memory; on CPU the
        same without that collection (about 0.4 s a call, per increment, for no memory returned)."""
        acc = self.acc
        if self.device.type != "cpu":
            acc.free_memory()
            return
        if getattr(acc, "deepspeed_engine_wrapped", None) is not None:   # as free_memory does (accelerate 1.15)
            acc.deepspeed_engine_wrapped.engine.destroy()
            acc.deepspeed_engine_wrapped = None
        acc._schedulers, acc._optimizers, acc._models, acc._dataloaders = [], [], [], []
        acc.step = 0

    def set_micro_batch(self, images_per_rank: int) -> None:
        # no dataloader goes through prepare(), so DeepSpeed cannot infer the micro batch
        if self.deepspeed is not None:
            self.deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = images_per_rank

    def sync_buffers(self, modules: Iterable[nn.Module]) -> None:
        """BatchNorm statistics are updated from each rank's own last batch; take rank 0's everywhere."""
        broadcast_buffers(modules, src=0)

    @staticmethod
    def rank_max_diff(modules: Iterable[nn.Module]) -> float:
        """Max difference of parameter+buffer checksums across ranks; 0.0 = identical everywhere."""
        with torch.no_grad():
            tensors: List[torch.Tensor] = [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
            flat = torch.cat([t.detach().double().flatten().cpu() for t in tensors])
            sums = (flat.sum().item(), flat.pow(2).sum().item(), flat[::97].sum().item())
        parts = gather_objects(sums)
        return max(abs(a - b) for p in parts for a, b in zip(p, parts[0]))
