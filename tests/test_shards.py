"""Shard round trip: synthetic and CSV sources, DALI index files, determinism, bad input."""
import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_build_config
from mclfir_dist.config import ShardBuildConfig
from mclfir_dist.data import synthetic
from mclfir_dist.data.manifest import Manifest
from mclfir_dist.data.shards import BadInputError, build_from_config, read_csv_samples
from mclfir_dist.data.streams import decode_labels, iter_shard


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_synthetic_round_trip(tiny_shards):
    m = Manifest.load(tiny_shards)
    assert m.attributes == list(synthetic.ATTRIBUTES)
    assert len(m.attributes) >= 4 and all(3 <= len(m.values(a)) <= 6 for a in m.attributes)
    total = 0
    keys_by_split = {}
    for split in ("train", "val", "test"):
        keys = []
        for tar, n in zip(m.shard_files(split), m.shard_counts(split)):
            samples = list(iter_shard(tar))
            assert len(samples) == n
            for s in samples:
                lab = decode_labels(s["lbl"])
                assert lab.shape == (len(m.attributes),)
                Image.open(io.BytesIO(s["jpg"])).verify()
                keys.append(s["__key__"])
        assert len(keys) == m.count(split)
        keys_by_split[split] = set(keys)
        total += len(keys)
    assert total == 400
    assert not (keys_by_split["train"] & keys_by_split["test"]) and not (keys_by_split["val"] & keys_by_split["test"])
    for split in ("val", "test"):
        for a in m.attributes:
            qc = m.eval_set(split, a)
            assert qc["query"] and qc["candidate"]
            assert not set(qc["query"]) & set(qc["candidate"])
            assert set(qc["query"]) | set(qc["candidate"]) <= keys_by_split[split]


def test_index_files_match_dali_wds2idx(tiny_shards, tmp_path):
    from wds2idx import IndexCreator
    m = Manifest.load(tiny_shards)
    tar, idx = m.shard_files("train")[0], m.index_files("train")[0]
    ref = tmp_path / "ref.idx"
    with IndexCreator(str(tar), str(ref), verbose=False) as ic:
        ic.create_index()
    ours = idx.read_text().split("\n")
    theirs = ref.read_text().split("\n")
    assert ours[0] == theirs[0]
    # wds2idx (GNU tar path) records the same offsets and sizes per component
    strip = lambda line: line.split()
    assert [strip(l) for l in ours if l] == [strip(l) for l in theirs if l]


