"""ree.data.images.decode_image: every Pillow mode to the right uint8 RGB, on files Pillow (or
tifffile) writes here; unreadable, truncated and out-of-range images refused naming the file;
the readers decode through it."""
import colorsys
import io

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageCms, ImageFile

from ree.data import ImageFolderDataset, RecordIODataset, load_images, pack_payload, write_recordio
from ree.data.images import SUPPORTED_MODES, decode_image, decode_resized

RNG = np.random.default_rng(0)
H, W = 5, 7  # not square, so a transposition shows


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(grey, np.uint8)[..., None], 3, axis=2)


def over_black(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.rint(colour.astype(np.float64) * alpha[..., None] / 255).astype(np.uint8)


# A file format of this test: a 32-byte header naming the mode and size, then raw pixels. It
# reaches the modes that Pillow has but none of its file formats opens as (HSV, RGBX, RGBa,
# I;16L, I;16N).
_MAGIC = b"REEMODE\0"


class _RawModeFile(ImageFile.ImageFile):
    format = "REEMODE"

    def _open(self) -> None:
        mode, width, height = self.fp.read(32)[len(_MAGIC):].rstrip(b"\0").decode().split(",")
        self._mode, self._size = mode, (int(width), int(height))
        self.tile = [ImageFile._Tile("raw", (0, 0) + self._size, 32, (mode, 0, 1))]


@pytest.fixture(scope="module", autouse=True)
def raw_mode_format():
    Image.register_open(_RawModeFile.format, _RawModeFile, lambda prefix: prefix[:len(_MAGIC)] == _MAGIC)
    yield
    Image.OPEN.pop(_RawModeFile.format)
    Image.ID.remove(_RawModeFile.format)


def raw_file(mode: str, pixels: np.ndarray) -> bytes:
    header = (_MAGIC + f"{mode},{W},{H}".encode()).ljust(32, b"\0")
    return header + np.ascontiguousarray(pixels).tobytes()


def tiff_with_associated_alpha(pixels: np.ndarray, photometric: str) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, photometric=photometric, extrasamples=["assocalpha"], planarconfig="contig")
    return buffer.getvalue()


def u8(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, (H, W, *shape), dtype=np.uint8)


def case(mode: str):
    """(encoded file, the RGB it means, tolerance) for a file that Pillow opens in `mode`."""
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return colour_space_case(mode)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return wide_case(mode)
    if mode == "1":
        bits = RNG.random((H, W)) < 0.5
        return encode(Image.fromarray(bits), "PNG"), grey3(bits * 255), 0
    if mode == "L":
        grey = u8()
        return encode(Image.fromarray(grey), "PNG"), grey3(grey), 0
    if mode == "L+tRNS":  # a grey value marked transparent: black
        grey = u8()
        grey[0, 0] = 77
        return encode(Image.fromarray(grey), "PNG", transparency=77), grey3(np.where(grey == 77, 0, grey)), 0
    if mode == "LA":
        grey, alpha = u8(), u8()
        expected = grey3(over_black(grey[..., None], alpha)[..., 0])
        return encode(Image.fromarray(np.stack([grey, alpha], -1), "LA"), "PNG"), expected, 0
    if mode == "La":  # associated alpha: the stored grey is already over black
        grey = u8()
        alpha = np.maximum(grey, u8())  # valid premultiplied data: colour <= alpha
        return tiff_with_associated_alpha(np.stack([grey, alpha], -1), "minisblack"), grey3(grey), 0
    if mode in ("P", "P+tRNS", "PA"):
        picture = Image.fromarray(u8(3)).quantize(16)
        index = np.asarray(picture)
        colours = np.array(picture.getpalette(), np.uint8).reshape(-1, 3)[index]
        if mode == "P":
            return encode(picture, "PNG"), colours, 0
        if mode == "P+tRNS":
            expected = np.where((index == index[0, 0])[..., None], 0, colours)
            return encode(picture, "PNG", transparency=int(index[0, 0])), expected, 0
        alpha = u8()
        pa = picture.convert("PA")
        pa.putalpha(Image.fromarray(alpha))
        return encode(pa, "TIFF"), over_black(colours, alpha), 0
    if mode == "RGB":
        rgb = u8(3)
        return encode(Image.fromarray(rgb), "PNG"), rgb, 0
    if mode == "RGBA":
        rgba = u8(4)
        return encode(Image.fromarray(rgba, "RGBA"), "PNG"), over_black(rgba[..., :3], rgba[..., 3]), 0
    if mode == "RGBa":
        rgb = u8(3)
        return raw_file("RGBa", np.concatenate([rgb, np.maximum(rgb.max(-1, keepdims=True), u8(1))], -1)), rgb, 0
    if mode == "RGBX":
        rgbx = u8(4)
        return raw_file("RGBX", rgbx), rgbx[..., :3], 0
    raise AssertionError(mode)


