"""Converters, on fixture files written in the published formats with real JPEGs."""
import json

import numpy as np
import pytest
from PIL import Image

from mclfir_dist.cli import main
from mclfir_dist.data.converters import ASEN_DATASETS
from mclfir_dist.data.manifest import Manifest
from mclfir_dist.data.shards import BadInputError
from mclfir_dist.data.streams import decode_labels, iter_shard


def _jpeg(path, seed):
    arr = np.random.default_rng(seed).integers(0, 255, (12, 10, 3)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=90)


def write_asen_fixture(root, dataset="fashionai"):
    attrs = ASEN_DATASETS[dataset]
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").write_text(json.dumps({"ATTRIBUTES": [a for a, _ in attrs]}))
    truth = {}
    for split, n in (("train", 12), ("valid", 8), ("test", 8)):
        names = [f"img/{split}/{i}.jpg" for i in range(n)]
        for i, rel in enumerate(names):
            _jpeg(root / rel, hash((split, i)) % 1000)
        (root / f"filenames_{split}.txt").write_text("\n".join(names) + "\n")
        if split == "train":
            lines = []
            for i in range(n):
                a, b = i % len(attrs), (i + 1) % len(attrs)
                va, vb = i % attrs[a][1], (2 * i) % attrs[b][1]
                lines.append(f"{i} {a} {va} {b} {vb}")
                truth[(split, i)] = {a: va, b: vb}
            (root / "label_train.txt").write_text("\n".join(lines) + "\n")
        else:
            q, c = [], []
            for i in range(n):
                a, v = 1, i % 2  # sleeve_length (fashionai) values 0/1
                (q if i < 3 else c).append(f"{i} {a} {v}")
                truth[(split, i)] = {a: v}
            (root / f"query_{split}.txt").write_text("\n".join(q) + "\n")
            (root / f"candidate_{split}.txt").write_text("\n".join(c) + "\n")
    return truth


def test_asen_fashionai_round_trip(tmp_path):
    root = tmp_path / "fashionai"
    truth = write_asen_fixture(root)
    assert main(["shards", "convert", "fashionai", "--root", str(root), "--out", str(tmp_path / "out")]) == 0
    m = Manifest.load(tmp_path / "out")
    assert m.attributes == [a for a, _ in ASEN_DATASETS["fashionai"]]
    assert [len(m.values(a)) for a in m.attributes] == [n for _, n in ASEN_DATASETS["fashionai"]]
    assert (m.count("train"), m.count("val"), m.count("test")) == (12, 8, 8)
    qc = m.eval_set("test", "sleeve_length")
    assert qc["query"] == ["test0000000", "test0000001", "test0000002"] and len(qc["candidate"]) == 5
    split_tag = {"train": "train", "val": "valid", "test": "test"}
    for split in ("train", "val", "test"):
        for tar in m.shard_files(split):
            for s in iter_shard(tar):
                lab = decode_labels(s["lbl"])
                idx = int(s["__key__"][len(split):])
                expect = truth[(split_tag[split], idx)]
                assert {a: int(v) for a, v in enumerate(lab) if v >= 0} == expect


@pytest.mark.parametrize("dataset", ["darn", "deepfashion"])
def test_asen_attribute_lists(tmp_path, dataset):
    root = tmp_path / dataset
    write_asen_fixture(root, dataset)
    from mclfir_dist.data.converters import convert_asen
    m = convert_asen(root, dataset, tmp_path / "out")
    assert len(m.attributes) == len(ASEN_DATASETS[dataset])


def test_asen_bad_lines_name_file_and_line(tmp_path):
    root = tmp_path / "fa"
    write_asen_fixture(root)
    (root / "query_test.txt").write_text("0 1 0\n1 99 0\n")
    from mclfir_dist.data.converters import convert_asen
    with pytest.raises(BadInputError, match=r"query_test.txt:2: attribute index 99"):
        convert_asen(root, "fashionai", tmp_path / "out")


def test_zappos_csn_value_classes_from_triplets(tmp_path):
    root = tmp_path / "zap"
    files = [f"img/{i}.jpg" for i in range(30)]
    for i, f in enumerate(files):
        _jpeg(root / f, i)
    (root / "filenames.json").write_text(json.dumps(files))
    split_ids = {"train": range(0, 18), "val": range(18, 24), "test": range(24, 30)}
    truth = {}
    for cond in ("class", "closure", "gender", "heel"):
        for split, ids in split_ids.items():
            ids = list(ids)
            lines = []
            for j, a in enumerate(ids):  # value = parity; c shares a's value, b does not
                same = [x for x in ids if x % 2 == a % 2]  # link each image to the next of its class
                diff = [x for x in ids if x % 2 != a % 2]
                lines.append(f"{a} {diff[j % len(diff)]} {same[(same.index(a) + 1) % len(same)]}")
                truth[a] = a % 2
            (root / f"{cond}_tripletlist_{split}.txt").write_text("\n".join(lines) + "\n")
    from mclfir_dist.data.converters import convert_zappos_csn
    from mclfir_dist.config import ShardBuildConfig
    m = convert_zappos_csn(root, tmp_path / "out", cfg=ShardBuildConfig(min_value_count=2))
    assert m.attributes == ["class", "closure", "gender", "heel"]
    assert (m.count("train"), m.count("val"), m.count("test")) == (18, 6, 6)
    for split in ("train", "val", "test"):
        for tar in m.shard_files(split):
            for s in iter_shard(tar):
                i = int(s["__key__"][3:])
                lab = decode_labels(s["lbl"])
                # same parity <=> same value class, within a split
                assert lab[0] >= 0
                for tar2 in m.shard_files(split):
                    for s2 in iter_shard(tar2):
                        j = int(s2["__key__"][3:])
                        assert (decode_labels(s2["lbl"])[0] == lab[0]) == (truth[i] == truth[j])


def test_asen_refuses_a_file_listed_in_two_splits_and_overlapping_query_candidate(tmp_path):
    from mclfir_dist.data.converters import convert_asen
    root = tmp_path / "fa"
    write_asen_fixture(root)
    names = (root / "filenames_test.txt").read_text().splitlines()
    (root / "filenames_test.txt").write_text("\n".join(["img/train/0.jpg"] + names[1:]) + "\n")
    with pytest.raises(BadInputError, match="img/train/0.jpg' is listed in both the train and the test split"):
        convert_asen(root, "fashionai", tmp_path / "out")
    write_asen_fixture(root)
    with open(root / "candidate_test.txt", "a") as f:
        f.write("0 1 0\n")   # image 0 is already a query of sleeve_length
    with pytest.raises(BadInputError, match="both query and candidate"):
        convert_asen(root, "fashionai", tmp_path / "out2")
