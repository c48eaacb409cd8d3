"""Multi-process checks on CPU (gloo): each test starts 2 real processes."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, needs, tiny_train_overrides

# launchers as modules of this interpreter: their console scripts need not sit beside it
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run(cmd, timeout=600, env=None):
    p = subprocess.run(cmd, cwd=ROOT, env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)
    return p


@pytest.fixture(scope="module")
def equivalence(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("eq") / "eq.json"
    p = run([*TORCHRUN, "--standalone", "--nproc_per_node", "2",
             str(ROOT / "tests/dist/check_equivalence.py"), str(out), str(tiny_shards)])
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("variant", ["plain", "mask_same_value", "multi_positive"])
def test_gathered_infonce_matches_single_process(equivalence, variant):
    r = equivalence
    assert r["world_size"] == 2 and r[f"{variant}_global_batch"] == 16
    assert r[f"{variant}_loss_diff"] <= 1e-5
    assert r[f"{variant}_grad_diff"] <= 1e-5
    assert r[f"{variant}_grad_scale"] > 0.1  # the gradients compared are not trivially zero


def test_gather_without_grad_would_be_wrong(equivalence):
    assert equivalence["nograd_gather_grad_diff"] > 1e-2


def test_rank_streams_partition_every_epoch(equivalence):
    r = equivalence
    for e in (0, 1):
        assert r[f"epoch{e}_union"] == r[f"epoch{e}_total_reads"] == r["train_count"]
        assert all(n > 0 for n in r[f"epoch{e}_per_rank"])


def test_distributed_eval_equals_single_process(equivalence):
    r = equivalence
    assert r["eval_rows"] > 0
    for a, m in r["eval_map_single"].items():
        assert r["eval_map_dist"][a] == pytest.approx(m, abs=1e-12)


def test_teacher_identical_on_every_rank(equivalence):
    assert equivalence["teacher_updates"] == 5 and equivalence["teacher_rank_diff"] == 0.0


def test_buffer_broadcast_makes_ranks_identical(equivalence):
    """The rank sync of BatchNorm statistics is its own step (runtime.sync_buffers), not part of a metric."""
    assert equivalence["buffers_spread_before_sync"] > 0.01
    assert equivalence["buffers_spread_after_sync"] == 0.0


def free_port() -> str:
    """A free TCP port on this machine: parallel test processes must not meet on 29500."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def accelerate_train(config_file, out, overrides, extra=(), env=None):
    cmd = [*ACCELERATE_LAUNCH, "--config_file", str(ROOT / config_file),
           "--main_process_port", free_port(), *extra,
           "-m", "mclfir_dist.train", "--config", str(ROOT / "configs/debug_cpu.yaml"), "--out", str(out), *overrides]
    return run(cmd, timeout=900, env=env)


