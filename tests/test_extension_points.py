"""A converter from a module outside the package (tests/plugins/extras.py), one registration, used through
`mclfir --plugins MOD shards convert NAME`. The other "nothing else" rows of the README's table (a method, a
trunk, an lr schedule, a loader) are trained, killed, resumed, evaluated and exported in test_plugins.py."""
import json
import os
import subprocess
import sys

from conftest import ROOT

from mclfir_dist.data import synthetic

PLUGINS = ROOT / "tests" / "plugins"


def run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(PLUGINS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


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
