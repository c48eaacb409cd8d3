"""The docs site's reference pages, generated from the code so they cannot drift:

    python scripts/gen_reference.py            # writes docs/reference/config.md and docs/reference/cli.md
    python scripts/gen_reference.py --check    # exit 1, naming the page, when a committed page is stale

config.md comes from `mclfir train --help-config` (config.describe), cli.md from the argparse parsers
(every subcommand's --help). tests/test_docs.py runs --check."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "reference"


def config_page() -> str:
    import mclfir_dist.configure  # noqa: F401 (fills the registries: the choices of each key)
    from mclfir_dist.config import describe
    sections: dict = {}
    for line in describe():
        m = re.match(r"^(\S+) \(default (.*?)\): (.*)$", line)
        key, default, meaning = m.groups()
        top = key.split(".")[0] if "." in key else "top level"
        sections.setdefault(top, []).append((key, default, meaning))
    out = ["# Configuration reference", "",
           "Every key of a config file, its default and its meaning, generated from `mclfir train --help-config` "
           "by `scripts/gen_reference.py`. Any key can be set in the YAML file or on the command line as "
           "`dotted.key=value`; an unknown key, a wrong type or a value outside its choices stops with a message "
           "naming the key. Plug-ins may add sections (they are listed by `--help-config` once loaded).", ""]
    for top, rows in sections.items():
        out += [f"## {top}", "", "| key | default | meaning |", "|---|---|---|"]
        out += [f"| `{k}` | `{d}` | {m.replace('|', '&#124;')} |" for k, d, m in rows]
        out.append("")
    return "\n".join(out)


def _parsers(parser, prefix="mclfir"):
    """(command line, parser) for every parser under `parser`, depth first."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prefix} {name}")


def cli_page() -> str:
    os.environ["COLUMNS"] = "100"   # argparse wraps to the terminal: fixed, so the page is the same everywhere
    from mclfir_dist.cli import build_parser
    out = ["# Command-line reference", "",
           "Every `mclfir` command's `--help`, generated from its argparse parser by `scripts/gen_reference.py`. "
           "Errors a user can fix print one line and exit 2.", ""]
    for name, parser in _parsers(build_parser()):
        parser.prog = name
        out += [f"## `{name}`", "", "```text", parser.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed pages instead of writing")
    args = ap.parse_args(argv)
    pages = {OUT / "config.md": config_page(), OUT / "cli.md": cli_page()}
    stale = [p for p, text in pages.items() if not p.is_file() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"{p.relative_to(ROOT)} is stale: run python scripts/gen_reference.py", file=sys.stderr)
        return 1 if stale else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for p, text in pages.items():
        p.write_text(text)
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
