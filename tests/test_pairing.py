"""Doublet batching and per-rank stream partitioning."""
import numpy as np
import pytest
import torch

from conftest import needs
from mclfir_dist.data.manifest import Manifest
from mclfir_dist.data.pairing import DoubletBatcher, positive_index
from mclfir_dist.data.streams import iter_partition


def fake_samples(n, n_attr=2, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        lab = rng.integers(-1, 3, size=n_attr)
        yield {"key": f"k{i}", "labels": lab, "image": torch.full((3, 2, 2), float(i))}


def test_every_anchor_has_a_positive_and_tasks_are_balanced():
    batcher = DoubletBatcher([0, 1], batch_doublets=6)
    batches = list(batcher.batches(fake_samples(500)))
    assert len(batches) > 5
    for b in batches:
        assert b["images"].shape[0] == 12
        pos = positive_index(12)
        assert torch.equal(b["value"], b["value"][pos])
        assert torch.equal(b["task"], b["task"][pos])
        assert (b["value"] >= 0).all()
        assert (b["task"] == 0).sum() == 6 and (b["task"] == 1).sum() == 6
        assert len(set(b["keys"])) == 12  # an image is never its own positive


def test_rotate_gives_each_batch_one_attribute_in_turn():
    """data.task_sampling=rotate (static_joint): every row of a batch competes with 2B-1 rows of its own
    attribute, as in a one-attribute increment."""
    batcher = DoubletBatcher([0, 1, 2], batch_doublets=6, rotate=True)
    batches = list(batcher.batches(fake_samples(900, n_attr=3)))
    assert len(batches) > 9
    for i, b in enumerate(batches):
        assert b["images"].shape[0] == 12 and (b["task"] == i % 3).all()
        pos = positive_index(12)
        assert torch.equal(b["value"], b["value"][pos]) and (b["value"] >= 0).all()
        assert len(set(b["keys"])) == 12


@pytest.mark.parametrize("world,workers", [(2, 1), (2, 2), (3, 1), (8, 1)])
def test_streams_partition_each_epoch(tiny_shards, world, workers):
    m = Manifest.load(tiny_shards)
    shards = m.shard_files("train")
    n_streams = world * workers
    for epoch in (0, 1):
        seen = []
        for stream in range(n_streams):
            seen += [s["__key__"] for s in iter_partition(shards, stream, n_streams, seed=5, epoch=epoch)]
        assert len(seen) == len(set(seen)) == m.count("train")


def test_epochs_reshuffle(tiny_shards):
    m = Manifest.load(tiny_shards)
    order = lambda e: [s["__key__"] for s in iter_partition(m.shard_files("train"), 0, 2, seed=5, epoch=e)]
    assert order(0) != order(1) or len(m.shard_files("train")) < 3


@pytest.mark.parametrize("n_streams", [1, 8, 48])
def test_no_image_is_its_own_positive_across_epochs_and_streams(n_streams):
    """Property test: many epochs over a small labelled set, split over many streams (ranks x workers),
    each stream's batcher persisting across epochs as the loaders' does. A sample still pending at the
    end of an epoch must not pair with its own next-epoch copy."""
    import random
    rng = np.random.default_rng(n_streams)
    keys = [f"img{i:04d}" for i in range(240)]
    labels = {k: rng.integers(-1, 4, size=3) for k in keys}
    self_pairs = doublets = 0
    for stream in range(n_streams):
        mine = keys[stream::n_streams] if n_streams <= len(keys) else keys
        batcher = DoubletBatcher([0, 1, 2], batch_doublets=3)

        def epochs():
            for epoch in range(12):
                order = list(mine)
                random.Random(epoch * 1000 + stream).shuffle(order)
                for k in order:
                    yield {"key": k, "labels": labels[k], "image": torch.zeros(1)}
        for b in batcher.batches(epochs()):
            half = len(b["keys"]) // 2
            for anchor, positive in zip(b["keys"][:half], b["keys"][half:]):
                doublets += 1
                self_pairs += anchor == positive
    assert doublets > 100
    assert self_pairs == 0


@pytest.mark.parametrize("loader", ["torch", "torch_gpu", pytest.param("dali", marks=needs("dali"))])
def test_every_loader_honours_task_sampling_rotate(tiny_shards, loader):
    import itertools
    from mclfir_dist.config import DataConfig
    from mclfir_dist.data import build_train_loader
    m = Manifest.load(tiny_shards)
    cfg = DataConfig(image_size=32, batch_doublets=8, num_workers=0, task_sampling="rotate", dali_threads=1)
    batches = list(itertools.islice(iter(build_train_loader(cfg, m, ["colour", "garment_length"], 0, 1, 0,
                                                            loader)), 4))
    assert [sorted(set(b["task"].tolist())) for b in batches] == [[0], [1], [0], [1]]


def test_label_noise_replaces_the_asked_fraction_with_wrong_values_fixed_per_image():
    from mclfir_dist.data.pairing import LabelNoise
    noise = LabelNoise(0.2, seed=3, sizes={0: 5, 1: 4})
    rng = np.random.default_rng(0)
    labels = {f"k{i}": rng.integers(-1, 4, size=3) for i in range(5000)}
    noisy = {k: noise(k, v) for k, v in labels.items()}
    for c in (0, 1):
        labelled = [k for k, v in labels.items() if v[c] >= 0]
        changed = [k for k in labelled if noisy[k][c] != labels[k][c]]
        assert 0.18 < len(changed) / len(labelled) < 0.22                      # about the fraction asked
        assert all(0 <= noisy[k][c] < (5, 4)[c] for k in changed)             # a value of the vocabulary
    assert all(noisy[k][2] == v[2] for k, v in labels.items())                # a column not named is untouched
    assert all((noisy[k][labels[k] < 0] == -1).all() for k in labels)         # unlabelled stays unlabelled
    # the same image gets the same wrong label every time (an epoch, a rank); another seed draws others
    assert all(np.array_equal(noise(k, v), noisy[k]) for k, v in list(labels.items())[:200])
    other = LabelNoise(0.2, seed=4, sizes={0: 5, 1: 4})
    assert any(not np.array_equal(other(k, v), noisy[k]) for k, v in labels.items())
    assert all(np.array_equal(LabelNoise(0.0, 3, {0: 5})(k, v), v) for k, v in list(labels.items())[:50])


def test_the_batcher_pairs_on_the_noisy_labels(tiny_shards):
    """Doublets are formed on the noisy labels (a mislabelled image pairs with its wrong class), and a batch
    hands them on; data.label_noise reaches the torch loader through the config."""
    from mclfir_dist.config import DataConfig
    from mclfir_dist.data import build_train_loader
    from mclfir_dist.data.pairing import LabelNoise, label_noise
    manifest = Manifest.load(tiny_shards)
    col = manifest.attribute_index("colour")
    cfg = DataConfig(shards=str(tiny_shards), image_size=32, batch_doublets=8, num_workers=0, label_noise=0.5,
                     label_noise_seed=1)
    noise = label_noise(cfg, manifest, [col])
    assert isinstance(noise, LabelNoise) and noise.sizes == {col: len(manifest.values("colour"))}
    clean = {}
    from mclfir_dist.data.streams import decode_labels, iter_shard
    for shard in manifest.shard_files("train"):
        clean.update({s["__key__"]: decode_labels(s["lbl"]) for s in iter_shard(shard)})
    batch = next(iter(build_train_loader(cfg, manifest, ["colour"], 0, 1, seed=0)))
    values = batch["value"].tolist()
    expected = [int(noise(k, clean[k])[col]) for k in batch["keys"]]
    assert values == expected and values != [int(clean[k][col]) for k in batch["keys"]]
    assert label_noise(DataConfig(label_noise=0.0), manifest, [col]) is None
