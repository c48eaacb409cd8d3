"""`mclfir tune` on Optuna: tiny studies of real `mclfir train` trials. Two workers share one SQLite study, one
is killed with `kill -9` mid-trial and the study still ends with exactly N finished (complete or pruned)
trials, the median pruner stops losing trials from their validation curve, a rerun does not add trials, and
--report writes its table and plots. Two workers against a real PostgreSQL server. Misuse is one line."""
import glob
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SELF_BUILDING_TINY, free_port

TINY = [*SELF_BUILDING_TINY, "train.steps_per_increment=4", "eval.split=val", "eval.every_steps=2",
        "train.num_threads=1", "data.batch_doublets=8", "model.head_channels=16", "model.embed_dim=8"]
SPACE = "optim.lr: {log: [1.0e-4, 3.0e-3]}\nloss.kd_weight: {choices: [0.1, 1.0, 10.0]}\n"


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def tune_cmd(out: Path, shards: Path, trials: int, *extra):
    (out.parent / "space.yaml").write_text(SPACE)
    return [sys.executable, "-m", "mclfir_dist.cli", "tune", "--config", str(ROOT / "configs/debug_cpu.yaml"),
            "--space", str(out.parent / "space.yaml"), "--trials", str(trials), "--out", str(out), *extra,
            *TINY, f"data.shards={shards}"]


def states(db: Path) -> dict:
    with sqlite3.connect(db) as c:
        return {n: s for n, s in c.execute("select number, state from trials")}


