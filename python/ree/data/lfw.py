"""Labeled Faces in the Wild (LFW) as users have it: an extracted folder, the downloaded `.tgz`
read in place, or scikit-learn's cache, with its pairs files.

Layouts read (docs/lfw.md):
- a folder `lfw-deepfunneled/`, `lfw_funneled/` or `lfw/` of `<Name>/<Name>_<NNNN>.jpg` (or a
  folder holding one of them, or holding `lfw-deepfunneled.tgz` / `lfw-funneled.tgz` / `lfw.tgz`);
- one of those `.tgz` archives, read in place;
- scikit-learn's cache `~/scikit_learn_data/lfw_home/` (`$SCIKIT_LEARN_DATA/lfw_home/`).
The pairs files (`pairs.txt`, `pairsDevTrain.txt`, `pairsDevTest.txt`) are looked up beside the
image folder or archive and one level up.

`find_lfw` applies the search order of the CLI: an explicit path (`--lfw`), then `REE_LFW_DIR`,
then scikit-learn's cache. The face is located by fractions of the image size (`FACE_BOX`), so the
250 px originals and half-size copies read alike. Errors name the file and, for pairs files, the
line; nothing is skipped silently.

Source: G. B. Huang, M. Ramesh, T. Berg, E. Learned-Miller, "Labeled Faces in the Wild: A Database
for Studying Face Recognition in Unconstrained Environments", UMass TR 07-49, 2007 (pairs format:
its README, section 3c).
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..errors import DataError, UserError
from .arrays import save_npz_atomic
from .images import decode_image

IMAGE_FOLDERS = ("lfw-deepfunneled", "lfw_funneled", "lfw")
"""Image folder names, in the order they are preferred when a folder holds several."""
ARCHIVES = ("lfw-deepfunneled.tgz", "lfw-funneled.tgz", "lfw.tgz")
PAIRS_FILES = ("pairs.txt", "pairsDevTrain.txt", "pairsDevTest.txt")
ENV_VAR = "REE_LFW_DIR"

FACE_BOX = (0.208, 0.728, 0.240, 0.760)
"""(top, bottom, left, right) of the face square as fractions of the image: on the mean
deep-funneled LFW face it matches the 112 × 112 ArcFace framing (eyes about 45 % down the square).
The funneled and original LFW images centre the face the same way, at 250 × 250."""

_IMAGE_NAME = re.compile(r"^(?P<name>.+)_(?P<num>\d{4})\.jpg$")


class LfwNotFound(UserError, FileNotFoundError):
    """No LFW copy where it was looked for; the message lists the places and how to provide one."""


class PairsError(DataError):
    """A malformed pairs file; the message names the file and the line."""


class Pair(NamedTuple):
    """One line of a pairs file: (name_a, number_a) against (name_b, number_b); numbers start at 1."""

    name_a: str
    num_a: int
    name_b: str
    num_b: int
    line: int

    @property
    def same(self) -> bool:
        return self.name_a == self.name_b


def image_name(name: str, num: int) -> str:
    """The file name LFW gives image `num` (from 1) of `name`."""
    return f"{name}_{num:04d}.jpg"


@dataclass
class LfwSource:
    """Where one LFW copy lives: `images` is the image folder or the `.tgz` archive, `pairs_dir`
    the folder holding its pairs files (None when none was found)."""

    images: Path
    pairs_dir: Optional[Path]

    @property
    def is_archive(self) -> bool:
        return self.images.is_file()

    def pairs_path(self, file_name: str) -> Path:
        """The path of one pairs file; LfwNotFound naming where it was looked for."""
        if self.pairs_dir is None or not (self.pairs_dir / file_name).is_file():
            places = [self.images.parent, self.images.parent.parent] if self.pairs_dir is None else [self.pairs_dir]
            raise LfwNotFound(f"{file_name} not found beside {self.images} (looked in "
                              f"{', '.join(str(p) for p in places)})")
        return self.pairs_dir / file_name


def _pairs_dir(images: Path) -> Optional[Path]:
    for folder in (images.parent, images.parent.parent):
        if any((folder / f).is_file() for f in PAIRS_FILES):
            return folder
    return None


def _holds_people(folder: Path) -> bool:
    """Whether `folder` is itself an image folder: a subfolder holding `<sub>_<NNNN>.jpg`."""
    for entry in os.scandir(folder):
        if entry.is_dir():
            with os.scandir(entry.path) as files:
                for f in files:
                    match = _IMAGE_NAME.match(f.name)
                    if match and match["name"] == entry.name:
                        return True
    return False


def open_source(path: str | os.PathLike) -> LfwSource:
    """The LFW copy at `path`: an image folder, a folder holding one (or an archive), or an archive.

    Raises:
        LfwNotFound: `path` holds no LFW layout (the message lists what was expected).
    """
    path = Path(path).expanduser()
    if path.is_file():
        if not path.name.endswith((".tgz", ".tar.gz")):
            raise LfwNotFound(f"{path}: not an LFW archive (expected one of {', '.join(ARCHIVES)})")
        return LfwSource(path, _pairs_dir(path))
    if not path.is_dir():
        raise LfwNotFound(f"{path}: no such file or directory")
    for name in IMAGE_FOLDERS:
        if (path / name).is_dir():
            return LfwSource(path / name, _pairs_dir(path / name))
    for name in ARCHIVES:
        if (path / name).is_file():
            return LfwSource(path / name, _pairs_dir(path / name))
    if _holds_people(path):
        return LfwSource(path, _pairs_dir(path))
    raise LfwNotFound(f"{path} holds no LFW copy: expected a folder {' / '.join(IMAGE_FOLDERS)} of "
                      f"<Name>/<Name>_<NNNN>.jpg, or an archive {' / '.join(ARCHIVES)}")


def sklearn_cache() -> Path:
    """scikit-learn's LFW folder: `$SCIKIT_LEARN_DATA/lfw_home`, default `~/scikit_learn_data/lfw_home`."""
    home = os.environ.get("SCIKIT_LEARN_DATA", os.path.join("~", "scikit_learn_data"))
    return Path(home).expanduser() / "lfw_home"


