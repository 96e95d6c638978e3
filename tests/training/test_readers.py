"""ImageFolder and insightface RecordIO readers, on files written here (docs/spec.md §7)."""
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from ree.data import FaceArrays, ImageFolderDataset, RecordIODataset, RecordIOError, pack_payload, write_recordio
from ree.data.recordio import MAGIC, unpack_payload


def _png(seed: int, size: int = 8) -> tuple[bytes, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # lossless: pixels come back exactly
    return buffer.getvalue(), pixels


def _normalised(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1


# ---------------------------------------------------------------------------- ImageFolder


def test_image_folder(tmp_path):
    expected = {}
    for name, seeds in (("bob", (1, 2)), ("alice", (3,)), ("carol", (4, 5, 6))):
        (tmp_path / name).mkdir()
        for seed in seeds:
            data, pixels = _png(seed)
            (tmp_path / name / f"{seed}.png").write_bytes(data)
            expected[seed] = pixels
    (tmp_path / "carol" / "notes.txt").write_text("not an image")
    (tmp_path / "stray.png").write_bytes(_png(9)[0])  # outside any identity folder
    ds = ImageFolderDataset(tmp_path, image_size=8)
    assert ds.classes == ds.class_names == ["alice", "bob", "carol"] and ds.num_classes == 3
    assert len(ds) == 6 and ds.labels.tolist() == [0, 1, 1, 2, 2, 2]
    image, label, resolution = ds[1]
    assert (label, resolution) == (1, 8) and image.dtype == torch.float32
    torch.testing.assert_close(image, _normalised(expected[1]))
    arrays = ds.to_arrays()
    assert isinstance(arrays, FaceArrays) and arrays.images.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(arrays.images[0], expected[3])
    resized = ImageFolderDataset(tmp_path, image_size=20)
    assert resized[0][0].shape == (3, 20, 20) and resized[0][2] == 8


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="root"):
        ImageFolderDataset(tmp_path / "missing", 8)
    (tmp_path / "empty_identity").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path, 8)
    (tmp_path / "empty_identity" / "x.jpg").write_bytes(b"garbage")
    ds = ImageFolderDataset(tmp_path, 8)
    with pytest.raises(ValueError, match="x.jpg"):
        ds[0]
    with pytest.raises(ValueError, match="image_size"):
        ImageFolderDataset(tmp_path, 0)


def test_an_empty_identity_folder_is_refused_naming_it(tmp_path):
    for name in ("alice", "bob", "carol"):
        (tmp_path / name).mkdir()
    (tmp_path / "alice" / "0.png").write_bytes(_png(0)[0])
    (tmp_path / "carol" / "0.png").write_bytes(_png(1)[0])
    (tmp_path / "bob" / "notes.txt").write_text("no image here")
    # bob would be label 1, a class without a single image
    with pytest.raises(ValueError, match=f"identity folder {tmp_path / 'bob'} holds no images"):
        ImageFolderDataset(tmp_path, 8)
    (tmp_path / "bob" / "0.jpg").write_bytes(b"")  # an image file, even unreadable, is an image of bob
    assert ImageFolderDataset(tmp_path, 8).labels.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="no identity folders"):
        ImageFolderDataset(tmp_path / "alice", 8)


# ---------------------------------------------------------------------------- RecordIO


def test_record_layout_matches_the_format_byte_for_byte(tmp_path):
    # Written by hand from the format, so reader and writer cannot share a misreading.
    magic = struct.pack("<I", MAGIC)
    write_recordio(tmp_path / "a.rec", [b"abcde", b"wxyz"], tmp_path / "a.idx")
    assert (tmp_path / "a.rec").read_bytes() == (magic + struct.pack("<I", 5) + b"abcde\0\0\0"
                                                 + magic + struct.pack("<I", 4) + b"wxyz")
    assert (tmp_path / "a.idx").read_text() == "0\t0\n1\t16\n"
    # A payload holding the magic word at a 4-byte boundary is split into parts (flags 1, 3).
    write_recordio(tmp_path / "b.rec", [b"ab\0\0" + magic + b"cd"])
    assert (tmp_path / "b.rec").read_bytes() == (magic + struct.pack("<I", (1 << 29) | 4) + b"ab\0\0"
                                                 + magic + struct.pack("<I", (3 << 29) | 2) + b"cd\0\0")
    # insightface payload header <IfQQ: flag, label, id, id2; labels follow when flag > 0.
    assert pack_payload(7, b"IMG", id=3) == struct.pack("<IfQQ", 0, 7.0, 3, 0) + b"IMG"
    assert pack_payload([7, 2.5], b"IMG") == struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 7, 2.5) + b"IMG"
    labels, image = unpack_payload(struct.pack("<IfQQ", 1, 0.0, 0, 0) + struct.pack("<f", 4.0) + b"IMG")
    assert labels.tolist() == [4.0] and image == b"IMG"


