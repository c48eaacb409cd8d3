"""The search page in a real browser: Debian's Chromium (installed by .ci/run), driven by Playwright, against
`mclfir serve` on the tiny run. A key search and an upload search each show k results in score order, equal
to the service's own answer; a catalogue query marks the hits that share its value, an upload marks nothing.
Hits search when clicked, the query lives in the URL (back works), pages go past k, keys autocomplete, the
picker and grid work from the keyboard, and the layout holds at 1366x860 and at 390 px. Screenshots of each
state are saved beside the test's files (SCREENSHOTS)."""
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
    # an upload has no labels: no value is guessed from the hits, and no hit is marked against one
    assert "not marked" in tab.inner_text("#query-note") and tab.inner_text("#query-values") == ""
    assert not any(h["same"] for h in hits) and tab.query_selector("#same-count") is None
    tab.screenshot(path=str(tmp_path / "upload_search.png"), full_page=True)
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    tab.set_input_files("#file", str(bad))
    tab.wait_for_selector("#error:not([hidden])")
    assert "not a JPEG" in tab.inner_text("#error")
    # nothing of the previous query stays on screen after an error
    assert tab.query_selector_all("#results .hit") == [] and tab.query_selector("#query") is None
    assert not [e for e in errors if "415" not in e], errors   # the refused upload's 415 is the only console error
    errors.clear()
    tab.click("#tab-key")


def key_search(tab, url, key, k):
    """From a fresh page (default attribute, no filters), typed and searched as a user would."""
    tab.goto(url)
    tab.wait_for_selector("#picker img")
    tab.fill("#k", str(k))
    tab.fill("#key", key)
    tab.click("#go")
    tab.wait_for_function(f"document.querySelector('#query strong')?.textContent === {json.dumps(key)}")
    return shown(tab, k)


def test_click_a_hit_to_search_from_it_and_back_returns_to_the_query(page, catalogue, tmp_path):
    tab, url, errors = page
    _, _, key = catalogue
    first = key_search(tab, url, key, 4)
    assert f"key={key}" in tab.url
    target = first[1]["key"]
    tab.click(f"#results .hit[data-rank='2']")
    tab.wait_for_function(f"document.querySelector('#query strong')?.textContent === {json.dumps(target)}")
    assert f"key={target}" in tab.url and tab.input_value("#key") == target
    status, want = search(url, {"key": target, "attributes": "colour", "k": "4"})
    assert [h["key"] for h in shown(tab, 4)] == [h["key"] for h in want["hits"]]
    tab.go_back()
    tab.wait_for_function(f"document.querySelector('#query strong')?.textContent === {json.dumps(key)}")
    assert [h["key"] for h in shown(tab, 4)] == [h["key"] for h in first] and tab.input_value("#key") == key
    assert not errors, errors


def test_a_shared_url_restores_the_query_with_filters_and_a_score_breakdown(page, catalogue, tmp_path):
    tab, url, errors = page
    _, _, key = catalogue
    value = json.loads(request(url + f"/items/{key}")[2])["values"]["pattern"]
    shared = f"{url}/?key={key}&attributes=colour:1,garment_length:0.5&k=3&where=pattern={value}"
    tab.goto(shared)
    hits = shown(tab, 3)
    status, want = search(url, {"key": key, "attributes": "colour:1,garment_length:0.5", "k": "3",
                                "where": f"pattern={value}"})
    assert status == 200 and [h["key"] for h in hits] == [h["key"] for h in want["hits"]]
    assert tab.input_value("#f-pattern") == value and tab.is_checked("#use-garment_length")
    assert tab.inner_text("#summary [data-filter=pattern]") == f"pattern = {value}"   # the active filter is shown
    parts = tab.inner_text("#results .hit[data-rank='1'] .parts")
    assert "colour" in parts and "garment_length" in parts   # why the hit ranks: each attribute's similarity
    card = tab.inner_text("#results .hit[data-rank='1'] .values")
    assert all(c in card for c in ("colour", "garment_length", "neckline", "pattern", "sleeve_length"))
    tab.screenshot(path=str(tmp_path / "combined_filtered.png"), full_page=True)
    assert not errors, errors


