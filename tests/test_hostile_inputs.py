"""The hostile-input issue's acceptance: every case of scripts/hostile_inputs.py (crafted names, damaged
shards, manifests and checkpoints, a real full disk, bad configs, misuse of embed/index/search) gives one
line and the expected exit, changes no file outside its run and output folders, and deletes no user file.
Plus the parts a command cannot show: what the loaders catch, and the DALI filtered index's name."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, needs

ITEMS = {str(i) for i in range(1, 22)} | {"40.1", "40.2", "40.3", "40.6", "40.7", "40.10"}   # every item has a case


def test_every_hostile_case_holds(tmp_path):
    rows_file = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts/hostile_inputs.py"), "--work", str(tmp_path / "w"),
                           "--json", str(rows_file)], capture_output=True, text=True, timeout=900)
    rows = json.loads(rows_file.read_text())
    failed = [f"{r['id']}: {r['why']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed) + "\n" + done.stdout[-3000:]
    assert done.returncode == 0
    assert {r["item"] for r in rows} == ITEMS
    refusals = [r for r in rows if r["rc"] not in (0, None)]
    assert len(refusals) > 35 and all(r["line"] for r in refusals)


def test_a_failing_transform_is_not_reported_as_a_bad_image(tiny_shards):
    """Only the image's own faults are skipped; anything else (here a transform that fails) stops the pass."""
    from mclfir_dist.data.loader_torch import EvalStream, TransformSpec
    from mclfir_dist.data.manifest import Manifest

    class Failing(EvalStream):
        def _load(self, jpeg, transform):
            raise RuntimeError("can't allocate memory")

    stream = Failing(Manifest.load(tiny_shards).shard_files("test"), TransformSpec(32), 8)
    with pytest.raises(RuntimeError, match="allocate"):
        next(iter(stream))


def test_the_pixel_limit_is_read_from_the_header(tiny_shards):
    from mclfir_dist.data.images import ImageRejected, decode
    from mclfir_dist.data.manifest import Manifest
    from mclfir_dist.data.streams import iter_shard
    sys.path.insert(0, str(ROOT / "scripts"))
    from hostile_inputs import huge_jpeg_header
    jpeg = next(iter_shard(Manifest.load(tiny_shards).shard_files("test")[0]))["jpg"]
    assert decode(jpeg, max_pixels=32 * 32).shape[0] == 3
    with pytest.raises(ImageRejected, match="over data.max_image_pixels"):
        decode(jpeg, max_pixels=32 * 32 - 1)
    with pytest.raises(ImageRejected, match="20000x20000"):
        decode(huge_jpeg_header(jpeg))   # refused before a byte is decoded


@needs("dali")
def test_dali_filters_its_index_from_the_shard_index_every_time(tiny_shards, tmp_path, monkeypatch):
    """Each corrupt-JPEG rescan filters the shard's own index: the name stays short however often it runs."""
    monkeypatch.setenv("MCLFIR_CACHE", str(tmp_path / "cache"))
    from mclfir_dist.data.loader_dali import filtered_index
    from mclfir_dist.data.manifest import Manifest
    idx = Manifest.load(tiny_shards).index_files("train")[0]
    once = filtered_index(idx, ["a"])
    again = filtered_index(idx, ["a", "b"])
    assert len(once.name) == len(again.name) == 17 + len(idx.name)
    assert filtered_index(idx, ["b", "a"]) == again   # the same set, the same file


@pytest.mark.parametrize("name", ["/abs/path/x", "../x", "a/b", "__class__", "", "a b", "x" * 101, 7])
def test_names_from_files_are_checked(name):
    from mclfir_dist.errors import CheckpointError
    from mclfir_dist.utils.names import check_attribute
    with pytest.raises(CheckpointError, match="not allowed"):
        check_attribute(name, "ckpt.pt: head", CheckpointError)