def _insightface_files(tmp_path, with_header: bool, with_idx: bool, name: str = "train"):
    """A small insightface-style dataset: 5 images of 3 identities, optionally preceded by the
    header record (key 0: labels [first image key past the end, end of identity records]) and
    followed by the identity records that insightface writes after the images."""
    labels = [0, 0, 1, 2, 2]
    images = [_png(10 + i) for i in range(5)]
    payloads = [pack_payload(label, data, id=i) for i, (label, (data, _)) in enumerate(zip(labels, images))]
    if with_header:
        first, end = 1 + len(payloads), 1 + len(payloads) + 3
        identity_records = [pack_payload([1 + 2 * c, 3 + 2 * c], b"") for c in range(3)]
        payloads = [pack_payload([first, end], b"")] + payloads + identity_records
    rec, idx = tmp_path / f"{name}.rec", tmp_path / f"{name}.idx"
    write_recordio(rec, payloads, idx if with_idx else None)
    return rec, labels, [p for _, p in images]


@pytest.mark.parametrize("with_header", [True, False])
@pytest.mark.parametrize("with_idx", [True, False])
def test_recordio_reads_images_and_labels(tmp_path, with_header, with_idx):
    rec, labels, pixels = _insightface_files(tmp_path, with_header, with_idx)
    ds = RecordIODataset(rec, image_size=8)
    assert ds.idx_path == (str(tmp_path / "train.idx") if with_idx else None)
    assert len(ds) == 5
    assert ds.keys == ([1, 2, 3, 4, 5] if with_header else [0, 1, 2, 3, 4])
    assert ds.labels.tolist() == labels and ds.num_classes == 3 and ds.class_names == ["0", "1", "2"]
    for i in range(5):
        image, label, resolution = ds[i]
        assert (label, resolution) == (labels[i], 8)
        torch.testing.assert_close(image, _normalised(pixels[i]))
    assert ds[0][0].shape == (3, 8, 8)
    assert RecordIODataset(rec, image_size=16)[0][0].shape == (3, 16, 16)


def test_recordio_keys_from_the_idx_and_explicit_idx_path(tmp_path):
    payloads = [pack_payload(c, _png(c)[0]) for c in (4, 1, 3)]
    write_recordio(tmp_path / "x.rec", payloads, tmp_path / "other.idx", keys=[10, 3, 7])
    ds = RecordIODataset(tmp_path / "x.rec", tmp_path / "other.idx", image_size=8)
    assert ds.keys == [3, 7, 10] and ds.labels.tolist() == [1, 3, 4]
    assert RecordIODataset(tmp_path / "x.rec", image_size=8).keys == [0, 1, 2]  # no sibling .idx: scanned


def test_recordio_multilabel_and_multipart_records(tmp_path):
    data, pixels = _png(20)
    magic = MAGIC | (MAGIC << 32)
    payloads = [
        struct.pack("<IfQQ", 3, 0.0, 0, 0) + struct.pack("<3f", 2, 0.5, 9) + data,  # flag 3: class 2
        struct.pack("<IfQQ", 1, 0.0, 0, 0) + struct.pack("<f", 1) + data,  # flag 1
        pack_payload(0, data, id=MAGIC, id2=magic),  # the magic word three times: a 4-part record
    ]
    write_recordio(tmp_path / "m.rec", payloads, tmp_path / "m.idx")
    raw = (tmp_path / "m.rec").read_bytes()
    assert raw.count(struct.pack("<I", MAGIC)) == 3 + 3  # one per part, none left in payloads
    for idx in (tmp_path / "m.idx", None):
        if idx is None:
            os.remove(tmp_path / "m.idx")
        ds = RecordIODataset(tmp_path / "m.rec", image_size=8)
        assert len(ds) == 3 and ds.labels.tolist() == [2, 1, 0] and ds.num_classes == 3
        for i in range(3):
            torch.testing.assert_close(ds[i][0], _normalised(pixels))
            assert ds[i][1] == [2, 1, 0][i]
        assert ds._record(2)[1] == data


