"""Each row of the README's "What a change touches" table that says "nothing else" is done here from a
module outside the package (tests/plugins/): a training method (test_plugins.py), a trunk, an lr schedule,
a loader and a converter, each with one registration, used through the command line."""
import json
import os
import subprocess
import sys

from conftest import ROOT

from mclfir_dist.data import synthetic

PLUGINS = ROOT / "tests" / "plugins"
TINY = ["data.image_size=32", "data.batch_doublets=8", "data.num_workers=0", "data.eval_batch_size=64",
        "model.head_channels=16", "model.embed_dim=16", "train.steps_per_increment=6", "train.log_every=3",
        "eval.grid_queries=0", "eval.frozen_baseline=false", "train.increments=[{name: a, attributes: [colour]}]"]


def run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(PLUGINS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_trunk_a_schedule_and_a_loader_from_outside_train_evaluate_and_export(tiny_shards, tmp_path):
    out = tmp_path / "run"
    p = run("-m", "mclfir_dist.cli", "train", "--config", str(ROOT / "configs/debug_cpu.yaml"), "--out", str(out),
            f"data.shards={tiny_shards}", *TINY, "plugins=[extras]", "model.trunk=tiny_cnn",
            "optim.schedule=halving", "data.loader=counting")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "loader: counting (data.loader=counting)" in p.stdout + p.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and res["config"]["model"]["trunk"] == "tiny_cnn"
    assert res["config"]["optim"]["schedule"] == "halving"
    p = run("-m", "mclfir_dist.cli", "eval", "--run", str(out), "--shards", str(tiny_shards))
    assert p.returncode == 0 and "colour" in p.stdout, p.stderr[-2000:]
    p = run("-m", "mclfir_dist.cli", "export", "--run", str(out), "--out", str(tmp_path / "export"))
    assert p.returncode == 0, p.stderr[-2000:]
    check = ("import torch, extras\n"
             "from mclfir_dist.retrieval.portable import load_exported\n"
             "from mclfir_dist.training.checkpoint import load_run_model\n"
             f"exported = load_exported({str(tmp_path / 'export')!r})\n"
             f"model, _, _ = load_run_model({str(out)!r})\n"
             "x = torch.randn(3, 3, 32, 32)\n"
             "a = exported(x)['colour']\n"
             "b, _ = model.embed_all(x, ['colour'])\n"
             "print('diff', float((a - b[:, 0]).abs().max()))\n")
    p = run("-c", check)
    assert p.returncode == 0, p.stderr[-2000:]
    assert float(p.stdout.split("diff")[1]) < 1e-5


def test_a_converter_from_outside_runs_under_mclfir_shards_convert(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    rows = ["filename,colour"]
    for key, jpeg, values in synthetic.generate(40, 32, 0):
        (root / f"{key}.jpg").write_bytes(jpeg)
        rows.append(f"{key}.jpg,{values['colour']}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    p = run("-m", "mclfir_dist.cli", "--plugins", "extras", "shards", "convert", "flat_csv", "--root", str(root),
            "--out", str(tmp_path / "shards"))
    assert p.returncode == 0, p.stderr[-2000:]
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert [a["name"] for a in manifest["attributes"]] == ["colour"]
    assert sum(s["count"] for s in manifest["splits"].values()) == 40
    p = run("-m", "mclfir_dist.cli", "shards", "convert", "flat_csv", "--root", str(root), "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "flat_csv" in p.stderr   # without the plug-in it is not a converter