def test_paging_goes_past_k_and_back(page, catalogue):
    tab, url, errors = page
    _, _, key = catalogue
    key_search(tab, url, key, 3)
    status, want = search(url, {"key": key, "attributes": "colour", "k": "9"})
    tab.click("#next")
    tab.wait_for_function("document.querySelector('#results .hit')?.dataset.rank === '4'")
    assert [h["key"] for h in shown(tab, 3)] == [h["key"] for h in want["hits"][3:6]] and "offset=3" in tab.url
    tab.click("#next")
    tab.wait_for_function("document.querySelector('#results .hit')?.dataset.rank === '7'")
    tab.click("#prev")
    tab.wait_for_function("document.querySelector('#results .hit')?.dataset.rank === '4'")
    assert [h["rank"] for h in shown(tab, 3)] == [4, 5, 6]
    assert not errors, errors


def test_keys_autocomplete_and_the_picker_and_grid_work_from_the_keyboard(page, catalogue):
    tab, url, errors = page
    _, _, key = catalogue
    tab.click("#tab-key")
    tab.fill("#key", key[:4])
    tab.wait_for_function("document.querySelectorAll('#key-list option').length > 0")
    options = tab.eval_on_selector_all("#key-list option", "os => os.map(o => o.value)")
    assert options and all(o.startswith(key[:4]) for o in options)
    tab.focus("#picker button:first-child")
    tab.keyboard.press("ArrowRight")
    second = tab.evaluate("document.activeElement.dataset.key")
    assert second == tab.eval_on_selector("#picker button:nth-child(2)", "b => b.dataset.key")
    tab.keyboard.press("Enter")
    tab.wait_for_function(f"document.querySelector('#query strong')?.textContent === {json.dumps(second)}")
    tab.wait_for_selector("#results .hit")
    tab.focus("#results .hit[data-rank='1']")
    tab.keyboard.press("ArrowRight")
    third = tab.evaluate("document.activeElement.dataset.key")
    assert third == tab.eval_on_selector("#results .hit[data-rank='2']", "h => h.dataset.key")
    tab.keyboard.press("Enter")
    tab.wait_for_function(f"document.querySelector('#query strong')?.textContent === {json.dumps(third)}")
    assert not errors, errors


def test_the_layout_holds_on_a_laptop_and_a_phone(page, catalogue, tmp_path):
    tab, url, errors = page
    _, image, key = catalogue
    for width, height in [(1366, 860), (390, 844)]:
        tab.set_viewport_size({"width": width, "height": height})
        tab.goto(url)
        tab.wait_for_selector("#picker img")
        go = tab.eval_on_selector("#go", "b => b.getBoundingClientRect().toJSON()")
        assert go["bottom"] <= height and go["right"] <= width, (width, go)   # Search is on the first screen
        title = tab.eval_on_selector("header h1", "h => h.getBoundingClientRect().toJSON()")
        assert title["right"] <= width and title["top"] >= 0, (width, title)   # the header is not clipped
        assert tab.evaluate("document.documentElement.scrollWidth") <= width   # no sideways scrolling
        tab.click("#tab-upload")
        tabs = tab.eval_on_selector(".tabs", "t => t.getBoundingClientRect().toJSON()")
        tab.set_input_files("#file", {"name": "a-photo-with-a-very-long-file-name-from-a-phone-camera-2026.jpg",
                                      "mimeType": "image/jpeg", "buffer": image.read_bytes()})
        tab.wait_for_selector("#results .hit")
        drop = tab.eval_on_selector("#drop", "d => ({...d.getBoundingClientRect().toJSON(), "
                                             "overflow: d.scrollWidth > d.clientWidth})")
        assert drop["top"] >= tabs["bottom"] and not drop["overflow"], (width, drop, tabs)   # no overlap, no spill
        tab.screenshot(path=str(tmp_path / f"layout_{width}.png"), full_page=False)
        tab.click("#tab-key")
    tab.set_viewport_size({"width": 1366, "height": 800})
    assert not errors, errors
