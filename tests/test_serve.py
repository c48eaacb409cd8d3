"""`mclfir serve` as a real process (uvicorn on a free localhost port) over the tiny run's index: its answers
equal the Python API's, concurrent uploads are embedded in shared batches, and every hostile request gets a
4xx with a one-line JSON error, never a traceback and never a file named by the request."""
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, free_port, needs

pytestmark = [needs("faiss"), needs("fastapi"), needs("uvicorn")]


def start_server(run, index, *extra):
    port = free_port()
    cmd = [sys.executable, "-m", "mclfir_dist.cli", "serve", "--index", str(index), "--port", port, *extra]
    if run is not None:
        cmd += ["--run", str(run)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise AssertionError(f"mclfir serve exited {proc.returncode}: {proc.stdout.read()}")
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("mclfir serve did not answer within 60 s")


def stop_server(proc):
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


@pytest.fixture(scope="module")
def server(run, catalogue):
    index, _, _ = catalogue
    proc, url = start_server(run, index, "--max-upload-mb", "0.05", "--max-pixels", "2000", "--max-k", "50")
    yield url
    out = stop_server(proc)
    assert "Traceback" not in out, out


def request(url, method="GET", body=None, headers=None):
    """(status, headers, body bytes); errors are answers too."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def multipart(fields: dict, files: dict = None):
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in (files or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def search(url, fields, files=None):
    body, headers = multipart(fields, files)
    status, _, data = request(url + "/search", "POST", body, headers)
    return status, json.loads(data)


def jpeg(size=32, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_endpoints_answer_what_the_catalogue_holds(server, catalogue, tiny_shards):
    index, _, key = catalogue
    status, _, body = request(server + "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["items"] == len(
        [k for k in (index / "keys.txt").read_text().splitlines() if k])
    meta = json.loads(request(server + "/attributes")[2])
    assert meta["attributes"] == ["colour", "garment_length"] and meta["uploads"] is True
    assert "red" in meta["labels"]["colour"] or len(meta["labels"]["colour"]) >= 2
    item = json.loads(request(server + f"/items/{key}")[2])
    # every label column of the shards, headed or not (only the two headed ones were kept: neckline was refused)
    assert item["key"] == key and set(item["values"]) == {"colour", "garment_length", "neckline", "pattern",
                                                          "sleeve_length"}
    neckline = item["values"]["neckline"]
    status, got = search(server, {"key": key, "attributes": "colour", "k": "3", "where": f"neckline={neckline}"})
    assert status == 200 and got["hits"] and all(h["values"]["neckline"] == neckline for h in got["hits"])
    status, headers, image = request(server + f"/items/{key}/image")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    shard = next(p for p in sorted(Path(tiny_shards).glob("test-*.tar"))
                 if f"{key}.jpg" in tarfile.open(p).getnames())
    assert image == tarfile.open(shard).extractfile(f"{key}.jpg").read()
    listing = json.loads(request(server + "/items?sample=5&seed=3")[2])
    assert len(listing["items"]) == 5 and listing == json.loads(request(server + "/items?sample=5&seed=3")[2])
    assert request(server + "/")[1]["content-type"].startswith("text/html")


def test_searches_equal_the_python_api(server, run, catalogue):
    from mclfir_dist import Retriever
    index, image, key = catalogue
    r = Retriever.from_run(run, index=index)
    for fields, query in [({"key": key, "attributes": "colour", "k": "7"}, key),
                          ({"key": key, "attributes": "colour:1,garment_length:0.5", "k": "9"}, key)]:
        status, got = search(server, fields)
        want = r.search(query, {"colour": 1, "garment_length": 0.5} if "," in fields["attributes"] else "colour",
                        k=int(fields["k"]))
        assert status == 200 and [h["key"] for h in got["hits"]] == [h.key for h in want]
        assert np.allclose([h["score"] for h in got["hits"]], [h.score for h in want], atol=1e-5)
        assert got["query"]["key"] == key and [h["rank"] for h in got["hits"]] == list(range(1, len(want) + 1))
    data = image.read_bytes()
    status, got = search(server, {"attributes": "garment_length", "k": "5"}, {"image": ("q.jpg", data)})
    want = r.search(data, "garment_length", k=5)
    assert status == 200 and [h["key"] for h in got["hits"]] == [h.key for h in want]
    assert np.allclose([h["score"] for h in got["hits"]], [h.score for h in want], atol=1e-5)
    value = want[0].values["colour"]
    status, got = search(server, {"key": key, "attributes": "garment_length", "k": "4", "where": f"colour={value}"})
    assert status == 200 and got["hits"] and all(h["values"]["colour"] == value for h in got["hits"])
    assert [h["key"] for h in got["hits"]] == [h.key for h in r.search(key, "garment_length", 4,
                                                                           where={"colour": value})]
    body = json.dumps({"key": key, "attributes": {"colour": 1}, "k": 3}).encode()
    status, _, data = request(server + "/search", "POST", body, {"Content-Type": "application/json"})
    assert status == 200 and [h["key"] for h in json.loads(data)["hits"]] == [h.key for h in r.search(key, "colour", 3)]


def test_an_animated_gif_is_searched_by_its_first_frame(server, run, catalogue):
    """torchvision decodes an animated GIF to N frames; the service and the API take the first (it was a 500)."""
    from PIL import Image
    from mclfir_dist import Retriever
    index, _, _ = catalogue
    frames = [Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    first = io.BytesIO()
    frames[0].save(first, "PNG")
    status, got = search(server, {"attributes": "colour", "k": "4"}, {"image": ("a.gif", buf.getvalue())})
    want = Retriever.from_run(run, index=index).search(first.getvalue(), "colour", k=4)
    assert status == 200 and [h["key"] for h in got["hits"]] == [h.key for h in want]


def test_concurrent_uploads_share_batches_and_get_their_own_answers(server, run, catalogue):
    from mclfir_dist import Retriever
    index, _, _ = catalogue
    r = Retriever.from_run(run, index=index)
    images = [jpeg(32, seed) for seed in range(16)]
    before = json.loads(request(server + "/health")[2])["embedding"]
    answers = [None] * len(images)

    def ask(i):
        answers[i] = search(server, {"attributes": "colour", "k": "3"}, {"image": (f"{i}.jpg", images[i])})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = json.loads(request(server + "/health")[2])["embedding"]
    for i, (status, got) in enumerate(answers):
        want = r.search(images[i], "colour", k=3)
        assert status == 200 and [h["key"] for h in got["hits"]] == [h.key for h in want], i
    served, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    assert served == 16 and batches < 16, after   # some requests were embedded together


def _is_one_line_error(data: bytes) -> str:
    body = json.loads(data)
    assert list(body) == ["error"] and "\n" not in body["error"] and "Traceback" not in body["error"], body
    return body["error"]


def hostile_cases(key):
    big = jpeg(200, 1)   # 40,000 pixels: over --max-pixels 2000, under the 50 kB upload limit
    png_garbage = b"\x89PNG\r\n\x1a\n" + os.urandom(200)
    return [
        ("upload over the size limit", 413, {"attributes": "colour"}, {"image": ("x.jpg", b"\xff\xd8\xff" + b"0" * 60_000)}),
        ("not an image (magic bytes)", 415, {"attributes": "colour"}, {"image": ("x.jpg", b"hello, this is text")}),
        ("an HTML file named .jpg", 415, {"attributes": "colour"}, {"image": ("x.jpg", b"<html><script>1</script>")}),
        ("image header, no image", 422, {"attributes": "colour"}, {"image": ("x.png", png_garbage)}),
        ("image over the pixel limit", 422, {"attributes": "colour"}, {"image": ("x.jpg", big)}),
        ("empty upload", 400, {"attributes": "colour"}, {"image": ("x.jpg", b"")}),
        ("unknown attribute", 400, {"key": key, "attributes": "sleeve"}, None),
        ("unknown key", 404, {"key": "no_such_item", "attributes": "colour"}, None),
        ("key with path characters", 400, {"key": "../../etc/passwd", "attributes": "colour"}, None),
        ("k = 0", 400, {"key": key, "attributes": "colour", "k": "0"}, None),
        ("k over the limit", 400, {"key": key, "attributes": "colour", "k": "51"}, None),
        ("k not a number", 400, {"key": key, "attributes": "colour", "k": "ten"}, None),
        ("no query", 400, {"attributes": "colour"}, None),
        ("key and image", 400, {"key": key, "attributes": "colour"}, {"image": ("x.jpg", jpeg())}),
        ("no attributes", 400, {"key": key}, None),
        ("weight not a number", 400, {"key": key, "attributes": "colour:lots"}, None),
        ("weight not finite", 400, {"key": key, "attributes": "colour:nan"}, None),
        ("unknown filter column", 400, {"key": key, "attributes": "colour", "where": "price=1"}, None),
        ("filter value no item has", 400, {"key": key, "attributes": "colour", "where": "colour=chartreuse"}, None),
        ("filter not COL=VAL", 400, {"key": key, "attributes": "colour", "where": "red"}, None),
        ("two files", 400, {"attributes": "colour"}, {"image": ("x.jpg", jpeg()), "other": ("y.jpg", jpeg())}),
    ]


def test_hostile_requests_get_a_4xx_and_one_line(server, catalogue):
    _, _, key = catalogue
    for name, status, fields, files in hostile_cases(key):
        body, headers = multipart(fields, files)
        got, _, data = request(server + "/search", "POST", body, headers)
        assert got == status, (name, got, data)
        _is_one_line_error(data)
    raw = [("GET /search", "GET", "/search", None, {}, 405),
           ("unknown endpoint", "GET", "/admin", None, {}, 404),
           ("unknown item", "GET", "/items/nope/image", None, {}, 404),
           ("a path as item", "GET", "/items/..%2F..%2Fetc%2Fpasswd/image", None, {}, 400),
           ("a dotted path as item", "GET", "/items/../../etc/passwd", None, {}, 400),
           ("backslash path", "GET", "/items/..%5C..%5Cwin.ini", None, {}, 400),
           ("bad JSON", "POST", "/search", b"{not json", {"Content-Type": "application/json"}, 400),
           ("JSON list", "POST", "/search", b"[1, 2]", {"Content-Type": "application/json"}, 400),
           ("JSON weight not a number", "POST", "/search", json.dumps({"key": key, "attributes": {"colour": "x"}}).encode(),
            {"Content-Type": "application/json"}, 400),
           ("JSON key not a string", "POST", "/search", json.dumps({"key": 5, "attributes": "colour"}).encode(),
            {"Content-Type": "application/json"}, 400),
           ("plain text body", "POST", "/search", b"key=x", {"Content-Type": "text/plain"}, 415),
           ("declared body too large", "POST", "/search", b"x" * 200_000, {"Content-Type": "application/json"}, 413),
           ("items limit out of range", "GET", "/items?limit=100000", None, {}, 400),
           ("items offset not a number", "GET", "/items?offset=abc", None, {}, 400)]
    for name, method, path, body, headers, status in raw:
        got, _, data = request(server + path, method, body, headers)
        assert got == status, (name, got, data)
        message = _is_one_line_error(data)
        assert "root:" not in message   # no file content ever comes back
    assert json.loads(request(server + "/health")[2])["status"] == "ok"   # and the service is still up


def test_a_chunked_upload_over_the_limit_is_stopped_while_it_streams(server):
    import http.client
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body, headers = multipart({"attributes": "colour"}, {"image": ("x.jpg", b"\xff\xd8\xff" + b"0" * 300_000)})
    conn.putrequest("POST", "/search")
    for h, v in {**headers, "Transfer-Encoding": "chunked"}.items():
        conn.putheader(h, v)
    conn.endheaders()
    try:
        for i in range(0, len(body), 8192):
            chunk = body[i:i + 8192]
            conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass   # the server may stop reading first: that is the point
    response = conn.getresponse()
    assert response.status == 413
    _is_one_line_error(response.read())


def listening_addresses(port: int) -> set:
    """The local addresses with a socket listening on `port` (from /proc/net/tcp: state 0A = LISTEN)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_it_binds_to_localhost_and_refuses_another_models_index(run, catalogue, tmp_path):
    index, _, _ = catalogue
    proc, url = start_server(None, index)   # no model: key queries only
    try:
        status, got = search(url, {"attributes": "colour"}, {"image": ("x.jpg", jpeg())})
        assert status == 400 and "key" in got["error"]
        assert listening_addresses(int(url.rsplit(":", 1)[1])) == {"127.0.0.1"}
        taken = subprocess.run([sys.executable, "-m", "mclfir_dist.cli", "serve", "--index", str(index), "--port",
                                url.rsplit(":", 1)[1]], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert taken.returncode == 2 and "cannot listen on" in taken.stderr and "serving" not in taken.stdout
    finally:
        stop_server(proc)
    other = tmp_path / "index"
    import shutil
    shutil.copytree(index, other)
    meta = json.loads((other / "index.json").read_text())
    meta["model_hash"] = {a: "0" * 16 for a in meta["attributes"]}
    (other / "index.json").write_text(json.dumps(meta))
    done = subprocess.run([sys.executable, "-m", "mclfir_dist.cli", "serve", "--run", str(run), "--index", str(other),
                           "--port", free_port()], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "another model" in done.stderr and "Traceback" not in done.stderr


def test_the_serve_benchmark_runs_bounded_and_every_request_succeeds(run, tmp_path):
    done = subprocess.run([sys.executable, "-m", "mclfir_dist.bench.serve", "--run", str(run), "--sizes", "300",
                           "--concurrency", "1,4", "--requests", "12", "--uploads", "4", "--cli-repeats", "1",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    (row,) = rows
    assert row["items"] == 300 and set(row["http"]) == {"1", "4"}
    for level in row["http"].values():
        assert level["key"]["n"] == 12 and level["upload"]["n"] == 4
        assert level["key"]["failures"] == 0 and level["upload"]["failures"] == 0
    assert row["in_process"]["key"]["n"] == 12 and row["cli"]["n"] == 1
    assert "| 300 | key | HTTP | 4 |" in (tmp_path / "bench.md").read_text()


def test_a_foreign_host_header_is_refused_dns_rebinding(server):
    """A page on attacker.example that rebinds its name to 127.0.0.1 sends Host: attacker.example: refused
    (421) before any route runs; the loopback names the server is bound to are answered."""
    port = server.rsplit(":", 1)[1]
    status, _, body = request(server + "/items", headers={"Host": f"attacker.example:{port}"})
    assert status == 421 and "attacker.example" in json.loads(body)["error"]
    for name in (f"localhost:{port}", f"127.0.0.1:{port}"):
        assert request(server + "/health", headers={"Host": name})[0] == 200


def test_allowed_hosts_follow_the_bound_address_and_the_flag():
    import asyncio

    from mclfir_dist.serve.inputs import HostCheck, allowed_hosts, host_name
    assert host_name("[::1]:8000") == "::1" and host_name("Shop.Example:80") == "shop.example"
    assert allowed_hosts("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}
    assert allowed_hosts("10.0.0.5", ["shop.example"]) == {"10.0.0.5", "shop.example"}
    assert allowed_hosts("0.0.0.0") is None and allowed_hosts("0.0.0.0", ["shop.example", ""]) == {"shop.example"}
    sent = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message):
        sent.append(message)

    check = HostCheck(app, allowed_hosts("0.0.0.0", ["shop.example"]))
    for host, status in ((b"shop.example:8000", 200), (b"evil.example", 421), (b"", 421)):
        sent.clear()
        asyncio.run(check({"type": "http", "headers": [(b"host", host)]}, None, send))
        assert sent[0]["status"] == status, host


def test_only_image_bytes_leave_the_service_whatever_locations_txt_names(catalogue, tmp_path):
    """A hostile locations.txt naming a secret (directly, or through a link dressed as an image) got its bytes
    back with 200; now only bytes with an image's magic and a parsable header are served, and a refusal names
    no path."""
    import shutil
    index, query_jpg, _ = catalogue
    hostile = tmp_path / "idx"
    shutil.copytree(index, hostile)
    meta = json.loads((hostile / "index.json").read_text())
    meta["embed"]["source"] = {}   # locations are file paths, not shard names
    (hostile / "index.json").write_text(json.dumps(meta))
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0 the secret\n")
    (tmp_path / "photo.jpg").symlink_to(secret)
    keys = (hostile / "keys.txt").read_text().splitlines()
    rows = [str(secret), str(tmp_path / "photo.jpg"), str(query_jpg)] + [""] * (len(keys) - 3)
    (hostile / "locations.txt").write_text("".join(r + "\n" for r in rows))
    proc, url = start_server(None, hostile)
    try:
        for key in keys[:2]:
            status, _, body = request(f"{url}/items/{key}/image")
            assert status == 404 and b"secret" not in body and str(tmp_path).encode() not in body, body
        status, headers, body = request(f"{url}/items/{keys[2]}/image")
        assert status == 200 and headers["content-type"] == "image/jpeg" and body == query_jpg.read_bytes()
    finally:
        out = stop_server(proc)
    assert "Traceback" not in out


def test_images_root_confines_what_locations_txt_can_name(catalogue, tmp_path):
    """--images-root: a real image outside the root, or a link inside it that leads out, is a 404; an image
    under the root is served."""
    import shutil
    index, query_jpg, _ = catalogue
    confined = tmp_path / "idx"
    shutil.copytree(index, confined)
    meta = json.loads((confined / "index.json").read_text())
    meta["embed"]["source"] = {}
    (confined / "index.json").write_text(json.dumps(meta))
    root = tmp_path / "photos"
    root.mkdir()
    shutil.copy(query_jpg, root / "inside.jpg")
    (root / "link.jpg").symlink_to(query_jpg)   # an image, but outside the root once resolved
    keys = (confined / "keys.txt").read_text().splitlines()
    rows = [str(root / "inside.jpg"), str(query_jpg), str(root / "link.jpg")] + [""] * (len(keys) - 3)
    (confined / "locations.txt").write_text("".join(r + "\n" for r in rows))
    proc, url = start_server(None, confined, "--images-root", str(root))
    try:
        assert request(f"{url}/items/{keys[0]}/image")[0] == 200
        for key in keys[1:3]:
            status, _, body = request(f"{url}/items/{key}/image")
            assert status == 404 and str(tmp_path).encode() not in body, body
    finally:
        out = stop_server(proc)
    assert "Traceback" not in out and "outside --images-root" in out


def test_limits_and_messages_name_what_a_client_can_change(server):
    """The 413 states the upload limit /attributes publishes (it said the body limit, 64 KiB more); an image over
    the pixel limit names the service's flag, not a training key; a file PIL cannot identify is not described by
    PIL's buffer object."""
    limits = json.loads(request(server + "/attributes")[2])["limits"]
    status, _, data = request(server + "/search", "POST", b"x" * 200_000, {"Content-Type": "application/json"})
    assert status == 413 and f"{limits['max_upload_bytes']:,}-byte" in json.loads(data)["error"]
    big = io.BytesIO()
    from PIL import Image
    Image.new("RGB", (60, 60)).save(big, "PNG")
    status, got = search(server, {"attributes": "colour"}, {"image": ("x.png", big.getvalue())})
    assert status == 422 and "--max-pixels" in got["error"] and "data.max_image_pixels" not in got["error"]
    status, got = search(server, {"attributes": "colour"}, {"image": ("x.png", b"\x89PNG\r\n\x1a\n" + b"junk" * 50)})
    assert status == 422 and "BytesIO" not in got["error"] and "0x" not in got["error"], got


def test_weights_of_zero_or_below_are_refused_unless_a_positive_one_ranks(server, catalogue):
    _, _, key = catalogue
    for spec in ("colour:0", "colour:-1", "colour:0,garment_length:-2"):
        status, got = search(server, {"key": key, "attributes": spec})
        assert status == 400 and "above 0" in got["error"], (spec, got)
    status, got = search(server, {"key": key, "attributes": "colour:1,colour:2"})
    assert status == 400 and "twice" in got["error"]
    status, got = search(server, {"key": key, "attributes": "colour:1,garment_length:-0.5", "k": "5"})
    assert status == 200
    for h in got["hits"]:   # the score's parts come back, and add up
        assert set(h["scores"]) == {"colour", "garment_length"}
        assert abs(h["score"] - (h["scores"]["colour"] - 0.5 * h["scores"]["garment_length"])) < 1e-5


def test_vector_queries_and_paging_over_http(server, run, catalogue):
    from mclfir_dist import Retriever
    index, _, key = catalogue
    r = Retriever.from_run(run, index=index)
    vector = r.catalogue.vector("colour", key)
    body = json.dumps({"vector": {"colour": vector.tolist()}, "attributes": "colour", "k": 6}).encode()
    status, _, data = request(server + "/search", "POST", body, {"Content-Type": "application/json"})
    got = json.loads(data)
    want = r.search(vector, "colour", k=6)
    assert status == 200 and [h["key"] for h in got["hits"]] == [h.key for h in want] and got["query"]["vector"]
    short = json.dumps({"vector": {"colour": [0.1, 0.2]}, "attributes": "colour"}).encode()
    status, _, data = request(server + "/search", "POST", short, {"Content-Type": "application/json"})
    assert status == 422 and "finite numbers" in json.loads(data)["error"]
    status, first = search(server, {"key": key, "attributes": "colour", "k": "6"})
    status2, page2 = search(server, {"key": key, "attributes": "colour", "k": "3", "offset": "3"})
    assert status == status2 == 200 and page2["offset"] == 3
    assert [(h["key"], h["rank"]) for h in page2["hits"]] == [(h["key"], h["rank"]) for h in first["hits"][3:6]]
    status, got = search(server, {"key": key, "attributes": "colour", "offset": "-1"})
    assert status == 400 and "offset" in got["error"]


def test_openapi_documents_every_endpoint_with_schemas(server):
    spec = json.loads(request(server + "/openapi.json")[2])
    post = spec["paths"]["/search"]["post"]
    body = post["requestBody"]["content"]
    assert {"key", "vector", "attributes", "k", "offset", "where"} <= set(body["application/json"]["schema"]["properties"])
    assert "image" in body["multipart/form-data"]["schema"]["properties"]
    reply = post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    hit = spec["components"]["schemas"]["SearchHit"]["properties"]
    assert reply == "SearchReply" and {"rank", "key", "score", "scores", "values", "image"} <= set(hit)
    for path in ("/health", "/attributes", "/items"):
        ok = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert "$ref" in ok, path
    assert "400" in post["responses"] and "ErrorReply" in json.dumps(post["responses"]["400"])


def test_metrics_are_scraped_and_parsed_with_the_prometheus_parser(server, catalogue):
    from prometheus_client.parser import text_string_to_metric_families
    _, image, key = catalogue
    assert search(server, {"key": key, "attributes": "colour", "k": "3"})[0] == 200
    assert search(server, {"attributes": "colour", "k": "3"}, {"image": ("q.jpg", image.read_bytes())})[0] == 200
    request(server + "/items/no_such_thing")
    status, headers, data = request(server + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(data.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    ok = samples[("mclfir_requests_total", (("method", "POST"), ("route", "/search"), ("status", "200")))]
    assert ok >= 2
    assert samples[("mclfir_requests_total", (("method", "GET"), ("route", "/items/{rest:path}"), ("status", "404")))] >= 1
    assert samples[("mclfir_request_seconds_count", (("route", "/search"),))] >= 2
    assert samples[("mclfir_embed_batch_size_count", ())] >= 1 and samples[("mclfir_embed_seconds_count", ())] >= 1
    assert ("mclfir_embed_queue_depth", ()) in samples and samples[("mclfir_searches_total", (("query", "image"),))] >= 1
    assert samples[("mclfir_catalogue_items", ())] == json.loads(request(server + "/health")[2])["items"]


def test_the_access_log_writes_one_documented_line_per_request(run, catalogue, tmp_path):
    import re
    index, _, key = catalogue
    log = tmp_path / "access.log"
    proc, url = start_server(None, index, "--access-log", str(log))
    try:
        request(url + f"/items/{key}")
        search(url, {"key": key, "attributes": "colour", "k": "2"})
    finally:
        stop_server(proc)
    lines = log.read_text().splitlines()
    pattern = r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ 127\.0\.0\.1 "(GET|POST) \S+" \d{3} \d+ [\d.]+ route=\S+'
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    assert any(f'"GET /items/{key}" 200' in line and "route=/items/{rest:path}" in line for line in lines)
    assert any('"POST /search" 200' in line for line in lines)
    from mclfir_dist.serve.metrics import ACCESS_FORMAT
    assert ACCESS_FORMAT in (ROOT / "docs/serve.md").read_text()   # the format is documented as written
