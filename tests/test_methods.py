"""The engine's seams: methods as registered objects, the checkpoint component, per-increment plans."""
import pickle
import sys

import pytest
import torch

from conftest import ROOT, tiny_train_overrides
from mclfir_dist.training.checkpoint import CheckpointError, load_checkpoint, load_run_model
from mclfir_dist.config import ConfigError
from mclfir_dist.configure import load_config
from mclfir_dist.training.engine import Trainer, train
from mclfir_dist.methods import METHODS
from mclfir_dist.registry import CONFIG_SECTIONS

FAST = ["eval.grid_queries=0", "eval.frozen_baseline=false"]


def tiny_cfg(shards, steps=8, extra=()):
    return load_config(ROOT / "configs/debug_cpu.yaml", tiny_train_overrides(shards, steps=steps) + FAST + list(extra))


@pytest.fixture
def replay_plugin(monkeypatch):
    """tests/plugins on the path; afterwards the plug-in's registrations go, so no later test sees them."""
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "plugins"))
    yield
    METHODS.unregister("replay_one_batch")
    CONFIG_SECTIONS.unregister("replay")
    sys.modules.pop("replay_method", None)


def test_a_method_named_as_a_plugin_in_the_config_trains_two_increments(tiny_shards, tmp_path, replay_plugin):
    with pytest.raises(ConfigError, match="train.method.*replay_one_batch.*not one of|not one of.*train.method"):
        tiny_cfg(tiny_shards, extra=["train.method=replay_one_batch"])   # not imported yet
    cfg = tiny_cfg(tiny_shards, extra=["plugins=[replay_method]", "train.method=replay_one_batch",
                                       "replay.weight=0.5"])
    assert cfg.replay.weight == 0.5   # the plug-in's own typed section
    trainer = Trainer.create(cfg, tmp_path / "r")
    res = trainer.run()
    assert res["complete"] and set(res["accuracy_matrix"][-1]) == {"colour", "garment_length"}
    assert list(trainer.method.stored) == ["colour", "garment_length"]
    assert trainer.method.replayed_steps == 8   # every step of increment 1 replayed colour's batch
    state = load_checkpoint(tmp_path / "r" / "checkpoints" / "increment_01.pt")
    assert set(state["method"]["stored"]) == {"colour", "garment_length"}
    saved = (tmp_path / "r" / "config.yaml").read_text()
    assert "- replay_method" in saved and "weight: 0.5" in saved   # --resume imports it again


def test_unknown_registry_names_are_config_errors(tiny_shards):
    for key in ("train.method=nope", "model.trunk=nope", "optim.schedule=nope", "loss.kd_type=nope",
                "data.loader=nope"):
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            tiny_cfg(tiny_shards, extra=[key])


def test_trunk_trains_later_when_the_first_encoder_lr_scale_is_zero(tiny_shards, tmp_path):
    """The plan states the trainable set every increment: a trunk frozen in increment 0 trains in 1."""
    cfg = tiny_cfg(tiny_shards, extra=["optim.first_encoder_lr_scale=0", "optim.encoder_lr_scale=0.3"])
    train(cfg, tmp_path / "r")
    first = load_checkpoint(tmp_path / "r" / "checkpoints" / "increment_00.pt")["model"]
    second = load_checkpoint(tmp_path / "r" / "checkpoints" / "increment_01.pt")["model"]
    torch.manual_seed(cfg.train.seed)
    from mclfir_dist.model.mclfir import build_model
    init = build_model(cfg.model, cfg.data.image_size).trunk.state_dict()
    conv = "stem.0.weight"
    assert torch.equal(first[f"trunk.{conv}"], init[conv])          # frozen in increment 0 ...
    assert not torch.equal(second[f"trunk.{conv}"], first[f"trunk.{conv}"])  # ... trained in increment 1


def test_static_joint_rebuilds_go_through_the_same_model_builder(tiny_shards, tmp_path, monkeypatch):
    """Every model static_joint trains gets the SyncBatchNorm conversion (GPU-only, so counted here)."""
    import mclfir_dist.model.mclfir as mclfir_model
    converted = []
    monkeypatch.setattr(mclfir_model, "convert_sync_batchnorm", lambda m, on_gpu: converted.append(m) or m)
    trainer = Trainer.create(tiny_cfg(tiny_shards, steps=4, extra=["train.method=static_joint", "model.sync_batchnorm=true"]),
                      tmp_path / "s")
    trainer.run()
    assert len(converted) == 3   # the initial model and one rebuild per increment
    assert any(m is trainer.model for m in converted)


def test_lwf_distils_from_a_frozen_snapshot_of_the_increment_start(tiny_shards, tmp_path):
    trainer = Trainer.create(tiny_cfg(tiny_shards, extra=["train.method=lwf"]), tmp_path / "l")
    trainer.run()
    snapshot = trainer.method.snapshot
    from mclfir_dist.methods.teacher import EMATeacher
    assert not isinstance(snapshot, EMATeacher) and not snapshot.training
    assert all(not p.requires_grad for p in snapshot.parameters())
    start = load_checkpoint(tmp_path / "l" / "checkpoints" / "increment_00.pt")["model"]
    for k, v in snapshot.state_dict().items():
        assert torch.equal(v, start[f"trunk.{k}"]), k


