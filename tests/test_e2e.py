"""End to end on tiny synthetic data: 2 increments, results.json, resume, eval export, report."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, needs, tiny_train_overrides
from mclfir_dist.configure import load_config
from mclfir_dist.training.engine import train
from mclfir_dist.evaluation.metrics import mean_average_precision


@pytest.fixture(scope="module")
def tiny_run(tiny_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = load_config(ROOT / "configs/debug_cpu.yaml", tiny_train_overrides(tiny_shards))
    results = train(cfg, run)
    return run, results


def test_two_increments_beat_random_and_results_are_complete(tiny_run):
    run, results = tiny_run
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["complete"] and on_disk["shards"]
    assert [i["attributes"] for i in on_disk["increments"]] == [["colour"], ["garment_length"]]
    R = on_disk["accuracy_matrix"]
    assert list(R[0]) == ["colour"] and set(R[1]) == {"colour", "garment_length"}
    for a, m in R[1].items():
        assert m > on_disk["random_map"][a] + 0.15, (a, m, on_disk["random_map"][a])
    final = on_disk["final"]
    assert {"average_map", "forgetting", "average_forgetting", "bwt"} <= set(final)
    for c in on_disk["cost"]:
        for k in ("train_seconds", "eval_seconds", "images_seen", "images_per_second", "world_size", "device_seconds"):
            assert c[k] > 0 if k != "world_size" else c[k] == 1
        assert c["images_seen"] == 30 * 32
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "eval_embeddings_00.pt", "eval_embeddings_01.pt", "increment_00.pt", "increment_01.pt"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "grids" / "increment_01_garment_length.png").is_file()
    assert (run / "summary.md").read_text().count("|") > 20


def test_tensorboard_has_losses_map_cost_and_grids(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run, _ = tiny_run
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for t in ("loss/nce", "loss/kd", "loss/total", "lr/heads", "lr/encoder", "throughput/images_per_s",
              "map/colour", "map/garment_length", "cost/train_seconds", "cost/eval_seconds",
              "perf/data_wait_fraction", "perf/peak_memory_mb"):
        assert t in tags["scalars"], t
    assert "retrieval/colour" in tags["images"]
    waits = [e.value for e in acc.Scalars("perf/data_wait_fraction")]
    assert waits and all(0 <= w <= 1 for w in waits)


def test_each_increment_records_its_data_wait_and_peak_memory(tiny_run):
    _, results = tiny_run
    for row in results["cost"]:
        assert 0 <= row["data_wait_seconds"] <= row["train_seconds"], row
        assert row["peak_memory_mb"] > 50, row   # the process's peak RSS on CPU: torch alone is more


def test_resume_matches_uninterrupted_run(tiny_run, tmp_path):
    run, results = tiny_run
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "checkpoints" / "increment_01.pt").unlink()   # as if the job died during increment 1
    (broken / "results.json").unlink()
    cfg = load_config(broken / "config.yaml")
    resumed = train(cfg, broken, resume=True)
    for a, m in results["accuracy_matrix"][1].items():
        assert resumed["accuracy_matrix"][1][a] == pytest.approx(m, abs=1e-6)
    assert resumed["final"]["average_map"] == pytest.approx(results["final"]["average_map"], abs=1e-6)


def test_eval_exports_embeddings_that_reproduce_map(tiny_run, tiny_shards, tmp_path):
    from mclfir_dist.cli import main
    run, results = tiny_run
    out = tmp_path / "export"
    assert main(["eval", "--run", str(run), "--shards", str(tiny_shards), "--export", str(out)]) == 0
    report = json.loads((run / f"eval_{Path(tiny_shards).name}_test.json").read_text())
    for a in ("colour", "garment_length"):
        d = out / a
        q, ql, c, cl = (np.load(d / f) for f in ("query_emb.npy", "query_labels.npy", "cand_emb.npy", "cand_labels.npy"))
        import torch
        m = mean_average_precision(*(torch.from_numpy(x) for x in (q, ql, c, cl)))["map"]
        assert m == pytest.approx(report["map"][a], abs=1e-9)
        assert m == pytest.approx(results["accuracy_matrix"][-1][a], abs=1e-5)
        # the same leakage as the run recorded for its last increment (same checkpoint, same test split)
        recorded = results["map_details"][-1][a]["leakage"]
        assert report["details"][a]["leakage"].keys() == recorded.keys()
        for b, v in recorded.items():
            assert report["details"][a]["leakage"][b]["share"] == pytest.approx(v["share"], abs=1e-4)


def test_report_writes_table_and_plots(tiny_run, tmp_path):
    from mclfir_dist.cli import main
    run, _ = tiny_run
    assert main(["report", str(run), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "avg mAP" in text and "colour" in text and "| leakage" in text and "attribute leakage" in text
    assert (tmp_path / "map_vs_cost.png").stat().st_size > 1000
    assert (tmp_path / f"matrix_{run.name}.png").stat().st_size > 1000
    res = json.loads((run / "results.json").read_text())
    assert res["wall_seconds"] >= sum(c["train_seconds"] + c["eval_seconds"] for c in res["cost"])
    assert f"- {run.name}: " in text and "CPU only" in text and "torch 2." in text


def test_train_module_entry_point_errors_cleanly(tmp_path):
    p = subprocess.run([sys.executable, "-m", "mclfir_dist.train", "--config", str(ROOT / "configs/debug_cpu.yaml"),
                        "--out", str(tmp_path / "r"), "train.nonsense=1"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "train.nonsense" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("method", ["mclfir", "lwf"])
def test_compiled_run_equals_the_eager_run(tiny_shards, tmp_path, method):
    """train.compile with the aot_eager backend traces trunk, heads, the EMA teacher (or LwF's snapshot)
    and their backward exactly as inductor would, without code generation: the run must equal the eager
    one (a copied compiled module running the original's weights, i.e. a teacher equal to the student,
    would change the result), and checkpoints keep their keys."""
    import torch
    short = tiny_train_overrides(tiny_shards, steps=4) + [f"train.method={method}", "eval.grid_queries=0",
                                                          "eval.frozen_baseline=false", "train.log_every=2"]
    eager = train(load_config(ROOT / "configs/debug_cpu.yaml", short), tmp_path / "eager")
    compiled = train(load_config(ROOT / "configs/debug_cpu.yaml", short + ["train.compile=true",
                                                                           "train.compile_backend=aot_eager"]),
                     tmp_path / "compiled")
    assert compiled["accuracy_matrix"] == eager["accuracy_matrix"]
    a, b = (torch.load(tmp_path / r / "checkpoints" / "increment_01.pt", weights_only=True) for r in ("eager", "compiled"))
    assert list(a["model"]) == list(b["model"]) and not any("_orig_mod" in k for k in b["model"])
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["finetune", "lwf", "frozen", "static_joint"])
def test_baseline_methods_run_in_the_same_engine(tiny_shards, tmp_path, method):
    import torch
    cfg = load_config(ROOT / "configs/debug_cpu.yaml",
                      tiny_train_overrides(tiny_shards, steps=10) + [f"train.method={method}", "eval.grid_queries=0",
                                                                     "eval.frozen_baseline=false"])
    res = train(cfg, tmp_path / method)
    assert res["complete"] and set(res["accuracy_matrix"][-1]) == {"colour", "garment_length"}
    steps = [c["steps"] for c in res["cost"]]
    assert steps == ([10, 20] if method == "static_joint" else [10, 10])
    if method == "frozen":
        from mclfir_dist.model.mclfir import build_model
        torch.manual_seed(cfg.train.seed)
        init = build_model(cfg.model, cfg.data.image_size).trunk.state_dict()
        final = torch.load(tmp_path / method / "checkpoints" / "increment_01.pt", map_location="cpu", weights_only=False)["model"]
        for k, v in init.items():
            assert torch.equal(final[f"trunk.{k}"], v), k


def test_frozen_trunk_batchnorm_and_anchor_only_distillation(tiny_shards, tmp_path, monkeypatch):
    """trunk_bn=frozen: the trunk learns but its BatchNorm statistics stay pretrained-initial.
    Embedding-level KD with kd_anchors_only: no teacher pass in the first increment (no old heads),
    then the teacher sees only the anchor half of each batch."""
    import torch
    from mclfir_dist.methods.teacher import EMATeacher
    calls = []
    forward = EMATeacher.forward
    monkeypatch.setattr(EMATeacher, "forward", lambda self, x: calls.append(x.shape[0]) or forward(self, x))
    cfg = load_config(ROOT / "configs/debug_cpu.yaml",
                      tiny_train_overrides(tiny_shards, steps=10) + ["model.trunk_bn=frozen", "loss.kd_anchors_only=true",
                                                                     "loss.kd_type=embedding", "eval.grid_queries=0",
                                                                     "eval.frozen_baseline=false"])
    res = train(cfg, tmp_path / "run")
    assert res["complete"]
    assert calls == [cfg.data.batch_doublets] * 10  # increment 1 only, anchors only
    from mclfir_dist.model.mclfir import build_model
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg.model, cfg.data.image_size).trunk.state_dict()
    final = torch.load(tmp_path / "run" / "checkpoints" / "increment_01.pt", map_location="cpu", weights_only=False)["model"]
    stats = [k for k in init if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(final[f"trunk.{k}"], init[k]) for k in stats)
    assert not torch.equal(final["trunk.stem.0.weight"], init["stem.0.weight"])


def test_static_final_only_estimates_earlier_retrainings(tiny_shards, tmp_path):
    cfg = load_config(ROOT / "configs/debug_cpu.yaml",
                      tiny_train_overrides(tiny_shards, steps=10) + ["train.method=static_joint", "train.static_final_only=true",
                                                                     "eval.grid_queries=0", "eval.frozen_baseline=false"])
    res = train(cfg, tmp_path / "s")
    first, last = res["cost"]
    assert first["estimated"] and not last.get("estimated") and last["steps"] == 20 and first["steps"] == 10
    assert first["train_seconds"] == pytest.approx(last["train_seconds"] / 2)
    assert res["accuracy_matrix"][0] == {} and set(res["accuracy_matrix"][1]) == {"colour", "garment_length"}
    import math
    assert math.isnan(res["final"]["average_forgetting"]) and math.isnan(res["final"]["bwt"])  # unknown, not 0
    from mclfir_dist.evaluation.report import comparison_table
    table = comparison_table([str(tmp_path / "s")], [res])
    assert "| 1.00* " in table and "not run" in table


@pytest.mark.parametrize("loader,optimizer", [("torch", "auto"), pytest.param("dali", "auto", marks=needs("dali")),
                                              ("torch_gpu", "auto"),
                                              ("torch", "fused")])
def test_run_killed_mid_increment_resumes_exactly(tiny_shards, tmp_path, monkeypatch, loader, optimizer):
    """Killed inside increment 0 after its step-10 checkpoint: the resumed run replays the data stream to
    step 10 and ends bit-identical to an uninterrupted run (metrics and every weight), with either loader,
    and with the fused AdamW that CUDA runs take (its step counts live on the parameters' device)."""
    import torch
    overrides = tiny_train_overrides(tiny_shards, steps=20) + ["train.checkpoint_every=5", "eval.grid_queries=0",
                                                               "eval.frozen_baseline=false", f"data.loader={loader}",
                                                               f"optim.implementation={optimizer}"]
    cfg = load_config(ROOT / "configs/debug_cpu.yaml", overrides)
    reference = train(cfg, tmp_path / "uninterrupted")
    monkeypatch.setenv("MCLFIR_FAULT_RANK", "0")
    monkeypatch.setenv("MCLFIR_FAULT_STEP", "12")  # dies inside increment 0, after the step-10 checkpoint
    with pytest.raises(RuntimeError, match="injected fault"):
        train(cfg, tmp_path / "r")
    partial = torch.load(tmp_path / "r" / "checkpoints" / "partial.pt", map_location="cpu", weights_only=True)
    assert partial["increment"] == 0 and partial["step"] == 10 and "optimizer" in partial
    assert all(bool(g["fused"]) == (optimizer == "fused") for g in partial["optimizer"]["param_groups"])
    monkeypatch.delenv("MCLFIR_FAULT_RANK")
    res = train(load_config(tmp_path / "r" / "config.yaml"), tmp_path / "r", resume=True)
    assert res["complete"] and [c["steps"] for c in res["cost"]] == [20, 20]
    assert not (tmp_path / "r" / "checkpoints" / "partial.pt").exists()
    assert res["accuracy_matrix"] == reference["accuracy_matrix"]
    final = torch.load(tmp_path / "r" / "checkpoints" / "increment_01.pt", map_location="cpu", weights_only=True)
    ref = torch.load(tmp_path / "uninterrupted" / "checkpoints" / "increment_01.pt", map_location="cpu", weights_only=True)
    for part in ("model", "method"):
        flat, ref_flat = _flatten(final[part]), _flatten(ref[part])
        assert flat.keys() == ref_flat.keys()
        assert all(torch.equal(flat[k], ref_flat[k]) for k in flat), part


def _flatten(state, prefix=""):
    import torch
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def test_increments_on_different_shard_sets(tiny_shards, tmp_path):
    """A run spanning two datasets (the paper's FashionAI -> DeepFashion -> DARN shape)."""
    other = tmp_path / "other"
    shutil.copytree(tiny_shards, other)
    man = json.loads((other / "manifest.json").read_text())
    for a in man["attributes"]:
        a["name"] = "b_" + a["name"]
    for split in man["eval_sets"]:
        man["eval_sets"][split] = {"b_" + k: v for k, v in man["eval_sets"][split].items()}
    (other / "manifest.json").write_text(json.dumps(man))
    incs = f"[{{name: a, attributes: [colour]}},{{name: b, attributes: [b_garment_length], shards: '{other}'}}]"
    cfg = load_config(ROOT / "configs/debug_cpu.yaml",
                      tiny_train_overrides(tiny_shards, steps=30, increments=incs) + ["eval.grid_queries=1"])
    res = train(cfg, tmp_path / "r")
    assert res["attribute_shards"] == {"colour": str(tiny_shards), "b_garment_length": str(other)}
    assert set(res["accuracy_matrix"][1]) == {"colour", "b_garment_length"}
    for a, m in res["accuracy_matrix"][1].items():
        assert m > res["random_map"][a] + 0.15, (a, m)
    assert (tmp_path / "r" / "grids" / "increment_01_b_garment_length.png").is_file()


def test_resume_after_the_last_checkpoint_heals_results_and_summary(tiny_run, tmp_path):
    """A kill between the final checkpoint and the results.json write: resume rewrites both from the checkpoint."""
    run, results = tiny_run
    broken = tmp_path / "killed_late"
    shutil.copytree(run, broken)
    stale = json.loads((broken / "results.json").read_text())
    stale["accuracy_matrix"] = stale["accuracy_matrix"][:1]
    stale["complete"] = False
    (broken / "results.json").write_text(json.dumps(stale))
    (broken / "summary.md").unlink()
    from mclfir_dist.cli import main
    assert main(["train", "--resume", str(broken)]) == 0
    healed = json.loads((broken / "results.json").read_text())
    assert healed["complete"] and healed["accuracy_matrix"] == results["accuracy_matrix"]
    assert (broken / "summary.md").is_file()


def test_report_marks_incomplete_runs(tiny_run, tmp_path):
    from mclfir_dist.evaluation.report import comparison_table
    run, results = tiny_run
    partial = json.loads(json.dumps(results))
    partial["complete"] = False
    partial["accuracy_matrix"] = partial["accuracy_matrix"][:1]
    assert "INCOMPLETE: 1/2 increments" in comparison_table([str(run)], [partial])
    assert "INCOMPLETE" not in comparison_table([str(run)], [results])
