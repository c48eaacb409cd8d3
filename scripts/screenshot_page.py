"""A screenshot of the search page after a key search, in Debian's Chromium (as tests/test_page.py drives it).

    make serve &        # or: mclfir serve --run RUN --index INDEX
    .venv/bin/python scripts/screenshot_page.py --url http://127.0.0.1:8000 --out docs/serve_page.png
"""
import argparse
import shutil

from playwright.sync_api import sync_playwright


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--out", default="docs/serve_page.png")
    p.add_argument("--key", help="the query item (default: the first one the page offers)")
    p.add_argument("--k", default="12")
    p.add_argument("--attribute", default="", help="rank by this attribute instead of the first")
    p.add_argument("--query", default="", help="a page URL's query instead (key=K&attributes=a:1,b:0.5&where=c=v&k=8)")
    args = p.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium: apt-get install chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        tab = browser.new_page(viewport={"width": 1366, "height": 800})
        tab.goto(args.url + ("/?" + args.query if args.query else ""))
        tab.wait_for_selector("#picker img")
        if args.query:
            tab.wait_for_selector("#results .hit")
        elif args.key:
            tab.fill("#key", args.key)
        if args.attribute:
            tab.eval_on_selector_all("#attrs input[type=checkbox]", "bs => bs.forEach(b => b.checked = false)")
            tab.check(f"#use-{args.attribute}")
        if not args.query:
            tab.fill("#k", args.k)
            tab.click("#go")
            tab.wait_for_function(f"document.querySelectorAll('#results .hit').length === {int(args.k)}")
        tab.wait_for_function("[...document.images].every(i => i.complete)")
        tab.evaluate("document.querySelector('aside').scrollTop = 0")
        tab.screenshot(path=args.out)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
