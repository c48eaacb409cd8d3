"""train.reference_batch_doublets: a larger global batch keeps each increment's sample budget."""
import math

import pytest

from conftest import ROOT, tiny_train_overrides
from mclfir_dist.training.batch_scaling import scale_to_global_batch
from mclfir_dist.config import ConfigError, from_dict, to_dict
from mclfir_dist.configure import load_config


def test_paper_config_on_eight_gpus_keeps_the_doublets_per_task():
    cfg = load_config(ROOT / "configs/paper_gpu.yaml")
    assert cfg.train.reference_batch_doublets == 16
    scaled, info = scale_to_global_batch(cfg, world=8)          # 8 x 16 = 128 doublets per step
    assert info["factor"] == 8
    assert scaled.train.steps_per_increment == 1563             # ceil(12500 / 8): never fewer doublets
    assert scaled.train.steps_per_increment * 128 >= 12500 * 16 > (scaled.train.steps_per_increment - 1) * 128
    assert scaled.optim.step_size == round(3750 / 8)
    assert scaled.optim.lr == pytest.approx(1e-4 * math.sqrt(8))
    assert scaled.teacher.decay == pytest.approx(0.999 ** 8)
    # the EMA's horizon in doublets is kept: 16 / (1 - 0.999) ~ 128 / (1 - 0.999 ** 8)
    assert 128 / (1 - scaled.teacher.decay) == pytest.approx(16 / (1 - 0.999), rel=0.01)
    assert scaled.train.reference_batch_doublets == 128
    assert set(info["changes"]) == {"train.steps_per_increment", "optim.step_size", "optim.lr", "teacher.decay"}
    assert cfg.train.steps_per_increment == 12500 and cfg.optim.lr == 1e-4   # the input is not changed


def test_scaling_is_idempotent_and_composes():
    cfg = load_config(ROOT / "configs/paper_gpu.yaml", ["data.batch_doublets=64"])
    once, info = scale_to_global_batch(cfg, world=1)
    assert info["factor"] == 4
    again, none = scale_to_global_batch(once, world=1)       # a resume from the saved effective config
    assert none is None and again is once
    eight, _ = scale_to_global_batch(once, world=2)          # then resumed on 2 processes: 128 doublets
    direct, _ = scale_to_global_batch(load_config(ROOT / "configs/paper_gpu.yaml", ["data.batch_doublets=128"]), 1)
    assert eight.train.steps_per_increment == direct.train.steps_per_increment
    assert eight.optim.lr == pytest.approx(direct.optim.lr) and eight.teacher.decay == pytest.approx(direct.teacher.decay)


@pytest.mark.parametrize("rule,factor", [("linear", 4.0), ("none", 1.0), ("sqrt", 2.0)])
def test_lr_rules_and_smaller_batches(rule, factor):
    cfg = load_config(ROOT / "configs/paper_gpu.yaml", ["data.batch_doublets=64", f"optim.lr_scaling={rule}",
                                                         "optim.warmup_steps=100", "teacher.warmup_steps=40"])
    scaled, _ = scale_to_global_batch(cfg, world=1)
    assert scaled.optim.lr == pytest.approx(1e-4 * factor)
    assert (scaled.optim.warmup_steps, scaled.teacher.warmup_steps) == (25, 10)
    small, info = scale_to_global_batch(load_config(ROOT / "configs/paper_gpu.yaml", ["data.batch_doublets=8"]), 1)
    assert info["factor"] == 0.5 and small.train.steps_per_increment == 25000
    assert small.teacher.decay == pytest.approx(0.999 ** 0.5)


def test_off_by_default_and_when_the_batch_matches():
    cfg = load_config(ROOT / "configs/debug_cpu.yaml")
    assert cfg.train.reference_batch_doublets == 0
    assert scale_to_global_batch(cfg, world=4) == (cfg, None)
    paper = load_config(ROOT / "configs/paper_gpu.yaml")
    assert scale_to_global_batch(paper, world=1) == (paper, None)