def test_rebuild_is_byte_identical(tmp_path):
    cfg = tiny_build_config(num_images=120)
    build_from_config(cfg, tmp_path / "a")
    build_from_config(cfg, tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def _make_csv(tmp_path, n=40, bad=None):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    rows = []
    rng = np.random.default_rng(0)
    colours = ["Red", "Blue"]
    for i in range(n):
        colour = colours[i % 2]
        arr = np.zeros((20, 16, 3), np.uint8) + np.array([200, 20, 20] if colour == "Red" else [20, 20, 200], np.uint8)
        arr = np.clip(arr + rng.integers(0, 30, arr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(img_dir / f"{i}.jpg", quality=90)
        rows.append({"filename": f"images/{i}.jpg", "id": str(i), "baseColour": colour, "gender": ["Men", "Women"][i % 3 == 0]})
    rows.append({"filename": "images/rare.jpg", "id": "rare", "baseColour": "Green", "gender": "Other"})
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img_dir / "rare.jpg")
    if bad == "missing":
        rows.append({"filename": "images/nope.jpg", "id": "x", "baseColour": "Red", "gender": "Men"})
    if bad == "corrupt":
        (img_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        rows.append({"filename": "images/broken.jpg", "id": "y", "baseColour": "Red", "gender": "Men"})
    if bad == "empty":
        rows.append({"filename": "images/0.jpg", "id": "z", "baseColour": "", "gender": "Men"})
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["filename", "id", "baseColour", "gender"])
        w.writeheader()
        w.writerows(rows)
    return path


def _csv_cfg(path, attrs=("baseColour", "gender"), skip=False):
    cfg = ShardBuildConfig(source="csv", min_value_count=3, samples_per_shard=16)
    cfg.csv.csv, cfg.csv.image_root, cfg.csv.attributes = str(path), str(path.parent), list(attrs)
    cfg.csv.key_column, cfg.csv.skip_bad_rows = "id", skip
    return cfg


def test_csv_round_trip_drops_rare_values(tmp_path):
    path = _make_csv(tmp_path)
    m = build_from_config(_csv_cfg(path), tmp_path / "out")
    assert m.values("baseColour") == ["Blue", "Red"]
    assert m.data["attributes"][0]["dropped_values"] == {"Green": 1}
    assert sum(m.count(s) for s in ("train", "val", "test")) == 40  # 'rare' has no usable label left
    col = m.attribute_index("baseColour")
    for tar in m.shard_files("train"):
        for s in iter_shard(tar):
            lab = decode_labels(s["lbl"])
            img = np.asarray(Image.open(io.BytesIO(s["jpg"])))
            assert (img[..., 0].mean() > img[..., 2].mean()) == (m.values("baseColour")[lab[col]] == "Red")
    # deterministic
    m2 = build_from_config(_csv_cfg(path), tmp_path / "out2")
    assert digest(tmp_path / "out") == digest(tmp_path / "out2")


@pytest.mark.parametrize("bad,needle", [("missing", "nope.jpg"), ("corrupt", "broken.jpg"), ("empty", "baseColour")])
def test_csv_bad_rows_fail_with_row_and_file(tmp_path, bad, needle):
    path = _make_csv(tmp_path, bad=bad)
    with pytest.raises(BadInputError) as e:
        build_from_config(_csv_cfg(path), tmp_path / "out")
    assert needle in str(e.value) and "labels.csv:43" in str(e.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("bad", ["missing", "corrupt", "empty"])
def test_csv_bad_rows_skipped_under_flag(tmp_path, bad):
    path = _make_csv(tmp_path, bad=bad)
    m = build_from_config(_csv_cfg(path, skip=True), tmp_path / "out")
    assert len(m.data["skipped_rows"]) == 1 and m.data["skipped_rows"][0]["row"] == 43
    assert m.data["source"]["skipped"] == 1


def test_csv_unknown_column(tmp_path):
    path = _make_csv(tmp_path)
    with pytest.raises(BadInputError, match="unknown column 'sleeve'"):
        read_csv_samples(path, tmp_path, ["baseColour", "sleeve"])


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    from mclfir_dist.cli import main
    path = _make_csv(tmp_path, bad="missing")
    rc = main(["shards", "build", "--source", "csv", "--csv", str(path), "--attributes", "baseColour",
               "--min-value-count", "3", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.jpg" in err and "Traceback" not in err


def _append_raw_line(path, raw: bytes):
    with open(path, "ab") as f:
        f.write(raw)


def test_non_utf8_bytes_name_the_line_and_are_skipped_under_the_flag(tmp_path):
    path = _make_csv(tmp_path)                       # header + 41 rows: the next line is 43
    _append_raw_line(path, b"images/0.jpg,caf\xe9,Red,Men\r\n")
    with pytest.raises(BadInputError, match=r"labels.csv:43: column 'id' is not valid UTF-8"):
        build_from_config(_csv_cfg(path), tmp_path / "out")
    m = build_from_config(_csv_cfg(path, skip=True), tmp_path / "out")
    assert [r["row"] for r in m.data["skipped_rows"]] == [43]


def test_non_utf8_bytes_in_an_unused_column_do_not_stop_the_build(tmp_path):
    path = _make_csv(tmp_path)
    _append_raw_line(path, b"images/1.jpg,extra,Blue,Wom\xe9n\r\n")   # 'gender' is not used below
    m = build_from_config(_csv_cfg(path, attrs=("baseColour",)), tmp_path / "out")
    assert not m.data["skipped_rows"]   # the extra row is a copy of photo 1 with its label: one of them is kept
    assert sum(m.count(s) for s in ("train", "val", "test")) == 40 and m.data["deduplicated"]["copies_removed"] == 1


def test_byte_identical_photos_never_cross_splits(tmp_path):
    """Copies of one photo (74 groups in the real catalogue) go to one split together."""
    path = _make_csv(tmp_path, n=60)
    img_dir = tmp_path / "images"
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        for i in range(20):   # 20 extra copies of 5 photos (4 each), under new ids
            src = i % 5
            (img_dir / f"copy{i}.jpg").write_bytes((img_dir / f"{src}.jpg").read_bytes())
            w.writerow([f"images/copy{i}.jpg", f"copy{i}", ["Red", "Blue"][src % 2], "Men"])
    cfg = _csv_cfg(path)
    cfg.deduplicate = False
    m = build_from_config(cfg, tmp_path / "out")
    split_of = {k: sp for sp in ("train", "val", "test") for k in m.keys(sp)}
    for src in range(5):
        group = {split_of[str(src)]} | {split_of[f"copy{i}"] for i in range(src, 20, 5)}
        assert len(group) == 1, (src, group)
    assert m.data["duplicate_groups"] == {"groups": 5, "images": 25, "across_splits": 0}
    # by default: one copy of each agreeing group is kept; a group whose labels conflict is dropped whole
    # (photos 0 and 3 are labelled Women, their copies Men)
    m = build_from_config(_csv_cfg(path), tmp_path / "dedup")
    everything = [k for sp in ("train", "val", "test") for k in m.keys(sp)]
    assert len(everything) == len(set(everything))
    for src in (1, 2, 4):
        assert sum(k in everything for k in [str(src)] + [f"copy{i}" for i in range(src, 20, 5)]) == 1, src
    for src in (0, 3):
        assert not any(k in everything for k in [str(src)] + [f"copy{i}" for i in range(src, 20, 5)]), src
    dedup = m.data["deduplicated"]
    assert dedup["copies_removed"] == 12 and len(dedup["kept_and_removed"]) == 3
    assert sorted(sorted(g) for g in dedup["conflicting_groups_dropped"]) == sorted(
        sorted([str(s)] + [f"copy{i}" for i in range(s, 20, 5)]) for s in (0, 3))


def test_published_splits_with_a_query_that_is_also_a_candidate_are_refused():
    from mclfir_dist.data.shards import check_splits
    splits = {"train": ["a"], "val": [], "test": ["b", "c"]}
    eval_sets = {"test": {"colour": {"query": ["b"], "candidate": ["b", "c"]}}}
    with pytest.raises(BadInputError, match="both query and candidate"):
        check_splits(splits, eval_sets, {})
    with pytest.raises(BadInputError, match="both the train and the test split"):
        check_splits({"train": ["a"], "test": ["a"]}, {}, {})


def test_the_remote_cache_evicts_the_least_recently_used_files_of_other_sets(tmp_path, monkeypatch):
    import os
    from mclfir_dist.data import remote
    monkeypatch.setattr(remote, "SETTINGS", remote.Settings(cache_dir=str(tmp_path), cache_max_gb=2.5e-6))  # 2.5 kB
    current, other = tmp_path / "current", tmp_path / "other"
    for folder in (current, other):
        folder.mkdir()
    for i, folder in enumerate([other, other, other, current]):
        f = folder / f"s{i}.tar"
        f.write_bytes(b"x" * 1000)
        os.utime(f, (1000 + i, 1000 + i))   # s0 oldest
    (other / "manifest.json").write_text("{}")
    remote.evict(keep=current)
    left = sorted(p.name for p in tmp_path.glob("*/*"))
    assert left == ["manifest.json", "s2.tar", "s3.tar"]   # the two oldest of the other set went; manifests stay
    assert remote.is_url("s3://b/p/") and remote.is_url("https://h/x/") and not remote.is_url("shards/x")
