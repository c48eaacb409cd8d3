"""A run that is a `mclfir tune` trial (tune.study set) reports each validation to its Optuna study and stops
when the study's pruner says so. Optuna is imported only here and only for trials; the storage URL comes from
MCLFIR_TUNE_STORAGE (a database password never reaches config.yaml, a checkpoint or a log)."""
from __future__ import annotations

import logging
import os
from typing import Optional

from ..config import RunConfig

log = logging.getLogger(__name__)
STORAGE_ENV = "MCLFIR_TUNE_STORAGE"
PRUNE_METRIC = "final.average_map"   # a trial's validation curve is mAP: it can prune only an mAP objective


def pruner_of(settings: dict):
    """The pruner a study was made with, from the settings stored in the study (workers and trials alike)."""
    import optuna
    if settings.get("pruner") == "median" and settings.get("metric") == PRUNE_METRIC:
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


class TrialPruned(Exception):
    """The study's pruner stopped this trial at a validation; the run ends there, marked pruned."""

    def __init__(self, step: int, value: float):
        super().__init__(f"pruned at global step {step} (validation {100 * value:.2f})")
        self.step, self.value = step, value


class TrialReporter:
    """report(step, value) after each validation; raises TrialPruned when the pruner says so. Main process
    only: a trial runs as one process (`mclfir tune` starts each with `mclfir train`)."""

    def __init__(self, study: str, number: int, prune: bool, storage: str):
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        settings = optuna.load_study(study_name=study, storage=storage).user_attrs.get("settings") or {}
        self.study = optuna.load_study(study_name=study, storage=storage, pruner=pruner_of(settings))
        trial_id = self.study._storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)
        self.trial = optuna.trial.Trial(self.study, trial_id)
        self.prune, self.last_step = prune, -1

    @classmethod
    def of(cls, cfg: RunConfig, is_main: bool, world: int) -> Optional["TrialReporter"]:
        if not cfg.tune.study or not is_main:
            return None
        storage = os.environ.get(STORAGE_ENV)
        if not storage:
            log.warning("tune.study=%s but %s is not set: this run reports to no study", cfg.tune.study, STORAGE_ENV)
            return None
        if world > 1 and cfg.tune.prune:
            log.warning("a trial of %d processes reports to its study but is not pruned (one process per trial)",
                        world)
        return cls(cfg.tune.study, cfg.tune.trial, cfg.tune.prune and world == 1, storage)

    def report(self, step: int, value: float) -> None:
        if step <= self.last_step:   # Optuna keeps the first value of a step
            return
        self.last_step = step
        self.trial.report(value, step)
        if self.prune and self.trial.should_prune():
            raise TrialPruned(step, value)