def find_lfw(path: str | os.PathLike | None = None) -> LfwSource:
    """LFW from `path` when given, else `$REE_LFW_DIR`, else scikit-learn's cache.

    Raises:
        LfwNotFound: none of them holds LFW; the message names each place and `REE_LFW_DIR`.
    """
    if path is not None:
        return open_source(path)
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return open_source(env)
        except LfwNotFound as err:
            raise LfwNotFound(f"{ENV_VAR}={env}: {err}") from err
    cache = sklearn_cache()
    if cache.is_dir():
        return open_source(cache)
    raise LfwNotFound(f"LFW not found: set {ENV_VAR} (or pass --lfw DIR to ree train, demo or lfw) to a folder "
                      f"holding lfw-deepfunneled/ (or lfw_funneled/, lfw/, or their .tgz) and the pairs files, or "
                      f"fetch it with scikit-learn (looked in {cache})")


# --------------------------------------------------------------------------------------------- pairs

def read_pairs(path: str | os.PathLike) -> Tuple[List[List[Pair]], int]:
    """The folds of a pairs file and the number of same-person pairs per fold.

    `pairs.txt` starts with "<folds> <n>", then per fold n same-person lines `Name i j` and n
    different-person lines `Name1 i Name2 j`; `pairsDevTrain.txt` / `pairsDevTest.txt` start with
    "<n>" (one fold).

    Raises:
        PairsError: a malformed header or line, or a line of the wrong kind or count
            (the message gives the file and line number).
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise PairsError(f"{path}:1: empty pairs file")
    header = lines[0].split()
    if len(header) not in (1, 2) or not all(h.isdigit() and int(h) > 0 for h in header):
        raise PairsError(f"{path}:1: malformed header {lines[0]!r} (expected '<folds> <pairs>' or '<pairs>')")
    folds, per_fold = (1, int(header[0])) if len(header) == 1 else (int(header[0]), int(header[1]))
    expected = folds * 2 * per_fold
    if len(lines) - 1 != expected:
        raise PairsError(f"{path}: the header announces {folds} fold(s) × 2 × {per_fold} = {expected} pairs, "
                         f"the file has {len(lines) - 1} lines after it")
    out: List[List[Pair]] = []
    number = 1
    for _ in range(folds):
        fold = []
        for kind in ("same", "different"):
            for _ in range(per_fold):
                number += 1
                fold.append(_parse_pair(lines[number - 1], kind, path, number))
        out.append(fold)
    return out, per_fold


def _parse_pair(text: str, kind: str, path: Path, number: int) -> Pair:
    fields = text.split()
    want = 3 if kind == "same" else 4
    if len(fields) != want:
        raise PairsError(f"{path}:{number}: expected a {kind}-person pair of {want} fields, got {text!r}")
    numbers = (fields[1], fields[2]) if kind == "same" else (fields[1], fields[3])
    if not all(n.isdigit() and int(n) >= 1 for n in numbers):
        raise PairsError(f"{path}:{number}: image numbers must be integers >= 1, got {text!r}")
    if kind == "same":
        return Pair(fields[0], int(fields[1]), fields[0], int(fields[2]), number)
    if fields[0] == fields[2]:
        raise PairsError(f"{path}:{number}: a different-person pair names {fields[0]} twice")
    return Pair(fields[0], int(fields[1]), fields[2], int(fields[3]), number)


def pair_people(folds: Sequence[Sequence[Pair]]) -> List[str]:
    """Every person a pairs file names, sorted."""
    return sorted({p.name_a for f in folds for p in f} | {p.name_b for f in folds for p in f})


# -------------------------------------------------------------------------------------------- images

def _crop_box(width: int, height: int) -> Tuple[int, int, int, int]:
    top, bottom, left, right = FACE_BOX
    return (round(left * width), round(top * height), round(right * width), round(bottom * height))


def face_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The face square of an LFW image (`FACE_BOX`, fractions of its size), resized to size × size
    with an antialiased bicubic filter. image: uint8 [H, W, 3] -> uint8 [size, size, 3]."""
    picture = Image.fromarray(image)
    face = picture.crop(_crop_box(*picture.size))
    return np.asarray(face.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None))