@pytest.fixture(scope="module")
def finished_run(tiny_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("ck") / "run"
    train(tiny_cfg(tiny_shards, steps=6), run)
    return run


def test_checkpoints_load_weights_only_and_restore_frozen_heads_and_rng(finished_run):
    state = torch.load(finished_run / "checkpoints" / "increment_01.pt", map_location="cpu", weights_only=True)
    assert state["format"] == "mclfir-ckpt/2" and state["frozen"] == ["colour"]
    model, cfg, path = load_run_model(finished_run)
    assert path.name == "increment_01.pt" and model.frozen == ["colour"]
    assert not any(p.requires_grad for p in model.heads["colour"].parameters())
    # resuming restores the saved RNG state
    (finished_run / "checkpoints" / "increment_01.pt").rename(finished_run / "increment_01.pt.bak")
    try:
        saved = load_checkpoint(finished_run / "checkpoints" / "increment_00.pt")["rng"]
        trainer = Trainer.create(load_config(finished_run / "config.yaml"), finished_run, resume=True)
        assert trainer.progress.next_increment == 1
        assert torch.equal(torch.get_rng_state(), saved["torch"])
        import random
        assert random.getstate()[1] == tuple(saved["python"][1])
    finally:
        (finished_run / "increment_01.pt.bak").rename(finished_run / "checkpoints" / "increment_01.pt")


def test_checkpoint_format_tag_is_checked(finished_run, tmp_path):
    state = torch.load(finished_run / "checkpoints" / "increment_00.pt", map_location="cpu", weights_only=True)
    state["format"] = "someone-else/9"
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="format 'someone-else/9'"):
        load_checkpoint(tmp_path / "other.pt")


class _Payload:
    def __reduce__(self):
        import os
        return (os.system, (f"touch {_Payload.marker}",))


def test_a_crafted_checkpoint_is_refused_and_runs_no_code(finished_run, tmp_path):
    from mclfir_dist.cli import main
    run = tmp_path / "crafted"
    (run / "checkpoints").mkdir(parents=True)
    _Payload.marker = tmp_path / "pwned"
    with open(run / "checkpoints" / "increment_00.pt", "wb") as f:
        pickle.dump({"format": "mclfir-ckpt/2", "x": _Payload()}, f)
    torch.save({"format": "mclfir-ckpt/2", "x": _Payload()}, run / "checkpoints" / "increment_01.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(run / "checkpoints" / "increment_01.pt")
    assert main(["eval", "--run", str(run), "--shards", "unused"]) == 2
    assert not _Payload.marker.exists()


def test_every_static_joint_retraining_is_a_fresh_start_with_the_first_encoder_lr(tiny_shards):
    """Before: retrainings from the second on used optim.encoder_lr_scale (0.3 here) instead of the first's (1.0)."""
    cfg = tiny_cfg(tiny_shards, extra=["train.method=static_joint", "optim.first_encoder_lr_scale=1.0",
                                       "optim.encoder_lr_scale=0.3"])
    method = METHODS.get("static_joint")(cfg, None)
    plans = [method.plan(i, f"i{i}", [f"a{i}"], [f"a{j}" for j in range(i)]) for i in range(2)]
    assert [p.encoder_lr_scale for p in plans] == [1.0, 1.0]
    assert all(p.rebuild_model and p.frozen_heads == [] for p in plans)
    assert plans[1].train_heads == ["a0", "a1"] and plans[1].steps == 2 * cfg.train.steps_per_increment


def test_static_steps_factor_lets_each_retraining_run_past_what_it_is_charged(tiny_shards):
    cfg = tiny_cfg(tiny_shards, extra=["train.method=static_joint", "train.static_steps_factor=2.5"])
    method = METHODS.get("static_joint")(cfg, None)
    plans = [method.plan(i, f"i{i}", [f"a{i}"], [f"a{j}" for j in range(i)]) for i in range(3)]
    assert [p.steps for p in plans] == [round(2.5 * cfg.train.steps_per_increment * (i + 1)) for i in range(3)]


def test_mixed_batches_too_small_to_give_every_attribute_a_negative_are_refused(tiny_shards):
    from mclfir_dist.config import ConfigError
    from mclfir_dist.training.engine import check_negatives, plan_increments
    cfg = tiny_cfg(tiny_shards, extra=["train.method=static_joint", "data.batch_doublets=3"])
    plans = plan_increments(METHODS.get("static_joint")(cfg, None), cfg)
    assert len(plans[-1].train_heads) >= 2
    with pytest.raises(ConfigError, match="data.task_sampling=rotate"):
        check_negatives(plans, cfg, world=1)          # 3 doublets over >= 2 attributes: one gets a single doublet
    check_negatives(plans, cfg, world=2)              # gathered over 2 ranks every attribute has >= 2
    rotate = tiny_cfg(tiny_shards, extra=["train.method=static_joint", "data.batch_doublets=3",
                                          "data.task_sampling=rotate"])
    check_negatives(plans, rotate, world=1)
