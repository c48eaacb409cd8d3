"""The several-seed report (scripts/fpi_seeds.py): statistics and verdicts from results.json files."""
import importlib.util
import json
import math
import subprocess
import sys
from argparse import Namespace

import pytest

from conftest import ROOT
from mclfir_dist.study import runner

spec = importlib.util.spec_from_file_location("fpi_seeds", ROOT / "scripts/fpi_seeds.py")
fpi_seeds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fpi_seeds)


def _result(avg, forgetting, seconds, estimated_first=False):
    cost = [{"train_seconds": s, "estimated": estimated_first and i < len(seconds) - 1} for i, s in enumerate(seconds)]
    leak = {"a": {"a": {"share": avg, "chance": 0.5}, "b": {"share": 0.6, "chance": 0.5}},
            "b": {"b": {"share": avg, "chance": 0.5}, "a": {"share": 0.5, "chance": 0.5}}}
    return {"complete": True, "final": {"average_map": avg, "average_forgetting": forgetting},
            "cost": cost, "increments": [{"attributes": ["a"]}, {"attributes": ["b"]}],
            "accuracy_matrix": [{"a": avg}, {"a": avg, "b": avg}],
            "map_details": [{}, {h: {"map": avg, "leakage": leak[h]} for h in ("a", "b")}]}


def _write(runs, name, res):
    (runs / name).mkdir(parents=True)
    (runs / name / "results.json").write_text(json.dumps(res))


def test_report_states_each_target_from_the_runs(tmp_path):
    runs = tmp_path / "runs" / "seeds"
    for seed, jitter in enumerate((0.0, 0.004, -0.004)):
        _write(runs, f"mclfir_s{seed}", _result(0.640 + jitter, 0.010, [10, 10]))
        _write(runs, f"finetune_s{seed}", _result(0.600 + jitter, 0.050, [9, 9]))
        _write(runs, f"lwf_s{seed}", _result(0.638 + jitter, 0.008, [10, 10]))
        # static_joint: seed 0 retrains at every increment (10 + 20 s), the others only at the last
        _write(runs, f"static_joint_s{seed}", _result(0.660 + jitter, float("nan"), [10, 20], seed > 0))
    args = Namespace(runs=tmp_path / "runs", out=tmp_path / "out", seeds=[0, 1, 2],
                     methods=["mclfir", "finetune", "lwf", "static_joint"], config=ROOT / "configs/fpi_seeds_cpu.yaml")
    (tmp_path / "out").mkdir()
    text = fpi_seeds.report(args)
    assert "Within 1 point of tuned static_joint: does not hold" in text    # 64.0 vs 66.0
    assert "At most 35% of static-cumulative training cost: does not hold" in text   # 20 s / 30 s
    assert "67%" in text
    assert "Average forgetting at most 2 points: holds" in text
    assert "mclfir is above finetune** (Welch's t-test over seeds, two-sided p < 0.001" in text
    assert "mclfir is not distinguishable from lwf** (Welch" in text          # 0.2 points, sd 0.4
    assert "mclfir is below static_joint** (Welch" in text
    assert "Attribute leakage" in text and "| mclfir | 64.0 / +10.0 | 64.0 / +0.0 |" in text   # seed mean
    assert (tmp_path / "out" / "final_map.png").stat().st_size > 0
    assert (tmp_path / "out" / "map_vs_cost.png").stat().st_size > 0


def test_tune_gives_every_method_the_same_study_over_its_own_ladders_from_start(tmp_path, monkeypatch):
    asked = {}

    def fake_run(config, methods, trials, tdir, prog, prefix, write):
        asked.update(trials=trials, tdir=tdir, prefix=prefix, methods={m.name: m for m in methods})
        return {"methods": {m.name: {"chosen": {"optim.lr": 1e-3}} for m in methods}}

    monkeypatch.setattr(fpi_seeds.tuning, "run", fake_run)
    args = Namespace(runs=tmp_path / "runs", out=tmp_path / "out", config=ROOT / "configs/fpi_seeds_cpu.yaml",
                     methods=["mclfir", "frozen", "static_joint"], trials=4, start="earlier")
    chosen = fpi_seeds.tune(args, ["data.shards=x"])
    assert chosen == {m: {"optim.lr": 1e-3} for m in args.methods} and asked["trials"] == 4
    for name, m in asked["methods"].items():
        assert m.space == {k: {"choices": ladder} for k, ladder in fpi_seeds.KNOBS[name]}
        assert m.overrides[0] == "data.shards=x" and "eval.split=val" in m.overrides and "train.seed=0" in m.overrides
        last = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in m.overrides}   # the later one wins
        assert all(last[k] == str(v) for k, v in fpi_seeds.START[name].items())   # trial 0: the earlier choice
        assert ("train.static_final_only=true" in m.overrides) == (name == "static_joint")
    args.start = "config"
    fpi_seeds.tune(args, [])
    assert not any(o.startswith("teacher.decay=") for o in asked["methods"]["mclfir"].overrides)