def colour_space_case(mode: str):
    """`case` for the modes of other colour spaces than RGB."""
    if mode == "CMYK":  # the naive inversion: R = (255 - C)(255 - K) / 255
        cmyk = u8(4).astype(np.float64)
        rgb = (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255
        return encode(Image.fromarray(cmyk.astype(np.uint8), "CMYK"), "TIFF"), np.rint(rgb).astype(np.uint8), 1
    if mode == "YCbCr":  # JFIF (ITU-R BT.601, full range)
        ycc = u8(3)
        y, cb, cr = (ycc[..., k].astype(np.float64) for k in range(3))
        green = y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128)
        rgb = np.stack([y + 1.402 * (cr - 128), green, y + 1.772 * (cb - 128)], -1)
        return encode(Image.fromarray(ycc, "YCbCr"), "TIFF"), np.rint(np.clip(rgb, 0, 255)).astype(np.uint8), 1
    if mode == "LAB":  # skin tones and greys in sRGB, to CIELAB by LittleCMS: they come back
        tones = np.array([[224, 172, 105], [141, 85, 36], [198, 134, 66], [255, 219, 172], [128, 128, 128],
                          [20, 20, 20], [92, 58, 42]], np.uint8)
        rgb = tones[RNG.integers(0, len(tones), (H, W))]
        to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
        return encode(ImageCms.applyTransform(Image.fromarray(rgb), to_lab), "TIFF"), rgb, 2
    if mode == "HSV":
        hsv = u8(3)
        rgb = [colorsys.hsv_to_rgb(*(hsv[i, j] / 255.0)) for i in range(H) for j in range(W)]
        return raw_file("HSV", hsv), np.rint(np.array(rgb).reshape(H, W, 3) * 255).astype(np.uint8), 1
    raise AssertionError(mode)


def wide_case(mode: str):
    """`case` for the 16-bit integer and float modes."""
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = RNG.integers(0, 65536, (H, W)).astype(np.uint16)
        values[0, :3] = [0, 65535, 4096]  # the extremes, and a dark value Pillow's conversion clips to 255
        expected = grey3(np.rint(values / 257.0))  # 65535 / 255 = 257
        if mode == "I;16":
            return encode(Image.fromarray(values), "PNG"), expected, 0
        if mode == "I;16B":
            return encode(Image.frombytes("I;16B", (W, H), values.astype(">u2").tobytes()), "TIFF"), expected, 0
        if mode == "I":  # Pillow opens a 16-bit PGM as "I"
            return b"P5\n%d %d\n65535\n" % (W, H) + values.astype(">u2").tobytes(), expected, 0
        return raw_file(mode, values.astype("<u2" if mode == "I;16L" else "=u2")), expected, 0
    if mode == "F":
        values = RNG.random((H, W)).astype(np.float32)
        values[0, :2] = [0.0, 1.0]
        return encode(Image.fromarray(values), "TIFF"), grey3(np.rint(values.astype(np.float64) * 255)), 0
    raise AssertionError(mode)


CASES = ["1", "L", "L+tRNS", "LA", "La", "P", "P+tRNS", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
         "LAB", "HSV", "I;16", "I;16B", "I;16L", "I;16N", "I", "F"]


