"""`ree quality`: score a folder of face crops as people have them.

- Every file under the folder is looked at, linked folders included (a link back to a folder
  already scanned, a loop, is not followed again and is reported). File names are kept as the
  bytes the file system holds, so a name that is not UTF-8 reaches the CSV unchanged.
- Files with an image extension (`ree.data.folders.IMAGE_EXTENSIONS`) are decoded upright (EXIF
  orientation applied, `ree.data.images.decode_image`); one that cannot be read is reported by
  name, the others are scored. Other files are skipped and counted.
- Each image's row depends on that image alone: the model runs in eval mode and SER-FIQ's
  dropout masks are drawn from the image's own pixels (`ree.models.ree_model.serfiq_keep`).
- The framing check compares the crops with the LFW-VLR face square (docs/lfw.md, "Finding the
  face"): crops far from square, and a folder whose mean face is off-centre or has its eyes
  away from 44 % of the height, are warned about (`framing_warnings`).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .data.arrays import to_tensor
from .data.folders import IMAGE_EXTENSIONS
from .data.images import decode_image

EYE_ROW = 0.44
"""Where the LFW-VLR face square puts the eyes: the darkest row of the mean face, as a fraction
of the height (measured on LFW deep-funneled crops: 14 of 32 rows in every group of 20)."""
EYE_ROW_RANGE = (0.40, 0.50)
MIN_SYMMETRY = 0.6
"""The lowest left-right correlation of a folder's mean face before it counts as off-centre."""
MIN_FOLDER = 20
"""The folder-level checks need this many images (a mean face of fewer is too noisy)."""
MAX_ASPECT = 1.1
"""Crops whose longer side exceeds the shorter by more than this are stretched to a square."""


@dataclass
class FolderScan:
    """What `scan_folder` found: image files (paths relative to the root, as bytes), the number
    of other files skipped, the linked folders not scanned again (as bytes), and the folders
    that could not be listed (name: reason)."""

    images: List[bytes] = field(default_factory=list)
    skipped: int = 0
    repeated_folders: List[bytes] = field(default_factory=list)
    unlisted: List[str] = field(default_factory=list)


def scan_folder(root: Path) -> FolderScan:
    """Every file under `root`, following linked folders once each (by device and inode), sorted
    by their byte names."""
    scan = FolderScan()
    root_bytes = os.fsencode(root)
    seen = set()
    pending = [root_bytes]
    while pending:
        folder = pending.pop()
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:
            scan.repeated_folders.append(os.path.relpath(folder, root_bytes))
            continue
        seen.add((info.st_dev, info.st_ino))
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            scan.unlisted.append(f"{display_name(os.path.relpath(folder, root_bytes))}: cannot be listed "
                                 f"({type(err).__name__}: {err.strerror})")
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=True):
                pending.append(entry.path)
            elif entry.name.lower().endswith(tuple(e.encode() for e in IMAGE_EXTENSIONS)):
                scan.images.append(os.path.relpath(entry.path, root_bytes))
            else:
                scan.skipped += 1
    scan.images.sort()
    scan.repeated_folders.sort()
    return scan


def display_name(path: bytes) -> str:
    """A byte path as text for the CSV and messages: undecodable bytes as surrogate escapes,
    which a file written with errors="surrogateescape" turns back into the same bytes."""
    return os.fsdecode(path)


@dataclass
class Crop:
    """One decoded image: its pixels resized to the model input, the stored width and height,
    and its 32 × 32 grey version for the framing check."""

    pixels: np.ndarray
    size: Tuple[int, int]
    grey: np.ndarray


def read_crop(path: bytes, name: str, input_size: int) -> Crop:
    """Decodes the file at `path` upright; errors call it `name`.

    Raises:
        ValueError: naming the file, when it cannot be read as an image."""
    rgb = decode_image(os.fsdecode(path), name)
    picture = Image.fromarray(rgb)
    resized = picture.resize((input_size, input_size), Image.Resampling.BICUBIC)
    grey = np.asarray(picture.convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64)
    return Crop(np.asarray(resized), (rgb.shape[1], rgb.shape[0]), grey)


def mean_face_layout(greys: Sequence[np.ndarray]) -> Tuple[float, float]:
    """(left-right correlation, eye row as a fraction of the height) of the mean of 32 × 32 grey
    crops: the eye row is the darkest row of the central half of the columns, between 1/8 and
    5/8 of the height."""
    mean = np.mean(greys, axis=0)
    centred = mean - mean.mean()
    mirrored = centred[:, ::-1]
    symmetry = float((centred * mirrored).sum() / max(float((centred * centred).sum()), 1e-12))
    profile = mean[:, 8:24].mean(axis=1)
    return symmetry, (int(np.argmin(profile[4:20])) + 4) / 32


