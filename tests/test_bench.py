"""Benchmarks run (at tiny size) and print their numbers; times are never asserted."""
from conftest import ROOT
from mclfir_dist.data.loader_torch import DoubletStream


def test_bench_step_reports_every_part_and_the_ratios(tiny_shards, tmp_path, capsys):
    from mclfir_dist.bench.step import main
    results = main(["--config", str(ROOT / "configs/debug_cpu.yaml"), "--steps", "2", "--warmup", "1",
                    "--out", str(tmp_path / "run"), f"data.shards={tiny_shards}", "data.image_size=32",
                    "data.batch_doublets=8", "data.num_workers=0", "model.head_channels=32", "model.embed_dim=16",
                    "model.channels_last=true", "eval.frozen_baseline=false", "--project-doublets", "1000",
                    "--profile", str(tmp_path / "profile.txt")])
    out = capsys.readouterr().out
    for part in ("model", "step", "loader", "end2end"):
        assert results[part] > 0 and f"  {part} " in out
    assert "end2end/step" in out and "loader/step" in out and "channels_last True" in out
    assert results["after_step_ms"] > 0 and "EMA teacher update" in out
    total, in_optimizer = results["ops_per_step"]
    assert total > in_optimizer > 0 and f"ops dispatched per engine step: {total}" in out
    assert set(results["adamw_ms"]) == {"fused", "foreach", "for_loop"} and min(results["adamw_ms"].values()) > 0
    assert "AdamW step over" in out and "(this run: torch default)" in out   # auto on CPU
    assert "1000 doublets (125 steps of 8) at the end-to-end rate" in out
    assert abs(results["projected_hours"] - 2000 / results["end2end"] / 3600) < 1e-9
    profile = (tmp_path / "profile.txt").read_text()   # the step's ops, as torch.profiler counted them
    assert "2 end-to-end steps profiled" in profile and "by self CPU time" in profile
    assert "aten::convolution_backward" in profile and "16 images/step" in profile   # 8 doublets


def test_bench_ema_times_the_update_against_the_previous_one_and_a_loop(capsys):
    from mclfir_dist.bench.ema import main
    results = main(["--trunk", "resnet18", "--image-size", "32", "--updates", "2", "--warmup", "1", "--host-only"])
    out = capsys.readouterr().out
    assert set(results) == {"teacher.update", "previous", "loop"} and all(v > 0 for v in results.values())
    assert "host only" in out and "previous/this" in out


def test_bench_loader_times_every_loader_and_the_gpu_feed(tiny_shards, capsys):
    from mclfir_dist.bench.loader import main
    assert main(["--shards", str(tiny_shards), "--size", "32", "--batch", "16", "--workers", "1",
                 "--batches", "2", "--teacher-view", "perspective"]) == 0
    out = capsys.readouterr().out
    assert "teacher view: perspective" in out
    for row in ("torch", "pil", "torch_gpu", "gpu_feed"):
        assert f"  {row} " in out and "images/s" in out
    assert "gpu_feed/torch ratio:" in out
    assert main(["--shards", str(tiny_shards / "missing")]) == 2   # a wrong folder: one line, exit 2


class _CountingStream(DoubletStream):
    """The torch loader's stream, counting in shared memory the batches its workers have made."""

    def __init__(self, made, *args):
        super().__init__(*args)
        self.made = made

    def __iter__(self):
        for batch in super().__iter__():
            with self.made.get_lock():
                self.made.value += 1
            yield batch


