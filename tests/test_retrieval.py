"""Using a trained model: embed a catalogue, index and search it, export a portable model."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, needs
from mclfir_dist.cli import main


@pytest.fixture(scope="module")
def embedded(run, tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb")
    assert main(["embed", "--run", str(run), "--shards", str(tiny_shards), "--splits", "test", "--out", str(out),
                 "--workers", "0"]) == 0
    return out


def test_embeddings_are_the_runs_own_with_keys_labels_and_provenance(run, tiny_shards, embedded):
    from mclfir_dist.training.checkpoint import load_run_model
    from mclfir_dist.data import build_eval_loader
    from mclfir_dist.data.manifest import Manifest
    from mclfir_dist.evaluation.metrics import embed_split
    meta = json.loads((embedded / "embed.json").read_text())
    keys = (embedded / "keys.txt").read_text().splitlines()
    assert meta["count"] == len(keys) == Manifest.load(tiny_shards).count("test")
    assert meta["attributes"] == ["colour", "garment_length"] and meta["unreadable"]["count"] == 0
    assert meta["checkpoint"].endswith("increment_01.pt") and meta["image_size"] == 32
    model, cfg, _ = load_run_model(run)
    reference = embed_split(model, build_eval_loader(cfg.data, Manifest.load(tiny_shards), "test", 0, 1),
                            ["colour", "garment_length"], torch.device("cpu"))
    order = [reference.keys.index(k) for k in keys]
    for h, a in enumerate(["colour", "garment_length"]):
        ours = np.load(embedded / f"{a}.npy")
        assert np.abs(ours - reference.emb[order, h].numpy()).max() <= 1e-5
    labels = json.loads((embedded / "labels.json").read_text())
    assert len(labels["colour"]) == len(keys) and all(isinstance(v, str) for v in labels["colour"])


@needs("faiss")
def test_flat_index_search_equals_brute_force_torch_scoring(embedded, tmp_path):
    from mclfir_dist.retrieval.index import CatalogueIndex, index_catalogue
    index_catalogue(embedded, tmp_path / "idx")
    catalogue = CatalogueIndex(tmp_path / "idx")
    matrix = torch.from_numpy(np.load(embedded / "colour.npy"))
    queries = matrix[:7]
    scores, rows = catalogue.search("colour", queries.numpy(), 10)
    ref_scores, ref_rows = (queries @ matrix.t()).topk(10, dim=1)
    assert np.array_equal(rows, ref_rows.numpy())
    assert np.abs(scores - ref_scores.numpy()).max() <= 1e-5


@needs("faiss")
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_the_exact_neighbours_on_a_small_catalogue(embedded, tmp_path, kind):
    from mclfir_dist.retrieval.index import CatalogueIndex
    assert main(["index", "--embeddings", str(embedded), "--out", str(tmp_path / kind), "--kind", kind]) == 0
    catalogue = CatalogueIndex(tmp_path / kind)
    matrix = np.load(embedded / "colour.npy")
    _, rows = catalogue.search("colour", matrix[:20], 5)
    exact = np.argsort(-(matrix[:20] @ matrix.T), axis=1)[:, :5]
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(rows, exact)])
    assert recall >= 0.9, recall
    assert np.allclose(catalogue.vector("colour", catalogue.keys[3]), matrix[3], atol=1e-6)


@needs("faiss")
def test_search_by_key_and_by_image_prints_ranks_and_draws_a_sheet(run, embedded, tmp_path, capsys):
    from mclfir_dist.retrieval.search import _image_bytes
    from mclfir_dist.retrieval.index import CatalogueIndex
    assert main(["index", "--embeddings", str(embedded), "--out", str(tmp_path / "idx")]) == 0
    keys = (embedded / "keys.txt").read_text().splitlines()
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "idx"), "--attribute", "colour", "--key", keys[0], "--k", "4",
                 "--sheet", str(tmp_path / "sheet.png")]) == 0
    out = capsys.readouterr().out
    assert "rank" in out and out.count("\n") >= 6 and keys[0] not in out.split("\n", 2)[2]
    assert (tmp_path / "sheet.png").stat().st_size > 2000
    # the same image as a file query ranks its own catalogue copy first
    query = tmp_path / "q.jpg"
    query.write_bytes(_image_bytes(CatalogueIndex(tmp_path / "idx"), [0])[0])
    assert main(["search", "--run", str(run), "--index", str(tmp_path / "idx"), "--attribute", "colour",
                 "--image", str(query), "--k", "3"]) == 0
    first = capsys.readouterr().out.splitlines()[2].split()
    assert first[0] == "1" and first[2] == keys[0] and float(first[1]) > 0.999
    assert main(["search", "--index", str(tmp_path / "idx"), "--attribute", "colour", "--key", "nope"]) == 2


@needs("faiss")
def test_embedding_a_folder_counts_and_lists_unreadable_images(run, embedded, tmp_path):
    from mclfir_dist.retrieval.index import CatalogueIndex, index_catalogue
    from mclfir_dist.retrieval.search import _image_bytes
    folder = tmp_path / "catalogue"
    (folder / "tops").mkdir(parents=True)
    index_catalogue(embedded, tmp_path / "idx")
    catalogue_images = _image_bytes(CatalogueIndex(tmp_path / "idx"), [0, 1])
    (folder / "tops" / "a.jpg").write_bytes(catalogue_images[0])
    (folder / "b.jpg").write_bytes(catalogue_images[1])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    assert main(["embed", "--run", str(run), "--images", str(folder), "--out", str(tmp_path / "e"),
                 "--attributes", "colour", "--workers", "0"]) == 0
    meta = json.loads((tmp_path / "e" / "embed.json").read_text())
    assert meta["count"] == 2 and (tmp_path / "e" / "keys.txt").read_text().split() == ["b", "tops/a"]
    assert meta["unreadable"]["count"] == 1 and meta["unreadable"]["items"][0]["key"] == "broken"
    assert np.load(tmp_path / "e" / "colour.npy").shape == (2, 32)


BLOCKED = ["accelerate", "deepspeed", "nvidia.dali", "webdataset", "omegaconf", "faiss", "mclfir_dist.config",
           "mclfir_dist.data"]


def test_export_loads_with_torch_and_torchvision_only_and_matches_the_run(run, tmp_path):
    from mclfir_dist.training.checkpoint import load_run_model
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "exp"), "--torch-export"]) == 0
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert config["attributes"] == ["colour", "garment_length"] and config["image_size"] == 32
    images = torch.randn(6, 3, 32, 32)
    torch.save(images, tmp_path / "x.pt")
    script = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if any(name == b or name.startswith(b + ".") for b in {BLOCKED!r}):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import torch
from mclfir_dist.retrieval.portable import load_exported
model = load_exported({str(tmp_path / 'exp')!r})
out = model(torch.load({str(tmp_path / 'x.pt')!r}))
torch.save(out, {str(tmp_path / 'portable_out.pt')!r})
print("ok", sorted(m for m in sys.modules if m.split('.')[0] in ("accelerate", "deepspeed", "webdataset", "omegaconf")))
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and "ok []" in p.stdout, p.stderr[-3000:]
    portable = torch.load(tmp_path / "portable_out.pt", map_location="cpu")
    model, _, _ = load_run_model(run)
    reference, _ = model.embed_all(images, ["colour", "garment_length"])
    for h, a in enumerate(["colour", "garment_length"]):
        assert (portable[a] - reference[:, h]).abs().max().item() <= 1e-5
    program = torch.export.load(str(tmp_path / "exp" / "model.pt2"))
    stacked = program.module()(torch.cat([images, images[:3]]))     # another batch size than the example's
    assert stacked.shape == (9, 2, 32) and (stacked[:6] - reference).abs().max().item() <= 1e-5
    # the trunk keeps torchvision's names: it loads into torchvision's ResNet
    import torchvision
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "exp" / "model.safetensors"))
    resnet = torchvision.models.resnet18()
    missing, unexpected = resnet.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("trunk.")},
                                                 strict=False)
    assert not unexpected and all(k.startswith(("layer4", "fc")) for k in missing)


@pytest.mark.parametrize("key,value,message", [
    ("embed_dim", 200000, "embed_dim must be an integer in [1, 65536], got 200000"),
    ("image_size", -5, "image_size must be an integer in [1, 4096], got -5"),
    ("trunk", "os.system", "trunk 'os.system' is not one of"),
    ("attributes", ["a/../b"], "attribute name 'a/../b' is not allowed"),
    ("head_channels", 48, "tensor 'heads."),   # a valid size that the file's tensors do not have
])
def test_an_export_config_is_checked_before_anything_is_built(run, tmp_path, key, value, message):
    from mclfir_dist.retrieval.portable import load_exported
    exp = tmp_path / "exp"
    if not exp.exists():
        assert main(["export", "--run", str(run), "--out", str(exp)]) == 0
    config = json.loads((exp / "config.json").read_text())
    config[key] = value
    (exp / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_exported(exp)

