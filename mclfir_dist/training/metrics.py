"""The run's metrics: when to log, throughput, ETA, and where values go (the log line and every
Accelerate tracker: TensorBoard by default; wandb, MLflow, ... via train.trackers). Trackers write
on the main process only. Losses are read from the device only when a step logs."""
from __future__ import annotations

import logging
import math
import time
from typing import Dict, Sequence

import torch

log = logging.getLogger("mclfir")


class MetricsProcessor:
    def __init__(self, accelerator, run_name: str, log_every: int, images_per_step: int, plans: Sequence = ()):
        self.acc = accelerator
        self.acc.init_trackers(run_name)
        self.log_every, self.images_per_step, self.plans = log_every, images_per_step, list(plans)
        self.window_start, self.window_steps = time.time(), 0
        self.wait_window = self.wait_increment = 0.0

    # -- cadence and throughput ---------------------------------------------------------------
    def start_window(self) -> None:
        self.window_start, self.window_steps, self.wait_window = time.time(), 0, 0.0

    def start_increment(self) -> None:
        self.start_window()
        self.wait_increment = 0.0

    def next_batch(self, batches):
        """The loader's next batch, timing how long the step loop was blocked on it (data-bound when large)."""
        started = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - started
        self.wait_window += waited
        self.wait_increment += waited
        return batch

    def step_done(self, step: int, steps: int) -> bool:
        """Count a finished step (0-based `step` of `steps`); True when this one logs."""
        self.window_steps += 1
        return (step + 1) % self.log_every == 0 or step + 1 == steps

    def log_step(self, plan, step: int, global_step: int, optimizer, loss: torch.Tensor, nce: torch.Tensor,
                 terms, stats: dict, extra: Dict[str, float]) -> None:
        seconds = time.time() - self.window_start
        ips = self.window_steps * self.images_per_step / max(seconds, 1e-9)
        per_step = seconds / max(self.window_steps, 1)
        left_here = plan.steps - step - 1
        left_run = left_here + sum(p.steps for p in self.plans[plan.index + 1:] if not p.skip)
        values = {"loss/total": loss.item(), "loss/nce": nce.item(),
                  **{f"loss/{t.name}": t.value.item() for t in terms},
                  "throughput/images_per_s": ips, "train/negative_pool": float(stats["negative_pool"]),
                  "perf/data_wait_fraction": self.wait_window / max(seconds, 1e-9),
                  "perf/peak_memory_mb": peak_memory_mb(loss.device),
                  **{f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}}
        values.setdefault("loss/kd", 0.0)
        values.update(extra)
        self.emit(values, global_step,
                  f"inc {plan.index} step {step + 1}/{plan.steps}  loss {values['loss/total']:.4f}  "
                  f"nce {values['loss/nce']:.4f}  kd {values['loss/kd']:.5f}  {ips:.1f} img/s  "
                  f"pool {values['train/negative_pool']:.0f}  {1000 * per_step:.0f} ms/step  "
                  f"data-wait {100 * values['perf/data_wait_fraction']:.0f}%  "
                  f"mem {values['perf/peak_memory_mb']:.0f} MB  "
                  f"ETA increment {duration(left_here * per_step)}, run {duration(left_run * per_step)} "
                  f"(+ evaluation)")
        self.start_window()

    def log_increment(self, index: int, global_step: int, row: Dict[str, float], metrics: dict, cost) -> None:
        """mAP against the global step, like the losses; costs per increment."""
        log.info("increment %d: mAP %s | avg %.2f | train %.1fs (%.1f img/s) | eval %.1fs", index,
                 {a: round(100 * v, 2) for a, v in row.items()}, 100 * metrics["average_map"],
                 cost.train_seconds, cost.images_per_second, cost.eval_seconds)
        self.emit({f"map/{a}": v for a, v in row.items()}, global_step)
        self.emit({"map/average": metrics["average_map"], "forgetting/average": metrics["average_forgetting"]},
                  global_step)
        self.emit({"cost/train_seconds": cost.train_seconds, "cost/eval_seconds": cost.eval_seconds,
                   "cost/images_per_second": cost.images_per_second, "cost/device_seconds": cost.device_seconds},
                  index)

    def log_validation(self, index: int, global_step: int, row: Dict[str, float], score: float) -> None:
        """eval.every_steps: the validation mAP of the heads being trained, inside an increment."""
        self.emit({**{f"val_map/{a}": v for a, v in row.items()}, "val_map/trained_heads": score}, global_step,
                  f"inc {index}, global step {global_step}: val mAP {100 * score:.2f} "
                  f"({', '.join(f'{a} {100 * v:.2f}' for a, v in row.items())})")

    # -- sinks --------------------------------------------------------------------------------
    def emit(self, values: Dict[str, float], step: int, message: str = "") -> None:
        if message:
            log.info(message)
        finite = {k: float(v) for k, v in values.items()
                  if v is not None and not (isinstance(v, float) and math.isnan(v))}
        self.acc.log(finite, step=step)

    def _tensorboard(self):
        try:
            writer = self.acc.get_tracker("tensorboard", unwrap=True) if self.acc.is_main_process else None
        except ValueError:   # not among train.trackers
            return None
        # without any tracker Accelerate hands back a stand-in that has no add_image
        return writer if hasattr(writer, "add_image") else None

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        writer = self._tensorboard()
        if writer is not None:
            writer.add_image(tag, img, step)

    def text(self, tag: str, text: str, step: int) -> None:
        writer = self._tensorboard()
        if writer is not None:
            writer.add_text(tag, text, step)

    def close(self) -> None:
        self.acc.end_training()


def peak_memory_mb(device) -> float:
    """CUDA: the peak allocated by torch on the device; CPU: the process's peak resident memory (Linux)."""
    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
