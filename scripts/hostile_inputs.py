"""Every hostile or careless input the framework must survive, run against a tiny run, as a table.

Each case gets its own folder W (a copy of what it needs: shards, run, embeddings, index) with user files and
an empty `outside/` beside them. A case passes when:
  - the exit status is the expected one (non-zero for every refusal; 0 where the input is survivable);
  - a refusal is one line on stderr (no traceback);
  - no file in W changed except under the folders the command may write (its run, its output), `outside/`
    stayed empty and no file appeared at the absolute paths the case aimed at;
  - the case's own check holds (e.g. a skipped bad image is counted, a sheet is not 100,000 px wide).

    python scripts/hostile_inputs.py [--work DIR] [--only ID,ID] [--keep]
prints the table; exit 1 if any case fails. Cases run in this process (`mclfir_dist.cli.main`), one at a time.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mclfir_dist.cli import main  # noqa: E402

DEBUG = str(ROOT / "configs/debug_cpu.yaml")
INCREMENTS = "train.increments=[{name: a, attributes: [colour]},{name: b, attributes: [garment_length]}]"


def train_overrides(shards: Path, steps: int = 4) -> List[str]:
    return [f"data.shards={shards}", "data.image_size=32", "data.batch_doublets=8", "data.num_workers=0",
            "data.eval_batch_size=64", "model.head_channels=32", "model.embed_dim=16", "eval.grid_queries=0",
            "eval.frozen_baseline=false", INCREMENTS, f"train.steps_per_increment={steps}", "train.log_every=2"]


# ---------------------------------------------------------------- running one command

LOG = io.StringIO()
HANDLER = logging.StreamHandler(LOG)
HANDLER.setFormatter(logging.Formatter("%(levelname)s %(message)s"))


def _capture_logs() -> None:
    """Training re-configures logging (force=True): every command starts with our handler again."""
    LOG.seek(0)
    LOG.truncate()
    logging.getLogger().handlers = [HANDLER]
    logging.getLogger().setLevel(logging.INFO)


def run_cli(argv: List[str]) -> dict:
    """main(argv) in this process: exit status, stderr, stdout, log text, and the traceback if one escaped."""
    err, out = io.StringIO(), io.StringIO()
    _capture_logs()
    escaped = ""
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            rc, escaped = 1, traceback.format_exc()
    return {"rc": rc, "stderr": err.getvalue() + escaped, "stdout": out.getvalue(), "log": LOG.getvalue(),
            "traceback": bool(escaped) or "Traceback (most recent call last)" in err.getvalue()}


def run_call(fn: Callable[[], object]) -> dict:
    """A library call (for what has no command): a refusal is an exception whose message is one line."""
    _capture_logs()
    try:
        fn()
        return {"rc": 0, "stderr": "", "stdout": "", "log": LOG.getvalue(), "traceback": False}
    except (ValueError, OSError, RuntimeError) as e:
        return {"rc": 2, "stderr": f"{type(e).__name__}: {e}\n", "stdout": "", "log": LOG.getvalue(),
                "traceback": False}
    except BaseException:
        return {"rc": 1, "stderr": traceback.format_exc(), "stdout": "", "log": LOG.getvalue(), "traceback": True}


# ---------------------------------------------------------------- files

def snapshot(w: Path, skip: List[Path]) -> Dict[str, str]:
    out = {}
    for p in sorted(w.rglob("*")):
        if p.is_file() and p.name != ".lock" and not any(p == s or s in p.parents for s in skip):
            out[str(p.relative_to(w))] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def shard_members(tar: Path) -> List[tuple]:
    with tarfile.open(tar) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isreg()]


def write_shard(tar: Path, members: List[tuple], drop_index: bool = True) -> None:
    """Rewrite a shard and make its manifest entry agree (size, count), so only the content is hostile."""
    with tarfile.open(tar, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    manifest_path = tar.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for split in manifest["splits"].values():
        for s in split["shards"]:
            if s["file"] == tar.name:
                s["bytes"] = tar.stat().st_size
                s["count"] = len({n.split(".", 1)[0] for n, _ in members})
    manifest_path.write_text(json.dumps(manifest))
    if drop_index:
        tar.with_suffix(".idx").unlink(missing_ok=True)


def huge_jpeg_header(small_jpeg: bytes, width: int = 20000, height: int = 20000) -> bytes:
    """A real JPEG whose frame header claims width x height: a decompression bomb for whoever trusts it."""
    data = bytearray(small_jpeg)
    i = 2
    while i < len(data):
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 7] = height.to_bytes(2, "big")
            data[i + 7:i + 9] = width.to_bytes(2, "big")
            return bytes(data)
        i += 2 + length
    raise ValueError("no frame header")


def png_bytes() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="PNG")
    return buf.getvalue()


def damage_checkpoints(run: Path, fn: Callable[[dict], None], newest_only: bool = False) -> None:
    paths = sorted((run / "checkpoints").glob("increment_*.pt"))
    for p in paths[-1:] if newest_only else paths:
        state = torch.load(p, weights_only=True)
        fn(state)
        torch.save(state, p)


# ---------------------------------------------------------------- the base artefacts every case copies

@dataclass
class Base:
    shards: Path
    run: Path
    emb: Path
    index: Path
    export: Path


def make_base(root: Path) -> Base:
    b = Base(root / "shards", root / "run", root / "emb", root / "index", root / "export")
    steps = [["shards", "build", "--out", b.shards, "--num-images", "240", "--image-size", "32",
              "--samples-per-shard", "60", "--min-value-count", "4"],
             ["train", "--config", DEBUG, "--out", b.run, *train_overrides(b.shards)],
             ["embed", "--run", b.run, "--shards", b.shards, "--out", b.emb, "--workers", "0"],
             ["index", "--embeddings", b.emb, "--out", b.index],
             ["export", "--run", b.run, "--out", b.export]]
    for argv in steps:
        r = run_cli(argv)
        if r["rc"] != 0:
            raise SystemExit(f"setting up the base run failed at {' '.join(map(str, argv[:2]))}:\n{r['stderr']}")
    return b


# ---------------------------------------------------------------- cases

@dataclass
class Case:
    id: str
    item: str                       # the hostile-input issue's item number
    what: str
    prepare: Callable               # (w, base) -> argv list, or a zero-argument callable for run_call
    expect: int = 2                 # 2 (refused, one line), 0 (survived), or -1 (any non-zero)
    may_write: List[str] = field(default_factory=list)   # folders under w the command may change
    check: Optional[Callable] = None  # (w, result) -> problem ('' if none)
    aims_at: List[str] = field(default_factory=list)     # absolute paths that must not appear
    needs_root: bool = False


def copy(src: Path, w: Path, name: str) -> Path:
    dst = w / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def first_shard(shards: Path, split: str) -> Path:
    return shards / json.loads((shards / "manifest.json").read_text())["splits"][split]["shards"][0]["file"]


def edit_manifest(shards: Path, fn) -> None:
    path = shards / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps(fn(data)))


def _set_labels(shards: Path, split: str, raw: bytes) -> None:
    tar = first_shard(shards, split)
    write_shard(tar, [(n, raw if n.endswith(".lbl") else d) for n, d in shard_members(tar)])


def cases() -> List[Case]:
    out: List[Case] = []

    def case(*a, **k):
        out.append(Case(*a, **k))

    # -- files destroyed
    def overwrite(w, b):
        copy(b.run, w, "run")
        return ["train", "--config", DEBUG, "--out", w / "run", "--overwrite", "train.steps_per_increment=abc"]
    case("overwrite-bad-config", "1", "--overwrite with a bad override deletes nothing", overwrite)

    def mixed(w, b):
        (w / "user").mkdir()
        (w / "user" / "backup_2024.tar").write_bytes(b"a user's archive")
        (w / "user" / "photos.idx").write_text("a user's index")
        return ["shards", "build", "--out", w / "user", "--num-images", "120", "--image-size", "32",
                "--min-value-count", "2"]
    case("shards-into-user-folder", "2", "shard build beside a user's .tar/.idx keeps them", mixed, expect=0,
         may_write=["user"], check=lambda w, r: "" if (w / "user/backup_2024.tar").read_bytes() == b"a user's archive"
         and (w / "user/photos.idx").is_file() else "a user file was changed or deleted")

    def full_disk_train(w, b):
        copy(b.shards, w, "shards")
        (w / "full").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(w / "full")], check=True)
        return ["train", "--config", DEBUG, "--out", w / "full" / "run", *train_overrides(w / "shards")]
    case("full-disk-train", "3", "training onto a real 600 kB tmpfs", full_disk_train, may_write=["full", "shards"],
         needs_root=True, check=lambda w, r: "" if "disk is full" in r["stderr"] else "not reported as a full disk")

    def full_disk_shards(w, b):
        (w / "full").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(w / "full")], check=True)
        return ["shards", "build", "--out", w / "full" / "s", "--num-images", "400", "--image-size", "32"]
    case("full-disk-shards", "3", "a shard build onto a real 600 kB tmpfs", full_disk_shards, may_write=["full"],
         needs_root=True, check=lambda w, r: "" if "disk is full" in r["stderr"] and
         not [p for p in (w / "full").rglob("*.tmp")] else "not reported as a full disk, or a temp file was left")

    # -- writes outside the folder given
    def abs_head(w, b):
        run = copy(b.run, w, "run")
        target = str(w / "outside" / "x")

        def rename(s):   # the first head becomes /abs/path/x, its tensors too: a well-formed hostile file
            old = s["heads"][0]
            s["heads"] = [target, *s["heads"][1:]]
            s["frozen"] = [target if h == old else h for h in s["frozen"]]
            s["model"] = {(f"heads.{target}." + k[len(f"heads.{old}."):] if k.startswith(f"heads.{old}.") else k): v
                          for k, v in s["model"].items()}
        damage_checkpoints(run, rename)
        return ["embed", "--run", run, "--shards", b.shards, "--out", w / "emb", "--workers", "0"]
    case("checkpoint-head-abs-path", "4", "a head named /abs/path in the checkpoint", abs_head)

    def embed_json(w, b):
        emb = copy(b.emb, w, "emb")
        meta = json.loads((emb / "embed.json").read_text())
        meta["attributes"] = ["../../outside/x"]
        (emb / "embed.json").write_text(json.dumps(meta))
        return ["index", "--embeddings", emb, "--out", w / "idx"]
    case("embed-json-escape", "5", "embed.json attributes with ../ paths", embed_json)

    def manifest_index(w, b, value):
        shards = copy(b.shards, w, "shards")
        (shards / "train-00000.idx").unlink()
        edit_manifest(shards, lambda d: (d["splits"]["train"]["shards"][0].update(index=value), d)[1])
        return ["eval", "--run", b.run, "--shards", shards, "--json", w / "out" / "e.json"]
    case("manifest-index-relative", "6", "manifest index ../outside/x.sh",
         lambda w, b: manifest_index(w, b, "../outside/x.sh"))
    case("manifest-index-absolute", "6", "manifest index as an absolute path",
         lambda w, b: manifest_index(w, b, str(w / "outside" / "abs.sh")))

    def injected_member(w, b):
        from mclfir_dist.data.shards import write_index
        shards = copy(b.shards, w, "shards")
        tar = first_shard(shards, "train")
        members = shard_members(tar) + [("a.x\ntouch INJECTED\n.txt", b"x")]
        write_shard(tar, members)
        return lambda: write_index(tar, w / "outside" / "x.idx")
    case("tar-member-newline", "6", "a tar member whose name holds a shell line", injected_member)

    # -- wrong numbers
    def labels_99(w, b):
        shards = copy(b.shards, w, "shards")
        _set_labels(shards, "test", np.full(5, 99, "<i4").tobytes())
        return ["eval", "--run", b.run, "--shards", shards, "--json", w / "out" / "e.json"]
    case("labels-outside-vocabulary", "7", "every test .lbl set to 99", labels_99)

    def weights(w, b, fn):
        run = copy(b.run, w, "run")
        damage_checkpoints(run, fn)
        return ["eval", "--run", run, "--shards", b.shards, "--json", w / "out" / "e.json"]
    nan = lambda s: s["model"].update({k: torch.full_like(v, float("nan")) for k, v in s["model"].items()
                                       if v.is_floating_point()})
    case("weights-nan", "8", "checkpoint weights all NaN", lambda w, b: weights(w, b, nan))
    case("weights-int64", "8", "checkpoint weights cast to int64",
         lambda w, b: weights(w, b, lambda s: s["model"].update({k: v.long() for k, v in s["model"].items()})))

    def effnet_export(w, b):
        from safetensors.torch import save_file
        from mclfir_dist.model.backbones import export_state
        from mclfir_dist.retrieval.portable import EXPORT_FORMAT, ExportedModel, load_exported
        config = {"format": EXPORT_FORMAT, "trunk": "efficientnet_lite0", "cut": "full", "image_size": 32,
                  "resize": 36, "resize_ratio": 1.14, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                  "attributes": ["colour"], "head_channels": 16, "embed_dim": 8}
        model = ExportedModel(config)
        tensors = {f"heads.{k}": v.contiguous() for k, v in model.heads.state_dict().items()}
        assert len(export_state(model.trunk)) > 200   # the trunk's tensors, all of them left out below
        (w / "x").mkdir()
        save_file(tensors, str(w / "x" / "model.safetensors"), metadata={"format": EXPORT_FORMAT})
        (w / "x" / "config.json").write_text(json.dumps(config))
        return lambda: load_exported(w / "x")
    case("effnet-export-no-trunk", "9", "EfficientNet export with every trunk.* tensor deleted", effnet_export)

    # -- resume compares configs
    def resume_changed(w, b):
        run = copy(b.run, w, "run")
        return ["train", "--config", DEBUG, "--resume", run, *train_overrides(b.shards), "train.seed=5"]
    case("resume-changed-config", "10", "resume with another seed", resume_changed)

    def resume_auto_overwrite(w, b):
        return ["train", "--config", DEBUG, "--out", w / "run", "--resume", "auto", "--overwrite",
                *train_overrides(b.shards)]
    case("resume-auto-overwrite", "10", "--resume auto with --overwrite", resume_auto_overwrite, expect=-1)

    # -- crashes
    def dali_bad_jpegs(w, b):
        shards = copy(b.shards, w, "shards")
        tar = first_shard(shards, "train")
        members = shard_members(tar)
        jpgs = [i for i, (n, _) in enumerate(members) if n.endswith(".jpg")]
        members[jpgs[0]] = (members[jpgs[0]][0], png_bytes())                  # a PNG named .jpg
        members[jpgs[1]] = (members[jpgs[1]][0], members[jpgs[1]][1][:200])   # a truncated JPEG
        write_shard(tar, members)
        return ["train", "--config", DEBUG, "--out", w / "run", *train_overrides(shards), "data.loader=dali"]
    case("dali-png-and-truncated", "11", "DALI training over a PNG renamed .jpg and a truncated JPEG",
         dali_bad_jpegs, expect=0, may_write=["run", "shards"],
         check=lambda w, r: "" if json.loads((w / "run/results.json").read_text())["complete"] else "run incomplete")

    for n in (3, 4):
        case(f"lbl-{n}-bytes", "12", f"a {n}-byte .lbl", lambda w, b, n=n: (
            _set_labels(copy(b.shards, w, "shards"), "test", b"\x00" * n),
            ["eval", "--run", b.run, "--shards", w / "shards", "--json", w / "out" / "e.json"])[1])

    structures = {"no-splits": lambda d: {k: v for k, v in d.items() if k != "splits"},
                  "no-eval-sets": lambda d: {k: v for k, v in d.items() if k != "eval_sets"},
                  "attributes-string": lambda d: {**d, "attributes": "colour"},
                  "a-list": lambda d: [], "null": lambda d: None,
                  "count-sixty": lambda d: (d["splits"]["train"]["shards"][0].update(count="sixty"), d)[1]}
    for name, fn in structures.items():
        case(f"manifest-{name}", "13", f"manifest: {name.replace('-', ' ')} (shards info)",
             lambda w, b, fn=fn: (edit_manifest(copy(b.shards, w, "shards"), fn), ["shards", "info", w / "shards"])[1])
    case("manifest-no-splits-train", "13", "manifest without splits (train)", lambda w, b: (
        edit_manifest(copy(b.shards, w, "shards"), structures["no-splits"]),
        ["train", "--config", DEBUG, "--out", w / "run", *train_overrides(w / "shards")])[1], may_write=["run"])

    def head_tensor(s):
        key = next(k for k in s["model"] if k.startswith("heads."))
        s["model"][key] = torch.zeros(3, 3)
    fields = {"wrong-shape": head_tensor, "no-heads": lambda s: s.pop("heads"), "no-model": lambda s: s.pop("model"),
              "increment-one": lambda s: s.update(increment="one"),
              "head-dunder-class": lambda s: s.update(heads=["__class__", *s["heads"][1:]])}
    for name, fn in fields.items():
        case(f"checkpoint-{name}", "14", f"checkpoint: {name.replace('-', ' ')} (eval)",
             lambda w, b, fn=fn: weights(w, b, fn))
    case("checkpoint-wrong-shape-export", "14", "checkpoint: wrong shape (export)", lambda w, b: (
        damage_checkpoints(copy(b.run, w, "run"), head_tensor),
        ["export", "--run", w / "run", "--out", w / "x"])[1])

    def resume_fallback(w, b):
        run = copy(b.run, w, "run")
        damage_checkpoints(run, head_tensor, newest_only=True)
        return ["train", "--resume", run]
    case("checkpoint-wrong-shape-resume", "14", "resume falls back past a mis-shaped newest checkpoint",
         resume_fallback, expect=0, may_write=["run"],
         check=lambda w, r: "" if "falling back" in r["log"] + r["stdout"] and json.loads(
             (w / "run/results.json").read_text())["complete"] else "no fallback to the checkpoint before")

    def not_utf8(w, b):
        (w / "c.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
        return ["train", "--config", w / "c.yaml", "--out", w / "run"]
    case("config-not-utf8", "15", "a config with Latin-1 bytes", not_utf8)
    case("config-lr-inf", "15", "optim.lr=inf",
         lambda w, b: ["train", "--config", DEBUG, "--out", w / "run", *train_overrides(b.shards), "optim.lr=inf"])

    def bomb_csv(w, b, skip):
        (w / "imgs").mkdir()
        rows = ["filename,colour"]
        samples = [(n, d) for n, d in shard_members(first_shard(b.shards, "train")) if n.endswith(".jpg")][:24]
        for i, (_, data) in enumerate(samples):
            (w / "imgs" / f"{i}.jpg").write_bytes(data)
            rows.append(f"{i}.jpg,{['red', 'blue'][i % 2]}")
        (w / "imgs" / "bomb.jpg").write_bytes(huge_jpeg_header(samples[0][1]))
        rows.append("bomb.jpg,red")
        (w / "imgs" / "labels.csv").write_text("\n".join(rows) + "\n")
        return ["shards", "build", "--source", "csv", "--csv", w / "imgs" / "labels.csv", "--attributes", "colour",
                "--out", w / "s", "--min-value-count", "2", *(["--skip-bad-rows"] if skip else [])]
    case("pixel-bomb-csv", "16", "a 20000x20000 JPEG in the CSV", lambda w, b: bomb_csv(w, b, False))
    case("pixel-bomb-csv-skip", "16", "the same with --skip-bad-rows: skipped and counted",
         lambda w, b: bomb_csv(w, b, True), expect=0, may_write=["s"],
         check=lambda w, r: "" if [s["file"] for s in json.loads((w / "s/manifest.json").read_text())["skipped_rows"]]
         == ["bomb.jpg"] else "the bomb was not counted as skipped")

    def bomb_shard(w, b):
        shards = copy(b.shards, w, "shards")
        tar = first_shard(shards, "test")
        members = shard_members(tar)
        i = next(i for i, (n, _) in enumerate(members) if n.endswith(".jpg"))
        members[i] = (members[i][0], huge_jpeg_header(members[i][1]))
        write_shard(tar, members)
        return ["eval", "--run", b.run, "--shards", shards, "--json", w / "out" / "e.json"]
    case("pixel-bomb-shard", "16", "a 20000x20000 JPEG header in a test shard: skipped and counted", bomb_shard,
         expect=0, may_write=["out", "shards"],
         check=lambda w, r: "" if json.loads((w / "out/e.json").read_text())["skipped_samples"]["count"] == 1
         else "the bomb was not skipped and counted")

    case("image-size-huge", "17", "data.image_size=10000000", lambda w, b: [
        "train", "--config", DEBUG, "--out", w / "run", *train_overrides(b.shards), "data.image_size=10000000"])
    case("checkpoint-image-size-huge", "17", "a checkpoint whose saved config has image_size 10000000",
         lambda w, b: weights(w, b, lambda s: s["config"]["data"].update(image_size=10000000)))

    # -- using a trained model
    def search_image(w, b, data):
        (w / "q.jpg").write_bytes(data)
        return ["search", "--run", b.run, "--index", b.index, "--attribute", "colour", "--image", w / "q.jpg"]
    case("search-text-file", "18", "search --image on a text file",
         lambda w, b: search_image(w, b, b"just some text\n"))
    case("search-truncated", "18", "search --image on a truncated JPEG", lambda w, b: search_image(
        w, b, [d for n, d in shard_members(first_shard(b.shards, "test")) if n.endswith(".jpg")][0][:300]))
    for k in ("0", "-3"):
        case(f"search-k{k}", "18", f"search --k {k}", lambda w, b, k=k: [
            "search", "--index", b.index, "--attribute", "colour",
            "--key", json.loads((b.shards / "manifest.json").read_text())["splits"]["test"]["keys"][0], "--k", k])

    def huge_k(w, b):
        key = json.loads((b.shards / "manifest.json").read_text())["splits"]["test"]["keys"][0]
        return ["search", "--index", b.index, "--attribute", "colour", "--key", key, "--k", "100000",
                "--sheet", w / "out" / "sheet.png"]

    def sheet_width(w, r):
        from PIL import Image
        with Image.open(w / "out" / "sheet.png") as im:
            return "" if im.width <= 60 * 168 else f"the sheet is {im.width} px wide"
    case("search-k-100000", "18", "search --k 100000 --sheet: every hit listed, the sheet capped", huge_k,
         expect=0, may_write=["out"], check=sheet_width)

    def embed_folder(w, b, files):
        (w / "imgs").mkdir()
        for name, data in files.items():
            (w / "imgs" / name).write_bytes(data)
        return ["embed", "--run", b.run, "--images", w / "imgs", "--out", w / "emb", "--workers", "0"]
    case("embed-empty-folder", "18", "embed an empty folder", lambda w, b: embed_folder(w, b, {}))
    case("embed-only-bad-image", "18", "embed a folder whose one image is bad",
         lambda w, b: embed_folder(w, b, {"bad.jpg": b"\xff\xd8 not really"}))

    def other_model(w, b):
        run = copy(b.run, w, "run")
        damage_checkpoints(run, lambda s: s["model"].update({k: v + 0.01 if v.is_floating_point() else v
                                                             for k, v in s["model"].items()}))
        (w / "q.jpg").write_bytes([d for n, d in shard_members(first_shard(b.shards, "test")) if n.endswith(".jpg")][0])
        return ["search", "--run", run, "--index", b.index, "--attribute", "colour", "--image", w / "q.jpg"]
    case("search-other-model", "18", "an index searched with another run's model", other_model)

    def embed_folder_damage(w, b, fn):
        emb = copy(b.emb, w, "emb")
        fn(emb)
        return ["index", "--embeddings", emb, "--out", w / "idx"]
    case("embed-npy-object-array", "18", "an .npy holding a pickled object array", lambda w, b: embed_folder_damage(
        w, b, lambda e: np.save(e / "colour.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)))
    case("embed-npy-nan", "18", "an .npy of NaN vectors", lambda w, b: embed_folder_damage(
        w, b, lambda e: np.save(e / "colour.npy", np.full_like(np.load(e / "colour.npy"), np.nan))))
    case("embed-keys-short", "18", "keys.txt with fewer lines than the matrices have rows",
         lambda w, b: embed_folder_damage(w, b, lambda e: (e / "keys.txt").write_text(
             "".join(k + "\n" for k in (e / "keys.txt").read_text().split()[:5]))))

    def faiss_damaged(w, b):
        index = copy(b.index, w, "idx")
        data = (index / "colour.faiss").read_bytes()
        (index / "colour.faiss").write_bytes(data[: len(data) // 3])
        key = (index / "keys.txt").read_text().split()[0]
        return ["search", "--index", index, "--attribute", "colour", "--key", key]
    case("faiss-file-truncated", "18", "a truncated .faiss file", faiss_damaged)

    def relative_images(w, b):
        (w / "imgs").mkdir()
        for i, (n, d) in enumerate([(n, d) for n, d in shard_members(first_shard(b.shards, "test"))
                                    if n.endswith(".jpg")][:6]):
            (w / "imgs" / f"{i}.jpg").write_bytes(d)
        os.chdir(w)
        return ["embed", "--run", b.run, "--images", "imgs", "--out", "emb", "--workers", "0"]

    def stored_absolute(w, r):
        os.chdir(ROOT)
        locations = (w / "emb" / "locations.txt").read_text().split()
        return "" if locations and all(Path(p).is_absolute() and Path(p).is_file() for p in locations) \
            else f"locations stored relative: {locations[:2]}"
    case("embed-relative-images", "18", "embed --images with a relative path stores absolute locations",
         relative_images, expect=0, may_write=["emb"], check=stored_absolute)

    case("no-trackers", "19", "train.trackers=[] finishes", lambda w, b: [
        "train", "--config", DEBUG, "--out", w / "run", *train_overrides(b.shards), "train.trackers=[]"],
         expect=0, may_write=["run"],
         check=lambda w, r: "" if (w / "run/checkpoints/increment_01.pt").is_file() else "no checkpoint")
    case("bad-override", "20", "a malformed override is named, not the config file", lambda w, b: [
        "train", "--config", DEBUG, "--out", w / "run", "train.increments=[{name: a"],
         check=lambda w, r: "" if "override" in r["stderr"] and "debug_cpu.yaml" not in r["stderr"]
         else "the config file was blamed")
    case("env-interpolation", "21", "${oc.env:SECRET} in an override", lambda w, b: [
        "train", "--config", DEBUG, "--out", w / "run", *train_overrides(b.shards), "name=${oc.env:HOME}"],
         check=lambda w, r: "" if not (w / "run").exists() else "a run folder was written")
    trust_cases(case)
    return out


def trust_cases(case) -> None:
    """The trust-boundary issue's reproductions (items 40.N): a downloaded run, planted links, a bypassed resume
    check, duplicate keys, a raising plug-in, a huge export config, a FIFO query, a reused increment name."""
    def run_plugin(w, b):
        run = copy(b.run, w, "run")
        (w / "evil_plugin.py").write_text(f"open({str(w / 'outside' / 'RAN')!r}, 'w').write('ran')\n")
        os.chdir(w)   # a plug-in file in the working directory, as in the report
        damage_checkpoints(run, lambda s: s["config"].update(plugins=["evil_plugin"]))
        return ["eval", "--run", run, "--shards", b.shards]
    case("trust-run-plugin", "40.1", "a checkpoint naming a plug-in in the working directory runs no code",
         run_plugin, check=lambda w, r: "" if "--trust-run-plugins" in r["stderr"]
         else "the refusal does not name --trust-run-plugins")

    def lock_link(w, b):
        run = copy(b.run, w, "run")
        (w / "user_notes.txt").write_text("a user's file\n")
        (run / ".lock").symlink_to(w / "user_notes.txt")
        return ["train", "--resume", run, "train.trackers=[]"]
    case("trust-lock-symlink", "40.2", "RUN/.lock planted as a link to a user's file", lock_link, expect=-1,
         may_write=["run"])

    def index_tmp_link(w, b):
        index = copy(b.index, w, "idx")
        (w / "user_notes.txt").write_text("a user's file\n")
        (index / ".colour.faiss.tmp").symlink_to(w / "user_notes.txt")
        key = (index / "keys.txt").read_text().split()[0]
        return ["index", "update", "--index", index, "--remove", key]
    case("trust-index-tmp-symlink", "40.3", "a link planted at an index's old temp name is not written through",
         index_tmp_link, expect=0, may_write=["idx"],
         check=lambda w, r: "" if (w / "user_notes.txt").read_text() == "a user's file\n" else "written through")

    case("trust-resume-bypass", "40.6", "--resume with optim.lr changed behind a new reference batch", lambda w, b: [
        "train", "--resume", copy(b.run, w, "run"), "optim.lr=5", "train.reference_batch_doublets=32"],
         may_write=["run"], check=lambda w, r: "" if "optim.lr" in r["stderr"] else "optim.lr not named")

    def duplicate_keys(w, b):
        emb = copy(b.emb, w, "emb")
        keys = (emb / "keys.txt").read_text().split()
        (emb / "keys.txt").write_text("".join(k + "\n" for k in [keys[1]] + keys[1:]))
        return ["index", "--embeddings", emb, "--out", w / "idx"]
    case("trust-duplicate-keys", "40.7", "an embeddings folder whose keys.txt repeats a key", duplicate_keys)

    def raising_plugin(w, b):
        (w / "raising_plugin.py").write_text("raise RuntimeError('this plug-in is broken')\n")
        os.chdir(w)
        return ["--plugins", "raising_plugin", "train", "--config", DEBUG, "--out", w / "run"]
    case("trust-plugin-raises", "40.10", "a plug-in that raises something other than ImportError", raising_plugin,
         check=lambda w, r: "" if "raising_plugin" in r["stderr"] else "the plug-in not named")

    def huge_export(w, b):
        export = copy(b.export, w, "export")
        edit = json.loads((export / "config.json").read_text())
        edit["embed_dim"] = 200000
        (export / "config.json").write_text(json.dumps(edit))
        from mclfir_dist import Retriever
        return lambda: Retriever.from_export(export)
    case("trust-export-config", "40.10", "an export whose config.json asks for embed_dim 200000", huge_export)

    def fifo_query(w, b):
        os.mkfifo(w / "q.jpg")
        return ["search", "--run", b.run, "--index", b.index, "--attribute", "colour", "--image", w / "q.jpg"]
    case("trust-fifo-image", "40.10", "a FIFO as the query image", fifo_query,
         check=lambda w, r: "" if "FIFO" in r["stderr"] else "not named a FIFO")

    case("trust-increment-name-reused", "40.10", "a new increment named like an old one", lambda w, b: [
        "train", "--config", DEBUG, "--out", w / "run", *train_overrides(b.shards),
        "train.increments=[{name: a, attributes: [colour]},{name: a, attributes: [garment_length]}]"],
         check=lambda w, r: "" if "'a'" in r["stderr"] or " a " in r["stderr"] else "the name not given")


# ---------------------------------------------------------------- the table

PROGRESS = re.compile(r"(img|it)/s\]|\d+img \[")   # tqdm's progress bars share stderr


def one_line(text: str) -> bool:
    lines = [l for l in text.splitlines() if l.strip() and "Warning" not in l and not l.startswith("  warnings.warn")
             and not PROGRESS.search(l)]
    return len(lines) == 1


def run_case(case: Case, base: Base, root: Path) -> dict:
    w = root / case.id
    w.mkdir(parents=True)
    (w / "outside").mkdir()
    started = time.time()
    try:
        prepared = case.prepare(w, base)
    except Exception:
        return {"id": case.id, "ok": False, "why": "setting up the case failed: " + traceback.format_exc(limit=3),
                "seconds": 0.0, "line": ""}
    skip = [w / d for d in case.may_write]
    before = snapshot(w, skip)
    result = run_call(prepared) if callable(prepared) else run_cli(prepared)
    os.chdir(ROOT)   # cases that run from their own folder (plug-ins beside them) do not leak it to the next
    problems = []
    if result["traceback"]:
        problems.append("a traceback")
    if case.expect == -1 and result["rc"] == 0 or case.expect != -1 and result["rc"] != case.expect:
        problems.append(f"exit {result['rc']}, expected {'non-zero' if case.expect == -1 else case.expect}")
    if result["rc"] != 0 and not one_line(result["stderr"]):
        problems.append(f"{len(result['stderr'].splitlines())} lines on stderr")
    after = snapshot(w, skip)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:
        problems.append(f"files changed outside the run: {changed[:3]}")
    if any((w / "outside").iterdir()):
        problems.append(f"wrote outside: {[p.name for p in (w / 'outside').iterdir()]}")
    if Path("/tmp/INJECTED").exists() or (w / "INJECTED").exists():
        problems.append("an injected command ran")
    if case.check is not None and not problems:
        try:
            extra = case.check(w, result)
        except Exception as e:
            extra = f"the check failed: {type(e).__name__}: {e}"
        if extra:
            problems.append(extra)
    line = next((l for l in result["stderr"].splitlines() if l.strip() and not PROGRESS.search(l)), "")
    return {"id": case.id, "item": case.item, "what": case.what, "ok": not problems, "why": "; ".join(problems),
            "rc": result["rc"], "line": line, "seconds": round(time.time() - started, 1)}


def main_script() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", help="work folder (default: a new temp folder, removed unless --keep)")
    p.add_argument("--only", default="", help="comma-separated case ids")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--json", help="also write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(2)
    root = Path(args.work or tempfile.mkdtemp(prefix="hostile_"))
    root.mkdir(parents=True, exist_ok=True)
    chosen = [c for c in cases() if not args.only or c.id in args.only.split(",")]
    rows = []
    mounts = []
    try:
        started = time.time()
        base = make_base(root / "_base")
        print(f"base run ready in {time.time() - started:.0f} s under {root}", flush=True)
        for case in chosen:
            if case.needs_root and os.geteuid() != 0:
                rows.append({"id": case.id, "item": case.item, "what": case.what, "ok": False,
                             "why": "needs root (a real tmpfs); CI runs as root", "rc": None, "line": "", "seconds": 0})
                continue
            row = run_case(case, base, root)
            if case.needs_root:
                mounts.append(root / case.id / "full")
            rows.append(row)
            print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['id']:32s} {row['seconds']:5.1f}s  "
                  f"{row['why'] or row['line'][:110]}", flush=True)
    finally:
        os.chdir(ROOT)
        for m in mounts:
            subprocess.run(["umount", str(m)], capture_output=True)
        if not args.keep and not args.work:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print("| item | case | exit | result | first line of stderr |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['item']} | {r['id']} | {r['rc']} | {'ok' if r['ok'] else 'FAIL: ' + r['why']} | "
              f"{r['line'][:140].replace('|', '/')} |")
    failed = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} cases hold")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main_script())