@pytest.fixture(scope="module")
def ddp_run(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    p = accelerate_train("launch/cpu_2proc.yaml", out, tiny_train_overrides(tiny_shards))
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    return out, json.loads((out / "results.json").read_text()), p


def test_two_process_ddp_run(ddp_run):
    out, res, p = ddp_run
    assert res["world_size"] == 2 and res["backend"] == "gloo"
    assert res["complete"] and len(res["accuracy_matrix"]) == 2
    assert res["global_batch"] == 2 * 2 * 16
    for a, m in res["accuracy_matrix"][-1].items():
        assert m > res["random_map"][a] + 0.15, (a, m)
    for c in res["cost"]:
        assert c["world_size"] == 2
        assert c["device_seconds"] == pytest.approx(2 * c["train_seconds"])
        assert c["images_seen"] == 30 * 64
        assert c["rank_max_diff"] == 0.0
    # only the main process writes: one event file, one results file
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_checkpoint_moves_between_world_sizes(ddp_run, tiny_shards, tmp_path):
    """A 2-process checkpoint resumes in 1 process, and a 1-process one in 2 processes."""
    out, res, _ = ddp_run
    two_to_one = tmp_path / "two_to_one"
    shutil.copytree(out, two_to_one)
    (two_to_one / "checkpoints" / "increment_01.pt").unlink()
    p = run([sys.executable, "-m", "mclfir_dist.train", "--resume", str(two_to_one)])
    assert p.returncode == 0, p.stderr[-3000:]
    r1 = json.loads((two_to_one / "results.json").read_text())
    assert r1["complete"] and r1["cost"][0]["world_size"] == 2 and r1["cost"][1]["world_size"] == 1

    one = tmp_path / "one"
    p = run([sys.executable, "-m", "mclfir_dist.train", "--config", str(ROOT / "configs/debug_cpu.yaml"), "--out", str(one),
             *tiny_train_overrides(tiny_shards, steps=10)])
    assert p.returncode == 0, p.stderr[-3000:]
    (one / "checkpoints" / "increment_01.pt").unlink()
    p = run([*ACCELERATE_LAUNCH, "--config_file", str(ROOT / "launch/cpu_2proc.yaml"),
             "--main_process_port", free_port(),
             "-m", "mclfir_dist.train", "--resume", str(one)], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r2 = json.loads((one / "results.json").read_text())
    assert r2["complete"] and r2["cost"][0]["world_size"] == 1 and r2["cost"][1]["world_size"] == 2


def test_failing_rank_brings_the_job_down(tiny_shards, tmp_path):
    env_fail = {"MCLFIR_FAULT_RANK": "1", "MCLFIR_FAULT_STEP": "3"}
    os.environ.update(env_fail)
    try:
        p = accelerate_train("launch/cpu_2proc.yaml", tmp_path / "r", tiny_train_overrides(tiny_shards, steps=20))
    finally:
        for k in env_fail:
            os.environ.pop(k)
    assert p.returncode != 0
    assert "injected fault on rank 1" in p.stdout + p.stderr
    assert not (tmp_path / "r" / "results.json").exists()


def _zero_config(tmp_path, stage):
    cfg = json.loads((ROOT / "launch/deepspeed_zero2_cpu.json").read_text())
    cfg["zero_optimization"]["stage"] = stage
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    return ["--deepspeed_config_file", str(tmp_path / "ds.json")]


ZERO_OVERRIDES = ["train.checkpoint_every=5"]


@pytest.fixture(scope="module")
def zero2_run(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2") / "ds"
    p = accelerate_train("launch/deepspeed_zero2_cpu.yaml", out,
                         tiny_train_overrides(tiny_shards, steps=20) + ZERO_OVERRIDES)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    return out, json.loads((out / "results.json").read_text())


def _check_zero_run(res, stage):
    assert res["world_size"] == 2 and res["backend"].startswith(f"deepspeed-zero{stage}")
    assert res["complete"] and len(res["accuracy_matrix"]) == 2
    assert all(c["rank_max_diff"] == 0.0 for c in res["cost"])


@needs("deepspeed")
def test_deepspeed_zero2_run(zero2_run):
    out, res = zero2_run
    _check_zero_run(res, 2)
    assert not list((out / "checkpoints").glob("partial*")), "the last increment checkpoint supersedes partials"


@needs("deepspeed")
def test_deepspeed_zero1_run(tiny_shards, tmp_path):
    out = tmp_path / "ds"
    extensions = tmp_path / "torch_extensions"   # empty, as on a fresh machine
    p = accelerate_train("launch/deepspeed_zero2_cpu.yaml", out, tiny_train_overrides(tiny_shards, steps=20),
                         extra=_zero_config(tmp_path, 1), env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    _check_zero_run(json.loads((out / "results.json").read_text()), 1)
    # DeepSpeed's shared-memory all-reduce (inference only) is not compiled: ~50 s saved on a fresh machine
    assert not list(extensions.rglob("*shm_comm*")) and "shm_comm" not in p.stdout + p.stderr


@needs("deepspeed")
def test_deepspeed_resume_inside_an_increment_is_exact(zero2_run, tiny_shards, tmp_path):
    """A rank dies at step 12 of increment 0; the run resumes from the step-10 partial (each rank's ZeRO
    optimizer partition + partial.pt) and must end exactly like the uninterrupted ZeRO-2 run."""
    import torch
    from mclfir_dist.training.checkpoint import load_checkpoint
    ref_dir, ref = zero2_run
    out = tmp_path / "ds"
    overrides = tiny_train_overrides(tiny_shards, steps=20) + ZERO_OVERRIDES
    os.environ.update({"MCLFIR_FAULT_RANK": "1", "MCLFIR_FAULT_STEP": "12"})
    try:
        p = accelerate_train("launch/deepspeed_zero2_cpu.yaml", out, overrides)
    finally:
        for k in ("MCLFIR_FAULT_RANK", "MCLFIR_FAULT_STEP"):
            os.environ.pop(k)
    assert p.returncode != 0 and "injected fault on rank 1 at step 12" in p.stdout + p.stderr
    partial = load_checkpoint(out / "checkpoints/partial.pt")
    assert (partial["increment"], partial["step"], partial["zero_world"]) == (0, 10, 2)
    assert partial["optimizer"] is None
    shards = sorted(p.name for p in (out / "checkpoints").glob("partial_zero_*.pt"))
    assert shards == [f"partial_zero_00_0000010_rank{r:05d}.pt" for r in (0, 1)], shards

    p = accelerate_train("launch/deepspeed_zero2_cpu.yaml", out, overrides + ["--resume", "auto"])
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert "continuing at step 10 of increment 0" in p.stdout + p.stderr
    res = json.loads((out / "results.json").read_text())
    _check_zero_run(res, 2)
    assert res["accuracy_matrix"] == ref["accuracy_matrix"]
    final = load_checkpoint(out / "checkpoints/increment_01.pt")["model"]
    ref_final = load_checkpoint(ref_dir / "checkpoints/increment_01.pt")["model"]
    assert final.keys() == ref_final.keys()
    assert all(torch.equal(final[k], ref_final[k]) for k in final)


def test_a_partial_missing_a_zero_shard_falls_back(tmp_path, caplog):
    import logging
    from mclfir_dist.training.checkpoint import Checkpointer
    ck = Checkpointer(tmp_path)
    from conftest import checkpoint_state
    ck.save_increment(0, checkpoint_state(0))
    ck.save_partial(checkpoint_state(1, step=5, zero_world=2))
    ck.save_zero_shard(1, 5, 0, {"x": 1})
    with caplog.at_level(logging.ERROR, logger="mclfir"):
        point = ck.resume_point()
    assert not point.partial and point.next_increment == 1
    assert "partial_zero_01_0000005_rank00001.pt is missing" in caplog.text
    ck.save_zero_shard(1, 5, 1, {"x": 1})
    assert ck.resume_point().partial


@needs("deepspeed")
def test_zero3_refused_with_clear_message(tiny_shards, tmp_path):
    cfg = tmp_path / "z3.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
                               "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True}))
    p = accelerate_train("launch/deepspeed_zero2_cpu.yaml", tmp_path / "z3", tiny_train_overrides(tiny_shards, steps=5),
                         extra=["--deepspeed_config_file", str(cfg)])
    assert p.returncode != 0
    assert "ZeRO stage 3 is not supported" in p.stdout + p.stderr


def _extend_and_compare(base, launch, overrides, tmp_path):
    """Extend the 2-process run `base` by a third increment; it must end bit-identical to a run of the three
    increments in one go under the same launcher (ranks, and ZeRO partitions, resume as for any resume)."""
    import shutil
    import torch
    three = "[{name: a, attributes: [colour]},{name: b, attributes: [garment_length]},{name: c, attributes: [pattern]}]"
    out = tmp_path / "extended"
    shutil.copytree(base, out, ignore=shutil.ignore_patterns(".lock"))
    overrides = [o if not o.startswith("train.increments=") else f"train.increments={three}" for o in overrides]
    p = accelerate_train(launch, out, overrides + ["--resume", "auto"])
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    assert "extending the run" in p.stdout + p.stderr
    one_go = tmp_path / "one_go"
    p = accelerate_train(launch, one_go, overrides)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    ext, ref = (json.loads((d / "results.json").read_text()) for d in (out, one_go))
    assert ext["world_size"] == 2 and len(ext["extensions"]) == 1 and ext["backend"] == ref["backend"]
    assert ext["accuracy_matrix"] == ref["accuracy_matrix"] and ext["compatibility"] == ref["compatibility"]
    a = torch.load(out / "checkpoints/increment_02.pt", weights_only=True)["model"]
    b = torch.load(one_go / "checkpoints/increment_02.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_extending_a_two_process_run_equals_training_it_in_one_go(ddp_run, tiny_shards, tmp_path):
    """A new attribute arrives under DDP."""
    _extend_and_compare(ddp_run[0], "launch/cpu_2proc.yaml", tiny_train_overrides(tiny_shards), tmp_path)


@needs("deepspeed")
def test_extending_a_deepspeed_zero2_run_equals_training_it_in_one_go(zero2_run, tiny_shards, tmp_path):
    """A new attribute arrives under DeepSpeed ZeRO-2 (2 CPU processes): the optimizer of the new increment is
    built anew, the old partitions are not carried over, and the end equals the one-go ZeRO-2 run."""
    _extend_and_compare(zero2_run[0], "launch/deepspeed_zero2_cpu.yaml",
                        tiny_train_overrides(tiny_shards, steps=20) + ZERO_OVERRIDES, tmp_path)
