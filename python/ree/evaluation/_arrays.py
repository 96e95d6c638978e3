"""Input checks shared by the metrics: numpy arrays in, errors that name the argument out."""
from __future__ import annotations

import math

import numpy as np


def real_array(value: object, name: str, ndim: int = 1) -> np.ndarray:
    """`value` as a non-empty float64 array of `ndim` dimensions holding only finite numbers."""
    array = np.asarray(value)
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    array = array.astype(np.float64)
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise ValueError(f"{name} has {bad} non-finite value(s)")
    return array


def bool_vector(value: object, name: str, length: int) -> np.ndarray:
    """`value` as a bool vector of `length` entries (bool, or integers that are all 0 or 1)."""
    array = np.asarray(value)
    if array.ndim != 1:
        raise ValueError(f"{name} must have 1 dimension, got shape {array.shape}")
    if array.dtype != bool:
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"{name} must be bool (or 0/1 integers), got dtype {array.dtype}")
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must hold only 0 and 1 when given as integers")
        array = array.astype(bool)
    if array.shape[0] != length:
        raise ValueError(f"{name} has {array.shape[0]} entries but there are {length} scores")
    return array


def int_vector(value: object, name: str, length: int | None = None) -> np.ndarray:
    """`value` as an int64 vector (of `length` entries when given); integer dtypes only: labels,
    pixel sizes."""
    array = np.asarray(value)
    if array.ndim != 1:
        raise ValueError(f"{name} must have 1 dimension, got shape {array.shape}")
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must have an integer dtype, got {array.dtype}")
    if length is not None and array.shape[0] != length:
        raise ValueError(f"{name} has {array.shape[0]} entries, expected {length}")
    return array.astype(np.int64)


def fraction(value: object, name: str, *, allow_zero: bool = True) -> float:
    """A Python or numpy real number in [0, 1] (or (0, 1] when `allow_zero` is False)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    low_ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and low_ok and value <= 1):
        raise ValueError(f"{name} must be in {'[0' if allow_zero else '(0'}, 1], got {value}")
    return value


def both_classes(same: np.ndarray, name: str) -> None:
    """Metrics that need genuine and impostor pairs say so instead of returning 0/0."""
    genuine = int(np.count_nonzero(same))
    if genuine == 0 or genuine == same.size:
        kind = "impostor" if genuine else "genuine"
        raise ValueError(f"{name} has no {kind} pair (True = genuine): the metric needs both")
