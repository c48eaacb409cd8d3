"""Shard sets served over HTTP by a real nginx (Debian's, started here on a free port): a run reads the
manifest and shards from the URL, verified into a local cache, and ends bit-identical to the same run on the
local folder; the second run reads the cache; the server stopped mid-shard and started again costs retries,
not the run; a 404 or 403 is one line naming the URL; a changed shard is named; a URL with a password is
refused and nothing secret is written."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SELF_BUILDING_TINY, free_port

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
if NGINX is None and os.environ.get("CI"):
    raise RuntimeError("CI must run the remote-shard tests: make test installs Debian's nginx")
pytestmark = pytest.mark.skipif(NGINX is None, reason="no nginx (apt-get install nginx); CI installs it")
TINY = [*SELF_BUILDING_TINY, "train.steps_per_increment=8", "train.num_threads=1"]


class Nginx:
    """nginx serving `root` on 127.0.0.1:port, its own config, access log and pid file; stop() and start()."""

    def __init__(self, root: Path, work: Path, rate: str = "0"):
        self.port, self.work = free_port(), work
        work.mkdir(parents=True, exist_ok=True)
        user = "user root;" if os.geteuid() == 0 else ""   # the workers must read pytest's root-only folders
        temps = "".join(f"{k}_temp_path {work}/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (work / "nginx.conf").write_text(f"""{user}
daemon off; worker_processes 1; pid {work}/nginx.pid; error_log {work}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log {work}/access.log; {temps}
  server {{ listen 127.0.0.1:{self.port};
    location /forbidden/ {{ return 403; }}
    location /upload/ {{ root {root}; dav_methods PUT DELETE; create_full_put_path on; client_max_body_size 0; }}
    location / {{ root {root}; limit_rate {rate}; }} }}
}}""")
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen([NGINX, "-c", str(self.work / "nginx.conf"), "-p", str(self.work)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        import socket
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", int(self.port)), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"nginx did not start: {self.proc.stderr.read()}")

    def stop(self):
        self.proc.terminate()   # nginx's fast shutdown: open connections are cut
        self.proc.wait(timeout=30)

    def requests(self):
        path = self.work / "access.log"
        return path.read_text().splitlines() if path.is_file() else []

    def url(self, path="shards/"):
        return f"http://127.0.0.1:{self.port}/{path}"


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def train(out: Path, shards: str, cache: Path, *extra, check=True):
    p = subprocess.run([sys.executable, "-m", "mclfir_dist.cli", "train", "--config", str(ROOT / "configs/debug_cpu.yaml"),
                        "--out", str(out), *TINY, f"data.shards={shards}", f"data.cache_dir={cache}", *extra],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = (torch.load(r / "checkpoints" / "increment_01.pt", weights_only=True)["model"] for r in (a, b))
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the web root holding shards/, the local reference run) built once."""
    work = tmp_path_factory.mktemp("remote")
    train(work / "reference", str(work / "www" / "shards"), work / "unused")   # builds the shards, then trains
    return work


def test_a_url_set_trains_like_the_local_one_and_the_second_run_reads_the_cache(served, tmp_path):
    server = Nginx(served / "www", tmp_path / "nginx")
    try:
        cache = tmp_path / "cache"
        train(tmp_path / "a", server.url(), cache)
        assert same_weights(tmp_path / "a", served / "reference")
        res = json.loads((tmp_path / "a" / "results.json").read_text())
        stats = res["remote_shards"][server.url()]
        manifest = (served / "www" / "shards" / "manifest.json").read_bytes()
        assert stats["manifest_sha256"] == hashlib.sha256(manifest).hexdigest() and stats["downloaded_bytes"] > 0
        assert res["config"]["data"]["shards"] == server.url()
        before = len(server.requests())
        train(tmp_path / "b", server.url(), cache)
        again = json.loads((tmp_path / "b" / "results.json").read_text())["remote_shards"][server.url()]
        assert again["downloaded_bytes"] == 0 and again["from_cache"] > 0
        assert [r for r in server.requests()[before:] if ".tar" in r] == []   # only the manifest was asked for
    finally:
        server.stop()


