"""`ree quality` on folders as people have them (issue 18, items 3 and 4): a row depends on its
image alone; every image file is scored or reported by name; non-UTF-8 names survive into the
CSV; linked folders are followed once (loops detected); images read upright (EXIF orientation);
non-images are skipped and counted; the framing check."""
import csv
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from ree.cli import main
from ree.data.images import decode_image
from ree.quality import Crop, framing_warnings, scan_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, image_folder):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", str(image_folder), "--output-dir", str(out), "--steps", "2", "--batch-size",
                 "8", "--warmup-steps", "1", "--embedding-size", "16", "--no-progress", "--no-tensorboard",
                 "--lr", "0.05"]) == 0
    return out / "last.pt"


def rows_of(path):
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def quality(checkpoint, folder, out, batch_size=4):
    assert main(["quality", "--checkpoint", str(checkpoint), "--images", str(folder), "--output", str(out),
                 "--batch-size", str(batch_size)]) == 0
    return rows_of(out)


def assert_same_row(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key != "path":
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-5), key


def test_a_row_depends_on_its_image_alone(tmp_path, checkpoint, image_folder):
    target = image_folder / "id2" / "3.png"
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(target, alone / "x.png")
    reference = quality(checkpoint, alone, tmp_path / "alone.csv", batch_size=1)["x.png"]
    for batch_size in (3, 16):  # other batch sizes, other positions, another folder
        rows = quality(checkpoint, image_folder, tmp_path / f"all{batch_size}.csv", batch_size)
        assert_same_row(rows["id2/3.png"], reference)
    crowd = tmp_path / "crowd"
    shutil.copytree(image_folder / "id4", crowd)
    shutil.copy(target, crowd / "a.png")  # first of its folder now
    assert_same_row(quality(checkpoint, crowd, tmp_path / "crowd.csv", 5)["a.png"], reference)


def exif_rotated(upright: np.ndarray) -> bytes:
    """A PNG stored rotated, whose EXIF orientation (6: turn 90° clockwise to view) shows `upright`
    (Pillow applies no orientation to PNGs by itself, unlike TIFFs)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1))).save(buffer, format="PNG", exif=exif)
    return buffer.getvalue()


def test_images_are_read_upright():
    upright = np.zeros((16, 24, 3), np.uint8)
    upright[:8, :8] = 255  # a mark at the top left
    np.testing.assert_array_equal(decode_image(exif_rotated(upright)), upright)


def test_a_messy_folder(tmp_path, checkpoint, image_folder, capsys):
    root = tmp_path / "messy"
    (root / "sub").mkdir(parents=True)
    shutil.copy(image_folder / "id0" / "0.png", root / "sub" / "plain.png")
    shutil.copy(image_folder / "id0" / "1.png", os.fsencode(root) + b"/caf\xe9 \xff.png")  # not UTF-8
    (root / "notes.txt").write_text("not an image")
    (root / "Thumbs.db").write_bytes(b"\0" * 10)
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    pixels = np.array(Image.open(image_folder / "id1" / "0.png"))
    (root / "turned.png").write_bytes(exif_rotated(pixels))
    Image.fromarray(pixels).save(root / "upright.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(image_folder / "id3" / "0.png", elsewhere / "linked.png")
    (root / "link").symlink_to(elsewhere, target_is_directory=True)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)

    scan = scan_folder(root)
    assert scan.skipped == 2 and scan.repeated_folders == [b"sub/loop"]
    rows = quality(checkpoint, root, tmp_path / "m.csv")
    assert sorted(rows) == sorted(["sub/plain.png", os.fsdecode(b"caf\xe9 \xff.png"), "turned.png", "upright.png",
                                   "link/linked.png"])
    assert b"caf\xe9 \xff.png" in (tmp_path / "m.csv").read_bytes()
    assert_same_row(rows["turned.png"], rows["upright.png"])
    err = capsys.readouterr().err
    assert "scored 5 images; skipped 2 files that are not images" in err
    assert "broken.jpg: not a readable image" in err and "sub/loop" in err


def test_framing_warnings():
    rng = np.random.default_rng(0)
    face = np.full((32, 32), 150.0)
    face[14, 8:24] = 40.0  # the eyes' row at 14/32 = 44 %
    framed = [Crop(np.empty(0), (64, 64), face + rng.normal(0, 5, face.shape)) for _ in range(20)]
    assert framing_warnings(["f"] * 20, framed) == []
    high = [Crop(np.empty(0), (64, 64), np.roll(c.grey, -5, axis=0)) for c in framed]
    assert any("eyes at 28%" in w for w in framing_warnings(["f"] * 20, high))
    wide = [Crop(np.empty(0), (100, 64), c.grey) for c in framed[:1]]
    assert framing_warnings(["wide.png"], wide) == ["wide.png: 100 × 64 px is not square; the crop is stretched "
                                                    "to a square face"]


def test_a_folder_that_cannot_be_listed_is_reported_by_name(tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    (tmp_path / "a.png").write_bytes(b"")
    listing = os.scandir

    def scandir(path):
        if path.endswith(b"locked"):
            raise PermissionError(13, "Permission denied")
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    scan = scan_folder(tmp_path)
    assert scan.images == [b"a.png"]
    assert scan.unlisted == ["locked: cannot be listed (PermissionError: Permission denied)"]
