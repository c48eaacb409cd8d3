"""A new attribute arrives: extending a trained run equals training it in one go, misuse is refused in one
line, and the compatibility figures (deployed index vs re-embedding) match an independent computation."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_train_overrides
from mclfir_dist.configure import load_config
from mclfir_dist.data.manifest import Manifest
from mclfir_dist.errors import ConfigError
from mclfir_dist.training.engine import train

TWO = "[{name: a, attributes: [colour]},{name: b, attributes: [garment_length]}]"
THREE = "[{name: a, attributes: [colour]},{name: b, attributes: [garment_length]},{name: c, attributes: [pattern]}]"


def _cfg(shards, increments, *extra):
    return load_config(ROOT / "configs/debug_cpu.yaml", tiny_train_overrides(shards, steps=6, increments=increments)
                       + ["eval.grid_queries=0", "eval.frozen_baseline=false", *extra])


@pytest.fixture(scope="module")
def runs(tiny_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("extend")
    train(_cfg(tiny_shards, TWO), root / "extended")
    extended = train(_cfg(tiny_shards, THREE), root / "extended", resume=True)
    one_go = train(_cfg(tiny_shards, THREE), root / "one_go")
    return root, extended, one_go


def test_extending_a_run_equals_training_it_in_one_go(runs):
    root, extended, one_go = runs
    assert extended["accuracy_matrix"] == one_go["accuracy_matrix"]   # bit-identical on CPU
    assert extended["random_map"] == one_go["random_map"]
    assert extended["compatibility"] == one_go["compatibility"]
    assert extended["complete"] and [i["name"] for i in extended["increments"]] == ["a", "b", "c"]
    (ext,) = extended["extensions"]
    assert ext["first_new_increment"] == 2 and ext["increments"] == ["c"] and len(ext["config_hash"]) == 16
    a = torch.load(root / "extended/checkpoints/increment_02.pt", weights_only=True)["model"]
    b = torch.load(root / "one_go/checkpoints/increment_02.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _ap(q, ql, c, cl):
    """Plain numpy AP per query (stable order by descending score), NaN-free queries only."""
    aps = []
    for v, lab in zip(q, ql):
        order = np.argsort(-(c @ v), kind="stable")
        rel = (cl[order] == lab).astype(float)
        if rel.sum():
            aps.append(float((np.cumsum(rel) / np.arange(1, len(rel) + 1) * rel).sum() / rel.sum()))
    return float(np.mean(aps))


def test_compatibility_matches_an_independent_computation_from_the_saved_embeddings(runs, tiny_shards):
    root, extended, _ = runs
    manifest = Manifest.load(tiny_shards)
    snaps = [torch.load(root / f"extended/checkpoints/eval_embeddings_{t:02d}.pt", weights_only=True)["attributes"]
             for t in (1, 2)]
    row = next(r for r in extended["compatibility"] if r["increment"] == 2)["attributes"]
    assert set(row) == {"colour", "garment_length"}
    split = extended["eval_split"]
    for attribute, got in row.items():
        old, new = snaps[0][attribute], snaps[1][attribute]
        assert old["keys"] == new["keys"]
        pos = {k: i for i, k in enumerate(new["keys"])}
        sets = manifest.eval_set(split, attribute)
        qi = [pos[k] for k in sets["query"]]
        ci = [pos[k] for k in sets["candidate"]]
        lab = _labels(manifest, split, attribute, new["keys"])
        n, o = new["emb"].double().numpy(), old["emb"].double().numpy()
        want = {"reembedded": _ap(n[qi], lab[qi], n[ci], lab[ci]), "deployed_index": _ap(n[qi], lab[qi], o[ci], lab[ci]),
                "previous": _ap(o[qi], lab[qi], o[ci], lab[ci])}
        for name, value in want.items():
            assert got[name] == pytest.approx(value, abs=1e-5), (attribute, name)
        assert got["stale_index_cost"] == pytest.approx(got["deployed_index"] - got["previous"])
        # the previous model's own mAP is the accuracy matrix's previous row
        assert got["previous"] == pytest.approx(extended["accuracy_matrix"][1][attribute], abs=1e-6)


def _labels(manifest, split, attribute, keys):
    """Each key's value index of `attribute`, read from the shard set's own label files."""
    from mclfir_dist.data import build_eval_loader
    cfg = load_config(ROOT / "configs/debug_cpu.yaml", ["data.image_size=32", "data.num_workers=0"])
    col = manifest.attribute_index(attribute)
    got = {}
    for batch in build_eval_loader(cfg.data, manifest, split, 0, 1):
        for k, lab in zip(batch["keys"], batch["labels"]):
            got[k] = int(lab[col])
    return np.array([got[k] for k in keys])


def test_frozen_keeps_the_deployed_index_exactly(tiny_shards, tmp_path):
    res = train(_cfg(tiny_shards, TWO, "train.method=frozen"), tmp_path / "frozen")
    (row,) = res["compatibility"]
    r = row["attributes"]["colour"]
    assert r["unchanged"] and r["reembedded"] == r["deployed_index"] == r["previous"]


def _train_cli(*args):
    return subprocess.run([sys.executable, "-m", "mclfir_dist.cli", "train", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize("increments, extra, message", [
    ("[{name: a, attributes: [colour]},{name: x, attributes: [pattern]},{name: c, attributes: [sleeve_length]}]",
     [], "train.increments[1] differs from the run's"),
    ("[{name: a, attributes: [colour]}]", [], "a resume may add increments, never drop them"),
    (THREE, ["loss.temperature=0.5"], "loss.temperature (run: 0.3, config: 0.5)"),
    (THREE.replace("pattern", "colour"), [], "already added by an"),
])
def test_misuse_of_an_extension_is_one_line_and_exit_2(runs, tiny_shards, increments, extra, message):
    root = runs[0]
    before = (root / "extended/results.json").read_text()
    overrides = tiny_train_overrides(tiny_shards, steps=6, increments=increments) + \
        ["eval.grid_queries=0", "eval.frozen_baseline=false", *extra]
    p = _train_cli("--config", str(ROOT / "configs/debug_cpu.yaml"), "--resume", str(root / "extended"), *overrides)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert (root / "extended/results.json").read_text() == before   # nothing of the run was touched


def test_operational_keys_may_change_on_resume(tiny_shards):
    from mclfir_dist.config import to_dict
    from mclfir_dist.training.resume_rules import check_resume
    saved = to_dict(_cfg(tiny_shards, TWO))
    assert check_resume(saved, _cfg(tiny_shards, TWO, "train.log_every=3", "data.num_workers=1"), "x") is None
    assert check_resume(saved, _cfg(tiny_shards, THREE), "x") == 2
    with pytest.raises(ConfigError, match="optim.lr"):
        check_resume(saved, _cfg(tiny_shards, TWO, "optim.lr=0.01"), "x")
    # json round trip (as results.json keeps it) changes nothing
    assert check_resume(json.loads(json.dumps(saved)), _cfg(tiny_shards, TWO), "x") is None


def test_report_shows_the_compatibility_table_and_plot(runs, tmp_path):
    from mclfir_dist.evaluation.report import report
    root = runs[0]
    text = report([str(root / "extended"), str(root / "one_go")], str(tmp_path))
    assert "(b) deployed index" in text and "b-c stale index" in text
    assert (tmp_path / "compatibility.png").stat().st_size > 1000


def test_a_search_with_another_model_than_the_index_is_refused_unless_allowed(runs, tiny_shards, tmp_path, capsys):
    import shutil
    from mclfir_dist.cli import main
    from mclfir_dist.retrieval.index import CatalogueIndex
    from mclfir_dist.retrieval.search import _image_bytes
    root = runs[0]
    deployed = tmp_path / "deployed_run"   # the run as it was before the extension: its newest is increment 1
    shutil.copytree(root / "extended", deployed)
    (deployed / "checkpoints/increment_02.pt").unlink()
    assert main(["embed", "--run", str(deployed), "--shards", str(tiny_shards), "--splits", "test", "--out",
                 str(tmp_path / "emb"), "--workers", "0"]) == 0
    assert main(["index", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "idx")]) == 0
    query = tmp_path / "q.jpg"
    query.write_bytes(_image_bytes(CatalogueIndex(tmp_path / "idx"), [0])[0])
    args = ["search", "--index", str(tmp_path / "idx"), "--attribute", "colour", "--image", str(query), "--k", "3"]
    capsys.readouterr()
    assert main(args + ["--run", str(deployed)]) == 0                       # same weights: fine
    assert main(args + ["--run", str(root / "extended")]) == 2               # the extended model: refused
    err = capsys.readouterr().err
    assert "embedded by another model" in err and "--allow-other-model" in err
    assert main(args + ["--run", str(root / "extended"), "--allow-other-model"]) == 0
    err = capsys.readouterr().err
    assert "with the previous model's index" in err and "re-embedded" in err


def test_a_kill_9_inside_the_extension_resumes_exactly(tiny_shards, tmp_path):
    """The extension's own increment is killed (-9) after its first partial checkpoint; running the same
    command again finishes it bit-identical to the same extension run without a kill. Both are fresh
    processes: a training step in the long-lived pytest process (after some hundred other tests) once ended
    0.1-0.2 mAP points away from the same steps in a fresh process, while fresh runs agreed bit for bit at
    every kill point tried (cause not pinned down; a likely one: CPU kernels taking other vector paths for
    other memory alignments). The in-process comparison with the one-go run is
    test_extending_a_run_equals_training_it_in_one_go."""
    import shutil
    import signal
    import time
    base = tmp_path / "two"
    train(_cfg(tiny_shards, TWO), base)
    overrides = tiny_train_overrides(tiny_shards, steps=6, increments=THREE) + [
        "eval.grid_queries=0", "eval.frozen_baseline=false", "train.checkpoint_every=2"]   # an operational key

    def command(run):
        return [sys.executable, "-m", "mclfir_dist.cli", "train", "--config", str(ROOT / "configs/debug_cpu.yaml"),
                "--resume", str(run), *overrides]

    reference, run = tmp_path / "reference", tmp_path / "run"
    shutil.copytree(base, reference)
    shutil.copytree(base, run)
    done = subprocess.run(command(reference), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    p = subprocess.Popen(command(run), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = run / "checkpoints" / "partial.pt"
    deadline = time.time() + 300
    while not partial.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert p.poll() is None, "the extension ended before its first partial checkpoint"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "checkpoints" / "increment_02.pt").exists()
    done = subprocess.run(command(run), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed, expected = (json.loads((r / "results.json").read_text()) for r in (run, reference))
    assert resumed["accuracy_matrix"] == expected["accuracy_matrix"]
    assert resumed["compatibility"] == expected["compatibility"]
    assert len(resumed["extensions"]) == 1
    a = torch.load(run / "checkpoints/increment_02.pt", weights_only=True)["model"]
    b = torch.load(reference / "checkpoints/increment_02.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_lifecycle_script_runs_at_tiny_size(tmp_path):
    """scripts/lifecycle.sh end to end (TINY=1): train 2, index, a third arrives, extend, compatibility, the
    deployed index refused with the new model, updated in place per the verdicts, all three searched."""
    env = {**__import__("os").environ, "TINY": "1", "OUT": str(tmp_path / "lc"), "PY": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts/lifecycle.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "embedded by another model" in out                      # the deployed index, new model: refused
    assert "new ['pattern']" in out                                 # the new head joined the deployed index
    assert out.count("rank    score") == 3                          # all three attributes searched
    from mclfir_dist.retrieval.index import CatalogueIndex
    index = CatalogueIndex(tmp_path / "lc" / "index_v2")
    assert set(index.meta["attributes"]) == {"colour", "sleeve_length", "pattern"}
    assert index.meta["updates"][-1]["new_attributes"] == ["pattern"]
