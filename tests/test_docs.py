"""The README and the docs site as a newcomer meets them: the README starts with what the project is, the two
commands and the install line, and stays a front page; its five commands go from a CSV of photos to a served
page (run here, with the training made tiny); the site builds with `mkdocs build --strict` (a broken link
fails it); the reference pages are what the code generates."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, free_port, needs

README = (ROOT / "README.md").read_text()
TINY_TRAIN = ["train.steps_per_increment=4", "data.image_size=32", "data.num_workers=0", "model.head_channels=16",
              "model.embed_dim=8", "eval.grid_queries=0", "eval.frozen_baseline=false", "train.num_threads=1"]


def test_the_readme_is_a_front_page_that_starts_where_users_start():
    lines = README.splitlines()
    first = "\n".join(lines[:15])
    assert len(lines) <= 200, len(lines)
    for needed in ("make demo", "make test", "pip install -e .", "make setup", "![", "docs/serve_page.png"):
        assert needed in first, needed
    assert lines[2].startswith("Train one retrieval head") and (ROOT / "docs/serve_page.png").is_file()
    assert "make test" in (ROOT / ".ci/run").read_text()   # CI runs the README's test command


def five_commands(text: str) -> list:
    block = re.search(r"## From your photos to a served page.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def mclfir(line: str) -> list:
    args = shlex.split(line, comments=True)
    assert args[0] == "mclfir", line
    return [sys.executable, "-m", "mclfir_dist.cli", *args[1:]]


@needs("faiss")
@needs("fastapi")
def test_the_readme_five_commands_reach_a_served_page(tmp_path):
    commands = five_commands(README)
    assert len(commands) == 5 and commands == [line for line in (ROOT / "docs/getting-started.md").read_text()
                                               .split("Then the five commands")[1].split("```bash\n")[1]
                                               .split("```")[0].splitlines() if line.strip()]
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = lambda cmd: subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    done = run([sys.executable, str(ROOT / "scripts/example_photos.py"), "--out", "photos", "--count", "240",
                "--size", "48"])
    assert done.returncode == 0, done.stderr[-2000:]
    for line in commands[:4]:
        cmd = mclfir(line) + (TINY_TRAIN if " train " in line else [])
        done = run(cmd)
        assert done.returncode == 0, (line, done.stderr[-3000:])
    port = free_port()
    serve = subprocess.Popen(mclfir(commands[4]) + ["--port", port], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                health = json.loads(urllib.request.urlopen(url + "/health", timeout=1).read())
                break
            except OSError:
                assert serve.poll() is None, serve.stdout.read()
                time.sleep(0.1)
        assert health["items"] == 240
        page = urllib.request.urlopen(url + "/", timeout=10).read().decode()
        assert "attribute search" in page
        meta = json.loads(urllib.request.urlopen(url + "/attributes", timeout=10).read())
        assert meta["attributes"] == ["colour", "pattern"] and "neckline" in meta["labels"]
        body = json.dumps({"key": "000007", "attributes": "colour:1,pattern:0.5", "k": 5,
                           "where": {"neckline": meta["labels"]["neckline"][0]}}).encode()
        req = urllib.request.Request(url + "/search", data=body, headers={"Content-Type": "application/json"})
        hits = json.loads(urllib.request.urlopen(req, timeout=30).read())["hits"]
        assert hits and all(h["values"]["neckline"] == meta["labels"]["neckline"][0] for h in hits)
    finally:
        serve.terminate()
        serve.wait(timeout=30)


def _mkdocs(config: Path, site: Path):
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))


@needs("mkdocs")
def test_the_docs_site_builds_strict_and_a_broken_link_fails_it(tmp_path):
    done = _mkdocs(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "getting-started" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    with open(copy / "docs" / "training.md", "a") as f:
        f.write("\nSee [the missing page](no_such_page.md).\n")
    broken = _mkdocs(copy / "mkdocs.yml", tmp_path / "site2")
    assert broken.returncode != 0 and "no_such_page.md" in broken.stderr


def test_the_reference_pages_are_what_the_code_generates():
    # a fresh process: plug-ins other tests register would add choices to the config reference
    done = subprocess.run([sys.executable, str(ROOT / "scripts/gen_reference.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr
    config = (ROOT / "docs/reference/config.md").read_text()
    assert "`optim.lr`" in config and "`data.loader`" in config
    cli = (ROOT / "docs/reference/cli.md").read_text()
    assert "## `mclfir serve`" in cli and "--skip-bad-queries" in cli


def test_the_code_map_names_every_module_under_its_folder():
    """docs/layout.md's map: every folder of the package, and every module under its folder's entry."""
    text = (ROOT / "docs/layout.md").read_text()
    block = text[text.index("mclfir_dist/\n"):text.index("\nlaunch/")]
    folders = {}   # folder -> the map's lines from its entry to the next folder's
    current = ""
    for line in block.splitlines()[1:]:
        name = line[2:].split(" ")[0] if line.startswith("  ") and not line.startswith("   ") else ""
        if name.endswith("/"):
            current = name[:-1]
        elif name:
            current = ""
        folders.setdefault(current, []).append(line)
    missing = []
    for path in sorted((ROOT / "mclfir_dist").rglob("*.py")):
        rel = path.relative_to(ROOT / "mclfir_dist")
        if path.name == "__init__.py" and len(rel.parts) > 1:
            continue
        folder = rel.parts[0] if len(rel.parts) > 1 else ""
        if path.name not in "\n".join(folders.get(folder, [])) and path.name != "__init__.py":
            missing.append(str(rel))
    assert not missing, f"docs/layout.md's map does not name: {', '.join(missing)}"