def _iter_folder(root: Path) -> Iterator[Tuple[str, Callable[[], bytes], str]]:
    """(person, reader of the image bytes, file name) for every image of an image folder, sorted."""
    for person in sorted(e.name for e in os.scandir(root) if e.is_dir()):
        folder = root / person
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(".jpg"))
        if not files:
            raise ValueError(f"{folder}: empty person folder (no <Name>_<NNNN>.jpg inside)")
        for f in files:
            yield person, (folder / f).read_bytes, str(folder / f)


def _iter_archive(archive: Path) -> Iterator[Tuple[str, Callable[[], bytes], str]]:
    """The same for a .tgz, read in one sequential pass (gzip has no random access)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                parts = member.name.split("/")
                if not member.isfile() or len(parts) < 2 or not parts[-1].lower().endswith(".jpg"):
                    continue
                data = tar.extractfile(member).read()
                yield parts[-2], (lambda d=data: d), f"{archive}:{member.name}"
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"{archive}: unreadable LFW archive ({err})") from err


@dataclass(eq=False)
class LfwCrops:
    """Face crops of every LFW image, in memory: `images` uint8 [N, S, S, 3] (S = `size`),
    `people` [N] person names, `numbers` [N] image numbers (from 1)."""

    images: np.ndarray
    people: np.ndarray
    numbers: np.ndarray

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def index(self) -> Dict[Tuple[str, int], int]:
        return {(str(p), int(n)): i for i, (p, n) in enumerate(zip(self.people, self.numbers))}

    def counts(self) -> Dict[str, int]:
        names, counts = np.unique(self.people, return_counts=True)
        return dict(zip(names.tolist(), counts.tolist()))


def _cache_key(source: LfwSource, size: int) -> str:
    stat = source.images.stat()
    text = f"{source.images.resolve()}|{stat.st_mtime_ns}|{size}|{FACE_BOX}|v1"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_crops(source: LfwSource, size: int, cache_dir: str | os.PathLike | None = None,
               progress: bool = False) -> LfwCrops:
    """Every image of `source`, decoded, face-cropped (`face_crop`) and resized to size × size.

    With `cache_dir` the crops are kept there (`lfw-<key>.npz`, written atomically) and read back
    when the source and size are unchanged.

    Raises:
        ValueError: an unreadable or truncated image, an empty person folder or an image file
            that does not follow `<Name>/<Name>_<NNNN>.jpg` (naming the file).
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"lfw-{_cache_key(source, size)}.npz"
        cached = _read_cache(path)
        if cached is not None:
            return cached
    entries = _iter_archive(source.images) if source.is_archive else _iter_folder(source.images)
    if progress:
        from tqdm.auto import tqdm

        entries = tqdm(entries, desc="reading LFW", unit="img", leave=False, total=13233)
    images, people, numbers = [], [], []
    for person, read, name in entries:
        match = _IMAGE_NAME.match(os.path.basename(name.split(":")[-1]))
        if match is None or match["name"] != person:
            raise ValueError(f"{name}: not an LFW image name (expected {person}/{person}_<NNNN>.jpg)")
        images.append(face_crop(decode_image(read(), name), size))
        people.append(person)
        numbers.append(int(match["num"]))
    if not images:
        raise ValueError(f"{source.images}: holds no LFW images")
    crops = LfwCrops(np.stack(images), np.array(people), np.array(numbers, np.int64))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npz_atomic(path, images=crops.images, people=crops.people, numbers=crops.numbers)
    return crops


def _read_cache(path: Path) -> Optional[LfwCrops]:
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            return LfwCrops(data["images"], data["people"], data["numbers"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        warnings.warn(f"ignoring unreadable LFW cache {path} ({err}); reading LFW again", stacklevel=2)
        return None


def check_pairs(folds: Sequence[Sequence[Pair]], crops: LfwCrops, path: str | os.PathLike) -> None:
    """Every image a pairs file names exists.

    Raises:
        PairsError: naming the file, the line and the missing person or image.
    """
    counts, index = crops.counts(), crops.index()
    for fold in folds:
        for pair in fold:
            for name, num in ((pair.name_a, pair.num_a), (pair.name_b, pair.num_b)):
                if name not in counts:
                    raise PairsError(f"{path}:{pair.line}: person {name} is not in the LFW images")
                if (name, num) not in index:
                    raise PairsError(f"{path}:{pair.line}: {image_name(name, num)} does not exist "
                                     f"({name} has {counts[name]} image(s))")


__all__ = [
    "ARCHIVES", "ENV_VAR", "FACE_BOX", "IMAGE_FOLDERS", "PAIRS_FILES", "LfwCrops", "LfwNotFound", "LfwSource",
    "Pair", "PairsError", "check_pairs", "face_crop", "find_lfw", "image_name", "load_crops", "open_source",
    "pair_people", "read_pairs", "sklearn_cache",
]
