"""Reading training images: 8-bit RGB after EXIF orientation, with a size guard.

Every image is seen upright (EXIF orientation applied, as a photo viewer shows
it), transparent areas are laid on a background colour, and every pixel format
PIL reads (grayscale, palette, CMYK, 16-bit) becomes 8-bit RGB. kohya converts
with `Image.convert("RGB")` only, which drops alpha to black-ish edges and
ignores EXIF orientation; we do not copy that.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Larger images are refused as possible decompression bombs (a small file that
# decodes to gigabytes). PIL refuses above 2 * Image.MAX_IMAGE_PIXELS, this same
# number by default; we keep the limit even where another package in the process
# (a ComfyUI custom node, say) has raised or disabled PIL's.
MAX_IMAGE_PIXELS = 178_956_970

# What a corrupt, truncated or foreign file raises while PIL opens or decodes it.
DECODE_ERRORS = (OSError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError, ValueError)

# EXIF orientations 5-8 rotate by 90 degrees, so width and height swap.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "La", "RGBa", "PA"})


@contextmanager
def open_image(path: Path):
    """Open `path` lazily (header only), refusing declared sizes over MAX_IMAGE_PIXELS.

    Raises DatasetError naming the file when the header declares too many pixels.
    """
    try:
        with warnings.catch_warnings():
            # Our own limit below decides; PIL's warning (at half of it) would only confuse.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise DatasetError(f"{path}: {error} — downscale the image first") from error
    with image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise DatasetError(
                f"{path}: declares {width}x{height} = {width * height:,} pixels, over the limit of "
                f"{MAX_IMAGE_PIXELS:,} (a possible decompression bomb) — downscale the image first"
            )
        yield image


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once its EXIF orientation is applied."""
    width, height = image.size
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, reading only the file's header.

    PngImageFile.getexif decodes the whole image when no eXIf chunk precedes
    the pixel data; the base class reads only what the header gave, which is
    where PNG writers put eXIf.
    """
    with open_image(Path(path)) as image:
        width, height = image.size
        orientation = Image.Image.getexif(image).get(_EXIF_ORIENTATION, 1)
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def load_rgb(path: Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode `path` fully into an upright 8-bit RGB image.

    Alpha (RGBA, LA, palette or grayscale/RGB with a transparency entry) is
    composited over `background`; 16-bit samples are scaled to 0..255 with
    rounding, v * 255 / 65535. Raises DatasetError naming the file if it cannot
    be decoded or declares more than MAX_IMAGE_PIXELS pixels.
    """
    path = Path(path)
    try:
        with open_image(path) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
    except DECODE_ERRORS as error:
        raise DatasetError(f"{path}: cannot be decoded ({error}) — re-export it as PNG or JPEG") from error
    return _to_rgb(upright, background)


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, background)
        flat.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return flat
    return image if image.mode == "RGB" else image.convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # PIL's convert("L") clips 16-bit values at 255 instead of scaling them.
    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    eight_bit = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(eight_bit).convert("RGB")
