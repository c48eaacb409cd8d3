"""Reading one sample's image: the size from the JPEG header first, then the decode.

Only what is wrong with the image itself is an `ImageRejected` (skipped and counted by the loaders): a JPEG that
does not decode, or one over `data.max_image_pixels`. Anything else (out of memory in a transform, a bug) is
not caught here and stops the run, so it is never reported as a bad image.
"""
from __future__ import annotations

from typing import Tuple

from typing import TYPE_CHECKING

if TYPE_CHECKING:   # torch loads on the first decode: key searches and `mclfir --help` never need it
    import torch

DEFAULT_MAX_PIXELS = 40_000_000   # 6,300 x 6,300: above any catalogue photo; a 20,000^2 JPEG decodes to 1.2 GB

# start-of-frame markers (baseline, extended, progressive, lossless...): they carry the image size
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _reason(e: RuntimeError) -> str:
    """torchvision's first line without its source location ('decode_jpeg, /__w/.../decode_jpeg.cpp:171, ')."""
    import re
    text = str(e).splitlines()[0] if str(e) else "RuntimeError"
    return re.sub(r"^[\w()]+, \S+:\d+, ", "", text)


class ImageRejected(ValueError):
    """A sample's image does not decode or is over the pixel limit; the loaders skip and count it."""


def jpeg_size(data: bytes) -> Tuple[int, int]:
    """(height, width) from a JPEG's frame header, without decoding it."""
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        raise ImageRejected("not a JPEG (no start-of-image marker)")
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            raise ImageRejected(f"corrupt JPEG header at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:      # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:   # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF:
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            if height == 0 or width == 0:
                raise ImageRejected("JPEG frame header with a zero size")
            return height, width
        if marker == 0xDA or length < 2:
            break
        i += 2 + length
    raise ImageRejected("JPEG without a frame header (truncated or corrupt)")


def check_pixels(height: int, width: int, max_pixels: int, limit: str = "data.max_image_pixels") -> None:
    """`limit` names the setting the user can change where this runs (a config key, or a service flag)."""
    if max_pixels and height * width > max_pixels:
        raise ImageRejected(f"{width}x{height} = {height * width:,} pixels, over {limit}={max_pixels:,}")


def check_jpeg_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[int, int]:
    """(height, width), or ImageRejected for a header that does not parse or an image over the limit."""
    height, width = jpeg_size(data)
    check_pixels(height, width, max_pixels)
    return height, width


def decode_any(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, limit: str = "data.max_image_pixels") -> torch.Tensor:
    """A file of any format torchvision decodes (catalogue and query images), RGB uint8 C x H x W; the size
    is read from the header (PIL) and checked before any pixel is decoded."""
    import io
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            check_pixels(height, width, max_pixels, limit)
            if getattr(im, "is_animated", False):   # torchvision would decode every frame: PIL decodes the first
                return _first_frame(im)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as e:
        raise ImageRejected(f"over the pixel limit ({e})") from None
    except UnidentifiedImageError:   # its text names PIL's buffer object ("<_io.BytesIO object at 0x...>")
        raise ImageRejected("not an image (no format PIL reads: JPEG, PNG, GIF, WebP, BMP, TIFF...)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageRejected(f"not an image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    import torch
    from torchvision.io import ImageReadMode, decode_image
    try:
        # EXIF orientation applied: a phone photo saved sideways is embedded upright, as a browser shows it
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                             apply_exif_orientation=True)
    except RuntimeError as e:
        raise ImageRejected(f"image does not decode ({_reason(e)})") from None
    return image[0] if image.dim() == 4 else image


def _first_frame(im) -> torch.Tensor:
    """Frame 0 of an animation (GIF, APNG, WebP) as RGB uint8 C x H x W; no other frame is decoded."""
    import numpy as np
    import torch
    from PIL import ImageOps
    im.seek(0)
    frame = ImageOps.exif_transpose(im.convert("RGB") if im.mode != "RGB" else im.copy())
    return torch.from_numpy(np.asarray(frame.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


def decode(jpeg: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """RGB uint8 C x H x W. The header is checked before any pixel is decoded."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    check_jpeg_header(jpeg, max_pixels)
    try:
        return decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:   # libjpeg's errors; the size was checked, so this is the data
        raise ImageRejected(f"JPEG does not decode ({_reason(e)})") from None
