"""The Python API (mclfir_dist.Retriever): docs/api.md's examples run here as written, on a tiny trained run;
then what the examples do not show: an export, typed errors, a model other than the index's."""
import re
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, needs
from mclfir_dist.cli import main

pytestmark = needs("faiss")


def test_the_documented_examples_run(run, catalogue, capsys):
    index, image, key = catalogue
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs/api.md").read_text(), re.S)
    assert len(blocks) >= 7
    namespace = {"RUN": str(run), "INDEX": str(index), "IMAGE": str(image), "KEY": key}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)
    capsys.readouterr()


def test_nothing_is_printed_and_hits_carry_the_catalogue(run, catalogue, capsys):
    from mclfir_dist import Hit, Retriever
    index, image, key = catalogue
    r = Retriever.from_run(run, index=index)
    hits = r.search(key, "colour", k=3)
    assert capsys.readouterr() == ("", "")
    assert all(isinstance(h, Hit) and set(h.values) >= {"colour", "garment_length"} and h.location for h in hits)
    # the same ranking as the CLI's search (which prints)
    from mclfir_dist.retrieval.search import search_catalogue
    cli = search_catalogue(None, str(index), "colour", key=key, k=3)
    assert [h.key for h in hits] == [c["key"] for c in cli]
    assert np.allclose([h.score for h in hits], [c["score"] for c in cli])


def test_a_vector_query_equals_the_key_query_without_the_key(run, catalogue):
    from mclfir_dist import Retriever
    from mclfir_dist.retrieval.index import CatalogueIndex
    index, _, key = catalogue
    r = Retriever.from_run(run, index=index)
    vector = CatalogueIndex(index).vector("colour", key)
    by_vector = r.search(vector, "colour", k=4)
    assert by_vector[0].key == key and by_vector[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.key for h in by_vector[1:]] == [h.key for h in r.search(key, "colour", k=3)]


def test_a_filter_that_few_items_pass_still_fills_k_by_fetching_more(run, catalogue):
    from mclfir_dist import Retriever
    index, _, key = catalogue
    r = Retriever.from_run(run, index=index)
    everything = r.search(key, "colour", k=10_000)
    rare = min({h.values["garment_length"] for h in everything},
               key=lambda v: sum(h.values["garment_length"] == v for h in everything))
    expected = [h.key for h in everything if h.values["garment_length"] == rare]
    got = r.search(key, "colour", k=len(expected), where={"garment_length": rare})
    assert [h.key for h in got] == expected       # the same order as filtering the full ranking
    assert len(r.search(key, "colour", k=len(expected) + 5, where={"garment_length": rare})) == len(expected)


def test_typed_errors(run, catalogue, tmp_path):
    from mclfir_dist import Retriever
    from mclfir_dist.errors import BadInputError, CheckpointError, ConfigError
    index, image, key = catalogue
    r = Retriever.from_run(run, index=index)
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    cases = [
        (lambda: r.search(key, "colour", k=0), ConfigError, "k must be"),
        (lambda: r.search("no-such-key", "colour"), ConfigError, "neither a catalogue key"),
        (lambda: r.search(key, "colour", where={"brand": "x"}), ConfigError, "unknown label column 'brand'"),
        (lambda: r.search(np.zeros(5, np.float32), "colour"), BadInputError, "32 finite numbers"),
        (lambda: r.search(np.zeros(32, np.float32), ["colour", "garment_length"]), ConfigError, "one attribute"),
        (lambda: r.search(not_image, "colour"), BadInputError, "notes.jpg"),
        (lambda: r.embed([tmp_path / "missing.jpg"]), FileNotFoundError, "missing.jpg"),
        (lambda: Retriever.from_run(run).search(key, "colour"), ConfigError, "needs a catalogue index"),
        (lambda: Retriever.from_run(tmp_path), CheckpointError, "no usable checkpoint"),
    ]
    for call, kind, text in cases:
        with pytest.raises(kind, match=re.escape(text)):
            call()


