"""The search page in a real browser: Debian's Chromium (installed by .ci/run), driven by Playwright, against
`mclfir serve` on the tiny run. A key search and an upload search each show k results in score order, equal
to the service's own answer, with the hits that share the query's value marked."""
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import needs
from test_serve import request, search, start_server, stop_server

pytestmark = [needs("faiss"), needs("fastapi"), needs("playwright")]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("CI must run the browser test: .ci/run installs Debian's chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def page(run, catalogue):
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (apt-get install chromium); CI installs it")
    from playwright.sync_api import sync_playwright
    index, _, _ = catalogue
    proc, url = start_server(run, index)
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        tab = browser.new_page(viewport={"width": 1366, "height": 800})   # a laptop screen
        tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(url)
        tab.wait_for_selector("#picker img")
        yield tab, url, errors
        browser.close()
    stop_server(proc)


def shown(tab, k):
    tab.wait_for_function(f"document.querySelectorAll('#results .hit').length === {k}")
    return tab.eval_on_selector_all(
        "#results .hit", "els => els.map(e => ({key: e.dataset.key, rank: +e.dataset.rank, score: +e.dataset.score, "
                         "same: e.classList.contains('same'), loaded: e.querySelector('img').complete}))")


def test_a_key_search_shows_k_results_in_order_with_the_same_values_marked(page, catalogue, tmp_path):
    tab, url, errors = page
    _, _, key = catalogue
    tab.fill("#k", "6")
    tab.fill("#key", key)
    tab.click("#go")
    hits = shown(tab, 6)
    status, want = search(url, {"key": key, "attributes": "colour", "k": "6"})
    assert status == 200 and [h["key"] for h in hits] == [h["key"] for h in want["hits"]]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5, 6]
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    value = json.loads(request(url + f"/items/{key}")[2])["values"]["colour"]
    assert value in tab.inner_text("#query-values")
    assert [h["same"] for h in hits] == [w["values"]["colour"] == value for w in want["hits"]]
    tab.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
    tab.screenshot(path=str(tmp_path / "key_search.png"), full_page=True)
    assert (tmp_path / "key_search.png").stat().st_size > 10_000
    assert not errors, errors


def test_an_upload_search_and_a_refusal(page, catalogue, tmp_path):
    tab, url, errors = page
    _, image, _ = catalogue
    tab.click("#tab-upload")
    tab.fill("#k", "5")
    tab.set_input_files("#file", str(image))   # choosing a file searches at once
    tab.wait_for_function("document.querySelector('#query strong')?.textContent === 'uploaded photo'")
    hits = shown(tab, 5)
    status, want = search(url, {"attributes": "colour", "k": "5"}, {"image": ("q.jpg", Path(image).read_bytes())})
    assert status == 200 and [h["key"] for h in hits] == [h["key"] for h in want["hits"]]
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    assert "most common" in tab.inner_text("#query-box")   # an upload has no label: the page says what it marks
    tab.screenshot(path=str(tmp_path / "upload_search.png"), full_page=True)
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    tab.set_input_files("#file", str(bad))
    tab.wait_for_selector("#error:not([hidden])")
    assert "not a JPEG" in tab.inner_text("#error")
    assert not [e for e in errors if "415" not in e], errors   # the refused upload's 415 is the only console error
