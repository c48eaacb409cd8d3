"""`mclfir tune`: an Optuna study whose trials are ordinary `mclfir train` runs in DIR/trials/NNNN. Any number
of workers (processes, machines, a SLURM array) share one study through its storage (SQLite by default, any
Optuna RDB URL), and together they stop at N finished trials (complete or pruned).

A worker killed with `kill -9`: its running trial is marked FAIL (at once by the next worker on the same host,
which sees the PID is gone; by Optuna's heartbeat after GRACE_S elsewhere) and its point is queued again (up to
MAX_RETRIES times), so the study tries the same point next; its `mclfir train` child gets SIGTERM (parent-death
signal), saves and exits. A trial's run is not resumed: the point starts over."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from ..errors import ConfigError
from ..runfolder.layout import RunFolder
from ..training.trial import STORAGE_ENV, pruner_of
from . import space as spaces

log = logging.getLogger(__name__)
HEARTBEAT_S, GRACE_S, MAX_RETRIES = 5, 30, 2
METRICS = {"final.average_map": "maximize", "final.average_forgetting": "minimize", "final.bwt": "maximize"}


@dataclass
class TuneJob:
    config: str
    overrides: List[str]
    space: Dict[str, dict]
    trials: int
    study: str
    storage: str
    out: Path
    sampler: str = "tpe"
    pruner: str = "median"
    metric: str = "final.average_map"
    seed: int = 0
    resume_study: bool = False
    startup_trials: int = 10   # the model-based samplers' random trials first (Optuna's default)
    start_at_config: bool = False   # trial 0: the config's own values of the space's keys
    settings: dict = field(default_factory=dict)   # what a study must agree on: space, sampler, pruner, metric


def check_job(job: TuneJob) -> None:
    """Everything a user can get wrong, before anything is written (ConfigError / FileNotFoundError)."""
    from ..configure import load_config
    cfg = load_config(job.config, job.overrides)
    if cfg.eval.split != "val":
        raise ConfigError(f"eval.split={cfg.eval.split}: tuning chooses settings on the validation split only "
                          "(set eval.split=val; report on test once, with the chosen settings)")
    if job.metric not in METRICS:
        raise ConfigError(f"--metric {job.metric}: not a results.json field tune can rank by "
                          f"({', '.join(METRICS)})")
    if job.trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {job.trials}")
    spaces.check_against_config(job.space, job.config, job.overrides)
    if job.startup_trials < 0:
        raise ConfigError(f"--startup-trials must be 0 or more, got {job.startup_trials}")
    start = spaces.config_point(job.space, cfg) if job.start_at_config else None
    if job.sampler == "grid":
        size = 1
        for values in spaces.grid(job.space).values():
            size *= len(values)
        if job.trials > size:
            log.info("--sampler grid: %d points, so %d trials, not %d", size, size, job.trials)
            job.trials = size
    job.settings = {"space": job.space, "sampler": job.sampler, "pruner": job.pruner, "metric": job.metric,
                    "seed": job.seed, "startup_trials": job.startup_trials, "start": start}


def open_storage(url: str):
    """Optuna's RDB storage with heartbeats (a dead worker's trial is failed), or one line naming the URL."""
    import warnings
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats are recorded by run_trial's own thread (Optuna warns that only Study.optimize does it)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(3):   # workers starting together race to create the tables: the loser tries again
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES))
        except Exception as e:   # SQLAlchemy's many errors: a bad URL, no server, no driver, a missing folder
            if attempt == 2 or isinstance(e, (ValueError, ImportError)):
                raise ConfigError(f"--storage {redact(url)}: cannot be opened ({str(e).splitlines()[0][:200]})") \
                    from None
            time.sleep(1 + attempt)


def redact(url: str) -> str:
    """The URL without its password (it may be shown; the password never is)."""
    import re
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _sampler(job: TuneJob, offset: int = 0):
    import optuna
    seed = job.seed + offset
    if job.sampler == "grid":
        return optuna.samplers.GridSampler(spaces.grid(job.space), seed=seed)
    if job.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=job.settings.get("startup_trials", 10))


def ask(study, job: TuneJob, dists: dict):
    """The next trial. A worker is often a fresh process for each trial (the studies start one per trial), and
    a seeded sampler made anew draws the same "random" point every time: the seed moves on with the number of
    trials the study holds, so every draw differs and a rerun still draws the same."""
    study.sampler = _sampler(job, len(study.get_trials(deepcopy=False)))
    return study.ask(dists)


def open_study(job: TuneJob, storage):
    """The study, made with the job's settings or found with the same ones (--resume-study: any)."""
    import optuna
    for attempt in range(3):   # two workers starting at once both create it: the loser loads it
        try:
            study = optuna.create_study(study_name=job.study, storage=storage, sampler=_sampler(job),
                                        pruner=pruner_of(job.settings), direction=METRICS[job.metric],
                                        load_if_exists=True)
            break
        except Exception as e:
            if attempt == 2:
                raise ConfigError(f"study {job.study!r} in {redact(job.storage)}: "
                                  f"{str(e).splitlines()[0][:200]}") from None
            time.sleep(1 + attempt)
    saved, mine = study.user_attrs.get("settings"), json.loads(json.dumps(job.settings))
    if saved is None:
        study.set_user_attr("settings", mine)
        if mine.get("start"):   # only the worker that made the study: trial 0 is the config's own point
            study.enqueue_trial(mine["start"])
        return study
    # the sampler's seed is each worker's own (a SLURM array gives every task another); the rest must agree
    older = {"startup_trials": 10, "start": None}   # a study stored before these settings existed ran so
    changed = sorted(k for k in mine if k != "seed" and saved.get(k, older.get(k)) != mine[k])
    if changed and not job.resume_study:
        raise ConfigError(f"study {job.study!r} exists with another {', '.join(changed)} (a new --study name, or "
                          "--resume-study to go on with the stored settings)")
    job.settings, job.space = {**saved, "seed": job.seed}, saved["space"]
    return study