def test_an_export_embeds_as_the_run_does_and_warns_against_an_index(run, catalogue, tmp_path):
    from mclfir_dist import Retriever
    index, image, key = catalogue
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export")]) == 0
    exported = Retriever.from_export(tmp_path / "export", index=index)
    a = exported.embed([image])["colour"]
    b = Retriever.from_run(run).embed([image])["colour"]
    assert np.allclose(a, b, atol=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hits = exported.search(image, "colour", k=3)
    assert len(hits) == 3 and any("another model" in str(w.message) for w in caught)


def test_an_index_of_another_model_is_refused_for_image_queries(run, catalogue, tiny_shards, tmp_path):
    """Another run's weights: the index's vectors would not be comparable; allowed, it warns."""
    from mclfir_dist import Retriever
    from mclfir_dist.configure import load_config
    from mclfir_dist.errors import ConfigError
    from mclfir_dist.training.engine import train
    from conftest import tiny_train_overrides
    index, image, key = catalogue
    other = tmp_path / "other"
    train(load_config(ROOT / "configs/debug_cpu.yaml", tiny_train_overrides(tiny_shards, steps=2) + [
        "eval.grid_queries=0", "eval.frozen_baseline=false", "train.seed=7"]), other)
    with pytest.raises(ConfigError, match="another model"):
        Retriever.from_run(other, index=index).search(image, "colour")
    assert Retriever.from_run(other, index=index).search(key, "colour", k=2)   # key queries use the index's vectors
    with pytest.warns(UserWarning, match="another model"):
        Retriever.from_run(other, index=index, allow_other_model=True).search(image, "colour", k=2)


def test_batch_search_loads_once_and_writes_what_the_api_returns(run, catalogue, tmp_path, capsys):
    """`mclfir search --queries CSV|DIR --out hits.jsonl|hits.csv`: each query's hits equal Retriever.search's."""
    import csv
    import json
    import shutil
    from mclfir_dist import Retriever
    index, image, key = catalogue
    keys = (index / "keys.txt").read_text().splitlines()[:3]
    shutil.copy(image, tmp_path / "photo.jpg")
    (tmp_path / "q.csv").write_text("query\n" + "\n".join(keys) + "\nphoto.jpg\n")
    assert main(["search", "--run", str(run), "--index", str(index), "--attributes", "colour:1,garment_length:0.5",
                 "--queries", str(tmp_path / "q.csv"), "--out", str(tmp_path / "hits.jsonl"), "--k", "4"]) == 0
    assert "4 queries in" in capsys.readouterr().err
    lines = [json.loads(l) for l in (tmp_path / "hits.jsonl").read_text().splitlines()]
    r = Retriever.from_run(run, index=index)
    weights = {"colour": 1.0, "garment_length": 0.5}
    for line, q in zip(lines, keys + [tmp_path / "photo.jpg"]):
        expected = r.search(q, weights, k=4)
        assert [h["key"] for h in line["hits"]] == [h.key for h in expected]
        assert np.allclose([h["score"] for h in line["hits"]], [h.score for h in expected], atol=1e-5)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        shutil.copy(image, folder / f"p{i}.jpg")
    assert main(["search", "--run", str(run), "--index", str(index), "--attribute", "colour", "--where",
                 f"garment_length={lines[0]['hits'][0]['values']['garment_length']}", "--queries", str(folder),
                 "--out", str(tmp_path / "hits.csv"), "--k", "2"]) == 0
    rows = list(csv.DictReader((tmp_path / "hits.csv").open()))
    assert len(rows) == 6 and {r["query"] for r in rows} == {"p0.jpg", "p1.jpg", "p2.jpg"}
    assert len({r["garment_length"] for r in rows}) == 1


def test_the_cli_filters_and_combines_like_the_api(run, catalogue, capsys):
    from mclfir_dist import Retriever
    index, _, key = catalogue
    value = Retriever.from_index(index).search(key, "colour", k=1)[0].values["colour"]
    assert main(["search", "--index", str(index), "--key", key, "--attributes", "colour:1,garment_length:0.5",
                 "--where", f"colour={value}", "--k", "3"]) == 0
    out = capsys.readouterr().out
    printed = [l.split()[2] for l in out.splitlines()[2:] if l.strip()]
    expected = Retriever.from_index(index).search(key, {"colour": 1, "garment_length": 0.5}, k=3,
                                                  where={"colour": value})
    assert printed == [h.key for h in expected] and all(h.values["colour"] == value for h in expected)


@pytest.mark.parametrize("argv,text", [
    (["--queries", "Q.csv"], "--queries and --out go together"),
    (["--key", "K", "--where", "colour"], "is not NAME=VALUE"),
    (["--key", "K", "--attributes", "colour:heavy"], "is not a number"),
    (["--queries", "Q.csv", "--out", "hits.txt"], "write .jsonl or .csv"),
    (["--image", "IMG", "--where", "colour=red"], "--image needs --run"),
])
def test_search_misuse_is_one_line(catalogue, tmp_path, capsys, argv, text):
    index, image, key = catalogue
    (tmp_path / "Q.csv").write_text(f"query\n{key}\n")
    argv = [a.replace("Q.csv", str(tmp_path / "Q.csv")).replace("IMG", str(image)).replace("K", key)
            if a in ("Q.csv", "IMG", "K") else a for a in argv]
    code = main(["search", "--index", str(index), *(["--attribute", "colour"] if "--attributes" not in argv else []),
                 *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and text in err[0], err


def test_a_label_column_named_otherwise_maps_to_its_head_or_is_named(run, tiny_shards, tmp_path, caplog):
    """`mclfir embed --csv ... --label-map baseColour=colour`: the values land under the head's name; without the
    map the head is named in the log instead of being dropped in silence."""
    import json
    tar = sorted(Path(tiny_shards).glob("test-*.tar"))[0]
    with tarfile.open(tar) as t:
        jpgs = [m for m in t.getmembers() if m.name.endswith(".jpg")][:3]
        for i, m in enumerate(jpgs):
            (tmp_path / f"img{i}.jpg").write_bytes(t.extractfile(m).read())
    (tmp_path / "cat.csv").write_text("filename,baseColour\nimg0.jpg,Red\nimg1.jpg,Blue\nimg2.jpg,Red\n")
    common = ["embed", "--run", str(run), "--csv", str(tmp_path / "cat.csv"), "--workers", "0"]
    assert main(common + ["--out", str(tmp_path / "mapped"), "--label-map", "baseColour=colour"]) == 0
    labels = json.loads((tmp_path / "mapped" / "labels.json").read_text())
    assert labels["colour"] == ["Red", "Blue", "Red"]
    caplog.clear()
    assert main(common + ["--out", str(tmp_path / "plain")]) == 0
    assert any("no label column for colour" in r.getMessage() and "--label-map" in r.getMessage()
               for r in caplog.records)
    assert main(common + ["--out", str(tmp_path / "bad"), "--label-map", "brand=colour"]) == 2


def test_a_query_path_that_is_not_a_regular_file_is_named_for_what_it_is(tmp_path):
    """A FIFO used to be reported as 'not found' (and reading one would block): now its kind is named."""
    import os

    from mclfir_dist.errors import BadInputError
    from mclfir_dist.retrieval.images import check_image_file
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(BadInputError, match=r"--image: .*pipe is not a regular file \(a FIFO\)"):
        check_image_file(tmp_path / "pipe", "--image")
    with pytest.raises(BadInputError, match=r"is not a regular file \(a folder\)"):
        check_image_file(tmp_path, "--image")
    with pytest.raises(FileNotFoundError, match="--image: no such file"):
        check_image_file(tmp_path / "gone.jpg", "--image")
    (tmp_path / "a.jpg").write_bytes(b"x")
    assert check_image_file(tmp_path / "a.jpg", "--image") == tmp_path / "a.jpg"


def test_loading_a_runs_model_to_search_imports_no_training_stack(run, catalogue):
    """Retriever.from_run and an image search read the run as data (model/saved.py): no method, no training
    module, no webdataset, DALI, DeepSpeed or Accelerate is imported (the trunks are: they build the model)."""
    import os
    import subprocess
    import sys
    index, image, _ = catalogue
    probe = (f"import sys\nfrom mclfir_dist.retrieval.api import Retriever\n"
             f"r = Retriever.from_run({str(run)!r}, index={str(index)!r})\n"
             f"hits = r.search({str(image)!r}, 'colour', k=3)\n"
             "heavy = ('mclfir_dist.methods', 'mclfir_dist.training', 'mclfir_dist.configure', 'webdataset', "
             "'nvidia.dali', 'deepspeed', 'accelerate')\n"
             "print(len(hits), sorted({m for m in sys.modules if m.startswith(heavy)}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "3 []", done.stdout
