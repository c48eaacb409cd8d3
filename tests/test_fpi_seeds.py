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


def _search(method, objective, budget):
    """Run the compass search against an objective of the knob values; the trials it made."""
    start = {key: ladder[len(ladder) // 2] for key, ladder in fpi_seeds.KNOBS[method]}
    trials = []
    while len(trials) < budget:
        point = fpi_seeds.next_trial(method, start, trials)
        if point is None:
            break
        assert point not in [t["point"] for t in trials]            # never the same trial twice
        trials.append({"point": point, "score": objective(point)})
    return trials


def test_the_search_extends_a_knob_until_its_best_value_is_interior():
    lr_ladder = dict(fpi_seeds.KNOBS["frozen"])["optim.lr"]
    best_lr = lr_ladder[-2]                                          # far above where the search starts
    trials = _search("frozen", lambda p: -abs(math.log(p["optim.lr"] / best_lr)), 20)
    chosen = max(trials, key=lambda t: t["score"])["point"]
    assert chosen["optim.lr"] == best_lr
    assert fpi_seeds.interior("frozen", trials) == {"optim.lr": "interior"}
    assert len(trials) == len(lr_ladder)                             # then every other value, then it stops


def test_a_small_budget_moves_every_knob_once_and_says_what_is_not_interior():
    start_lr = dict(fpi_seeds.KNOBS["mclfir"])["optim.lr"][len(dict(fpi_seeds.KNOBS["mclfir"])["optim.lr"]) // 2]
    trials = _search("mclfir", lambda p: -abs(p["optim.lr"] - start_lr), 5)   # start + one step up per knob
    moved = {key for t in trials[1:] for key in t["point"] if t["point"][key] != trials[0]["point"][key]}
    assert len(trials) == 5 and moved == {"optim.lr", "optim.encoder_lr_scale", "loss.kd_weight", "teacher.decay"}
    verdict = fpi_seeds.interior("mclfir", trials)
    assert verdict["optim.lr"] == "a neighbour untried" and set(verdict) == set(dict(fpi_seeds.KNOBS["mclfir"]))


def test_each_search_starts_at_the_earlier_choice_or_at_the_config():
    config = ROOT / "configs/fpi_seeds_cpu.yaml"
    for method in fpi_seeds.START:
        start = fpi_seeds.start_point(config, method, [])
        assert start == fpi_seeds.START[method]                       # every knob named, every value on its ladder
        assert all(v in dict(fpi_seeds.KNOBS[method])[k] for k, v in start.items())
    assert fpi_seeds.start_point(config, "mclfir", [], earlier=False)["loss.kd_weight"] == 3.0   # the config's
    assert fpi_seeds.start_point(config, "mclfir", ["optim.lr=2e-3"], earlier=False)["optim.lr"] == 2e-3


def test_bracketed_asks_only_that_the_grid_reached_past_the_chosen_value_on_both_sides():
    lr = dict(fpi_seeds.KNOBS["static_joint"])["optim.lr"]
    enc = dict(fpi_seeds.KNOBS["static_joint"])["optim.first_encoder_lr_scale"]
    trial = lambda i, j, score: {"point": {"optim.lr": lr[i], "optim.first_encoder_lr_scale": enc[j]}, "score": score}
    trials = [trial(3, 2, 0.50), trial(4, 2, 0.49), trial(3, 3, 0.52), trial(2, 2, 0.40), trial(0, 3, 0.1)]
    # chosen (lr[3], enc[3]): lr tried below (at enc[2] and enc[3]) and above (at enc[2] only)
    assert fpi_seeds.bracketed("static_joint", trials) == {"optim.lr": "bracketed",
                                                           "optim.first_encoder_lr_scale": "nothing tried above"}
    assert fpi_seeds.interior("static_joint", trials) == {"optim.lr": "a neighbour untried",
                                                          "optim.first_encoder_lr_scale": "a neighbour untried"}


def _tune(tmp_path, monkeypatch, objective, methods, trials=3, max_trials=30):
    """fpi_seeds.tune with each run replaced by `objective` of (method, point); the runs it asked for."""
    asked = []

    def fake_run(config, out, overrides, log):
        method = out.name.rsplit("_t", 1)[0]
        point = {k: float(v) for k, v in (o.split("=", 1) for o in overrides) if k in dict(fpi_seeds.KNOBS[method])}
        asked.append(out.name)
        return {"final": {"average_map": objective(method, point)}, "wall_seconds": 1.0}

    monkeypatch.setattr(fpi_seeds, "run_train", fake_run)
    args = Namespace(runs=tmp_path / "runs", out=tmp_path / "out", config=ROOT / "configs/fpi_seeds_cpu.yaml",
                     methods=methods, trials=trials, max_trials=max_trials, start="earlier")
    return fpi_seeds.tune(args, []), json.loads((tmp_path / "out" / "tuning.json").read_text()), asked


def _bowl(best):
    """A smooth objective whose best point is `best` (log distance on every knob)."""
    return lambda method, p: -sum(abs(math.log((p[k] + 0.01) / (best[k] + 0.01))) for k in p)


def test_every_method_searches_until_each_choice_is_interior_and_all_get_as_many_trials(tmp_path, monkeypatch):
    best = {"optim.lr": 4e-3, "optim.encoder_lr_scale": 0.05, "loss.kd_weight": 30.0, "teacher.decay": 0.9,
            "optim.first_encoder_lr_scale": 0.0}
    chosen, record, asked = _tune(tmp_path, monkeypatch, _bowl(best), ["mclfir", "lwf", "frozen", "static_joint"])
    counts = {m: len(r["trials"]) for m, r in record["methods"].items()}
    for method, r in record["methods"].items():
        assert r["settled"] and chosen[method] == {k: best[k] for k in r["chosen"]}   # found and every side tried
        assert all(v in ("interior", "end of the ladder, its neighbour tried") for v in r["interior"].values())
    assert counts["mclfir"] > 3                                      # it went past --trials to settle
    most = max(counts.values())
    for method, r in record["methods"].items():                   # topped up to the most, or nothing left
        assert counts[method] == most or fpi_seeds.next_trial(method, {}, r["trials"]) is None
    assert counts["lwf"] == most > counts["frozen"] == len(dict(fpi_seeds.KNOBS["frozen"])["optim.lr"])
    assert len(asked) == len(set(asked)) == sum(counts.values())     # no trial run twice
    text = (tmp_path / "out" / "TUNING.md").read_text()
    assert f"Trials per method: {most} each, " in text and "frozen 8 (every one-knob move from its best tried)" in text


def test_the_committed_search_is_what_the_script_runs_from_nothing(tmp_path, monkeypatch):
    """docs/results/fpi_seeds/tuning.json was made in two passes (9 trials, then the settling search). Replayed
    with its own scores, the search from nothing asks for exactly its trials, in order and under the same run
    names, and chooses the same values: `bash scripts/fpi_seeds.sh` from nothing runs those runs and no others."""
    record = json.loads((ROOT / "docs/results/fpi_seeds/tuning.json").read_text())
    score = {(m, json.dumps(t["point"], sort_keys=True)): t["score"]
             for m, r in record["methods"].items() for t in r["trials"]}
    chosen, replayed, asked = _tune(tmp_path, monkeypatch, lambda m, p: score[(m, json.dumps(p, sort_keys=True))],
                                    list(record["methods"]), record["trials_per_method"], record["max_trials"])
    assert len(asked) == len(set(asked)) == len(score)
    for method, r in record["methods"].items():
        again = replayed["methods"][method]["trials"]
        assert [(t["run"], t["point"]) for t in again] == [(t["run"], t["point"]) for t in r["trials"]]
        assert chosen[method] == r["chosen"]


def test_a_search_stops_at_max_trials_and_says_it_is_not_settled(tmp_path, monkeypatch):
    best = {"optim.lr": 1.25e-4, "optim.encoder_lr_scale": 0.8, "loss.kd_weight": 0.1, "teacher.decay": 0.999}
    _, record, asked = _tune(tmp_path, monkeypatch, _bowl(best), ["mclfir"], trials=2, max_trials=6)
    r = record["methods"]["mclfir"]
    assert len(asked) == len(r["trials"]) == 6 and not r["settled"]
    assert "a neighbour untried" in r["interior"].values()


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
    assert out == str(tmp_path / "r" / "tune" / "frozen_t00")        # under the caller's folder
    assert (tmp_path / "r" / "tune" / "frozen_t00.log").is_file()


@pytest.mark.parametrize("args, message", [
    (["--trials", "0"], "--trials must be at least 1"),
    (["--trials", "5", "--max-trials", "4"], "--max-trials must be at least --trials"),
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