def framing_warnings(names: Sequence[str], crops: Sequence[Crop]) -> List[str]:
    """Warnings for crops that are not framed as the LFW-VLR face square: each crop far from
    square, by name, and, for a folder of at least MIN_FOLDER images, a mean face off-centre
    or with its eyes outside EYE_ROW_RANGE."""
    out = []
    for name, crop in zip(names, crops):
        width, height = crop.size
        if max(width, height) > MAX_ASPECT * min(width, height):
            out.append(f"{name}: {width} × {height} px is not square; the crop is stretched to a square face")
    if len(crops) >= MIN_FOLDER:
        symmetry, eyes = mean_face_layout([c.grey for c in crops])
        if not EYE_ROW_RANGE[0] <= eyes <= EYE_ROW_RANGE[1]:
            out.append(f"the mean face has its eyes at {eyes:.0%} of the height; the expected framing puts "
                       f"them at {EYE_ROW:.0%} (crops framed higher or lower score differently)")
        if symmetry < MIN_SYMMETRY:
            out.append(f"the mean face is off-centre (left-right correlation {symmetry:.2f} < {MIN_SYMMETRY}); "
                       "the expected framing centres the face")
    return out


@dataclass
class QualityRun:
    """What `score_folder` did: rows written, files skipped, images and folders that could not
    be read (name: reason), linked folders not scanned again, framing warnings."""

    scored: int
    skipped: int
    failed: List[str]
    repeated_folders: List[str]
    warnings: List[str]

    def summary(self) -> str:
        lines = [f"scored {self.scored} images; skipped {self.skipped} files that are not images "
                 f"(extensions: {' '.join(IMAGE_EXTENSIONS)})"]
        if self.failed:
            lines.append(f"{len(self.failed)} image files or folders could not be read:")
            lines += [f"  {reason}" for reason in self.failed]
        if self.repeated_folders:
            lines.append("linked folders not scanned again (a link loop, or a folder already scanned):")
            lines += [f"  {name}" for name in self.repeated_folders]
        if self.warnings:
            lines.append("framing: the scores expect the LFW-VLR face square (ree quality --help):")
            lines += [f"  {w}" for w in self.warnings]
        return "\n".join(lines)


Scorer = Callable[[torch.Tensor], List[List[float]]]
"""Scores a batch [N, 3, S, S] of normalised images: one list of column values per image."""


def score_folder(root: Path, output: Path, header: Sequence[str], scorer: Scorer, input_size: int,
                 batch_size: int) -> QualityRun:
    """Scores every image under `root` with `scorer` and writes the CSV (`header` after "path"),
    one row per image read. Returns what happened, for the summary."""
    scan = scan_folder(root)
    failed: List[str] = []
    names: List[str] = []
    crops: List[Crop] = []
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        out = csv.writer(f)
        out.writerow(["path", *header])
        for start in range(0, len(scan.images), batch_size):
            batch_names, batch_crops = [], []
            for path in scan.images[start:start + batch_size]:
                try:
                    crop = read_crop(os.path.join(os.fsencode(root), path), display_name(path), input_size)
                except ValueError as err:
                    failed.append(str(err))
                    continue
                batch_names.append(display_name(path))
                batch_crops.append(crop)
            if not batch_crops:
                continue
            rows = scorer(to_tensor(np.stack([c.pixels for c in batch_crops])))
            for name, row in zip(batch_names, rows):
                out.writerow([name, *(f"{v:.6f}" for v in row)])
            names += batch_names
            crops += [Crop(np.empty(0), c.size, c.grey) for c in batch_crops]  # the pixels are done with
    return QualityRun(len(names), scan.skipped, scan.unlisted + failed,
                      [display_name(p) for p in scan.repeated_folders], framing_warnings(names, crops))


def csv_header(method: str, with_ers: bool) -> List[str]:
    """The score columns a checkpoint of `method` gives (QUALITY_COLUMNS in ree.cli says what
    each one is)."""
    head = {"ree": ["xi_hat"], "crfiqa": ["cr_fiqa"]}.get(method, [])
    return head + ["feature_norm", "ser_fiq"] + (["ers"] if with_ers else [])


def model_scorer(model: torch.nn.Module, method: str, ui_center: Optional[torch.Tensor], passes: int) -> Scorer:
    """A `Scorer` running `model` (`ree.models.ree_model.embed`, no flip fusion) with `passes`
    SER-FIQ passes."""
    from .models.ree_model import embed, ers_score

    head = method in ("ree", "crfiqa")

    def score(images: torch.Tensor) -> List[List[float]]:
        scores = embed(model, images, flip=False, serfiq_passes=passes)
        columns = ([scores.quality] if head else []) + [scores.norm, scores.serfiq]
        if ui_center is not None:
            columns.append(ers_score(scores.plain, ui_center))
        return torch.stack([c.float() for c in columns], 1).tolist()

    return score
