"""Validation inside increments (eval.every_steps), the best-on-validation state (train.select=best_val) and
early stopping (train.patience): what the cost rows record, that the kept model is the one that scored best,
and that a run killed inside an increment resumes to the same pick, bit for bit."""
import json

import pytest
import torch

from conftest import ROOT, tiny_train_overrides
from mclfir_dist.config import ConfigError
from mclfir_dist.configure import load_config
from mclfir_dist.training.engine import train
from mclfir_dist.training.selection import Selection


def _cfg(shards, *extra, steps=12):
    return load_config(ROOT / "configs/debug_cpu.yaml", tiny_train_overrides(shards, steps=steps) + [
        "eval.grid_queries=0", "eval.frozen_baseline=false", "optim.lr=5e-3", *extra])


def test_best_val_needs_validation_inside_increments(tiny_shards):
    for extra in (["train.select=best_val"], ["train.patience=2"]):
        with pytest.raises(ConfigError, match="eval.every_steps"):
            _cfg(tiny_shards, *extra)


def test_selection_keeps_the_best_and_stops_on_patience():
    model = torch.nn.ModuleDict({"heads": torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2)}),
                                 "trunk": torch.nn.Linear(2, 2)})
    s = Selection(every=2, select="best_val", patience=2)
    assert [s.due(n, 9) for n in range(1, 10)] == [False, True, False, True, False, True, False, True, True]
    weights = []
    for steps, score in [(2, 0.3), (4, 0.5), (6, 0.4), (8, 0.45)]:
        with torch.no_grad():
            model["heads"]["a"].weight.fill_(steps)
            model["trunk"].weight.fill_(-steps)
        weights.append(steps)
        stop = s.observe(steps, score, model, ["heads.a."])
    assert stop and s.stopped_at == 8 and s.best == [4, 0.5]
    s.finish(model, 8)
    assert torch.all(model["heads"]["a"].weight == 4) and torch.all(model["trunk"].weight == -8)   # heads only
    again = Selection(every=2, select="best_val", patience=2)
    again.load_state_dict(s.state_dict())
    assert again.record() == s.record() and again.record()["kept_step"] == 4


BEST_VAL = ("eval.every_steps=3", "train.select=best_val", "train.checkpoint_every=4")