def test_recordio_pickles_for_dataloader_workers(tmp_path):
    rec, labels, _ = _insightface_files(tmp_path, True, True)
    ds = RecordIODataset(rec, image_size=8)
    ds[0]  # opens the file
    clone = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(clone[3][0], ds[3][0])
    images, batch_labels, resolutions = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert images.shape == (5, 3, 8, 8) and batch_labels.tolist() == labels and resolutions.tolist() == [8] * 5


def test_recordio_errors_name_the_file(tmp_path):
    rec, _, _ = _insightface_files(tmp_path, True, True)
    raw = rec.read_bytes()
    bad = tmp_path / "bad_magic.rec"
    bad.write_bytes(b"\0\0\0\0" + raw[4:])
    with pytest.raises(RecordIOError, match="bad_magic.rec.*magic"):
        RecordIODataset(bad, tmp_path / "train.idx", image_size=8)
    with pytest.raises(RecordIOError, match="bad_magic.rec.*magic"):
        RecordIODataset(bad, image_size=8)  # scanned
    last_image = int((tmp_path / "train.idx").read_text().splitlines()[5].split("\t")[1])
    cut = tmp_path / "cut.rec"
    cut.write_bytes(raw[:last_image + 40])  # ends inside the last image
    with pytest.raises(RecordIOError, match="cut.rec.*truncated"):
        RecordIODataset(cut, image_size=8)
    ds = RecordIODataset(cut, tmp_path / "train.idx", image_size=8)
    assert ds[3][1] == 2  # the records before the cut still read
    with pytest.raises(RecordIOError, match="cut.rec.*truncated"):
        ds[4]
    # The header announces keys 1..5 but the index lacks key 3.
    lines = (tmp_path / "train.idx").read_text().splitlines()
    (tmp_path / "holes.idx").write_text("\n".join(line for line in lines if not line.startswith("3\t")) + "\n")
    with pytest.raises(RecordIOError, match="holes.idx.*key 3"):
        RecordIODataset(rec, tmp_path / "holes.idx", image_size=8)
    (tmp_path / "junk.idx").write_text("0\t0\nnot a line\n")
    with pytest.raises(RecordIOError, match="junk.idx.*line 2"):
        RecordIODataset(rec, tmp_path / "junk.idx", image_size=8)
    # An image that does not decode.
    write_recordio(tmp_path / "noimg.rec", [pack_payload(0, b"not an image")])
    with pytest.raises(ValueError, match="noimg.rec record 0"):
        RecordIODataset(tmp_path / "noimg.rec", image_size=8)[0]
    with pytest.raises(FileNotFoundError, match="rec_path"):
        RecordIODataset(tmp_path / "absent.rec", image_size=8)
    with pytest.raises(ValueError, match="image_size"):
        RecordIODataset(rec, image_size=0)


def test_recordio_without_images_is_refused(tmp_path):
    # insightface's header record announcing keys 1..0: no image, followed by identity records
    write_recordio(tmp_path / "none.rec", [pack_payload([1, 3], b""), pack_payload([1, 1], b""),
                                           pack_payload([1, 1], b"")], tmp_path / "none.idx")
    with pytest.raises(RecordIOError, match=r"none.rec: the header record announces no images"):
        RecordIODataset(tmp_path / "none.rec", image_size=8)
    (tmp_path / "empty.rec").write_bytes(b"")
    with pytest.raises(RecordIOError, match=r"empty.rec: holds no records"):
        RecordIODataset(tmp_path / "empty.rec", image_size=8)
    (tmp_path / "empty.idx").write_text("")
    with pytest.raises(RecordIOError, match=r"empty.idx: holds no records"):
        RecordIODataset(tmp_path / "empty.rec", image_size=8)