def test_the_server_stopped_mid_shard_and_started_again_costs_retries_not_the_run(served, tmp_path):
    server = Nginx(served / "www", tmp_path / "nginx", rate="150k")   # a shard takes a second or two
    cache = tmp_path / "cache"
    result = {}
    runner = threading.Thread(target=lambda: result.update(p=train(tmp_path / "run", server.url(), cache,
                                                                   check=False)))
    runner.start()
    try:
        deadline = time.time() + 120
        while not list(cache.glob("*/.*.part")) and time.time() < deadline:
            time.sleep(0.02)
        assert list(cache.glob("*/.*.part")), "no download was seen in progress"
        server.stop()
        time.sleep(2.0)
        server.start()
        runner.join(timeout=600)
    finally:
        server.stop()
    p = result["p"]
    assert p.returncode == 0, p.stderr[-3000:]
    stats = json.loads((tmp_path / "run" / "results.json").read_text())["remote_shards"][server.url()]
    assert stats["retries"] >= 1 and "retry" in p.stdout + p.stderr
    assert same_weights(tmp_path / "run", served / "reference")   # exactly the samples of an undisturbed run


def test_permanent_errors_a_changed_shard_and_a_password_are_one_line(served, tmp_path):
    www = tmp_path / "www"
    shutil.copytree(served / "www", www)
    server = Nginx(www, tmp_path / "nginx")
    try:
        for url, words in [(server.url("missing/"), "HTTP 404"), (server.url("forbidden/shards/"), "HTTP 403")]:
            p = train(tmp_path / "x", url, tmp_path / "cache", check=False)
            lines = [x for x in p.stderr.splitlines() if "error" in x]
            assert p.returncode == 2 and len(lines) == 1 and words in lines[0] and url in lines[0], p.stderr[-2000:]
            assert "Traceback" not in p.stderr and not list((tmp_path / "x").glob("checkpoints/*.pt"))
        shard = sorted((www / "shards").glob("train-*.tar"))[1]
        with open(shard, "ab") as f:
            f.write(b"\0" * 512)   # changed on the server after the manifest was written
        p = train(tmp_path / "y", server.url(), tmp_path / "cache2", check=False)
        assert p.returncode == 2 and f"{server.url()}{shard.name}" in p.stderr and "manifest says" in p.stderr
        secret = server.url().replace("://", "://mclfir:hunter2@")
        p = train(tmp_path / "z", secret, tmp_path / "cache3", check=False)
        assert p.returncode == 2 and "password" in p.stderr and "hunter2" not in p.stderr
        assert not (tmp_path / "z").exists() or "hunter2" not in "".join(
            f.read_text(errors="replace") for f in (tmp_path / "z").rglob("*") if f.is_file())
    finally:
        server.stop()


