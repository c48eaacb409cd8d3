"""The embedded default dataset: seeded, procedurally rendered garments.

Five visual attributes, drawn independently per image, so each one can only be retrieved
by looking at the right part of the picture (sleeves, colour, texture, collar, hem).
Rendering is pure PIL and deterministic for a given seed.
"""
from __future__ import annotations

import io
from typing import Dict, Iterator, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ATTRIBUTES: Dict[str, List[str]] = {
    "sleeve_length": ["sleeveless", "short", "elbow", "long"],
    "colour": ["red", "green", "blue", "yellow", "purple", "black"],
    "pattern": ["solid", "stripes", "dots", "checks"],
    "neckline": ["round", "v", "square"],
    "garment_length": ["cropped", "hip", "knee"],
}

_RGB = {
    "red": (200, 30, 35), "green": (40, 150, 50), "blue": (35, 60, 190),
    "yellow": (230, 200, 30), "purple": (130, 40, 150), "black": (25, 25, 25),
}
_SLEEVE = {"sleeveless": 0.0, "short": 0.10, "elbow": 0.22, "long": 0.36}
_HEM = {"cropped": 0.52, "hip": 0.70, "knee": 0.90}


def _pattern_layer(size: int, base: Tuple[int, int, int], pattern: str, rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (size, size), base)
    d = ImageDraw.Draw(img)
    contrast = np.array(base) * 0.45 + (140 if sum(base) < 150 else 0)
    accent = tuple(int(min(255, c)) for c in contrast)
    step = max(4, int(size * rng.uniform(0.07, 0.10)))
    offset = int(rng.integers(0, step))
    width = max(1, step // 3)
    if pattern in ("stripes", "checks"):
        for y in range(offset - step, size, step):
            d.rectangle([0, y, size, y + width], fill=accent)
    if pattern == "checks":
        for x in range(offset - step, size, step):
            d.rectangle([x, 0, x + width, size], fill=accent)
    if pattern == "dots":
        r = max(1, step // 4)
        for y in range(offset - step, size, step):
            for x in range(offset - step + (step // 2 if (y // step) % 2 else 0), size, step):
                d.ellipse([x - r, y - r, x + r, y + r], fill=accent)
    return img


def render_garment(labels: Dict[str, str], size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one garment with the given attribute values at `size` x `size`."""
    s = size * 2  # supersample, then downscale for anti-aliasing
    bg = tuple(int(v) for v in rng.integers(205, 250, size=3))
    canvas = Image.new("RGB", (s, s), bg)
    mask = Image.new("L", (s, s), 0)
    md = ImageDraw.Draw(mask)

    scale = rng.uniform(0.85, 1.0)
    cx = s * (0.5 + rng.uniform(-0.04, 0.04))
    top = s * (0.14 + rng.uniform(-0.02, 0.02))
    half_w = s * 0.18 * scale
    hem = s * _HEM[labels["garment_length"]] * scale + top * 0.2
    flare = s * 0.03 * scale
    md.polygon([(cx - half_w, top), (cx + half_w, top), (cx + half_w + flare, hem), (cx - half_w - flare, hem)],
               fill=255)

    sleeve = _SLEEVE[labels["sleeve_length"]] * s * scale
    if sleeve > 0:
        sw = s * 0.09 * scale
        for sign in (-1, 1):
            sx = cx + sign * half_w
            ex, ey = sx + sign * sleeve * 0.75, top + sleeve * 0.9
            md.polygon([(sx, top), (sx, top + sw * 1.2), (ex, ey + sw * 0.5), (ex + sign * sw * 0.6, ey - sw * 0.5)],
                       fill=255)

    neck_w, neck_d = s * 0.12 * scale, s * 0.17 * scale
    kind = labels["neckline"]
    if kind == "round":
        md.ellipse([cx - neck_w, top - neck_d * 0.7, cx + neck_w, top + neck_d * 0.9], fill=0)
    elif kind == "v":
        md.polygon([(cx - neck_w * 1.1, top - 1), (cx + neck_w * 1.1, top - 1), (cx, top + neck_d * 1.5)], fill=0)
    else:
        md.rectangle([cx - neck_w, top - 1, cx + neck_w, top + neck_d * 0.8], fill=0)

    jitter = rng.integers(-18, 19, size=3)
    base = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(_RGB[labels["colour"]], jitter))
    canvas.paste(_pattern_layer(s, base, labels["pattern"], rng), (0, 0), mask)
    img = canvas.resize((size, size), Image.Resampling.LANCZOS)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 0.5)))
    noise = rng.normal(0, 4, size=(size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def generate(num_images: int, image_size: int, seed: int) -> Iterator[Tuple[str, bytes, Dict[str, str]]]:
    """Yield (key, jpeg_bytes, {attribute: value}) for `num_images` garments."""
    rng = np.random.default_rng(seed)
    names = list(ATTRIBUTES)
    for i in range(num_images):
        labels = {a: ATTRIBUTES[a][int(rng.integers(len(ATTRIBUTES[a])))] for a in names}
        img = render_garment(labels, image_size, rng)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=92)
        yield f"syn{i:06d}", buf.getvalue(), labels
