"""A folder of photos with a labels CSV, as a catalogue team keeps them: the stand-in for "your own CSV of
photos" in the README's five commands (the embedded garment renderer, written out as JPEG files).

    python scripts/example_photos.py --out photos [--count 600] [--size 64]

Writes photos/images/NNNNNN.jpg and photos/labels.csv (columns: filename, id, colour, pattern, sleeve_length,
neckline, garment_length)."""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from mclfir_dist.data.synthetic import ATTRIBUTES, generate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--count", type=int, default=600)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (_, jpeg, labels) in enumerate(generate(args.count, args.size, args.seed)):
        name = f"images/{i:06d}.jpg"
        (args.out / name).write_bytes(jpeg)
        rows.append({"filename": name, "id": f"{i:06d}", **labels})
    with open(args.out / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["filename", "id", *ATTRIBUTES])
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} photos and {args.out / 'labels.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
