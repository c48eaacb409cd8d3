"""Search as a new user meets it (issue 38): each test here failed on the main before it. The search warns only
for another model; zero and negative weights never rank wrongly; EXIF orientation is applied wherever an image
is read; a batch with one bad query is named or skipped; messages and output are clean."""
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, needs

pytestmark = [needs("faiss")]


def test_an_image_search_against_its_own_index_does_not_warn_another_model(run, catalogue, capsys):
    """torchvision's DeprecationWarning from decode_image was taken for a model mismatch."""
    import warnings
    from mclfir_dist.retrieval.search import search_catalogue
    index, image, _ = catalogue
    with warnings.catch_warnings():
        warnings.simplefilter("always")   # as under `python -W default`: the deprecation warning is raised
        search_catalogue(str(run), str(index), "colour", image=str(image), k=3)
    assert "another model" not in capsys.readouterr().err


def test_weights_of_zero_or_below_are_refused_alone_and_exact_beside_a_positive_one(run, catalogue):
    from mclfir_dist import Retriever
    from mclfir_dist.errors import ConfigError
    from mclfir_dist.retrieval.batch import parse_weights
    index, _, key = catalogue
    r = Retriever.from_run(run, index=index)
    for weights in ({"colour": -1}, {"colour": 0}, {"colour": 0, "garment_length": -0.5}):
        with pytest.raises(ConfigError, match="above 0"):
            r.search(key, weights, k=5)
    with pytest.raises(ConfigError, match="twice"):
        parse_weights("colour:1,colour:2")
    cat = r.catalogue
    weights = {"colour": 1.0, "garment_length": -0.5}
    hits = r.search(key, weights, k=6)
    scores = sum(w * (cat.matrix(a) @ cat.vector(a, key)) for a, w in weights.items())
    live = [i for i, k in enumerate(cat.keys) if k and k != key]
    best = sorted(live, key=lambda i: -scores[i])[:6]
    assert [h.key for h in hits] == [cat.keys[i] for i in best]
    assert np.allclose([h.score for h in hits], scores[best], atol=1e-5)
    assert all(abs(h.score - (h.scores["colour"] - 0.5 * h.scores["garment_length"])) < 1e-5 for h in hits)


def _rotated(upright_jpeg: bytes) -> bytes:
    """The photo as a phone stores it: pixels turned sideways, EXIF Orientation=6 (rotate 90 CW to view)."""
    from PIL import Image
    im = Image.open(io.BytesIO(upright_jpeg)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=100, exif=exif.tobytes())
    return buf.getvalue()


def _photo(size=(96, 64)) -> bytes:
    from PIL import Image
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx < w // 3) * 200], -1).astype(np.uint8)   # not symmetric
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=100)
    return buf.getvalue()


def test_exif_orientation_is_applied_to_queries_and_at_shard_build(run, tmp_path):
    from PIL import Image
    from mclfir_dist import Retriever
    from mclfir_dist.data.images import decode_any
    from mclfir_dist.data.shards import _to_jpeg
    upright = _photo()
    rotated = _rotated(upright)
    assert Image.open(io.BytesIO(rotated)).size == (64, 96)   # stored sideways
    a, b = decode_any(upright).float(), decode_any(rotated).float()
    assert a.shape == b.shape == (3, 64, 96) and (a - b).abs().mean() < 3   # as a viewer shows it
    from PIL import ImageOps
    viewed, sideways = io.BytesIO(), io.BytesIO()   # lossless: what a viewer shows, and the pixels as stored
    ImageOps.exif_transpose(Image.open(io.BytesIO(rotated))).save(viewed, "PNG")
    Image.open(io.BytesIO(rotated)).save(sideways, "PNG")
    r = Retriever.from_run(run)
    v = r.embed([rotated, viewed.getvalue(), sideways.getvalue()], ["colour"])["colour"]
    assert float(v[0] @ v[1]) > 0.99999 and float(v[0] @ v[2]) < float(v[0] @ v[1])
    built = Image.open(io.BytesIO(_to_jpeg(rotated, 0)))   # shards hold it upright, for every loader
    assert built.size == (96, 64) and built.getexif().get(0x0112) in (None, 1)


def _queries_csv(tmp_path: Path, rows) -> Path:
    path = tmp_path / "queries.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query"])
        w.writerows([[q] for q in rows])
    return path


def test_a_batch_with_bad_queries_stops_naming_them_or_skips_and_lists_them(run, catalogue, tmp_path):
    from mclfir_dist.cli import main
    index, image, key = catalogue
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    (tmp_path / "good.jpg").write_bytes(image.read_bytes())
    queries = _queries_csv(tmp_path, [key, "no_such_key", "good.jpg", "broken.jpg"])
    out = tmp_path / "hits.jsonl"
    args = ["search", "--run", str(run), "--index", str(index), "--attribute", "colour", "--queries", str(queries),
            "--out", str(out), "--k", "3"]
    assert main(args) == 2 and not out.exists()   # nothing searched, nothing written
    assert main(args + ["--skip-bad-queries"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    done = {x["query"]: x for x in lines if "hits" in x}
    skipped = {x["query"]: x["skipped"] for x in lines if "skipped" in x}
    assert set(done) == {key, "good.jpg"} and all(len(x["hits"]) == 3 for x in done.values())
    assert set(skipped) == {"no_such_key", "broken.jpg"} and "catalogue key" in skipped["no_such_key"]


def test_help_never_shows_an_empty_default():
    from mclfir_dist.cli import build_parser
    parser = build_parser()
    texts = [parser.format_help()]
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            texts.append(sub.format_help())
            for a in sub._actions:
                if isinstance(a, type(action)):
                    texts += [s.format_help() for s in a.choices.values()]
    assert len(texts) > 10 and not [t for t in texts if "(default: )" in t or "(default: None)" in t]


def test_index_prints_each_line_once_and_export_prints_no_stray_warning(run, catalogue, tmp_path):
    index, _, _ = catalogue
    emb = index.parent / "emb"
    done = subprocess.run([sys.executable, "-m", "mclfir_dist.cli", "index", "--embeddings", str(emb), "--out",
                           str(tmp_path / "idx")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 0 and len([x for x in lines if "colour" in x]) == 1, lines
    done = subprocess.run([sys.executable, "-m", "mclfir_dist.cli", "export", "--run", str(run), "--out",
                           str(tmp_path / "exp"), "--torch-export"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and (tmp_path / "exp" / "model.pt2").is_file(), done.stderr[-2000:]
    assert "Expect archive" not in done.stderr and not [x for x in done.stderr.splitlines() if x.startswith("W")]


def test_help_and_a_key_search_never_import_torch(catalogue):
    """`mclfir --help` took 1.5-2 s and `mclfir search --key` 3-4 s, nearly all imports (docs/results/start_time)."""
    index, _, key = catalogue
    probe = ("import sys, contextlib, io\nfrom mclfir_dist.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
             "    assert 'torch' not in sys.modules, 'help'\n"
             f"    assert main(['search', '--index', {str(index)!r}, '--key', {key!r}, '--attribute', 'colour']) == 0\n"
             "assert 'torch' not in sys.modules, 'key search'\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
