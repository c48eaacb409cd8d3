"""The 96 px study's gate (scripts/fpi96_study.py): its verdict from results.json files, and misuse."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("fpi96_study", ROOT / "scripts/fpi96_study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


CONFIG = {"model": {"trunk": "efficientnet_lite0", "pretrained": True, "drop_connect": 0.0},
          "data": {"image_size": 96, "batch_doublets": 32},
          "train": {"steps_per_increment": 100, "increments": [{"name": str(i)} for i in range(6)]}}


def _res(avg, forgetting=0.0, seconds=10.0):
    return {"final": {"average_map": avg}, "metrics": [{"average_forgetting": forgetting}],
            "cost": [{"train_seconds": seconds}], "machine": {"cpu": "x86_64", "cpu_count": 2, "torch": "t"},
            "mixed_precision": "no", "precision_reason": "train.mixed_precision=no", "channels_last": True,
            "config": CONFIG}


def _runs(trained, frozen_lo, frozen_hi, forget, trained_hi=None):
    runs = {}
    for s, (t, lo, hi, f) in enumerate(zip(trained, frozen_lo, frozen_hi, forget)):
        runs["static_train_lr0.0005", s] = _res(t)
        runs["static_train_lr0.001", s] = _res(t - 0.01 if trained_hi is None else trained_hi[s])
        runs["static_frozen_lr0.0005", s] = _res(lo)
        runs["static_frozen_lr0.001", s] = _res(hi)
        runs["finetune", s] = _res(0.5, f)
    return runs


def test_the_gate_keeps_each_variants_better_lr_and_passes_only_on_both_counts():
    seeds = [0, 1, 2]
    runs = _runs([0.560, 0.565, 0.558], [0.530, 0.532, 0.529], [0.540, 0.541, 0.539], [0.03, 0.025, 0.04])
    v = study.gate_verdict(runs, seeds)
    assert v["kept"] == {"static_train": "static_train_lr0.0005", "static_frozen": "static_frozen_lr0.001"}
    assert v["difference"].mean == pytest.approx((2.0 + 2.4 + 1.9) / 3)
    assert v["passes"] and v["encoder_matters"] and v["finetune_forgets"]
    for name in ("static_train_lr0.001", "static_frozen_lr0.0005"):   # run on the first seed only
        del runs[name, 1], runs[name, 2]
    assert study.gate_verdict(runs, seeds)["difference"].mean == pytest.approx((2.0 + 2.4 + 1.9) / 3)
    text = study.gate_report(runs, seeds, "configs/fpi96_cpu.yaml")
    assert "**The gate passes.**" in text and "trainable 0.0005, frozen 0.001" in text
    assert "| 1 | 56.50 | - | - | 54.10 | +2.40 |" in text and "96 px, 6 increments x 100 steps" in text
    # a frozen encoder within 1.5 points fails the gate, and the report says which part failed
    close = _runs([0.550, 0.552, 0.549], [0.530, 0.532, 0.529], [0.540, 0.541, 0.539], [0.03, 0.025, 0.04])
    v = study.gate_verdict(close, seeds)
    assert not v["passes"] and not v["encoder_matters"] and v["finetune_forgets"]
    assert "**The gate fails.**" in study.gate_report(close, seeds, "c.yaml")
    # the trainable encoder's better lr counts for it, as the frozen one's for it
    better = _runs([0.550, 0.552, 0.549], [0.530] * 3, [0.540] * 3, [0.03] * 3, trained_hi=[0.57, 0.56, 0.565])
    assert study.gate_verdict(better, seeds)["kept"]["static_train"] == "static_train_lr0.001"
    # finetune that barely forgets fails it too
    assert not study.gate_verdict(_runs([0.56] * 3, [0.53] * 3, [0.54] * 3, [0.01, 0.02, 0.015]), seeds)["passes"]


@pytest.mark.parametrize("args,message", [
    (["--phase", "gate", "--seeds", "0"], "the paired test needs at least 2 seeds"),
    (["--phase", "gate", "--set", "optim.lrr=1"], "optim.lrr"),
    (["--phase", "gate", "--config", "no/such.yaml"], "no such file"),
    (["--phase", "seedz"], "invalid choice"),
])
def test_misuse_is_one_line_and_exit_2(tmp_path, args, message):
    p = subprocess.run([sys.executable, str(ROOT / "scripts/fpi96_study.py"), *args, "--runs", str(tmp_path / "r")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "r").exists()


def test_tune_runs_every_method_through_mclfir_tune_round_robin_from_the_configs_point(tmp_path):
    """Two methods, two trials each, of real tiny `mclfir tune` studies (the synthetic set, 2 increments)."""
    import json
    from conftest import SELF_BUILDING_TINY
    tiny = [*SELF_BUILDING_TINY, "train.steps_per_increment=4", "model.pretrained=false",
            f"data.shards={tmp_path / 's'}", "optim.lr=0.0007", "train.num_threads=1"]
    p = subprocess.run([sys.executable, str(ROOT / "scripts/fpi96_study.py"), "--phase", "tune", "--trials", "2",
                        "--methods", "finetune", "static_frozen", "--config", str(ROOT / "configs/debug_cpu.yaml"),
                        "--runs", str(tmp_path / "r"), "--out", str(tmp_path / "o"), "--set", *tiny],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    order = [ln.strip() for ln in p.stdout.splitlines() if ln.strip().endswith("trials")]
    assert order == ["finetune: 1 trials", "static_frozen: 1 trials", "finetune: 2 trials",
                     "static_frozen: 2 trials"]   # round robin: a stop leaves equal counts
    record = json.loads((tmp_path / "o" / "tuning.json").read_text())
    for method in ("finetune", "static_frozen"):
        trials = record["methods"][method]["trials"]
        assert len(trials) == 2 and trials[0]["params"]["optim.lr"] == 0.0007   # trial 0: the config's point
        assert set(trials[1]["params"]) == {k for k, _ in study.KNOBS[method]}
        res = json.loads((Path(trials[0]["run"]) / "results.json").read_text())
        cfg = res["config"]
        assert cfg["eval"]["split"] == "val" and cfg["train"]["seed"] == 0
        assert cfg["train"]["static_final_only"] == method.startswith("static")
        assert (cfg["optim"]["first_encoder_lr_scale"] == 0) == (method == "static_frozen")
        assert (tmp_path / "o" / "tune" / method / "REPORT.md").is_file()
    text = (tmp_path / "o" / "TUNING.md").read_text()
    assert "| finetune | 2 |" in text and "| static_frozen | 2 |" in text


def test_the_pruning_phase_runs_out_each_pruned_trial_and_says_what_it_saved(tmp_path, monkeypatch):
    import json
    asked = []

    def fake_run(config, out, overrides, log, prog):
        log.write_text("")   # as the real one does: the phase made the folder
        asked.append((out.name, list(overrides)))
        return {"final": {"average_map": 0.61 if out.name == "lwf_t02" else 0.50}, "wall_seconds": 300.0}

    monkeypatch.setattr(study.runner, "run_train", fake_run)
    trial = lambda n, state, value, seconds: {"number": n, "params": {"optim.lr": 0.001 * (n + 1)}, "state": state,
                                              "value": value, "seconds": seconds, "last_step": 100}
    record = {"methods": {"lwf": {"chosen_val_map": 0.60, "trials": [trial(0, "COMPLETE", 0.60, 300.0),
                                                                    trial(1, "COMPLETE", 0.55, 300.0),
                                                                    trial(2, "PRUNED", 0.40, 100.0)]},
                          "finetune": {"chosen_val_map": 0.58, "trials": [trial(0, "COMPLETE", 0.58, 200.0),
                                                                         trial(1, "PRUNED", 0.30, 50.0)]}}}
    out = tmp_path / "o"
    out.mkdir()
    (out / "tuning.json").write_text(json.dumps(record))
    args = study.parse_args(["--phase", "pruning", "--methods", "lwf", "finetune", "--runs", str(tmp_path / "r"),
                             "--out", str(out)])
    study.pruning_phase(args, {})
    assert [name for name, _ in asked] == ["lwf_t02", "finetune_t01"]
    assert "optim.lr=0.003" in asked[0][1] and "train.method=lwf" in asked[0][1]
    text = (out / "PRUNING.md").read_text()
    assert "| lwf | 3 | 1 | 700 | 900 | 22% | yes: trial 2 61.00 (chosen 60.00) |" in text
    assert "| finetune | 2 | 1 | 250 | 500 | 50% | no (chosen 58.00) |" in text
    assert "950 s with pruning against 1400 s" in text and "a choice changes for 1 of 2 methods" in text


def _full(avg, forgetting=0.01, seconds=(10.0,) * 6, estimated=False, per_step=0.1):
    cost = [{"train_seconds": s, "steps": round(s / per_step), "estimated": estimated and i < len(seconds) - 1}
            for i, s in enumerate(seconds)]
    return {"complete": True, "final": {"average_map": avg}, "metrics": [{"average_forgetting": forgetting}],
            "cost": cost}


def test_the_report_tests_each_claim_with_holm_from_the_runs(tmp_path):
    import json
    runs = tmp_path / "runs"

    def put(phase, name, res):
        (runs / phase / name).mkdir(parents=True)
        (runs / phase / name / "results.json").write_text(json.dumps(res))
    jitter = (0.0, 0.003, -0.002)
    for s, j in enumerate(jitter):
        put("seeds", f"mclfir_s{s}", _full(0.560 + j, 0.005, (10.0,) * 6))
        put("seeds", f"lwf_s{s}", _full(0.556 + j, 0.006))
        put("seeds", f"finetune_s{s}", _full(0.530 + j, 0.04))
        # static: seed 0 ran every retraining (cost 10, 20, ... 60 s); the others only the last (estimated before)
        put("seeds", f"static_train_s{s}", _full(0.5605 + j + 0.001 * s, 0.0, tuple(10.0 * (i + 1) for i in range(6)),
                                                estimated=s > 0))
        put("seeds", f"static_frozen_s{s}", _full(0.540 + j, 0.0, (5.0,) * 6, estimated=True))
        for f, gain in zip(study.BUDGETS, (-0.03, -0.01, 0.004)):
            put("budget", f"static_train_x{f:g}_s{s}", _full(0.5605 + j + gain, 0.0, (0,) * 5 + (60.0 * f,), True))
        for m, drop in (("mclfir", 0.010), ("lwf", 0.012), ("finetune", 0.02), ("static_train", 0.011 + 0.001 * s)):
            base = {"mclfir": 0.560, "lwf": 0.556, "finetune": 0.530, "static_train": 0.5605 + 0.001 * s}[m]
            put("noise", f"{m}_noisy_s{s}", _full(base + j - drop))
        put("sensitivity", f"static_train_config_s{s}",   # ~3 points above mclfir; two CPUs ran them
            {**_full(0.5905 + j + 0.002 * s), "machine": {"cpu_model": "AMD EPYC" if s else "Intel Xeon"}})
    for o, j in zip(study.ORDERS, (0.004, -0.006)):
        for m, base in (("mclfir", 0.560), ("lwf", 0.556), ("finetune", 0.528), ("static_train", 0.56)):
            put("orders", f"{m}_{o}_s0", _full(base + j) if m != "static_train" else
                {**_full(base + j, 0.0, tuple(10.0 * (i + 1) for i in range(6)), estimated=True),
                 **({"machine": {"cpu_model": "AMD EPYC"}} if o == "shuffled" else {})})
    # side by side: MCL-FIR 0.1 s/step at its first increment, 0.11 then 0.12 later; static 0.1 throughout
    (tmp_path / "out").mkdir()
    arm = {"mclfir@0": ("mclfir", 0, [0.1, 0.1]), "mclfir@1": ("mclfir", 1, [0.11, 0.12]),
           "mclfir@5": ("mclfir", 5, [0.11, 0.12]),
           "static_train@0": ("static_train", 0, [0.1, 0.1]), "static_train@5": ("static_train", 5, [0.1, 0.1])}
    (tmp_path / "out" / "cost_side_by_side.json").write_text(json.dumps({"arms": {
        k: {"name": n, "increment": i, "per_step": v, "median": sum(v) / 2, "train_heads": ["a"] * (i + 1)}
        for k, (n, i, v) in arm.items()}}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{study.README_START}\n- old bullet\n{study.README_END}\n- next\n")
    args = study.parse_args(["--phase", "report", "--runs", str(runs), "--out", str(tmp_path / "out"),
                             "--readme", str(readme)])
    text = study.report_phase(args)
    bullet = readme.read_text()   # the README's results bullet, regenerated from the same verdicts
    assert "old bullet" not in bullet and bullet.endswith(f"{study.README_END}\n- next\n")
    assert "Comparable to static retraining (trainable encoder): **equivalent**" in bullet
    claims = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    comparable = claims["Comparable to static retraining (trainable encoder)"]
    assert "TOST" in comparable and comparable.endswith("| equivalent |")     # -0.1 to -0.3 points, tight
    cost = claims["At most 35% of static-cumulative's training cost"]
    assert "28.6-28.6%" in cost and cost.endswith("| holds |")                # 60 s of 210 s for every seed
    side = claims["At most 35% of static-cumulative's training cost (steps x seconds per step)"]
    # 100 x 0.1 + 500 x 0.11 (0.12; 0.115) against 2100 x 0.1: 65 (70; 67.5) of 210 s
    assert "32.1% at the median seconds per step (31.0-33.3% over rounds)" in side and side.endswith("| holds |")
    assert "| mclfir | 5 | 6 | 0.115 | 0.110-0.120 |" in text and "| cost (side by side) | 1 of 1 | - | - |" in text
    assert claims["MCL-FIR against finetune"].endswith("| above |")
    sensitivity = next(v for k, v in claims.items() if k.startswith("Sensitivity"))
    assert sensitivity.endswith("| not equivalent: below |")   # its whole interval below -1 point
    assert "Holm" in text and text.count("| p (Holm) |") == 1
    assert "## What the study cost" in text and "| total |" in text
    assert any(k.startswith("Accuracy against cost") for k in claims)
    assert any(k.startswith("Messy data") for k in claims) and any(k.startswith("Order:") for k in claims)
    mclfir_row = next(line for line in text.splitlines() if line.startswith("| mclfir | 3 |"))
    assert "56.03 ± 0.25" in mclfir_row
    assert (tmp_path / "out" / "accuracy_cost.png").stat().st_size > 1000
    assert (tmp_path / "out" / "runs" / "noise" / "mclfir_noisy_s1.json").is_file()
    assert "| seeds | 15 of 15 | - | - |" in text and "| orders | 8 of 8 | - | AMD EPYC |" in text
    assert "| sensitivity | 3 of 3 | - | AMD EPYC, Intel Xeon |" in text
    assert "| mclfir | 0.100 | 0.100 | 0.100 |" in text   # 10 s per 100 steps, each seed
    # seed 0 in the reversed order: margins over lwf and finetune, and the cost share
    assert "| reversed | subCategory | 56.40 | 56.00 | 53.20 | 56.40 | +0.40 | +3.20 | 28.6% |" in text
    assert "| 28.6% (- / AMD EPYC: not comparable) |" in text   # shuffled: its static ran on another CPU
    assert "| mclfir | 3 | 56.03 ± 0.25 | 55.03 ± 0.25 | 1.00 ± 0.00 |" in text   # clean, noisy, drop
    # mclfir's 60 s sit at static's 1x point on each seed's curve (0.1 s a step x 600 steps)
    assert "| mclfir | 60.00 ± 0.00 | 56.03 ± 0.25 | 56.18 ± 0.23 | -0.15 ± 0.10 |" in text
    assert "| static_frozen | 30.00 ± 0.00 |" in text and "| static_train | 210" not in text
    # priced side by side: 100 x 0.1 + 500 x 0.115 = 67.5 s against static's 600 x 0.1 at 1x, on every seed
    assert "| 0 | 68 | 60 | 56.00 | 56.12 | -0.12 |" in text and "| mean | | | | | -0.20 ± 0.08 |" in text
    # a fresh checkout has no run folders: the committed copies give the same report
    import shutil
    shutil.rmtree(runs)
    assert study.report_phase(args) == text
    # a phase cut short is said, and its claim waits for it
    (tmp_path / "out" / "runs" / "noise" / "lwf_noisy_s2.json").unlink()
    (tmp_path / "out" / "runs" / "budget" / "static_train_x2_s2.json").unlink()
    again = study.report_phase(args)
    assert "| noise | 11 of 12 | lwf_noisy_s2 | - |" in again and "| budget | 8 of 9 | static_train_x2_s2 | - |" in again
    assert any(ln.startswith("| Messy data") for ln in again.splitlines())   # lwf's drop is not in its test
    assert "**Still to run: budget (1 run), noise (1 run)**" in readme.read_text()
    assert "Still to run" not in bullet


def test_the_budget_curve_prices_steps_at_the_seeds_phase_seconds_per_step():
    """The budget runs may run in another session or share the cores: their cost is their steps at the seconds
    per step of the seeds phase's retraining, measured beside MCL-FIR's runs."""
    runs = {"seeds": {"static_train_s0": _full(0.56, seconds=(60.0,), per_step=0.1)},
            "budget": {f"static_train_x{f:g}_s0": _full(0.5 + 0.01 * f, seconds=(600.0 * f,), per_step=1.0)
                       for f in study.BUDGETS}}
    curve = [x for point in study.budget_curve(runs, 0) for x in point]
    assert curve == pytest.approx([60.0, 56.0, *(x for f in study.BUDGETS for x in (60.0 * f, 50.0 + f))])
    assert study.budget_curve(runs, 1) == []


def test_a_phase_resumes_from_its_committed_copies_in_a_fresh_checkout(tmp_path, monkeypatch):
    """A run's results are copied beside the report as it ends; with the run folder gone (a new machine), the
    copy made with the same settings is kept, one with other settings runs again, one cut short is exit 2."""
    from mclfir_dist.config import to_dict
    from mclfir_dist.configure import load_config
    ran = []

    def fake_run(config, out, overrides, log, prog):
        ran.append(out.name)
        return {"complete": True, "config": to_dict(load_config(config, list(overrides))), "wall_seconds": 12.0,
                "final": {"average_map": 0.5}}

    monkeypatch.setattr(study.runner, "run_train", fake_run)
    args = study.parse_args(["--phase", "seeds", "--runs", str(tmp_path / "r"), "--out", str(tmp_path / "o")])
    chosen = {"lwf": {"optim.lr": 0.001}}
    study.study_run(args, "seeds", "lwf_s0", "lwf", chosen, study.seed_overrides(0, "test"))
    copy = tmp_path / "o" / "runs" / "seeds" / "lwf_s0.json"
    assert ran == ["lwf_s0"] and copy.is_file()
    assert study.study_run(args, "seeds", "lwf_s0", "lwf", chosen, study.seed_overrides(0, "test"))["wall_seconds"] == 12.0
    assert ran == ["lwf_s0"]
    study.study_run(args, "seeds", "lwf_s0", "lwf", {"lwf": {"optim.lr": 0.002}}, study.seed_overrides(0, "test"))
    assert ran == ["lwf_s0"] * 2
    copy.write_text('{"complete": tr')
    with pytest.raises(study.runner.UsageError):
        study.study_run(args, "seeds", "lwf_s0", "lwf", chosen, study.seed_overrides(0, "test"))


def test_interpolation_on_the_cost_curve_is_linear_in_log_cost():
    curve = [(10.0, 0.50), (40.0, 0.56), (20.0, 0.54)]
    assert study.interpolate(curve, 20.0) == pytest.approx(0.54)
    assert study.interpolate(curve, 20.0 * 2 ** 0.5) == pytest.approx(0.55)   # halfway in log between 20 and 40
    assert study.interpolate(curve, 5.0) == 0.50 and study.interpolate(curve, 99.0) == 0.56


def test_the_gate_runs_each_variants_lr_chosen_on_the_first_seed_only_there_after(tmp_path, monkeypatch):
    started = []

    def fake_run(config, out, overrides, log, prog):
        started.append(out.name)
        return _res(0.55 if "lr0.001" in out.name else 0.53, 0.03)

    monkeypatch.setattr(study.runner, "run_train", fake_run)
    args = study.parse_args(["--phase", "gate", "--runs", str(tmp_path / "r"), "--out", str(tmp_path / "o")])
    runs = study.gate_runs(args)
    assert started == ["static_train_lr0.0005_s0", "static_train_lr0.001_s0", "static_frozen_lr0.0005_s0",
                       "static_frozen_lr0.001_s0", "finetune_s0",
                       "static_train_lr0.001_s1", "static_frozen_lr0.001_s1", "finetune_s1",
                       "static_train_lr0.001_s2", "static_frozen_lr0.001_s2", "finetune_s2"]
    assert study.gate_verdict(runs, [0, 1, 2])["kept"]["static_frozen"] == "static_frozen_lr0.001"


def test_a_probe_runs_only_the_named_runs_on_the_first_seed(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(study.runner, "run_train", lambda config, out, overrides, log, prog: started.append(
        (out.name, overrides)) or _res(0.5))
    args = study.parse_args(["--phase", "gate", "--probe", "static_train_lr0.0005", "static_frozen_lr0.001",
                             "--runs", str(tmp_path / "r"), "--set", "data.image_size=128"])
    study.gate_runs(args)
    assert [n for n, _ in started] == ["static_train_lr0.0005_s0", "static_frozen_lr0.001_s0"]
    assert all("data.image_size=128" in o for _, o in started)


@pytest.mark.parametrize("passes", [True, False])
def test_phase_all_runs_every_phase_in_order_and_stops_at_a_failed_gate(tmp_path, monkeypatch, passes):
    done = []
    monkeypatch.setattr(study, "gate_runs", lambda args: done.append("gate") or {})
    monkeypatch.setattr(study, "write_gate", lambda args, runs: "GATE")
    monkeypatch.setattr(study, "gate_verdict", lambda runs, seeds: {"passes": passes})
    monkeypatch.setattr(study, "tune", lambda args: done.append("tune"))
    monkeypatch.setattr(study, "load_chosen", lambda out, methods: {})
    monkeypatch.setattr(study, "PHASES", {name: (lambda n: lambda args, chosen: done.append(n))(name)
                                          for name in study.PHASES})
    monkeypatch.setattr(study, "report_phase", lambda args: done.append("report") or "REPORT")
    rc = study.main(["--phase", "all", "--runs", str(tmp_path / "r"), "--out", str(tmp_path / "o")])
    if passes:
        assert rc == 0 and done == ["gate", "tune", "pruning", "seeds", "budget", "orders", "noise", "sensitivity",
                                    "cost", "report"]
    else:
        assert rc == 1 and done == ["gate"]


def test_the_study_goes_on_with_a_pruned_trial_that_ran_out_above_the_kept_one(tmp_path):
    """PRUNING.md found a static trial pruned at step 100 that ends at 60.61 against the kept 58.93: the seeds
    phase takes it; a run-out trial below the kept one changes nothing; without pruning.json the kept one stays."""
    import json
    trials = [{"number": 0, "params": {"optim.lr": 0.0005}}, {"number": 7, "params": {"optim.lr": 0.002}},
              {"number": 3, "params": {"optim.lr": 0.01}}]
    rec = {"methods": {m: {"trials": trials, "chosen": {"optim.lr": 0.0005}, "chosen_val_map": 0.5893}
                       for m in ("static_train", "lwf")}}
    (tmp_path / "tuning.json").write_text(json.dumps(rec))
    assert study.load_chosen(tmp_path, ["static_train", "lwf"]) == {"static_train": {"optim.lr": 0.0005},
                                                                    "lwf": {"optim.lr": 0.0005}}
    ran_out = {"static_train": {"pruned": [{"number": 3, "value": 0.2644}, {"number": 7, "value": 0.6061}]},
               "lwf": {"pruned": [{"number": 3, "value": 0.5587}]}}
    (tmp_path / "pruning.json").write_text(json.dumps(ran_out))
    assert study.load_chosen(tmp_path, ["static_train", "lwf"]) == {"static_train": {"optim.lr": 0.002},
                                                                    "lwf": {"optim.lr": 0.0005}}
    (tmp_path / "pruning.json").write_text(json.dumps({"lwf": {"pruned": [{"number": 9, "value": 0.7}]}}))
    with pytest.raises(study.runner.UsageError):   # a trial the record does not hold: one line, exit 2
        study.load_chosen(tmp_path, ["lwf"])
    (tmp_path / "pruning.json").write_text("{")
    with pytest.raises(study.runner.UsageError):
        study.load_chosen(tmp_path, ["lwf"])


def test_the_sensitivity_phase_retrains_static_at_the_configs_own_values(tmp_path, monkeypatch):
    """static_train's trial 0 (the config's point), every seed, test split, final retraining only."""
    import json
    asked = []
    monkeypatch.setattr(study.runner, "run_train",
                        lambda config, out, overrides, log, prog: asked.append((out.name, overrides)) or {})
    out = tmp_path / "o"
    out.mkdir()
    trials = [{"number": 0, "params": {"optim.lr": 0.0005, "optim.first_encoder_lr_scale": 0.2}},
              {"number": 7, "params": {"optim.lr": 0.0012, "optim.first_encoder_lr_scale": 0.19}}]
    (out / "tuning.json").write_text(json.dumps({"methods": {"static_train": {"trials": trials}}}))
    args = study.parse_args(["--phase", "sensitivity", "--seeds", "0", "1", "--runs", str(tmp_path / "r"),
                             "--out", str(out)])
    study.sensitivity_phase(args, {})
    assert [n for n, _ in asked] == ["static_train_config_s0", "static_train_config_s1"]
    over = asked[1][1]
    assert {"optim.lr=0.0005", "optim.first_encoder_lr_scale=0.2", "train.method=static_joint", "eval.split=test",
            "train.static_final_only=true", "train.seed=1"} <= set(over)
    (out / "tuning.json").write_text("{}")
    with pytest.raises(study.runner.UsageError):
        study.sensitivity_phase(args, {})


def test_the_cost_phase_times_mclfir_and_static_side_by_side_once(tmp_path, monkeypatch):
    """bench.cost with MCL-FIR at its first, second and last increment and static at its first and last, each
    with its chosen values; a measurement on record is kept; a failed bench writes nothing and says so."""
    import json
    calls, rc = [], [0]

    def fake_run(cmd, **kw):
        calls.append(cmd)
        if not rc[0]:
            Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps({"mclfir@0": {}}))
        return subprocess.CompletedProcess(cmd, rc[0])

    monkeypatch.setattr(subprocess, "run", fake_run)
    args = study.parse_args(["--phase", "cost", "--runs", str(tmp_path / "r"), "--out", str(tmp_path / "o")])
    chosen = {"mclfir": {"optim.lr": 0.002}, "static_train": {"optim.lr": 0.001}}
    study.cost_phase(args, chosen)
    cmd = calls[0]
    starts = [i for i, a in enumerate(cmd) if a == "--arm"]
    arms = [cmd[i + 1:j] for i, j in zip(starts, starts[1:] + [len(cmd)])]
    assert [a[:2] for a in arms] == [["mclfir", "0"], ["mclfir", "1"], ["mclfir", "5"], ["static_train", "0"],
                                     ["static_train", "5"]]
    assert arms[0][2:] == ["train.method=mclfir", "optim.lr=0.002"]
    assert arms[-1][2:] == ["train.method=static_joint", "optim.lr=0.001"]
    study.cost_phase(args, chosen)
    assert len(calls) == 1   # on record: kept
    (tmp_path / "o" / "cost_side_by_side.json").unlink()
    rc[0] = 1
    with pytest.raises(SystemExit) as e:
        study.cost_phase(args, chosen)
    assert e.value.code == 1 and not (tmp_path / "o" / "cost_side_by_side.json").exists()
