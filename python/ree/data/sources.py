"""The training set a run names (`TrainConfig.data`), and what the trainer reads of any set:
its number of classes and their names."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import numpy as np

from ..errors import ConfigError

DATA_HELP = ("'synthetic', 'lfw' (the LFW-VLR training people of the test split), 'lfw-val', 'lfw-fold1' … "
             "'lfw-fold10', an ImageFolder directory (<dir>/<identity>/<image>) or an insightface .rec file")
"""The values `TrainConfig.data` accepts, as `ree train --help` lists them."""


def build_dataset(config: Any) -> Any:
    """The training set named by `config.data` (a `ree.config.TrainConfig`): "synthetic"
    (ree.data.synthetic's train split, cached under `cache_dir`), "lfw" / "lfw-val" /
    "lfw-fold1" … "lfw-fold10" (the LFW-VLR training people of the test split, the validation
    split or a View 2 fold, from `ree.data.lfw.find_lfw()`, docs/lfw.md), a directory
    (`ImageFolderDataset`) or a `.rec` file (`RecordIODataset`), at the model's input size.

    Raises:
        ConfigError (a ValueError): `data` is none of these. DataError / LfwNotFound: the set
            is missing, empty or malformed (the readers' errors name the file or folder).
    """
    size = config.model_config().resolved_input_size
    if config.data == "synthetic":
        from .synthetic import SyntheticConfig, generate

        return generate(SyntheticConfig(**{"image_size": size, **config.synthetic}), cache_dir=config.cache_dir).train
    if config.data == "lfw" or config.data.startswith("lfw-"):
        from .lfw import find_lfw, load_crops
        from .lfw_splits import SPLITS, people, training_set

        split = "test" if config.data == "lfw" else config.data[len("lfw-"):]
        if config.data != "lfw" and (split not in SPLITS or split == "test"):
            raise ConfigError(f"data {config.data!r}: the LFW training sets are 'lfw', "
                              f"{', '.join(repr('lfw-' + s) for s in SPLITS if s != 'test')}")
        source = find_lfw()
        crops = load_crops(source, size, cache_dir=config.cache_dir)
        return training_set(crops, people(crops, source, split))
    path = Path(config.data)
    if path.is_dir():
        from .folders import ImageFolderDataset

        return ImageFolderDataset(path, image_size=size)
    if path.suffix == ".rec" and path.is_file():
        from .recordio import RecordIODataset

        return RecordIODataset(path, image_size=size)
    raise ConfigError(f"data must be {DATA_HELP}; {config.data!r} is none (no such folder or .rec file)")


def num_classes(dataset: Any) -> int:
    """`dataset.num_classes`, else 1 + the largest of `dataset.labels`.

    Raises:
        ValueError: the set has neither."""
    if hasattr(dataset, "num_classes"):
        return int(dataset.num_classes)
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise ValueError("the training set needs a num_classes or labels attribute")
    return int(np.max(np.asarray(labels))) + 1


def class_names(dataset: Any) -> Optional[List[str]]:
    """`dataset.class_names` as a list of str (label k is the k-th name), or None for a set
    that does not name its classes.

    Raises:
        ValueError: the names are not strings, or not one per class."""
    names = getattr(dataset, "class_names", None)
    if names is None:
        return None
    names = list(names)
    if not all(isinstance(name, str) for name in names):
        raise ValueError("the training set's class_names must be strings")
    classes = num_classes(dataset)
    if len(names) != classes:
        raise ValueError(f"the training set names {len(names)} classes but has {classes}")
    return names