def test_a_paused_loader_holds_no_more_than_bench_step_drains(tiny_shards):
    """bench.step drains batches_held_ahead batches before timing a loader-bound rate: that must be at least
    what a real torch loader's workers make ahead while its consumer is busy elsewhere."""
    import multiprocessing
    import time
    from mclfir_dist.config import DataConfig
    from mclfir_dist.data import batches_held_ahead
    from mclfir_dist.data.loader_torch import PREFETCH_FACTOR, TransformSpec, make_loader
    from mclfir_dist.data.manifest import Manifest
    m = Manifest.load(tiny_shards)
    cfg = DataConfig(image_size=32, batch_doublets=4, num_workers=2)
    made = multiprocessing.Value("i", 0)
    stream = _CountingStream(made, m.shard_files("train"), [m.attribute_index("colour")], 4, TransformSpec(32),
                             0, 1, 0, 64)
    batches = iter(make_loader(stream, cfg.num_workers))
    next(batches)
    last, deadline = -1, time.time() + 60
    while made.value != last and time.time() < deadline:   # until the workers stop: the consumer is "busy"
        last = made.value
        time.sleep(1.5)
    ahead = made.value - 1
    assert ahead == cfg.num_workers * PREFETCH_FACTOR <= batches_held_ahead(cfg)
    del batches


def test_bench_step_compares_precisions_in_four_processes_and_refuses_a_wrong_key(tiny_shards, tmp_path, capsys):
    import subprocess
    import sys

    from mclfir_dist.bench.step import PRECISION_GRID, main
    tiny = ["--config", str(ROOT / "configs/debug_cpu.yaml"), "--steps", "1", "--warmup", "1",
            "--out", str(tmp_path / "run"), f"data.shards={tiny_shards}", "data.image_size=32",
            "data.batch_doublets=8", "data.num_workers=0", "model.head_channels=16", "model.embed_dim=8",
            "eval.frozen_baseline=false"]
    table = main([*tiny, "--compare-precision"])
    assert list(table) == ["fp32", "fp32 + channels_last", "bf16", "bf16 + channels_last"] == \
        [f"{'fp32' if p == 'no' else p}{' + channels_last' if c else ''}" for p, c in PRECISION_GRID]
    assert all(r["step"] > 0 for r in table.values())
    out = capsys.readouterr().out
    assert "precision bf16, channels_last True" in out and "step 1.00x" in out
    p = subprocess.run([sys.executable, "-m", "mclfir_dist.bench.step", *tiny, "--compare-precision", "optim.lrr=1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 2 and "optim.lrr" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_bench_cost_times_each_arm_in_turns_in_its_own_process(tiny_shards, tmp_path, capsys):
    import json
    import subprocess
    import sys

    from mclfir_dist.bench.cost import main
    tiny = ["--config", str(ROOT / "configs/debug_cpu.yaml"), "--rounds", "2", "--steps", "1", "--warmup", "1",
            f"data.shards={tiny_shards}", "data.image_size=32", "data.batch_doublets=8", "data.num_workers=0",
            "model.head_channels=16", "model.embed_dim=8", "eval.frozen_baseline=false"]
    results = main([*tiny, "--json", str(tmp_path / "cost.json"), "--arm", "mclfir", "0", "train.method=mclfir",
                    "--arm", "static", "1", "train.method=static_joint"])
    record = json.loads((tmp_path / "cost.json").read_text())
    assert list(results) == ["mclfir@0", "static@1"] == list(record["arms"])
    assert record["machine"]["cpu_count"] and record["rounds"] == 2 and record["steps"] == 1
    assert results["mclfir@0"]["train_heads"] == ["colour"]
    assert results["static@1"]["train_heads"] == ["colour", "sleeve_length"]   # static retrains on both
    assert all(len(r["per_step"]) == 2 and min(r["per_step"]) > 0 and r["images_per_step"] == 16
               for r in results.values())
    out = capsys.readouterr().out
    assert "round 2/2" in out and "static@1" in out and "x first" in out
    for bad, named in ((["--arm", "m", "9", "train.method=mclfir"], "increment 9"),
                       (["--arm", "m", "0", "optim.lrr=1"], "optim.lrr"), (["--arm", "m"], "--arm")):
        p = subprocess.run([sys.executable, "-m", "mclfir_dist.bench.cost", *tiny, *bad], capture_output=True,
                           text=True, cwd=ROOT, timeout=300)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and named in p.stderr and len(lines) == 1, p.stderr
