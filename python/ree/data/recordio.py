"""insightface / MXNet RecordIO (.rec + .idx) read and written without mxnet (docs/spec.md §7).

File format: a sequence of records, each `uint32 magic 0xced7230a`, `uint32 lrecord` (low 29
bits: the length; high 3 bits: the part flag, 0 for a whole record, 1/2/3 for the first, middle
and last part of a record whose payload held the magic word at a 4-byte boundary: the parts are
joined with the magic word between them), the payload, zero padding to 4 bytes. The .idx file
is text, one `key<TAB>offset` line per record.

insightface payload: header `<IfQQ` (flag, label, id, id2); when flag > 0, `flag` float32
labels follow the header (the class is the first); then the encoded image. Record 0 whose
header has flag >= 2, labels [a, b, ...] and no image is the dataset header: the images are the
keys 1 .. a-1. Without it, every key is an image.
"""
from __future__ import annotations

import os
import struct
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .arrays import to_tensor
from .images import decode_resized

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2


class RecordIOError(DataError):
    """A malformed .rec / .idx file (the message names the file and where)."""


def pack_payload(label: float | Sequence[float], image: bytes, id: int = 0, id2: int = 0) -> bytes:
    """An insightface payload: header, the labels when there are several, the image bytes."""
    labels = np.atleast_1d(np.asarray(label, np.float32))
    if len(labels) == 1:
        return _HEADER.pack(0, float(labels[0]), id, id2) + bytes(image)
    return _HEADER.pack(len(labels), 0.0, id, id2) + labels.tobytes() + bytes(image)


def unpack_payload(payload: bytes) -> tuple[np.ndarray, bytes]:
    """(labels float32 [k >= 1], image bytes) from an insightface payload."""
    if len(payload) < _HEADER.size:
        raise ValueError(f"payload of {len(payload)} bytes is shorter than the {_HEADER.size}-byte header")
    flag, label, _, _ = _HEADER.unpack_from(payload)
    if flag == 0:
        return np.array([label], np.float32), payload[_HEADER.size:]
    end = _HEADER.size + 4 * flag
    if len(payload) < end:
        raise ValueError(f"header announces {flag} labels but the payload holds {len(payload)} bytes")
    return np.frombuffer(payload[_HEADER.size:end], np.float32).copy(), payload[end:]


def write_recordio(rec_path: str | os.PathLike, payloads: Iterable[bytes],
                   idx_path: str | os.PathLike | None = None, keys: Iterable[int] | None = None) -> None:
    """Writes payloads as records (keys 0, 1, ... unless given) and, with idx_path, the index."""
    offsets = []
    with open(rec_path, "wb") as rec:
        for payload in payloads:
            offsets.append(rec.tell())
            rec.write(_encode_record(bytes(payload)))
    if idx_path is not None:
        keys = range(len(offsets)) if keys is None else list(keys)
        if len(keys) != len(offsets):
            raise ValueError(f"keys: {len(keys)} keys for {len(offsets)} payloads")
        with open(idx_path, "w") as idx:
            idx.writelines(f"{key}\t{offset}\n" for key, offset in zip(keys, offsets))


def _encode_record(payload: bytes) -> bytes:
    """One record; split into parts wherever the payload holds the magic word at a 4-byte boundary."""
    parts, start = [], 0
    for i in range(0, len(payload) - 3, 4):
        if payload[i:i + 4] == _MAGIC_BYTES:
            parts.append(payload[start:i])
            start = i + 4
    parts.append(payload[start:])
    out = bytearray()
    for n, part in enumerate(parts):
        flag = 0 if len(parts) == 1 else 1 if n == 0 else 3 if n == len(parts) - 1 else 2
        out += _MAGIC_BYTES + struct.pack("<I", (flag << 29) | len(part)) + part
        out += b"\0" * (-len(part) % 4)
    return bytes(out)


def _record_header(file, path: str, offset: int) -> tuple[int, int]:
    """(continuation flag, payload length) of the record header at `offset`; the file is left
    at the payload."""
    file.seek(offset)
    head = file.read(8)
    if len(head) < 8:
        raise RecordIOError(f"{path}: truncated record at offset {offset} (end of file in the header)")
    magic, lrecord = struct.unpack("<II", head)
    if magic != MAGIC:
        raise RecordIOError(f"{path}: bad magic 0x{magic:08x} at offset {offset} (expected 0x{MAGIC:08x}); "
                            "not a RecordIO file, or the .idx offsets do not match it")
    return lrecord >> 29, lrecord & _LENGTH_MASK


def _read_record(file, path: str, offset: int) -> bytes:
    """The payload of the record starting at `offset`, its parts joined."""
    chunks = []
    while True:
        flag, length = _record_header(file, path, offset)
        data = file.read(length)
        if len(data) < length:
            raise RecordIOError(f"{path}: truncated record at offset {offset} ({len(data)} of {length} bytes)")
        chunks.append(data)
        if flag in (0, 3):
            return _MAGIC_BYTES.join(chunks)
        offset += 8 + length + (-length % 4)