def running_of(db: Path, pid: int) -> bool:
    try:
        with sqlite3.connect(db) as c:
            rows = c.execute("select t.state, a.value_json from trials t join trial_user_attributes a "
                             "on a.trial_id = t.trial_id where a.key = 'worker'").fetchall()
    except sqlite3.OperationalError:   # the file exists before Optuna has made its tables, or it is locked
        return False
    return any(state == "RUNNING" and json.loads(value)["pid"] == pid for state, value in rows)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The tiny shard set, built once by a first tiny training run."""
    work = tmp_path_factory.mktemp("tune_shards")
    done = subprocess.run([sys.executable, "-m", "mclfir_dist.cli", "shards", "build", "--out", str(work / "s"),
                           "--num-images", "240", "--image-size", "32", "--samples-per-shard", "60",
                           "--min-value-count", "4"], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return work / "s"


def test_two_workers_share_a_study_one_is_killed_and_it_still_ends_at_n(shards, tmp_path):
    out = tmp_path / "study"
    db = out / "study.db"
    a = subprocess.Popen(tune_cmd(out, shards, 6), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (db.is_file() and running_of(db, a.pid)) and time.time() < deadline:
        time.sleep(0.2)
    b = subprocess.Popen(tune_cmd(out, shards, 6), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    a.kill()   # kill -9 mid-trial: its trial is failed and replaced; its `mclfir train` child gets SIGTERM
    a.wait()
    out_b, _ = b.communicate(timeout=900)
    assert b.returncode == 0, out_b[-3000:]
    final = states(db)
    finished = [n for n, s in final.items() if s in ("COMPLETE", "PRUNED")]
    assert len(finished) == 6 and "FAIL" in final.values(), final   # the killed worker's trial, failed
    import optuna
    trials = optuna.load_study(study_name="mclfir", storage=f"sqlite:///{db}").trials
    for t in trials:   # the killed worker's point is tried again by a later trial
        if t.state.name == "FAIL" and not t.user_attrs.get("surplus"):
            assert any(u.params == t.params and u.number > t.number and u.user_attrs.get("retries") == 1
                       for u in trials), [(u.number, u.state.name, u.params) for u in trials]
    assert "PRUNED" in final.values(), final   # the median pruner stopped at least one from its curve
    for n in finished:   # every finished trial is an ordinary run that records its number and parameters
        res = json.loads((out / "trials" / f"{n:04d}" / "results.json").read_text())
        assert res["tune"]["trial"] == n and set(res["tune"]["params"]) == {"optim.lr", "loss.kd_weight"}
        assert res["config"]["tune"]["trial"] == n and res["config"]["eval"]["split"] == "val"
        assert f"trial: {n}" in (out / "trials" / f"{n:04d}" / "config.yaml").read_text()
    again = subprocess.run(tune_cmd(out, shards, 6), cwd=ROOT, env=env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and "ran 0 trials" in again.stdout and states(db) == final   # N, not 2N
    report = subprocess.run([sys.executable, "-m", "mclfir_dist.cli", "tune", "--report", "--out", str(out)],
                            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    text = (out / "report" / "REPORT.md").read_text()
    assert "| trial | optim.lr | loss.kd_weight | metric | state | seconds |" in text and "pruned" in text
    assert "optuna-dashboard sqlite:///" in report.stdout and "| `loss.kd_weight` |" in text
    for plot in ("optimization_history", "slice", "intermediate_values"):
        assert (out / "report" / f"{plot}.png").stat().st_size > 5000


MISUSE = [   # name, space file, flags, overrides, words the one line must hold
    ("unknown key", "optim.lr_typo: {log: [1.0e-4, 1.0e-3]}\n", [], [], "optim.lr_typo"),
    ("empty range", "optim.lr: {log: [1.0e-3, 1.0e-4]}\n", [], [], "is empty"),
    ("wrong type", "optim.lr: {uniform: [low, 1.0]}\n", [], [], "two numbers"),
    ("a value the key refuses", "data.image_size: {int: [-5, 8]}\n", [], [], "data.image_size"),
    ("unknown metric", SPACE, ["--metric", "final.nonsense"], [], "final.nonsense"),
    ("test split", SPACE, [], ["eval.split=test"], "validation split"),
    ("storage cannot be opened", SPACE, ["--storage", "sqlite:////no/such/folder/x.db"], [], "cannot be opened"),
    ("grid over a range", SPACE, ["--sampler", "grid"], [], "needs choices"),
    ("config outside the space", "optim.lr: {log: [0.5, 0.9]}\n", ["--start-at-config"], [], "outside its space"),
    ("negative startup trials", SPACE, ["--startup-trials", "-1"], [], "--startup-trials"),
]


@pytest.mark.parametrize("name,space,flags,overrides,words", MISUSE, ids=[m[0] for m in MISUSE])
def test_misuse_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, name, space, flags, overrides, words):
    from mclfir_dist.cli import main
    (tmp_path / "space.yaml").write_text(space)
    out = tmp_path / "out"
    rc = main(["tune", "--config", str(ROOT / "configs/debug_cpu.yaml"), "--space", str(tmp_path / "space.yaml"),
               "--out", str(out), *flags, *TINY, *overrides])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not out.exists()


def test_a_study_stored_with_another_space_is_refused_unless_resumed(shards, tmp_path, capsys):
    from mclfir_dist.tune import study as studies
    from mclfir_dist.cli import main
    out = tmp_path / "out"
    out.mkdir()
    url = f"sqlite:///{out / 'study.db'}"
    job = studies.TuneJob(str(ROOT / "configs/debug_cpu.yaml"), TINY, {"optim.lr": {"log": [1e-4, 1e-2]}}, 1,
                          "s", url, out)
    job.settings = {"space": job.space, "sampler": "tpe", "pruner": "median", "metric": "final.average_map",
                    "seed": 0}
    studies.open_study(job, studies.open_storage(url))   # the stored study
    (tmp_path / "space.yaml").write_text(SPACE)
    args = ["tune", "--config", str(ROOT / "configs/debug_cpu.yaml"), "--space", str(tmp_path / "space.yaml"),
            "--study", "s", "--out", str(out), "--trials", "1", *TINY]
    assert main(args) == 2 and "another space" in capsys.readouterr().err


def test_start_at_config_runs_the_configs_own_values_first(shards, tmp_path):
    from mclfir_dist.configure import load_config
    out = tmp_path / "study"
    done = subprocess.run(tune_cmd(out, shards, 1, "--start-at-config", "--startup-trials", "1",
                                   "loss.kd_weight=1.0", "optim.lr=0.0007"),
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads((out / "trials" / "0000" / "results.json").read_text())
    assert res["tune"]["params"] == {"optim.lr": 0.0007, "loss.kd_weight": 1.0}
    import optuna
    study = optuna.load_study(study_name="mclfir", storage=f"sqlite:///{out / 'study.db'}")
    assert study.user_attrs["settings"]["startup_trials"] == 1 and study.trials[0].params == res["tune"]["params"]


def _postgres_bin():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture
def postgres(tmp_path):
    """A PostgreSQL server of our own on a free port (as the postgres user when run as root), and a database."""
    pg = _postgres_bin()
    if pg is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI must run the PostgreSQL test: make test installs Debian's postgresql")
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    import tempfile
    # under /tmp itself: the postgres user cannot enter pytest's root-only folders
    data, port = Path(tempfile.mkdtemp(prefix="mclfir-pg-")), free_port()
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(data, "postgres")
    run = lambda *cmd: subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120, check=True)
    run(str(pg / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
    run(str(pg / "pg_ctl"), "-D", str(data), "-w", "-l", str(data / "log"), "-o",
        f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start")
    try:
        run(str(pg / "createdb"), "-h", "127.0.0.1", "-p", port, "-U", "postgres", "tune")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/tune"
    finally:
        subprocess.run([*as_user, str(pg / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True,
                       timeout=120)
        shutil.rmtree(data, ignore_errors=True)


def test_two_workers_against_a_real_postgresql_server(shards, tmp_path, postgres):
    out = tmp_path / "study"
    cmd = tune_cmd(out, shards, 4, "--storage", postgres, "--study", "pg")
    workers = [subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outputs = [w.communicate(timeout=900)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), [(w.returncode, o[-1500:]) for w, o in zip(workers, outputs)]
    ran = [int(o.split("this worker ran ")[1].split()[0]) for o in outputs]
    import optuna
    study = optuna.load_study(study_name="pg", storage=postgres)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4 and sum(ran) >= 4 and all(r >= 1 for r in ran), (ran, outputs)
    assert all((out / "trials" / f"{t.number:04d}" / "results.json").is_file() for t in finished)
    assert all("postgres@" not in (out / "trials" / f"{t.number:04d}" / "config.yaml").read_text() for t in finished)


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_a_fresh_worker_per_trial_draws_a_new_point_every_time(tmp_path, sampler):
    """The studies start one `mclfir tune` process per trial: a seeded sampler made anew in each drew the same
    'random' point again and again (the 96 px study's trials 1 and 2 were the same run). The seed moves on with
    the study's trial count, so each fresh worker draws a new point, and the same one again on a rerun."""
    from mclfir_dist.tune import study as studies
    space = {"optim.lr": {"log": [1e-4, 1e-2]}, "loss.kd_weight": {"choices": [0.1, 1.0, 10.0]}}

    def draws(url):
        points = []
        for _ in range(4):   # each a fresh worker: new job, new study object, new sampler
            job = studies.TuneJob("x", [], space, 4, "s", url, tmp_path, sampler=sampler)
            job.settings = {"space": space, "sampler": sampler, "pruner": "none", "metric": "final.average_map",
                            "seed": 0, "startup_trials": 3, "start": None}
            found = studies.open_study(job, studies.open_storage(url))
            trial = studies.ask(found, job, studies.spaces.distributions(space))
            found.tell(trial, 0.5)
            points.append(tuple(sorted(trial.params.items())))
        return points

    first = draws(f"sqlite:///{tmp_path / 'a.db'}")
    assert len(set(first)) == 4, first
    assert draws(f"sqlite:///{tmp_path / 'b.db'}") == first   # deterministic


def test_a_trial_stopped_by_a_signal_is_failed_and_its_point_queued_again(tmp_path):
    from mclfir_dist.tune import study as studies
    space = {"optim.lr": {"log": [1e-4, 1e-2]}}
    url = f"sqlite:///{tmp_path / 's.db'}"
    job = studies.TuneJob("x", [], space, 3, "s", url, tmp_path)
    job.settings = {"space": space, "sampler": "tpe", "pruner": "none", "metric": "final.average_map", "seed": 0,
                    "startup_trials": 3, "start": None}
    found = studies.open_study(job, studies.open_storage(url))
    (tmp_path / "trials").mkdir()
    for rc, queued in ((130, True), (1, False)):   # SIGINT: stopped, tried again; a crash: not
        trial = studies.ask(found, job, studies.spaces.distributions(space))
        (tmp_path / "trials" / f"{trial.number:04d}.log").write_text("stopped\n")
        studies.tell_outcome(job, found, trial, tmp_path / "run", rc)
        waiting = [t for t in found.get_trials() if t.state.name == "WAITING"]
        assert bool(waiting) == queued and all(t.system_attrs["fixed_params"] == trial.params for t in waiting)
        for t in waiting:   # take it off the queue for the next case
            found.tell(found.ask().number, 0.5)