@pytest.fixture(scope="module")
def best_val_run(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("best_val") / "run"
    return out, train(_cfg(tiny_shards, *BEST_VAL), out)


def test_best_val_keeps_the_state_that_scored_best(best_val_run, tiny_shards, tmp_path):
    from mclfir_dist.cli import main
    run, res = best_val_run
    for cost in res["cost"]:
        sel = cost["selection"]
        assert [p[0] for p in sel["curve"]] == [3, 6, 9, 12] and cost["val_seconds"] > 0 and cost["steps"] == 12
        best = max(sel["curve"], key=lambda p: p[1])
        assert sel["kept_step"] == best[0] and sel["best_val_map"] == best[1]
    # the final checkpoint is the kept state: its val mAP of the last head is the best of that curve
    out = tmp_path / "val.json"
    assert main(["eval", "--run", str(run), "--shards", str(tiny_shards), "--split", "val",
                 "--json", str(out)]) == 0
    kept = res["cost"][-1]["selection"]["best_val_map"]
    assert json.loads(out.read_text())["map"]["garment_length"] == pytest.approx(kept, abs=1e-9)


def test_patience_ends_an_increment_early_and_the_cost_row_says_so(tiny_shards, tmp_path):
    res = train(_cfg(tiny_shards, "eval.every_steps=1", "train.patience=1", steps=16), tmp_path / "run")
    stopped = [c for c in res["cost"] if c["selection"]["stopped_early_at"]]
    assert stopped, [c["selection"]["curve"] for c in res["cost"]]
    for c in stopped:
        curve = c["selection"]["curve"]
        assert c["steps"] == c["selection"]["stopped_early_at"] == len(curve) < 16
        assert curve[-1][1] <= max(v for _, v in curve[:-1])     # the last evaluation did not improve
        assert c["images_seen"] == c["steps"] * 32


def test_a_run_killed_inside_an_increment_resumes_to_the_same_pick(best_val_run, tiny_shards, tmp_path,
                                                                  monkeypatch):
    cfg = _cfg(tiny_shards, *BEST_VAL)
    uninterrupted, reference = best_val_run
    monkeypatch.setenv("MCLFIR_FAULT_RANK", "0")
    monkeypatch.setenv("MCLFIR_FAULT_STEP", "10")   # increment 0, after the step-8 partial (which saw 3 and 6)
    with pytest.raises(RuntimeError, match="injected fault"):
        train(cfg, tmp_path / "r")
    partial = torch.load(tmp_path / "r/checkpoints/partial.pt", map_location="cpu", weights_only=True)
    assert partial["step"] == 8 and [p[0] for p in partial["selection"]["curve"]] == [3, 6]
    monkeypatch.delenv("MCLFIR_FAULT_RANK")
    res = train(load_config(tmp_path / "r/config.yaml"), tmp_path / "r", resume=True)
    assert [c["selection"] for c in res["cost"]] == [c["selection"] for c in reference["cost"]]
    assert res["accuracy_matrix"] == reference["accuracy_matrix"]
    a = torch.load(tmp_path / "r/checkpoints/increment_01.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(uninterrupted / "checkpoints/increment_01.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_eval_split_is_decoded_once_and_replayed_bit_for_bit(tiny_shards, tmp_path, monkeypatch):
    """eval.cache_mb: the validation passes inside increments and the pass at each increment's end reuse the
    first pass's batches; the run's numbers equal a run that decodes on every pass."""
    import mclfir_dist.evaluation.evaluator as evaluator
    built = []
    original = evaluator.build_eval_loader

    def counting(cfg, manifest, split, *args, **kwargs):
        built.append(split)
        return original(cfg, manifest, split, *args, **kwargs)

    monkeypatch.setattr(evaluator, "build_eval_loader", counting)
    results, passes = {}, {}
    for cache_mb in (0, 1024):
        built.clear()
        results[cache_mb] = train(_cfg(tiny_shards, "eval.every_steps=4", "train.select=best_val",
                                       f"eval.cache_mb={cache_mb}", steps=8), tmp_path / f"c{cache_mb}")
        passes[cache_mb] = list(built)
    assert passes[1024] == ["test", "val"]   # the baselines' pass and the first validation; then replays only
    assert passes[0].count("val") == 4 and passes[0].count("test") == 3   # 2 increments x 2 validations
    for key in ("accuracy_matrix", "final", "random_map"):
        assert results[0][key] == results[1024][key]
    assert [r["selection"]["curve"] for r in results[0]["cost"]] == [r["selection"]["curve"] for r in results[1024]["cost"]]


def test_a_split_cache_keeps_only_whole_passes_that_fit():
    from mclfir_dist.evaluation.split_cache import SplitCache
    batch = lambda: {"images": torch.zeros(256, dtype=torch.uint8), "keys": ["a"]}   # noqa: E731; 256 bytes
    cache = SplitCache(limit_mb=1024 / 2 ** 20)   # 1 KiB
    made = []
    loader = lambda n: (made.append(n) or [batch() for _ in range(n)])   # noqa: E731
    assert len(list(cache.batches("small", lambda: loader(3)))) == 3
    assert len(list(cache.batches("small", lambda: loader(3)))) == 3 and made == [3]   # replayed
    assert len(list(cache.batches("big", lambda: loader(2)))) == 2 and "big" not in cache.splits   # 768 + 512 > 1024
    stopped = iter(cache.batches("other", lambda: loader(1)))
    next(stopped)
    assert "other" not in cache.splits   # a pass that did not reach its end is not kept
    assert len(list(SplitCache(0).batches("x", lambda: loader(1)))) == 1
