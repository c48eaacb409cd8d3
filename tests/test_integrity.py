"""Damaged shard sets: every damage is named, or (when asked) left out and counted; never silent."""
import io
import json
import shutil
import tarfile

import pytest

from conftest import ROOT, tiny_train_overrides
from mclfir_dist.configure import load_config
from mclfir_dist.data.manifest import Manifest, ShardError
from mclfir_dist.data.streams import iter_shard

FAST = ["eval.grid_queries=0", "eval.frozen_baseline=false"]


@pytest.fixture
def shards(tiny_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(tiny_shards, out)
    return out


def _cut_at_header(path, keep_members):
    """Truncate a tar right after `keep_members` regular files: Python's tarfile reads it without an error."""
    with tarfile.open(path) as tf:
        members = [m for m in tf.getmembers() if m.isreg()]
    cut = members[keep_members].offset   # the header of the next member
    data = path.read_bytes()[:cut]
    path.write_bytes(data)
    return cut


def test_a_shard_cut_on_a_header_is_caught_by_size_and_by_count(shards):
    m = Manifest.load(shards)
    path = m.shard_files("train")[0]
    _cut_at_header(path, 30)                                       # 10 whole samples of 3 files each
    with tarfile.open(path) as tf:                                  # what fooled the readers before
        assert len(tf.getmembers()) == 30
    with pytest.raises(ShardError, match=f"{path.name}.*bytes, the manifest says"):
        list(iter_shard(path))
    assert m.verify("train")[0][0] == path.name
    # an older manifest without sizes: the sample count still catches it
    data = json.loads((shards / "manifest.json").read_text())
    for s in data["splits"]["train"]["shards"]:
        s.pop("bytes")
    (shards / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardError, match=f"{path.name}: 10 samples, the manifest says"):
        list(iter_shard(path))


def test_an_empty_valid_tar_is_not_a_silent_pass(shards):
    m = Manifest.load(shards)
    path = m.shard_files("test")[0]
    buf = io.BytesIO()
    tarfile.open(fileobj=buf, mode="w").close()
    path.write_bytes(buf.getvalue())
    problems = dict(m.verify("test"))
    assert path.name in problems and "the manifest says" in problems[path.name]


def test_training_stops_naming_a_damaged_shard_or_skips_and_records_it(shards, tmp_path):
    from mclfir_dist.training.engine import train
    m = Manifest.load(shards)
    bad = m.shard_files("train")[1]
    _cut_at_header(bad, 12)
    incs = "[{name: a, attributes: [colour]}]"
    cfg = load_config(ROOT / "configs/debug_cpu.yaml", tiny_train_overrides(shards, steps=3, increments=incs) + FAST)
    with pytest.raises(ShardError, match=f"{bad.name}: .*data.skip_bad_shards"):
        train(cfg, tmp_path / "strict")
    assert not (tmp_path / "strict" / "results.json").exists()
    cfg = load_config(ROOT / "configs/debug_cpu.yaml",
                      tiny_train_overrides(shards, steps=3, increments=incs) + FAST + ["data.skip_bad_shards=true"])
    res = train(cfg, tmp_path / "lenient")
    assert res["complete"]
    assert [s["file"] for s in res["skipped_shards"]["train/shards"]] == [bad.name]


def test_eval_cli_names_a_truncated_test_shard(tiny_shards, shards, tmp_path, capsys):
    from mclfir_dist.cli import main
    from mclfir_dist.training.engine import train
    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs/debug_cpu.yaml",
                      tiny_train_overrides(tiny_shards, steps=2, increments="[{name: a, attributes: [colour]}]") + FAST)
    train(cfg, run)
    bad = Manifest.load(shards).shard_files("test")[0]
    _cut_at_header(bad, 9)
    assert main(["eval", "--run", str(run), "--shards", str(shards)]) == 2
    assert bad.name in capsys.readouterr().err
    # the tiny test split is one shard: skipping it leaves nothing, which is said, not scored as empty
    assert main(["eval", "--run", str(run), "--shards", str(shards), "--skip-bad-shards"]) == 2
    assert "every test shard" in capsys.readouterr().err


def test_corrupt_images_are_counted_in_results(shards, tmp_path):
    """A JPEG that does not decode is skipped in training and evaluation, and results.json counts it."""
    from mclfir_dist.training.engine import train
    m = Manifest.load(shards)
    # replace one test image's bytes (same length, so the shard's size still matches)
    path = m.shard_files("test")[0]
    with tarfile.open(path) as tf:
        member = next(x for x in tf.getmembers() if x.name.endswith(".jpg"))
    data = bytearray(path.read_bytes())
    data[member.offset_data:member.offset_data + member.size] = bytes(member.size)
    path.write_bytes(bytes(data))
    key = member.name.split(".")[0]
    incs = "[{name: a, attributes: [colour]}]"
    cfg = load_config(ROOT / "configs/debug_cpu.yaml", tiny_train_overrides(shards, steps=2, increments=incs) + FAST)
    res = train(cfg, tmp_path / "r")
    assert res["skipped_samples"]["test/shards"] == {"count": 1, "keys": [key]}
