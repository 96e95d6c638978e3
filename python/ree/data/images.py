"""Encoded images -> uint8 RGB pixels: the one decoder behind every reader (ImageFolder,
RecordIO, `load_images`, `ree quality`, the LFW reader).

Every Pillow mode decodes to the intensities it means:

- 8-bit modes: "1" (0/255), "L" (grey copied to R, G, B), "P" (the palette expanded), "RGB",
  and "RGBX", "CMYK", "YCbCr", "LAB", "HSV" (converted to RGB by Pillow; LAB as LittleCMS does).
- Alpha ("LA", "PA", "RGBA", and "L"/"RGB"/"P" with a transparency entry): composited on
  black, colour · alpha / 255 rounded, so a fully transparent pixel is black whatever colour
  the file stores under it. Premultiplied alpha ("La", "RGBa": TIFF's associated alpha) is
  that composite already: its colour channels are taken as stored.
- High bit depth, grey, scaled to 0..255 by the mode's range and rounded: "I;16", "I;16L",
  "I;16B", "I;16N" (0..65535); "I" (32-bit: Pillow's mode for 16-bit PGM/PPM, which it scales
  to 0..65535 whatever their maxval; values must lie in 0..65535); "F" (32-bit float: values
  must lie in [0, 1]). Pillow's own conversion to RGB clips these at 255 instead, so a 16-bit
  face came out almost white.

Images that are unreadable or truncated, "I"/"F" values outside their range, and a mode this
list lacks (a future Pillow's) are refused with a ValueError naming the image. A truncated file
is never accepted as a partial image, whatever `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` says: the
image is decoded whole with that switch off. Multi-frame files give their first frame, upright
as a viewer shows it: the EXIF orientation is applied (`PIL.ImageOps.exif_transpose`).
"""
from __future__ import annotations

import io
import os
from contextlib import contextmanager
from typing import Iterator, Optional, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ..errors import DataError

ImageSource = Union[bytes, bytearray, memoryview, str, os.PathLike]

_CONVERTED = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_ALPHA = ("LA", "PA", "RGBA")
_PREMULTIPLIED = ("La", "RGBa")
_TRANSPARENCY_ENTRY = ("L", "RGB", "P")  # modes whose files may carry a transparent colour (PNG tRNS, GIF)
_HIGH_DEPTH = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}
SUPPORTED_MODES = _CONVERTED + _ALPHA + _PREMULTIPLIED + tuple(_HIGH_DEPTH)
"""The Pillow modes `decode_image` accepts."""


def decode_image(source: ImageSource, name: Optional[str] = None) -> np.ndarray:
    """The pixels of an image file or of encoded image bytes, as uint8 RGB [H, W, 3] at the
    image's own size, upright (its EXIF orientation applied; the module doc says how each
    Pillow mode maps to RGB).

    Args:
        source: a path, or the bytes of an encoded image (PNG, JPEG, TIFF, ... as Pillow reads).
        name: how errors name the image (e.g. "train.rec record 12"); default: the path, or
            "encoded image" for bytes.

    Raises:
        ValueError: naming the image, when it is missing, unreadable, truncated, in a mode
            not supported, or holds values outside its mode's range.
    """
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    if name is None:
        name = "encoded image" if is_bytes else os.fspath(source)
    try:
        with _strict_decoding(), Image.open(io.BytesIO(bytes(source)) if is_bytes else source) as picture:
            picture.load()
            return _to_rgb(ImageOps.exif_transpose(picture), name)
    except _Refused:
        raise
    except Exception as error:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, struct.error, ...) on bad data
        raise DataError(f"{name}: not a readable image ({type(error).__name__}: {error})") from error


def decode_resized(source: ImageSource, image_size: int, name: Optional[str] = None) -> tuple[np.ndarray, int]:
    """(`decode_image` resized to uint8 [image_size, image_size, 3] by bicubic interpolation,
    the native resolution: the shorter side of the image as stored).

    Raises:
        ValueError: as `decode_image`."""
    pixels = decode_image(source, name)
    native = min(pixels.shape[:2])
    if pixels.shape[:2] != (image_size, image_size):
        pixels = np.array(Image.fromarray(pixels).resize((image_size, image_size), Image.Resampling.BICUBIC))
    return pixels, native


class _Refused(DataError):
    """A readable image that `decode_image` will not turn into RGB (already names the image)."""


@contextmanager
def _strict_decoding() -> Iterator[None]:
    # LOAD_TRUNCATED_IMAGES is process-wide; code elsewhere may have set it, and with it Pillow
    # pads a truncated file with grey and reports success.
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _to_rgb(picture: Image.Image, name: str) -> np.ndarray:
    mode = picture.mode
    if mode in _HIGH_DEPTH:
        values = np.asarray(picture).astype(np.float64)
        top = _HIGH_DEPTH[mode]
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= top):
            raise _Refused(f"{name}: a {mode!r} image with values in [{values.min()}, {values.max()}]; "
                           f"only 0..{top:g} is understood as an intensity range")
        grey = np.rint(values * (255.0 / top)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in _ALPHA or (mode in _TRANSPARENCY_ENTRY and "transparency" in picture.info):
        rgba = np.asarray(picture.convert("RGBA")).astype(np.uint16)
        return ((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8)
    if mode in _PREMULTIPLIED:
        colour = np.asarray(picture)[..., :-1]
        return np.repeat(colour, 3, axis=2) if colour.shape[2] == 1 else colour.copy()
    if mode in _CONVERTED:
        return np.array(picture.convert("RGB"))
    raise _Refused(f"{name}: images in Pillow mode {mode!r} are not supported "
                   f"(supported: {', '.join(SUPPORTED_MODES)})")