def _scan(file, path: str) -> list[int]:
    """Offsets of the records of a .rec read from start to end (when there is no .idx)."""
    offsets, offset = [], 0
    size = os.fstat(file.fileno()).st_size
    while offset < size:
        flag, length = _record_header(file, path, offset)
        if offset + 8 + length > size:
            raise RecordIOError(f"{path}: truncated record at offset {offset} "
                                f"({size - offset - 8} of {length} bytes)")
        if flag in (0, 1):
            offsets.append(offset)
        offset += 8 + length + (-length % 4)
    return offsets


def _read_index(path: str) -> dict[int, int]:
    index = {}
    with open(path) as idx:
        for number, line in enumerate(idx, 1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                key, offset = int(fields[0]), int(fields[1])
            except (IndexError, ValueError):
                raise RecordIOError(f"{path}: line {number} is not 'key<TAB>offset': {line.rstrip()!r}") from None
            index[key] = offset
    return index


class RecordIODataset(Dataset):
    """Images of an insightface .rec file; items (image float32 [3, H, W] normalised, label,
    native resolution), as `FaceArrays` gives them.

    idx_path: the .idx file; None uses the .idx beside the .rec when there is one, else the .rec
    is scanned from start to end (record n gets key n). Images are decoded by
    `ree.data.images.decode_image` and resized to image_size. `class_names` are the labels as
    strings.

    Raises:
        FileNotFoundError: no .rec file.
        RecordIOError: a malformed file, or one without images (no record, or a header record
            that announces none); the message names the file.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None,
                 image_size: int = 112):
        self.rec_path = os.fspath(rec_path)
        if not isinstance(image_size, (int, np.integer)) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.image_size = int(image_size)
        if not os.path.isfile(self.rec_path):
            raise FileNotFoundError(f"rec_path: no such file {self.rec_path}")
        if idx_path is None:
            sibling = os.path.splitext(self.rec_path)[0] + ".idx"
            idx_path = sibling if os.path.isfile(sibling) else None
        self.idx_path = None if idx_path is None else os.fspath(idx_path)
        self._file, self._pid = None, None
        if self.idx_path is not None:
            self._offsets = _read_index(self.idx_path)
        else:
            self._offsets = dict(enumerate(_scan(self._handle(), self.rec_path)))
        self.num_classes_in_header = None
        self.keys = sorted(self._offsets)
        if 0 in self._offsets:
            labels, image = self._record(0)
            if len(labels) >= 2 and len(image) == 0:
                first, end = int(labels[0]), int(labels[1])
                self.keys = list(range(1, first))
                self.num_classes_in_header = end - first
                if not self.keys:
                    raise RecordIOError(f"{self.rec_path}: the header record announces no images (keys 1..{first - 1})")
                missing = [k for k in self.keys if k not in self._offsets]
                if missing:
                    raise RecordIOError(f"{self.idx_path or self.rec_path}: the header announces keys 1..{first - 1} "
                                        f"but key {missing[0]} is missing ({len(missing)} missing)")
        if not self.keys:
            raise RecordIOError(f"{self.idx_path or self.rec_path}: holds no records (an empty dataset)")
        self._labels = None

    def _handle(self):
        # One handle per process: a handle inherited through fork would share its file offset.
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open(self.rec_path, "rb"), os.getpid()
        return self._file

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": None}

    def _record(self, key: int) -> tuple[np.ndarray, bytes]:
        if key not in self._offsets:
            raise RecordIOError(f"{self.idx_path or self.rec_path}: no record with key {key}")
        payload = _read_record(self._handle(), self.rec_path, self._offsets[key])
        try:
            return unpack_payload(payload)
        except ValueError as error:
            raise RecordIOError(f"{self.rec_path}: record {key}: {error}") from None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        key = self.keys[index]
        labels, image = self._record(key)
        pixels, native = decode_resized(image, self.image_size, f"{self.rec_path} record {key}")
        return to_tensor(pixels), int(labels[0]), native

    def _label(self, key: int) -> int:
        """The class of a record, reading its header only when the record is in one part."""
        file = self._handle()
        file.seek(self._offsets[key])
        head = file.read(8 + _HEADER.size + 4)
        if len(head) == 8 + _HEADER.size + 4:
            magic, lrecord = struct.unpack_from("<II", head)
            flag = _HEADER.unpack_from(head, 8)[0]
            if magic == MAGIC and lrecord >> 29 == 0 and (lrecord & _LENGTH_MASK) >= _HEADER.size + 4 * flag:
                return int(_HEADER.unpack_from(head, 8)[1] if flag == 0
                           else struct.unpack_from("<f", head, 8 + _HEADER.size)[0])
        return int(self._record(key)[0][0])

    @property
    def labels(self) -> np.ndarray:
        """int64 [N] class of every image (read from the record headers on first use)."""
        if self._labels is None:
            self._labels = np.array([self._label(k) for k in self.keys], np.int64)
        return self._labels

    @property
    def num_classes(self) -> int:
        """From the dataset header when there is one, else 1 + the largest label."""
        if self.num_classes_in_header is not None:
            return self.num_classes_in_header
        return int(self.labels.max()) + 1

    @property
    def class_names(self) -> list[str]:
        """The labels as strings, "0", "1", ...: a .rec file does not name its classes."""
        return [str(label) for label in range(self.num_classes)]
