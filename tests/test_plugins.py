"""Plug-ins from the command line: a training method from a module outside the package, named in the
config (`plugins: [...]`) or declared as an entry point, trains under `mclfir train` and a 2-process
`accelerate launch`, survives kill -9, and resumes from the command line (`--resume RUN`, which imports
the plug-in again from the saved config.yaml) to a bit-identical end. The runs also use a trunk, an lr
schedule and a loader registered outside the package (tests/plugins/extras.py: the README's "nothing
else" rows), and the run then evaluates and exports through the command line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SELF_BUILDING_TINY, free_port

PLUGINS = ROOT / "tests" / "plugins"
ACCELERATE_2PROC = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "launch/cpu_2proc.yaml")]
TINY = SELF_BUILDING_TINY + ["train.steps_per_increment=10", "train.checkpoint_every=2", "train.log_every=5"]
PLUGIN_RUN = ["plugins=[replay_method,extras]", "train.method=replay_one_batch", "replay.weight=0.5",
              "model.trunk=tiny_cnn", "optim.schedule=halving", "data.loader=counting"]


def env(extra_path=()):
    path = os.pathsep.join([str(ROOT), str(PLUGINS), *map(str, extra_path), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def mclfir(*args):
    return [sys.executable, "-m", "mclfir_dist.cli", *args]


def launch(two: bool, *args):
    """`mclfir train ARGS`, or the same under a 2-process `accelerate launch -m mclfir_dist.train`."""
    if two:
        return [*ACCELERATE_2PROC, "--main_process_port", free_port(), "-m", "mclfir_dist.train", *args]
    return mclfir("train", *args)


def start_args(run: Path, shards: Path):
    return ["--config", str(ROOT / "configs/debug_cpu.yaml"), "--out", str(run), f"data.shards={shards}",
            *TINY, *PLUGIN_RUN]


def run_ok(cmd, timeout=600):
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def kill_inside_second_increment(cmd, run: Path, timeout=600) -> None:
    """Start cmd and kill -9 its whole process group once a partial checkpoint of increment 1 is on disk
    (the plug-in's stored batch from increment 0 is then part of the state to restore)."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    ckpt, deadline = run / "checkpoints", time.time() + timeout
    try:
        while p.poll() is None and time.time() < deadline:
            if (ckpt / "increment_00.pt").is_file() and partial_increment(ckpt / "partial.pt") == 1:
                break
            time.sleep(0.05)
        assert p.poll() is None, "the run ended before it could be killed inside increment 1"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert not (run / "results.json").is_file() or not json.loads((run / "results.json").read_text())["complete"]


def partial_increment(path: Path):
    try:
        return torch.load(path, weights_only=True)["increment"]
    except (OSError, RuntimeError, EOFError):   # not there, or replaced while read
        return None


def final(run: Path):
    res = json.loads((run / "results.json").read_text())
    state = torch.load(run / "checkpoints" / "increment_01.pt", weights_only=True)
    return res, state


def assert_same_end(run: Path, reference: Path) -> None:
    (res, state), (ref, ref_state) = final(run), final(reference)
    assert res["complete"] and res["accuracy_matrix"] == ref["accuracy_matrix"]
    for part in ("model",):
        assert state[part].keys() == ref_state[part].keys()
        assert all(torch.equal(state[part][k], ref_state[part][k]) for k in state[part])
    stored, ref_stored = state["method"]["stored"], ref_state["method"]["stored"]
    assert stored.keys() == ref_stored.keys() == {"colour", "garment_length"}
    assert all(torch.equal(stored[a]["images"], ref_stored[a]["images"]) for a in stored)


def check_plugin_run_resumes_exactly(tmp_path: Path, two: bool) -> None:
    shards = tmp_path / "shards"
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    p = run_ok(launch(two, *start_args(reference, shards)))
    assert "loader: counting (data.loader=counting)" in p.stdout + p.stderr
    res = json.loads((reference / "results.json").read_text())
    assert res["config"]["plugins"] == ["replay_method", "extras"] and res["config"]["replay"]["weight"] == 0.5
    assert res["config"]["model"]["trunk"] == "tiny_cnn" and res["config"]["optim"]["schedule"] == "halving"
    assert res["world_size"] == (2 if two else 1)
    kill_inside_second_increment(launch(two, *start_args(killed, shards)), killed)
    run_ok(launch(two, "--resume", str(killed), "--trust-run-plugins"))   # no --config: config.yaml names them
    assert_same_end(killed, reference)


def test_a_plugin_method_under_mclfir_train_is_killed_and_resumes_exactly(tmp_path):
    check_plugin_run_resumes_exactly(tmp_path, two=False)
    run, shards = tmp_path / "reference", tmp_path / "shards"
    p = run_ok(mclfir("--trust-run-plugins", "eval", "--run", str(run), "--shards", str(shards)))   # the run's list
    assert "colour" in p.stdout
    run_ok(mclfir("--plugins", "replay_method,extras", "export", "--run", str(run), "--out", str(tmp_path / "export")))
    check = ("import torch, extras, replay_method\n"
             "from mclfir_dist.retrieval.portable import load_exported\n"
             "from mclfir_dist.training.checkpoint import load_run_model\n"
             f"exported = load_exported({str(tmp_path / 'export')!r})\n"
             f"model, _, _ = load_run_model({str(run)!r})\n"
             "x = torch.randn(3, 3, 32, 32)\n"
             "b, _ = model.embed_all(x, ['colour', 'garment_length'])\n"
             "print('diff', max(float((exported(x)[a] - b[:, i]).abs().max()) for i, a in enumerate(exported.attributes)))\n")
    p = run_ok([sys.executable, "-c", check])
    assert float(p.stdout.split("diff")[1]) < 1e-5   # the exported trunk is the plug-in's, rebuilt from BACKBONES


def test_a_plugin_method_under_two_process_accelerate_is_killed_and_resumes_exactly(tmp_path):
    check_plugin_run_resumes_exactly(tmp_path, two=True)


def test_an_entry_point_plugin_needs_no_config_key(tmp_path):
    """An installed package that declares `[mclfir_dist.plugins]` is imported on its own."""
    dist = tmp_path / "site" / "replay_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: replay-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mclfir_dist.plugins]\nreplay = replay_method\n")
    p = subprocess.run(mclfir("train", "--help-config"), cwd=ROOT, env=env([tmp_path / "site"]),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "replay.weight (default 1.0): Weight of each replayed attribute's InfoNCE term." in p.stdout
    assert "replay_one_batch" in next(line for line in p.stdout.splitlines() if line.startswith("train.method "))
    p = subprocess.run(mclfir("train", "--help-config"), cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert "replay.weight" not in p.stdout   # without the entry point nothing registers it


@pytest.mark.parametrize("value", ["[no_such_plugin_module]", "[../evil]", "abc"])
def test_a_plugin_that_does_not_import_is_one_line_and_exit_2(tmp_path, value):
    p = subprocess.run(mclfir("train", "--config", str(ROOT / "configs/debug_cpu.yaml"), "--out", str(tmp_path / "r"),
                              f"plugins={value}"), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "plugins" in err[0] and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "r").exists()


def test_a_plugin_that_raises_while_importing_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('half-written plug-in')\n")
    p = subprocess.run(mclfir("train", "--config", str(ROOT / "configs/debug_cpu.yaml"), "--out", str(tmp_path / "r"),
                              "plugins=[broken_plugin]"), cwd=tmp_path, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "'broken_plugin' raised RuntimeError: half-written plug-in" in err[0], p.stderr
    assert not (tmp_path / "r").exists()


def test_a_downloaded_run_imports_nothing_it_names(run, tiny_shards, tmp_path):
    """A run whose saved config lists `plugins: [evil_plugin]`, with evil_plugin.py in the working directory:
    eval, export and report used to import it (rc 0, its code ran). Now the run's list is data: eval and export
    refuse in one line naming the plug-in and both ways to load it, report reads results.json alone, and only
    an explicit --trust-run-plugins imports the list."""
    import shutil
    dl = tmp_path / "dl"
    shutil.copytree(run, dl)
    for ckpt in (dl / "checkpoints").glob("increment_*.pt"):
        state = torch.load(ckpt, weights_only=True)
        state["config"]["plugins"] = ["evil_plugin"]
        torch.save(state, ckpt)
    res = json.loads((dl / "results.json").read_text())
    res["config"]["plugins"] = ["evil_plugin"]
    (dl / "results.json").write_text(json.dumps(res))
    (tmp_path / "evil_plugin.py").write_text("open('EVIL_RAN', 'w').write('evil')\nprint('EVIL PLUGIN RAN')\n")

    def cli(*args):
        return subprocess.run(mclfir(*args), cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    for args in (["eval", "--run", str(dl), "--shards", str(tiny_shards)], ["export", "--run", str(dl), "--out", "x"]):
        p = cli(*args)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1, p.stdout[-2000:] + p.stderr[-2000:]
        assert "evil_plugin" in err[0] and "--trust-run-plugins" in err[0] and "--plugins evil_plugin" in err[0]
        assert "EVIL" not in p.stdout and not (tmp_path / "EVIL_RAN").exists()
    p = cli("report", str(dl), "--out", "rep")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "EVIL" not in p.stdout and not (tmp_path / "EVIL_RAN").exists()
    p = cli("--trust-run-plugins", "eval", "--run", str(dl), "--shards", str(tiny_shards))
    assert p.returncode == 0 and (tmp_path / "EVIL_RAN").exists(), p.stderr[-2000:]   # the user's explicit choice


def test_a_broken_installed_plugin_stops_commands_in_one_line_but_not_version_or_help(tmp_path):
    """An installed entry point whose module is gone: `mclfir --version` and `--help` still answer."""
    import subprocess
    import sys
    dist = tmp_path / "site" / "brokenplug-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenplug\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[mclfir_dist.plugins]\nbroken = no_such_module_xyz\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{ROOT}")
    run = lambda *a: subprocess.run([sys.executable, "-m", "mclfir_dist.cli", *a], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=120)
    version = run("--version")
    assert version.returncode == 0 and "mclfir_dist" in version.stdout, version.stderr
    assert run("--help").returncode == 0
    refused = run("train", "--help-config")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "no_such_module_xyz" in lines[0], refused.stderr
