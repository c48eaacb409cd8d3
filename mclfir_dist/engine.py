"""The increment loop. It wires data, model, loss, teacher, evaluation and results; the method's
math lives in losses.py / teacher.py / evaluate.py.

One code path for 1..N processes (Accelerate: DDP or DeepSpeed). Only the main process prints,
writes files and TensorBoard events. A checkpoint is written atomically after every increment;
increment t reseeds everything from (seed, t), so a resumed run ends exactly like an
uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from . import __version__
from .config import ConfigError, RunConfig, to_dict, to_yaml
from .data import build_eval_loader, build_train_loader, choose_loader
from .data.manifest import Manifest
from .data.pairing import positive_index
from .data.shards import ensure_shards
from .data.streams import epoch_seed
from .evaluate import continual_metrics, embed_split, evaluate_heads, pooled_feature_map, random_embedding_map
from .losses import DoubletInfoNCE, embedding_distillation, feature_distillation
from .model.mclfir import MCLFIRModel, build_model, convert_sync_batchnorm
from .results import Board, new_results, retrieval_grid, summary_text, write_results
from .teacher import EMATeacher
from .utils.io import atomic_torch_save, atomic_write_text

log = logging.getLogger("mclfir")
CKPT_DIR = "checkpoints"
PARTIAL_NAME = "partial.pt"


def setup_logging(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def build_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
    init = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_init_timeout_s))
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init.backend = "gloo"  # without it DeepSpeed-on-CPU ranks each believe they are rank 0 of 1
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=True)
    # Without CUDA, Accelerate only wraps models in DDP (MULTI_CPU) when told cpu=True; otherwise
    # `--multi_gpu` on a CPU box initialises gloo but leaves every rank training alone.
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision, kwargs_handlers=[init, ddp],
                      cpu=not torch.cuda.is_available() and not use_deepspeed)
    if acc.num_processes > 1 and acc.distributed_type.value == "NO":
        raise RuntimeError(f"{acc.num_processes} processes but Accelerate chose no distributed wrapper")
    if acc.num_processes > 1:
        import torch.distributed as dist
        dist.set_timeout(timedelta(seconds=cfg.train.dist_step_timeout_s))
    ds = getattr(acc.state, "deepspeed_plugin", None)
    if ds is not None and int(ds.zero_stage) == 3:
        raise ConfigError("DeepSpeed ZeRO stage 3 is not supported: the EMA teacher must read full encoder "
                          "parameters after each step and ZeRO-3 shards them. Use ZeRO stage 1 or 2.")
    return acc


def lr_lambda(cfg: RunConfig, steps: int):
    o = cfg.optim

    def f(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "cosine":
            progress = (step - o.warmup_steps) / max(1, steps - o.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if o.schedule == "step":
            return o.gamma ** (step // max(1, o.step_size))
        return 1.0
    return f


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    ckpts = sorted((run_dir / CKPT_DIR).glob("increment_*.pt"))
    return ckpts[-1] if ckpts else None


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: bool = False):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        self.acc = build_accelerator(cfg)
        self.is_main = self.acc.is_main_process
        setup_logging(self.is_main)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.device = self.acc.device
        self.method = cfg.train.method
        self.start_increment = 0
        self.partial: Optional[dict] = None   # mid-increment state to continue from (resume)
        self.resume = resume

        # shards: built once by the main process; the others wait and then read the manifest
        if self.is_main:
            ensure_shards(cfg.data.shards, cfg.data.build)
        self.acc.wait_for_everyone()
        self.manifest = Manifest.load(cfg.data.shards)
        # an increment may name its own shard set (a sequence across datasets); attribute -> manifest
        self.manifests: Dict[str, Manifest] = {str(cfg.data.shards): self.manifest}
        self.attr_manifest: Dict[str, Manifest] = {}
        for inc in cfg.train.increments:
            root = inc.shards or str(cfg.data.shards)
            if root not in self.manifests:
                self.manifests[root] = Manifest.load(root)
            for a in inc.attributes:
                self.manifests[root].attribute_index(a)
                self.attr_manifest[a] = self.manifests[root]
        if len(self.manifests) > 1 and cfg.train.method == "static_joint":
            raise ConfigError("train.method=static_joint trains all attributes in one batch stream: "
                              "it needs every increment on the same shard set (train.increments[i].shards)")
        self.loader_name, why = choose_loader(cfg.data)
        log.info("loader: %s (%s)", self.loader_name, why)

        seed_everything(cfg.train.seed)  # same initial weights on every rank (the teacher copies them)
        self.model: MCLFIRModel = build_model(cfg.model, cfg.data.image_size).to(self.device)
        if cfg.model.sync_batchnorm:
            self.model = convert_sync_batchnorm(self.model, torch.cuda.is_available())
        self.teacher = EMATeacher(self.model.trunk, cfg.teacher.decay, cfg.teacher.warmup_steps).to(self.device)
        self.results = new_results(to_dict(cfg), str(cfg.data.shards))
        self.results["attribute_shards"] = {a: str(m.root) for a, m in self.attr_manifest.items()}
        self.global_step = 0
        if resume:
            self._load_checkpoint()
        self.board = Board(self.run_dir / "tensorboard") if self.is_main else None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", to_yaml(cfg))

    # ---------------------------------------------------------------- checkpoints

    def _checkpoint_state(self, t: int) -> dict:
        m = self.model
        return {"format": "mclfir-ckpt/1", "version": __version__, "increment": t, "global_step": self.global_step,
                "heads": m.attributes, "frozen": list(m.frozen), "model": m.state_dict(),
                "teacher": self.teacher.state_dict(), "config": to_dict(self.cfg), "results": self.results,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}

    def _save_checkpoint(self, t: int) -> Path:
        path = self.run_dir / CKPT_DIR / f"increment_{t:02d}.pt"
        if self.is_main:
            atomic_torch_save(path, self._checkpoint_state(t))
            (self.run_dir / CKPT_DIR / PARTIAL_NAME).unlink(missing_ok=True)  # superseded
        self.acc.wait_for_everyone()
        return path

    def _save_partial(self, t: int, step: int, optimizer, scheduler, elapsed: float) -> None:
        """Mid-increment checkpoint (train.checkpoint_every): enough to continue this increment."""
        if self.is_main:
            state = self._checkpoint_state(t)
            state.update({"format": "mclfir-partial/1", "step": step, "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "elapsed_train_seconds": elapsed})
            atomic_torch_save(self.run_dir / CKPT_DIR / PARTIAL_NAME, state)
        self.acc.wait_for_everyone()

    def _load_checkpoint(self) -> None:
        path = latest_checkpoint(self.run_dir)
        partial_path = self.run_dir / CKPT_DIR / PARTIAL_NAME
        if partial_path.is_file():
            partial = torch.load(partial_path, map_location="cpu", weights_only=False)
            done = -1 if path is None else int(path.stem.split("_")[1])
            if partial["increment"] == done + 1:  # a newer, unfinished increment: continue inside it
                path, self.partial = partial_path, partial
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.run_dir / CKPT_DIR}")
        state = self.partial if self.partial is not None else torch.load(path, map_location="cpu", weights_only=False)
        for a in state["heads"]:
            self.model.add_head(a)
        self.model.load_state_dict(state["model"])
        self.model.freeze_heads(state["frozen"])
        self.teacher.load_state_dict(state["teacher"])
        self.results = state["results"]
        self.global_step = state["global_step"]
        self.start_increment = state["increment"] + (0 if self.partial is not None else 1)
        where = f"step {state['step']} of increment {state['increment']}" if self.partial else f"increment {self.start_increment}"
        log.info("resumed from %s: continuing at %s", path, where)

    # ---------------------------------------------------------------- evaluation

    def _eval_embeddings(self, attributes: Sequence[str]):
        """[(manifest, embeddings of its eval split under the heads of its attributes)] per shard set."""
        groups = []
        for root, manifest in self.manifests.items():
            attrs = [a for a in attributes if self.attr_manifest.get(a) is manifest]
            if not attrs and (attributes or not any(m is manifest for m in self.attr_manifest.values())):
                continue
            loader = build_eval_loader(self.cfg.data, manifest, self.cfg.eval.split, self.rank, self.world,
                                       loader=self.loader_name, device=self.device)
            groups.append((manifest, embed_split(self.model, loader, attrs, self.device)))
        return groups

    def _baselines(self) -> None:
        split, chunk = self.cfg.eval.split, self.cfg.eval.query_chunk
        for manifest, se in self._eval_embeddings([]):
            attrs = [a for a, m in self.attr_manifest.items() if m is manifest]
            self.results["random_map"].update(random_embedding_map(manifest, split, se, attrs, self.cfg.model.embed_dim,
                                                                   seed=self.cfg.train.seed, chunk=chunk))
            if self.cfg.eval.frozen_baseline:
                self.results["frozen_trunk_map"].update(pooled_feature_map(manifest, split, se, attrs, chunk))
        log.info("random-embedding mAP: %s", {a: round(100 * v, 2) for a, v in self.results["random_map"].items()})
        if self.cfg.eval.frozen_baseline:
            log.info("untrained-trunk pooled-feature mAP: %s",
                     {a: round(100 * v, 2) for a, v in self.results["frozen_trunk_map"].items()})

    def _retrieval_grids(self, manifest: Manifest, se, t: int) -> None:
        cfg = self.cfg.eval
        if cfg.grid_queries <= 0 or not self.is_main:
            return
        from .evaluate import query_candidate_rows
        for h, a in enumerate(se.attributes):
            q, c = query_candidate_rows(manifest, self.cfg.eval.split, a, se.keys)
            q = q[:cfg.grid_queries]
            if len(q) == 0 or len(c) == 0:
                continue
            col = manifest.attribute_index(a)
            scores = se.emb[q, h] @ se.emb[c, h].t()
            top = c[scores.topk(min(cfg.grid_topk, len(c)), dim=1).indices]
            keys = {se.keys[i] for i in q.tolist() + top.flatten().tolist()}
            imgs = self._raw_images(manifest, keys)
            qi = torch.stack([imgs[se.keys[i]] for i in q.tolist()])
            ci = torch.stack([torch.stack([imgs[se.keys[j]] for j in row]) for row in top.tolist()])
            match = se.labels[top, col] == se.labels[q, col][:, None]
            grid = retrieval_grid(qi, ci, match)
            self.board.image(f"retrieval/{a}", grid, t)
            from torchvision.io import write_png
            out = self.run_dir / "grids" / f"increment_{t:02d}_{a}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            write_png(grid, str(out))

    def _raw_images(self, manifest: Manifest, keys: set) -> Dict[str, torch.Tensor]:
        from .data.loader_torch import IMAGENET_MEAN, IMAGENET_STD
        loader = build_eval_loader(self.cfg.data, manifest, self.cfg.eval.split, 0, 1, keys=keys)
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        out = {}
        for b in loader:
            for k, img in zip(b["keys"], b["images"]):
                out[k] = ((img * std + mean).clamp(0, 1) * 255).to(torch.uint8)
        return out

    # ---------------------------------------------------------------- training

    def _optimizer(self, t: int, new_attrs: Sequence[str]):
        o = self.cfg.optim
        global_batch = 2 * self.cfg.data.batch_doublets * self.world
        scale = global_batch / o.lr_reference_batch if o.lr_reference_batch > 0 else 1.0
        enc_scale = o.first_encoder_lr_scale if t == 0 else o.encoder_lr_scale
        groups = []
        if self.method != "frozen" and enc_scale > 0:
            groups.append({"params": [p for p in self.model.trunk.parameters() if p.requires_grad],
                           "lr": o.lr * scale * enc_scale, "name": "encoder"})
        else:
            self.model.trunk.requires_grad_(False)
        groups.append({"params": [p for a in new_attrs for p in self.model.heads[a].parameters()],
                       "lr": o.lr * scale, "name": "heads"})
        return torch.optim.AdamW(groups, lr=o.lr * scale, weight_decay=o.weight_decay)

    def _train_increment(self, t: int, new_attrs: List[str], old_attrs: List[str]) -> dict:
        cfg = self.cfg
        steps = cfg.train.steps_per_increment
        method = self.method
        continuing = self.partial is not None and self.partial["increment"] == t
        if method == "static_joint":
            # retrain from the initial (pretrained) trunk on every attribute seen so far, with the
            # step budget of all increments so far
            if not continuing:
                seed_everything(cfg.train.seed)
                self.model = build_model(cfg.model, cfg.data.image_size).to(self.device)
            train_attrs, frozen_attrs, steps = old_attrs + new_attrs, [], steps * (t + 1)
        else:
            train_attrs, frozen_attrs = new_attrs, old_attrs
        lwf_source = None
        if method == "lwf" and old_attrs:  # LwF: the model as it was at the end of the previous increment
            lwf_source = EMATeacher(self.model.trunk, decay=1.0)
        seed_everything(epoch_seed(cfg.train.seed, t))  # new heads: identical on every rank
        for a in train_attrs:
            if a not in self.model.heads:
                self.model.add_head(a)
        seed_everything(epoch_seed(cfg.train.seed, t, self.rank))  # per-rank randomness from here on
        self.model.freeze_heads(frozen_attrs)
        if method == "frozen":
            self.model.trunk.requires_grad_(False)
        new_attrs = train_attrs
        optimizer = self._optimizer(t, new_attrs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
        ds = getattr(self.acc.state, "deepspeed_plugin", None)
        if ds is not None:  # no dataloader goes through prepare(), so DeepSpeed cannot infer the micro batch
            ds.deepspeed_config["train_micro_batch_size_per_gpu"] = 2 * cfg.data.batch_doublets
        start_step, elapsed_before = 0, 0.0
        partial, self.partial = self.partial, None
        if continuing:
            optimizer.load_state_dict(partial["optimizer"])
            scheduler.load_state_dict(partial["scheduler"])
            start_step, elapsed_before = partial["step"], partial["elapsed_train_seconds"]
        model, optimizer = self.acc.prepare(self.model, optimizer)
        partial_every = cfg.train.checkpoint_every if ds is None else 0  # ZeRO partitions the optimizer state
        loss_fn = DoubletInfoNCE(cfg.loss.temperature, cfg.loss.mask_same_value, cfg.loss.multi_positive,
                                 cfg.loss.gather, self.rank, self.world)
        # embedding-level distillation has no old heads to go through in the first increment
        use_kd = method == "mclfir" and cfg.loss.kd_weight > 0 and (cfg.loss.kd_type == "feature" or bool(old_attrs))
        use_lwf = lwf_source is not None and cfg.loss.kd_weight > 0
        # rows are anchors then positives; the anchor half sees every doublet once
        kd_rows = cfg.data.batch_doublets if cfg.loss.kd_anchors_only else 2 * cfg.data.batch_doublets
        # a mid-increment resume continues on a freshly seeded stream, not the exact remaining batches
        data_seed = epoch_seed(cfg.train.seed, t) if start_step == 0 else epoch_seed(cfg.train.seed, t, start_step, 7)
        loader = build_train_loader(cfg.data, self.attr_manifest[new_attrs[0]], new_attrs, self.rank, self.world,
                                    data_seed, self.loader_name, self.device)
        model.train()
        if method == "frozen":
            self.model.trunk.eval()  # a frozen trunk keeps its BatchNorm statistics too
        it = iter(loader)
        images_per_step = 2 * cfg.data.batch_doublets * self.world
        t0 = time.time()
        window_t, window_steps = time.time(), 0
        fault = _fault_injection()
        for step in range(start_step, steps):
            if fault == (self.rank, step):
                raise RuntimeError(f"injected fault on rank {self.rank} at step {step} (MCLFIR_FAULT_RANK/STEP)")
            batch = next(it)
            images = batch["images"].to(self.device, non_blocking=True)
            task, value = batch["task"].to(self.device), batch["value"].to(self.device)
            with self.acc.autocast():
                emb, pooled, fmap = model(images, task, new_attrs)
                nce, stats = loss_fn(emb, value, task, positive_index(emb.shape[0], self.device))
                kd = torch.zeros((), device=self.device)
                if use_kd:
                    t_fmap = self.teacher(batch["teacher_images"][:kd_rows].to(self.device, non_blocking=True))
                    if cfg.loss.kd_type == "feature":
                        kd = feature_distillation(pooled[:kd_rows], t_fmap.mean(dim=(2, 3)))
                    else:
                        kd = self._old_head_distillation(model, fmap[:kd_rows], t_fmap, old_attrs)
                elif use_lwf:
                    kd = self._old_head_distillation(model, fmap[:kd_rows], lwf_source(images[:kd_rows]), old_attrs)
                loss = nce + cfg.loss.kd_weight * kd
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at increment {t} step {step}; lower optim.lr?")
            self.acc.backward(loss)
            if cfg.optim.grad_clip > 0 and self.acc.sync_gradients:
                self.acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if method == "mclfir":
                self.teacher.update(self.acc.unwrap_model(model).trunk)
            self.global_step += 1
            window_steps += 1
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == steps:
                dt = time.time() - window_t
                ips = window_steps * images_per_step / max(dt, 1e-9)
                lrs = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}
                log.info("inc %d step %d/%d  loss %.4f  nce %.4f  kd %.5f  %.1f img/s  pool %d  %.0f ms/step",
                         t, step + 1, steps, loss.item(), nce.item(), kd.item(), ips, stats["negative_pool"],
                         1000 * dt / window_steps)
                if self.board:
                    self.board.scalars({"loss/total": loss.item(), "loss/nce": nce.item(), "loss/kd": kd.item(),
                                        "throughput/images_per_s": ips, "train/negative_pool": stats["negative_pool"],
                                        "train/teacher_decay": self.teacher.current_decay(), **lrs}, self.global_step)
                window_t, window_steps = time.time(), 0
            if partial_every and (step + 1) % partial_every == 0 and step + 1 < steps:
                self._save_partial(t, step + 1, optimizer, scheduler, elapsed_before + time.time() - t0)
        self.acc.wait_for_everyone()
        train_seconds = elapsed_before + time.time() - t0
        del it, loader
        self.acc.free_memory()  # drops the DDP/DeepSpeed wrapper; the next increment re-prepares
        images = steps * images_per_step
        return {"steps": steps, "images_seen": images, "train_seconds": train_seconds,
                "images_per_second": images / max(train_seconds, 1e-9),
                "teacher_rank_max_diff": self._teacher_rank_diff()}

    def _skip_static_increment(self, t: int, name: str) -> None:
        """static_final_only: no retraining at this increment; its cost is estimated after the final one."""
        log.info("static_final_only: increment %d not retrained; its cost is estimated from the final run's per-step cost", t)
        self.results["accuracy_matrix"].append({})
        self.results["map_details"].append({})
        self.results["metrics"].append({"average_map": float("nan"), "forgetting": {}, "average_forgetting": 0.0, "bwt": 0.0})
        self.results["cost"].append({"increment": t, "name": name, "steps": self.cfg.train.steps_per_increment * (t + 1),
                                     "estimated": True})

    def _fill_estimated_costs(self, final: dict) -> None:
        per_step = final["train_seconds"] / final["steps"]
        for c in self.results["cost"]:
            if c.get("estimated"):
                c.update({"train_seconds": per_step * c["steps"], "images_seen": c["steps"] * final["images_seen"] // final["steps"],
                          "images_per_second": final["images_per_second"], "eval_seconds": 0.0,
                          "world_size": final["world_size"], "device_seconds": per_step * c["steps"] * final["world_size"],
                          "backend": final["backend"], "global_batch": final["global_batch"],
                          "per_rank_batch": final["per_rank_batch"], "teacher_rank_max_diff": 0.0,
                          "note": "not run: estimated from the final retraining's measured seconds per step"})

    def _old_head_distillation(self, model, fmap, target_fmap, old_attrs) -> torch.Tensor:
        heads = self.acc.unwrap_model(model).heads
        return torch.stack([embedding_distillation(heads[a](fmap), heads[a](target_fmap)) for a in old_attrs]).mean()

    def _sync_buffers(self) -> None:
        """BatchNorm statistics are updated from each rank's own last batch; take rank 0's everywhere."""
        from .distributed import is_distributed
        if is_distributed():
            import torch.distributed as dist
            for buf in list(self.model.buffers()) + list(self.teacher.module.buffers()):
                dist.broadcast(buf.data, src=0)

    def _teacher_rank_diff(self) -> float:
        """Max difference of teacher checksums (parameters and buffers) across ranks; 0.0 = identical."""
        from .distributed import gather_objects
        self._sync_buffers()
        with torch.no_grad():
            tensors = list(self.teacher.module.parameters()) + list(self.teacher.module.buffers())
            flat = torch.cat([p.detach().double().flatten().cpu() for p in tensors])
            sums = (flat.sum().item(), flat.pow(2).sum().item(), flat[::97].sum().item())
        parts = gather_objects(sums)
        return max(abs(a - b) for p in parts for a, b in zip(p, parts[0]))

    def run(self) -> dict:
        cfg = self.cfg
        run_start, wall_before = time.time(), self.results.get("wall_seconds", 0.0)
        if self.start_increment == 0 and not self.results["random_map"]:
            self._baselines()
        incs = cfg.train.increments
        for t in range(self.start_increment, len(incs)):
            inc = incs[t]
            old = [a for prev in incs[:t] for a in prev.attributes]
            log.info("=== increment %d/%d '%s': new heads %s, frozen %s", t, len(incs) - 1, inc.name,
                     list(inc.attributes), old)
            for a in inc.attributes:
                self.results["learned_at"][a] = t
            if self.method == "static_joint" and cfg.train.static_final_only and t < len(incs) - 1:
                self._skip_static_increment(t, inc.name)
                continue
            cost = self._train_increment(t, list(inc.attributes), old)
            seen = old + list(inc.attributes)
            groups = self._eval_embeddings(seen)
            t_eval = time.time()
            details = {}
            for manifest, se in groups:
                details.update(evaluate_heads(manifest, cfg.eval.split, se, cfg.eval.query_chunk))
            details = {a: details[a] for a in seen}
            eval_seconds = sum(se.seconds for _, se in groups) + (time.time() - t_eval)
            row = {a: d["map"] for a, d in details.items()}
            self.results["accuracy_matrix"].append(row)
            self.results["map_details"].append(details)
            metrics = continual_metrics(self.results["accuracy_matrix"], self.results["learned_at"])
            self.results["metrics"].append(metrics)
            cost.update({"increment": t, "name": inc.name, "eval_seconds": eval_seconds, "world_size": self.world,
                         "device_seconds": cost["train_seconds"] * self.world, "backend": self._backend(),
                         "global_batch": 2 * cfg.data.batch_doublets * self.world,
                         "per_rank_batch": 2 * cfg.data.batch_doublets})
            self.results["cost"].append(cost)
            self.results.update({"world_size": self.world, "backend": self._backend(),
                                 "global_batch": 2 * cfg.data.batch_doublets * self.world, "loader": self.loader_name})
            log.info("increment %d: mAP %s | avg %.2f | train %.1fs (%.1f img/s) | eval %.1fs", t,
                     {a: round(100 * v, 2) for a, v in row.items()}, 100 * metrics["average_map"],
                     cost["train_seconds"], cost["images_per_second"], eval_seconds)
            if self.board:
                self.board.scalars({f"map/{a}": v for a, v in row.items()}, t)
                self.board.scalars({"map/average": metrics["average_map"],
                                    "forgetting/average": metrics["average_forgetting"],
                                    "cost/train_seconds": cost["train_seconds"], "cost/eval_seconds": eval_seconds,
                                    "cost/images_per_second": cost["images_per_second"],
                                    "cost/device_seconds": cost["device_seconds"]}, t)
                for manifest, se in groups:
                    self._retrieval_grids(manifest, se, t)
            if t == len(incs) - 1:
                self._fill_estimated_costs(cost)
                self.results["final"] = metrics
                self.results["complete"] = True
            self.results["wall_seconds"] = wall_before + time.time() - run_start
            self._save_checkpoint(t)
            if self.is_main:
                write_results(self.run_dir, self.results)
        if self.is_main:
            text = summary_text(self.results)
            atomic_write_text(self.run_dir / "summary.md", text + "\n")
            print("\n" + text + "\n", flush=True)
            self.board.text("summary", text, len(incs))
            self.board.close()
        self.acc.wait_for_everyone()
        return self.results

    def _backend(self) -> str:
        from .distributed import backend
        ds = getattr(self.acc.state, "deepspeed_plugin", None)
        b = backend()
        return f"deepspeed-zero{ds.zero_stage}/{b}" if ds is not None else b


def _fault_injection():
    """(rank, step) at which to raise, from MCLFIR_FAULT_RANK/MCLFIR_FAULT_STEP (tests of failure handling)."""
    if "MCLFIR_FAULT_RANK" not in os.environ:
        return None
    return int(os.environ["MCLFIR_FAULT_RANK"]), int(os.environ.get("MCLFIR_FAULT_STEP", "0"))


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> dict:
    return Trainer(cfg, run_dir, resume).run()