def test_retired_key_gets_a_pointer_and_old_runs_still_load(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.lr_reference_batch.*train.reference_batch_doublets"):
        load_config(ROOT / "configs/debug_cpu.yaml", ["optim.lr_reference_batch=256"])
    import yaml
    saved = tmp_path / "config.yaml"    # a run directory's config.yaml from before the change: resumes
    before = yaml.safe_load((ROOT / "configs/debug_cpu.yaml").read_text())
    before["optim"]["lr_reference_batch"] = 0
    saved.write_text(yaml.safe_dump(before))
    assert load_config(saved).optim.lr == 1e-3
    before["optim"]["lr_reference_batch"] = 256    # set: it would have changed the lr, so it is refused
    saved.write_text(yaml.safe_dump(before))
    with pytest.raises(ConfigError, match="optim.lr_reference_batch.*retired"):
        load_config(saved)
    old = to_dict(load_config(ROOT / "configs/debug_cpu.yaml"))
    old["optim"]["lr_reference_batch"] = 0        # what checkpoints written before the change hold
    assert from_dict(old).optim.lr == old["optim"]["lr"]
    with pytest.raises(ConfigError, match="optim.lr_scaling"):
        load_config(ROOT / "configs/debug_cpu.yaml", ["optim.lr_scaling=cubic"])


def test_trainer_runs_the_scaled_plan_and_saves_the_effective_config(tiny_shards, tmp_path):
    from mclfir_dist.training.engine import Trainer
    cfg = load_config(ROOT / "configs/debug_cpu.yaml",
                      tiny_train_overrides(tiny_shards, steps=30) + ["train.reference_batch_doublets=8"])
    trainer = Trainer.create(cfg, tmp_path / "run")                  # 16 doublets per step = 2 x the reference
    assert [p.steps for p in trainer.plans] == [15, 15]
    assert trainer.record.data["batch_scaling"]["changes"]["train.steps_per_increment"] == {"from": 30, "to": 15}
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert saved.startswith("# effective config; global batch 16 doublets vs the config's reference 8")
    resumed = load_config(tmp_path / "run" / "config.yaml")   # what --resume reads: nothing scaled twice
    assert resumed.train.steps_per_increment == 15 and resumed.train.reference_batch_doublets == 16
    assert scale_to_global_batch(resumed, world=1)[1] is None


def test_a_new_reference_batch_cannot_carry_a_changed_lr_past_the_resume_check(tiny_shards, tmp_path):
    """`--resume RUN optim.lr=5` was refused, but adding train.reference_batch_doublets=32 let it through (the
    batch-scaled keys were skipped whenever the reference changed), and the run's files then said lr 5 for
    increments trained at 0.001. The check now compares what the user asked for, before scaling."""
    from mclfir_dist.training.engine import train
    base = tiny_train_overrides(tiny_shards, steps=3, increments="[{name: a, attributes: [colour]}]") + [
        "eval.grid_queries=0", "eval.frozen_baseline=false"]
    assert train(load_config(ROOT / "configs/debug_cpu.yaml", base), tmp_path / "r")["complete"]
    for extra in (["optim.lr=5"], ["optim.lr=5", "train.reference_batch_doublets=32"],
                  ["train.reference_batch_doublets=32"]):
        with pytest.raises(ConfigError, match="changes what the run computes") as e:
            train(load_config(ROOT / "configs/debug_cpu.yaml", base + extra), tmp_path / "r", resume=True)
        assert ("optim.lr" in str(e.value)) == ("optim.lr=5" in extra)
    assert train(load_config(ROOT / "configs/debug_cpu.yaml", base), tmp_path / "r", resume=True)["complete"]


def test_a_scaled_run_resumes_from_its_own_config_yaml_and_from_the_original(tiny_shards, tmp_path):
    """Both configs a user may resume with: the original (scaled again at start) and config.yaml (the saved
    effective one, what `--resume RUN` reads); a changed lr is refused with either."""
    from mclfir_dist.training.engine import train
    base = tiny_train_overrides(tiny_shards, steps=6, increments="[{name: a, attributes: [colour]}]") + [
        "eval.grid_queries=0", "eval.frozen_baseline=false", "train.reference_batch_doublets=8"]
    original = load_config(ROOT / "configs/debug_cpu.yaml", base)
    assert train(original, tmp_path / "r")["complete"]
    saved = tmp_path / "r" / "config.yaml"
    assert load_config(saved).train.reference_batch_doublets == 16   # effective: 16 doublets a step
    assert train(original, tmp_path / "r", resume=True)["complete"]
    assert train(load_config(saved), tmp_path / "r", resume=True)["complete"]
    with pytest.raises(ConfigError, match="optim.lr"):
        train(load_config(saved, ["optim.lr=5"]), tmp_path / "r", resume=True)
