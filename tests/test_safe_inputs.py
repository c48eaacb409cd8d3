"""Inputs that must never destroy a user's files or end in a traceback (the first items of the hostile-
input issue): --overwrite with a bad config, shard building in a folder that holds other files, configs
that are not UTF-8, non-finite numbers, a bad override, and a run without trackers."""
import json

import pytest

from conftest import ROOT, tiny_train_overrides
from mclfir_dist.cli import main
from mclfir_dist.config import ConfigError
from mclfir_dist.configure import load_config

DEBUG = str(ROOT / "configs/debug_cpu.yaml")


def fake_run(run):
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "increment_00.pt").write_bytes(b"weights")
    for name in ("results.json", "config.yaml", "summary.md"):
        (run / name).write_text("{}")


def test_overwrite_with_a_bad_config_deletes_nothing(tmp_path, capsys):
    run = tmp_path / "ow"
    fake_run(run)
    assert main(["train", "--config", DEBUG, "--out", str(run), "--overwrite", "train.steps_per_increment=abc"]) == 2
    assert "train.steps_per_increment" in capsys.readouterr().err
    assert (run / "checkpoints" / "increment_00.pt").read_bytes() == b"weights"
    assert all((run / name).is_file() for name in ("results.json", "config.yaml", "summary.md"))


SMALL = ["--num-images", "120", "--image-size", "32", "--min-value-count", "2"]


def test_building_shards_deletes_only_the_shards_it_wrote(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "backup_2024.tar").write_bytes(b"a user's archive")
    (folder / "photos.idx").write_text("a user's index")
    assert main(["shards", "build", "--out", str(folder), *SMALL, "--samples-per-shard", "20"]) == 0
    many = sorted(p.name for p in folder.glob("train-*.tar"))
    assert len(many) > 2
    assert main(["shards", "build", "--out", str(folder), *SMALL, "--samples-per-shard", "500"]) == 0
    assert sorted(p.name for p in folder.glob("train-*.tar")) == ["train-00000.tar"]   # its own old shards went
    assert (folder / "backup_2024.tar").read_bytes() == b"a user's archive"
    assert (folder / "photos.idx").read_text() == "a user's index"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["splits"]["train"]["shards"][0]["file"] == "train-00000.tar"


def test_a_config_that_is_not_utf8_is_named(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml.*UTF-8"):
        load_config(bad)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ConfigError, match="optim.lr.*finite"):
        load_config(DEBUG, [f"optim.lr={value}"])
    with pytest.raises(ConfigError, match="loss.kd_weight.*finite"):
        load_config(DEBUG, [f"loss.kd_weight={value}"])


def test_a_bad_override_is_named_not_the_config_file():
    bad = "train.increments=[{name: a, attributes: [colour]"
    with pytest.raises(ConfigError) as e:
        load_config(DEBUG, ["optim.lr=0.01", bad])
    assert bad in str(e.value) and "debug_cpu.yaml" not in str(e.value)


def test_a_run_without_trackers_finishes(tiny_shards, tmp_path):
    from mclfir_dist.training.engine import train
    cfg = load_config(DEBUG, tiny_train_overrides(tiny_shards, steps=4) + ["train.trackers=[]", "eval.grid_queries=2"])
    res = train(cfg, tmp_path / "r")
    assert res["complete"] and (tmp_path / "r" / "checkpoints" / "increment_01.pt").is_file()
    assert not (tmp_path / "r" / "tensorboard").exists()


def test_an_animated_gif_decodes_its_first_frame_only(tmp_path):
    """A 20-frame GIF of 3000 x 3000 is a few kB; decoding every frame (as torchvision does) took 540 MB,
    growing with the frame count. Only frame 0 is decoded now: the memory of one frame."""
    import io
    import subprocess
    import sys

    from PIL import Image

    from conftest import ROOT
    from mclfir_dist.data.images import decode_any
    frames = [Image.new("P", (3000, 3000), color=i) for i in range(20)]
    for i, f in enumerate(frames):
        f.putpalette([(7 * i) % 256, 0, 0] * 256)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    (tmp_path / "anim.gif").write_bytes(buf.getvalue())
    assert len(buf.getvalue()) < 200_000
    small = io.BytesIO()   # the first frame's pixels come back, not another frame's
    Image.new("RGB", (8, 6), (200, 10, 10)).save(small, format="GIF", save_all=True,
                                                 append_images=[Image.new("RGB", (8, 6), (10, 200, 10))])
    img = decode_any(small.getvalue())
    assert tuple(img.shape) == (3, 6, 8) and img[0].float().mean() > 150 and img[1].float().mean() < 50
    # peak RSS of the decoding alone: the child resets its high-water mark first (a forked child inherits the
    # parent's ru_maxrss, and pytest's is high), then reads VmHWM against its RSS before decoding
    script = f"""
import re, sys
sys.path.insert(0, {str(ROOT)!r})
from mclfir_dist.data.images import decode_any
import torch, torchvision.io   # loaded on the first decode: not the decode's memory
data = open({str(tmp_path / 'anim.gif')!r}, "rb").read()
kb = lambda key: int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
open("/proc/self/clear_refs", "w").write("5")
before = kb("VmRSS")
img = decode_any(data)
print(tuple(img.shape), (kb("VmHWM") - before) // 1024)
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    shape, grown_mb = p.stdout.rsplit(" ", 1)
    assert shape.strip() == "(3, 3000, 3000)"
    assert int(grown_mb) < 200, f"decoding grew memory by {grown_mb} MB"   # one RGB frame is 27 MB