def test_the_cases_cover_every_mode():
    assert {c.split("+")[0] for c in CASES} == set(SUPPORTED_MODES)
    for mode in SUPPORTED_MODES:
        Image.new(mode, (1, 1))  # each is a mode of this Pillow


@pytest.mark.parametrize("mode", CASES)
def test_every_mode_decodes_to_its_intensities(mode, tmp_path):
    data, expected, tolerance = case(mode)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == mode.split("+")[0]  # the file exercises the mode it is meant to
    path = tmp_path / "face.img"
    path.write_bytes(data)
    for source in (data, path, str(path)):
        pixels = decode_image(source)
        assert pixels.dtype == np.uint8 and pixels.shape == (H, W, 3)
        assert np.abs(pixels.astype(int) - expected).max() <= tolerance, mode


def test_sixteen_bit_grey_is_not_clipped_as_pillow_does():
    values = np.full((H, W), 4096, np.uint16)  # 1/16 of the range: dark grey
    data = encode(Image.fromarray(values), "PNG")
    assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).min() == 255  # the bug this guards against
    assert (decode_image(data) == 16).all()


def test_values_outside_the_mode_range_are_refused(tmp_path):
    int32 = np.zeros((H, W), np.int32)
    float32 = np.zeros((H, W), np.float32)
    for name, array, match in (("big.tif", int32 + 70000, "I"), ("negative.tif", int32 - 1, "I"),
                               ("bright.tif", float32 + 1.5, "F"), ("nan.tif", float32 + np.nan, "F")):
        Image.fromarray(array).save(tmp_path / name)
        with pytest.raises(ValueError, match=rf"{name}: a '{match}' image with values"):
            decode_image(tmp_path / name)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_are_refused_even_when_pillow_is_told_to_accept_them(fmt, tmp_path, monkeypatch):
    picture = Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = encode(picture, fmt, quality=95) if fmt == "JPEG" else encode(picture, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with Image.open(path) as lenient:
        lenient.load()  # Pillow alone pads the missing half and reports success
    with pytest.raises(ValueError, match=rf"cut.{fmt.lower()}: not a readable image .*truncated"):
        decode_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is left as it was
    assert decode_image(data).shape == (64, 64, 3)


def test_unreadable_images_name_the_image(tmp_path):
    with pytest.raises(ValueError, match="encoded image: not a readable image"):
        decode_image(b"not an image")
    with pytest.raises(ValueError, match="train.rec record 7: not a readable image"):
        decode_image(b"", "train.rec record 7")
    with pytest.raises(ValueError, match="missing.png: not a readable image"):
        decode_image(tmp_path / "missing.png")


def test_decode_resized_reports_the_native_resolution():
    data = encode(Image.fromarray(RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)), "PNG")
    pixels, native = decode_resized(data, 16)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8 and native == 12


def test_every_reader_decodes_through_it(tmp_path):
    """A dark 16-bit grey (4096 -> 16) and a transparent white (-> black) through ImageFolder,
    RecordIO and load_images (which `ree quality` reads with)."""
    dark = encode(Image.fromarray(np.full((8, 8), 4096, np.uint16)), "PNG")
    clear = encode(Image.fromarray(np.full((8, 8, 4), [255, 255, 255, 0], np.uint8), "RGBA"), "PNG")
    expected = [torch.full((3, 8, 8), 16 / 127.5 - 1), torch.full((3, 8, 8), -1.0)]
    (tmp_path / "folder" / "a").mkdir(parents=True)
    paths = [tmp_path / "folder" / "a" / "0.png", tmp_path / "folder" / "a" / "1.png"]
    for path, data in zip(paths, (dark, clear)):
        path.write_bytes(data)
    write_recordio(tmp_path / "x.rec", [pack_payload(0, dark), pack_payload(0, clear)])
    folder = ImageFolderDataset(tmp_path / "folder", image_size=8)
    record = RecordIODataset(tmp_path / "x.rec", image_size=8)
    batch = load_images(paths, 8)
    for k in range(2):
        torch.testing.assert_close(folder[k][0], expected[k])
        torch.testing.assert_close(record[k][0], expected[k])
        torch.testing.assert_close(batch[k], expected[k])