def test_the_report_reads_the_committed_compass_record_and_says_its_verdicts(tmp_path):
    import shutil
    shutil.copy(ROOT / "docs/results/fpi_seeds/tuning.json", tmp_path / "tuning.json")
    lines = fpi_seeds.tuning_lines(tmp_path)
    assert lines[0].startswith("Chosen on validation (trials per method:") and "compass" in lines[0]
    assert any("interior" in ln for ln in lines[2:])


def test_a_kept_run_is_reused_only_with_the_same_settings(tmp_path, monkeypatch):
    from mclfir_dist.config import to_dict
    from mclfir_dist.configure import load_config
    config = ROOT / "configs/fpi_seeds_cpu.yaml"
    out = tmp_path / "run"
    out.mkdir()
    kept = {"complete": True, "config": to_dict(load_config(config, ["optim.lr=0.001"])), "final": {"average_map": 0.5}}
    (out / "results.json").write_text(json.dumps(kept))
    started = []

    def fake_subprocess_run(cmd, **kw):
        started.append(cmd)
        (out / "results.json").write_text(json.dumps({**kept, "final": {"average_map": 0.7}}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(runner.subprocess, "run", fake_subprocess_run)
    assert fpi_seeds.run_train(config, out, ["optim.lr=0.001"], tmp_path / "log")["final"]["average_map"] == 0.5
    assert not started                                               # same settings: kept
    assert fpi_seeds.run_train(config, out, ["optim.lr=0.002"], tmp_path / "log")["final"]["average_map"] == 0.7
    assert len(started) == 1 and "optim.lr=0.002" in started[0]      # other settings: run again


def test_a_run_that_refuses_its_input_stops_the_study_in_one_line(tmp_path, monkeypatch, capsys):
    log = tmp_path / "t00.log"

    def refusing_run(cmd, stdout=None, **kw):
        stdout.write("12:00:00 INFO reading x.csv\nmclfir train: error: x.csv row 7: missing column 'id'\n")
        return subprocess.CompletedProcess(cmd, 2)

    monkeypatch.setattr(runner.subprocess, "run", refusing_run)
    with pytest.raises(SystemExit) as stop:
        fpi_seeds.run_train(ROOT / "configs/fpi_seeds_cpu.yaml", tmp_path / "mclfir_t00", [], log)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fpi_seeds: mclfir_t00: mclfir train: error: x.csv row 7: missing column 'id' (log: {log})"]


def test_relative_folders_are_the_callers_not_the_repositorys(tmp_path, monkeypatch, capsys):
    started = []

    def refusing_run(cmd, stdout=None, **kw):   # the run starts in the repository root
        started.append(cmd)
        stdout.write("mclfir train: error: stop here\n")
        return subprocess.CompletedProcess(cmd, 2)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner.subprocess, "run", refusing_run)
    monkeypatch.setattr(sys, "argv", ["fpi_seeds.py", "--runs", "r", "--out", "o", "--methods", "frozen"])
    with pytest.raises(SystemExit) as stop:
        fpi_seeds.main()
    assert stop.value.code == 2 and "stop here" in capsys.readouterr().err
    out = started[0][started[0].index("--out") + 1]
    assert out == str(tmp_path / "r" / "tune_optuna" / "frozen")     # under the caller's folder
    assert (tmp_path / "r" / "tune_optuna" / "frozen.tune.log").is_file()


@pytest.mark.parametrize("args, message", [
    (["--trials", "0"], "--trials must be at least 1"),
    (["--trials", "abc"], "argument --trials: invalid int value: 'abc'"),
    (["--methods", "bogus"], "argument --methods: invalid choice: 'bogus'"),
    (["--csv", "no/such.csv", "--shards", "sh"], "--csv no/such.csv: no such file"),
    (["bogus.key=1"], "config key 'bogus'"),
    (["--phase", "seeds"], "run --phase tune first"),
    (["--phase", "report"], "no complete runs under"),
])
def test_misuse_is_one_line_and_exit_2_and_makes_no_folder(tmp_path, args, message):
    runs, out = tmp_path / "runs", tmp_path / "out"
    p = subprocess.run([sys.executable, str(ROOT / "scripts/fpi_seeds.py"), "--runs", str(runs), "--out", str(out),
                        *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert not runs.exists() and not out.exists()