def test_shards_built_to_a_url_upload_with_the_manifest_last_and_train_from_there(served, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    server = Nginx(www, tmp_path / "nginx")
    try:
        url = server.url("upload/set/")
        build = subprocess.run([sys.executable, "-m", "mclfir_dist.cli", "shards", "build", "--out", url,
                                "--num-images", "240", "--image-size", "32", "--samples-per-shard", "60",
                                "--min-value-count", "4"], cwd=ROOT, env=env(), capture_output=True, text=True,
                               timeout=300)
        assert build.returncode == 0, build.stderr[-2000:]
        puts = [r.split('"')[1].split()[1].rsplit("/", 1)[1] for r in server.requests() if '"PUT ' in r]
        assert puts[-1] == "manifest.json" and len(puts) > 5   # the manifest is the last file written
        assert "manifest.json" not in puts[:-1]
        reference = served / "www" / "shards"
        for f in sorted(reference.iterdir()):   # byte for byte the set built locally with the same settings
            assert (www / "upload" / "set" / f.name).read_bytes() == f.read_bytes(), f.name
        train(tmp_path / "run", url, tmp_path / "cache")
        assert same_weights(tmp_path / "run", served / "reference")
    finally:
        server.stop()


def test_an_s3_shard_set_is_written_read_and_its_secret_stays_out_of_the_run(served, tmp_path):
    """s3:// through s3fs against moto's S3 server: `shards build --out s3://...` (manifest last), then a run from
    there equals the local one; the credentials come from the environment and appear in no file of the run."""
    import socket
    port = free_port()
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", port],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    secret = "mclfir-test-secret-key-9f2c"
    s3 = dict(env(), AWS_ACCESS_KEY_ID="mclfirtest", AWS_SECRET_ACCESS_KEY=secret, AWS_DEFAULT_REGION="us-east-1",
              FSSPEC_S3_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", int(port)), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        run = lambda *cmd: subprocess.run([sys.executable, *cmd], cwd=ROOT, env=s3, capture_output=True, text=True,
                                          timeout=600)
        made = run("-c", "import fsspec; fsspec.filesystem('s3').mkdir('shards')")
        assert made.returncode == 0, made.stderr[-2000:]
        built = run("-m", "mclfir_dist.cli", "shards", "build", "--out", "s3://shards/tiny/", "--num-images", "240",
                    "--image-size", "32", "--samples-per-shard", "60", "--min-value-count", "4")
        assert built.returncode == 0 and "manifest.json last" in built.stdout, built.stderr[-2000:]
        trained = run("-m", "mclfir_dist.cli", "train", "--config", str(ROOT / "configs/debug_cpu.yaml"), "--out",
                      str(tmp_path / "run"), *TINY, "data.shards=s3://shards/tiny/",
                      f"data.cache_dir={tmp_path / 'cache'}")
        assert trained.returncode == 0, trained.stderr[-3000:]
        assert same_weights(tmp_path / "run", served / "reference")
        files = [f for f in (tmp_path / "run").rglob("*") if f.is_file()]
        assert files and not [f for f in files if secret.encode() in f.read_bytes()]
        assert secret not in trained.stdout + trained.stderr
    finally:
        moto.terminate()
        moto.wait(timeout=30)


def test_a_run_from_a_url_stopped_mid_increment_while_the_server_is_down_resumes_exactly(served, tmp_path):
    """The acceptance case: SIGTERM inside increment 0 while nginx is stopped, nginx started again, --resume:
    the run ends bit-identical to the local one (the shards come from the verified cache; the manifest is read
    from the URL again at the resume)."""
    import signal as signals
    server = Nginx(served / "www", tmp_path / "nginx")
    cmd = [sys.executable, "-m", "mclfir_dist.cli", "train", "--config", str(ROOT / "configs/debug_cpu.yaml"),
           "--out", str(tmp_path / "run"), "--resume", "auto", *TINY, "train.log_every=2",
           f"data.shards={server.url()}", f"data.cache_dir={tmp_path / 'cache'}"]
    try:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in p.stdout:
            if "inc 0 step 4/" in line:
                server.stop()
                p.send_signal(signals.SIGTERM)
                break
        rest = p.communicate(timeout=300)[0]
        assert p.returncode == 143, rest[-2000:]
        server.start()
        done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert same_weights(tmp_path / "run", served / "reference")
        res = json.loads((tmp_path / "run" / "results.json").read_text())
        assert res["complete"] and res["remote_shards"][server.url()]["from_cache"] > 0
    finally:
        server.stop()


def test_the_loader_benchmark_reads_local_and_http_in_one_run(served, tmp_path):
    server = Nginx(served / "www", tmp_path / "nginx")
    try:
        done = subprocess.run([sys.executable, "-m", "mclfir_dist.bench.loader", "--shards",
                               str(served / "www" / "shards"), "--size", "32", "--batches", "3", "--workers", "1",
                               "--remote", server.url()], cwd=ROOT, env=env(), capture_output=True, text=True,
                              timeout=300)
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "source" not in line]
    assert len(rows) == 2 and "(local)" in rows[0] and server.url() in rows[1], done.stdout


@pytest.mark.skipif(__import__("importlib").util.find_spec("nvidia.dali") is None, reason="DALI is not installed")
def test_the_dali_loader_reads_a_url_set_through_the_cache(served, tmp_path):
    """DALI needs local tar and index files: it gets the cache's, and trains exactly as from the folder."""
    server = Nginx(served / "www", tmp_path / "nginx")
    try:
        train(tmp_path / "url", server.url(), tmp_path / "cache", "data.loader=dali")
    finally:
        server.stop()
    train(tmp_path / "local", str(served / "www" / "shards"), tmp_path / "unused", "data.loader=dali")
    assert same_weights(tmp_path / "url", tmp_path / "local")
    res = json.loads((tmp_path / "url" / "results.json").read_text())
    assert res["loader"] == "dali" and res["remote_shards"][server.url()]["downloaded_bytes"] > 0
