"""Synthetic data for the corpus: numpy arrays from fixed seeds, nothing downloaded."""

import numpy as np


def rng(seed: int) -> np.random.Generator:
    """The corpus' numpy generator: every example's data comes from a fixed seed."""
    return np.random.default_rng(seed)


def learnable_classes(x: np.ndarray, classes: int, seed: int) -> np.ndarray:
    """Labels a model can learn: the argmax of a fixed random projection of `x`."""
    flat = x.reshape(len(x), -1).astype("float64")
    projection = rng(seed).normal(size=(flat.shape[1], classes))
    return np.argmax(flat @ projection, axis=1).astype("int64")


def images(count: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Float32 images in [0, 1]."""
    return rng(seed).random((count, *shape), dtype=np.float32)


def tokens(count: int, length: int, vocabulary: int, seed: int, pad: bool = False) -> np.ndarray:
    """Int64 token ids in [1, vocabulary); with `pad`, each row ends in a run of zeros."""
    generator = rng(seed)
    ids = generator.integers(1, vocabulary, size=(count, length)).astype("int64")
    if pad:
        lengths = generator.integers(length // 4, length + 1, size=count)
        ids[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return ids