def fail_dead_trials(study) -> None:
    """RUNNING trials whose worker died: on this host when its PID is gone (at once), elsewhere by heartbeat."""
    import optuna
    from optuna.trial import TrialState
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        if worker.get("host") == host and not _alive(worker.get("pid", -1)):
            study.tell(t.number, state=TrialState.FAIL)
            log.warning("trial %d: its worker (pid %s) is gone: marked failed%s", t.number, worker.get("pid"),
                        requeue(study, t))
    optuna.storages.fail_stale_trials(study)   # elsewhere: RetryHeartbeatStaleTrialCallback queues them again


def requeue(study, trial) -> str:
    """A trial stopped from outside (its worker killed, the run signalled) is tried again with the same point,
    up to MAX_RETRIES times: a stop must not change what the study tries (trial 0, the config's own point,
    above all)."""
    retries = trial.user_attrs.get("retries", 0)
    if retries >= MAX_RETRIES:
        return f" (its point was tried {retries + 1} times: not queued again)"
    study.enqueue_trial(dict(trial.params), user_attrs={"retries": retries + 1})
    return "; its point is queued again"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, ValueError, OverflowError):
        return False
    except PermissionError:
        return True


def counted(study) -> List[int]:
    """Trial numbers that count towards N: finished (complete, pruned) or running."""
    from optuna.trial import TrialState
    keep = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sorted(t.number for t in study.get_trials(deepcopy=False, states=keep))


def run_worker(job: TuneJob) -> int:
    """Ask, run, tell, until the study holds job.trials counted trials; returns how many this worker ran."""
    from optuna.trial import TrialState
    storage = open_storage(job.storage)
    study = open_study(job, storage)
    dists, ran = spaces.distributions(job.space), 0
    (job.out / "trials").mkdir(parents=True, exist_ok=True)
    while True:
        fail_dead_trials(study)
        if len(counted(study)) >= job.trials:
            break
        trial = ask(study, job, dists)
        if counted(study).index(trial.number) >= job.trials:   # another worker asked at the same moment
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            break
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        run_trial(job, study, storage, trial)
        ran += 1
    return ran


def trial_command(job: TuneJob, number: int, params: dict, out: Path) -> List[str]:
    values = [f"{k}={_value(v)}" for k, v in params.items()]
    return [sys.executable, "-m", "mclfir_dist.cli", "train", "--config", job.config, "--out", str(out),
            "--overwrite", *job.overrides, *values, f"tune.study={job.study}", f"tune.trial={number}",
            f"tune.params=[{','.join(params)}]"]


def _value(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def run_trial(job: TuneJob, study, storage, trial) -> None:
    out = job.out / "trials" / f"{trial.number:04d}"
    cmd = trial_command(job, trial.number, trial.params, out)
    env = dict(os.environ, **{STORAGE_ENV: job.storage})
    log.info("trial %d: %s", trial.number, " ".join(f"{k}={_value(v)}" for k, v in trial.params.items()))
    beating = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(storage, trial._trial_id, beating), daemon=True)
    beat.start()
    started = time.time()
    try:
        with open(job.out / "trials" / f"{trial.number:04d}.log", "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent).returncode
    finally:
        beating.set()
    trial.set_user_attr("seconds", round(time.time() - started, 1))
    trial.set_user_attr("run", str(out))
    tell_outcome(job, study, trial, out, rc)


def tell_outcome(job: TuneJob, study, trial, out: Path, rc: int) -> None:
    from optuna.trial import TrialState
    if rc != 0:
        study.tell(trial, state=TrialState.FAIL)
        lines = [x for x in (job.out / "trials" / f"{trial.number:04d}.log").read_text(errors="replace")
                 .splitlines() if x.strip()]
        last = lines[-1] if lines else f"exit {rc}"
        if rc == 2:   # the run refused a setting: every trial would; stop with its line
            raise ConfigError(f"trial {trial.number}: {last}")
        again = requeue(study, study.trials[trial.number]) if rc in (130, 143) else ""   # stopped, not broken
        log.warning("trial %d failed (exit %d): %s%s", trial.number, rc, last, again)
        return
    res = RunFolder(out).read_results()
    if (res.get("tune") or {}).get("pruned"):
        study.tell(trial, state=TrialState.PRUNED)
        log.info("trial %d: pruned at step %s", trial.number, res["tune"]["pruned_at_step"])
        return
    value = _metric(res, job.metric)
    study.tell(trial, value)
    log.info("trial %d: %s = %.4f", trial.number, job.metric, value)


def _metric(res: dict, metric: str) -> float:
    node = res
    for part in metric.split("."):
        node = node[part]
    return float(node)


def _heartbeat(storage, trial_id: int, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            storage.record_heartbeat(trial_id)
        except Exception as e:   # a database hiccup must not kill the trial; the next beat tries again
            log.warning("heartbeat of trial %d: %s", trial_id, e)


def _die_with_parent() -> None:
    """In the trial's child: SIGTERM when the worker dies (kill -9 included), so it saves and stops."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


def open_study_readonly(job: TuneJob):
    """An existing study, for --report (one line when there is none)."""
    import optuna
    storage = open_storage(job.storage)
    try:
        return optuna.load_study(study_name=job.study, storage=storage)
    except KeyError:
        raise ConfigError(f"no study {job.study!r} in {redact(job.storage)}") from None
