"""Updating a deployed index in place (`mclfir index update`, `index --attributes`, `embed --dry-run`):
items added, replaced and removed by key give the same results as an index built from scratch over the
same items; an index never mixes two models; a dry run writes nothing."""
import hashlib
import json

import numpy as np
import pytest
import torch

from conftest import needs
from mclfir_dist.cli import main

pytestmark = needs("faiss")


def embed(run, shards, out, splits="test", extra=()):
    assert main(["embed", "--run", str(run), "--shards", str(shards), "--splits", splits, "--out", str(out),
                 "--workers", "0", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def test_emb(run, tiny_shards, tmp_path_factory):
    return embed(run, tiny_shards, tmp_path_factory.mktemp("e") / "test")


@pytest.fixture(scope="module")
def val_emb(run, tiny_shards, tmp_path_factory):
    return embed(run, tiny_shards, tmp_path_factory.mktemp("e") / "val", "val")


def snapshot(folder):
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def top(index_dir, attribute, queries, k=10):
    from mclfir_dist.retrieval.index import CatalogueIndex
    cat = CatalogueIndex(index_dir)
    scores, rows = cat.search(attribute, queries, k)
    return [[cat.keys[r] for r in row] for row in rows], scores


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_add_replace_remove_equal_a_fresh_index_over_the_same_items(test_emb, val_emb, tmp_path, kind, capsys):
    from mclfir_dist.retrieval.embed import load_embeddings
    index = tmp_path / "idx"
    assert main(["index", "--embeddings", str(test_emb), "--out", str(index), "--kind", kind, "--nlist", "1"]) == 0
    # add: the val items arrive
    assert main(["index", "update", "--index", str(index), "--embeddings", str(val_emb)]) == 0
    val, test = load_embeddings(val_emb), load_embeddings(test_emb)
    assert f"{len(val['keys'])} added, 0 replaced, 0 removed" in capsys.readouterr().out
    # replace: the test items again (same model, same vectors): ids and results unchanged
    assert main(["index", "update", "--index", str(index), "--embeddings", str(test_emb)]) == 0
    assert f"0 added, {len(test['keys'])} replaced" in capsys.readouterr().out
    # remove three test keys
    gone = test["keys"][:3]
    assert main(["index", "update", "--index", str(index), "--remove", ",".join(gone)]) == 0
    # a fresh index over exactly the items that remain
    keep = [i for i, k in enumerate(test["keys"]) if k not in gone]
    fresh_emb = tmp_path / "fresh_emb"
    fresh_emb.mkdir()
    for a in ("colour", "garment_length"):
        np.save(fresh_emb / f"{a}.npy", np.concatenate([test["matrices"][a][keep], val["matrices"][a]]))
    keys = [test["keys"][i] for i in keep] + val["keys"]
    (fresh_emb / "keys.txt").write_text("".join(k + "\n" for k in keys))
    (fresh_emb / "locations.txt").write_text("".join("x\n" for _ in keys))
    (fresh_emb / "embed.json").write_text(json.dumps({**test["meta"], "count": len(keys)}))
    assert main(["index", "--embeddings", str(fresh_emb), "--out", str(tmp_path / "fresh"), "--kind", kind,
                 "--nlist", "1"]) == 0
    queries = np.concatenate([test["matrices"]["colour"][:5], val["matrices"]["colour"][:5]])
    updated_keys, updated_scores = top(index, "colour", queries, k=len(keys))
    fresh_keys, fresh_scores = top(tmp_path / "fresh", "colour", queries, k=len(keys))
    assert updated_keys == fresh_keys
    assert np.allclose(updated_scores, fresh_scores, atol=1e-6)
    assert not set(gone) & {k for row in updated_keys for k in row}
    from mclfir_dist.retrieval.index import CatalogueIndex
    cat = CatalogueIndex(index)
    assert len(cat._row) == len(keys) and cat.meta["items"] == len(keys) and len(cat.meta["updates"]) == 3
    row = cat.row(val["keys"][4])
    assert np.allclose(cat.vector("garment_length", val["keys"][4]), val["matrices"]["garment_length"][4])
    assert cat.label("colour", row) == val["labels"]["colour"][4]
    assert main(["search", "--index", str(index), "--attribute", "colour", "--key", gone[0]]) == 2


def test_an_index_never_mixes_two_models(run, tiny_shards, test_emb, val_emb, tmp_path):
    """Embeddings from other weights (after an extension) rebuild an attribute only when they cover all of it."""
    import shutil
    from mclfir_dist.retrieval.index import CatalogueIndex
    index = tmp_path / "idx"
    assert main(["index", "--embeddings", str(test_emb), "--out", str(index)]) == 0
    other = tmp_path / "other_val"
    shutil.copytree(val_emb, other)
    meta = json.loads((other / "embed.json").read_text())
    meta["model_hash"] = {a: "0" * 16 for a in meta["model_hash"]}
    (other / "embed.json").write_text(json.dumps(meta))
    before = snapshot(index)
    assert main(["index", "update", "--index", str(index), "--embeddings", str(other)]) == 2
    assert snapshot(index) == before
    # the whole catalogue re-embedded by the other weights: rebuilt, and the index says which weights
    full = tmp_path / "other_test"
    shutil.copytree(test_emb, full)
    (full / "embed.json").write_text(json.dumps({**json.loads((test_emb / "embed.json").read_text()),
                                                 "model_hash": meta["model_hash"]}))
    assert main(["index", "update", "--index", str(index), "--embeddings", str(full), "--attributes", "colour"]) == 0
    cat = CatalogueIndex(index)
    assert cat.model_hashes["colour"] == "0" * 16 and cat.model_hashes["garment_length"] != "0" * 16
    assert cat.meta["updates"][-1]["rebuilt"] == ["colour"]


def test_a_new_attribute_joins_and_index_attributes_rebuilds_only_those(run, tiny_shards, test_emb, tmp_path):
    only_colour = embed(run, tiny_shards, tmp_path / "colour_only", extra=["--attributes", "colour"])
    index = tmp_path / "idx"
    assert main(["index", "--embeddings", str(only_colour), "--out", str(index)]) == 0
    assert main(["index", "update", "--index", str(index), "--embeddings", str(test_emb),
                 "--attributes", "garment_length"]) == 0
    from mclfir_dist.retrieval.index import CatalogueIndex
    cat = CatalogueIndex(index)
    assert set(cat.meta["attributes"]) == {"colour", "garment_length"}
    assert cat.meta["updates"][-1]["new_attributes"] == ["garment_length"]
    colour_bytes = (index / "colour.faiss").read_bytes()
    assert main(["index", "--embeddings", str(test_emb), "--out", str(index), "--attributes", "garment_length"]) == 0
    assert (index / "colour.faiss").read_bytes() == colour_bytes   # kept as it was
    assert set(CatalogueIndex(index).meta["attributes"]) == {"colour", "garment_length"}


def test_dry_runs_write_nothing_and_say_what_it_would_cost(run, tiny_shards, test_emb, val_emb, tmp_path, caplog,
                                                          capsys):
    import logging
    index = tmp_path / "idx"
    assert main(["index", "--embeddings", str(test_emb), "--out", str(index)]) == 0
    before = snapshot(index)
    assert main(["index", "update", "--index", str(index), "--embeddings", str(val_emb), "--dry-run"]) == 0
    assert "would change" in capsys.readouterr().out and snapshot(index) == before
    caplog.set_level(logging.INFO)
    assert main(["embed", "--run", str(run), "--shards", str(tiny_shards), "--splits", "train,val,test",
                 "--out", str(tmp_path / "never"), "--workers", "0", "--batch", "16", "--dry-run"]) == 0
    assert not (tmp_path / "never").exists()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("dry run"))
    assert "images/s" in line and "about" in line


def test_misuse_is_one_line(test_emb, tmp_path, capsys):
    index = tmp_path / "idx"
    assert main(["index", "--embeddings", str(test_emb), "--out", str(index), "--kind", "hnsw"]) == 0
    key = (test_emb / "keys.txt").read_text().split()[0]
    capsys.readouterr()
    for argv in (["index", "update", "--index", str(index), "--remove", key],            # HNSW cannot remove
                 ["index", "update", "--index", str(index), "--remove", "no-such-key"],
                 ["index", "update", "--index", str(index)],                              # nothing to do
                 ["index", "update", "--embeddings", str(test_emb)],                      # no --index
                 ["index", "--embeddings", str(test_emb)],                                # no --out
                 ["index", "update", "--index", str(index), "--embeddings", str(test_emb), "--attributes", "nope"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error" in err[0], (argv, err)


def test_links_planted_in_an_index_folder_are_replaced_never_written_through(test_emb, tmp_path):
    """A link at the old fixed temp name (.colour.faiss.tmp) or at a destination (keys.txt) used to be written
    through: its target was overwritten. Now every file is a fresh temp file renamed over the name."""
    import shutil
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    index = tmp_path / "idx"
    assert main(["index", "--embeddings", str(test_emb), "--out", str(index)]) == 0
    attribute = json.loads((index / "index.json").read_text())["attributes"].popitem()[0]
    (index / f".{attribute}.faiss.tmp").symlink_to(victim)
    key = (test_emb / "keys.txt").read_text().split()[0]
    assert main(["index", "update", "--index", str(index), "--remove", key]) == 0
    fresh = tmp_path / "idx2"
    fresh.mkdir()
    (fresh / "keys.txt").symlink_to(victim)
    assert main(["index", "--embeddings", str(test_emb), "--out", str(fresh)]) == 0
    assert victim.read_text() == "precious\n"
    assert not (fresh / "keys.txt").is_symlink()
    assert (fresh / "keys.txt").read_text() == (test_emb / "keys.txt").read_text()
    shutil.rmtree(index)


def test_a_key_listed_twice_is_refused_naming_both_lines(test_emb, tmp_path, capsys):
    import shutil
    emb = tmp_path / "emb"
    shutil.copytree(test_emb, emb)
    keys = (emb / "keys.txt").read_text().splitlines()
    keys[3] = keys[1]
    (emb / "keys.txt").write_text("".join(k + "\n" for k in keys))
    capsys.readouterr()
    assert main(["index", "--embeddings", str(emb), "--out", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"key {keys[1]!r} on line 4 is already on line 2" in err and len(err.splitlines()) == 1
    index = tmp_path / "good"
    assert main(["index", "--embeddings", str(test_emb), "--out", str(index)]) == 0
    assert main(["index", "update", "--index", str(index), "--embeddings", str(emb)]) == 2
    assert "already on line 2" in capsys.readouterr().err
