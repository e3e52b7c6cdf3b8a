"""Each process's share of the data, and step counts that all processes agree on."""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from replicate.backends import Backend
from replicate.cluster import is_chief, process_count, process_rank

__all__ = ["ProcessBatches", "agree_on_steps", "is_chief", "process_count", "process_rank", "shard"]


def shard(data: Any, *, rank: int | None = None, size: int | None = None) -> Any:
    """This process's shard of numpy arrays (any nesting) or of a `tf.data.Dataset`.

    Arrays are cut into `size` contiguous blocks along axis 0 (the first
    `len % size` blocks one sample longer); a dataset is `dataset.shard(size,
    rank)`, so shard it before batching. `rank` and `size` default to the
    launcher's (`horovodrun`) environment.

    Raises:
        ValueError: If `rank` is outside `[0, size)` or arrays differ in length.
    """
    rank = process_rank() if rank is None else rank
    size = process_count() if size is None else size
    if not 0 <= rank < size:
        raise ValueError(f"`rank` must be in [0, size). Received: rank={rank}, size={size}.")
    if isinstance(data, tf.data.Dataset):
        return data.shard(size, rank)
    leaves = [a for a in tf.nest.flatten(data) if a is not None]
    lengths = {len(a) for a in leaves}
    if len(lengths) > 1:
        raise ValueError(
            f"All arrays must have the same number of samples to be sharded. Received lengths "
            f"{sorted(lengths)}."
        )
    total = lengths.pop() if lengths else 0
    base, extra = divmod(total, size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return tf.nest.map_structure(lambda a: None if a is None else a[start:stop], data)


class ProcessBatches(keras.utils.PyDataset):
    """Batches of this process's arrays, as many as the process with the most.

    All processes must run the same number of steps, or a collective waits
    for ever. A process that runs out of samples yields empty batches (0
    samples), which add nothing to the gradient average.
    """

    def __init__(
        self,
        x: Any,
        y: Any = None,
        sample_weight: Any = None,
        *,
        batch_size: int,
        backend: Backend,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.batch_size = batch_size
        self.samples = len(tf.nest.flatten(x)[0])
        local = math.ceil(self.samples / batch_size)
        self.steps = int(backend.reduce_max(tf.constant(local)))
        self.shuffle = shuffle
        self._rng = np.random.default_rng(seed + backend.rank)
        self._order = np.arange(self.samples)
        if shuffle:
            self._rng.shuffle(self._order)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int):
        chosen = self._order[index * self.batch_size : (index + 1) * self.batch_size]

        def take(a):
            return None if a is None else np.asarray(a)[chosen]

        parts = [tf.nest.map_structure(take, self.x)]
        if self.y is not None:
            parts.append(tf.nest.map_structure(take, self.y))
            if self.sample_weight is not None:
                parts.append(take(self.sample_weight))
        return tuple(parts) if len(parts) > 1 else parts[0]

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self._rng.shuffle(self._order)


def agree_on_steps(dataset: tf.data.Dataset, backend: Backend) -> tf.data.Dataset:
    """Pads a batched dataset with empty batches up to the most steps of any process."""
    steps = int(dataset.cardinality())
    if steps < 0:  # unknown or infinite: count once
        if steps == tf.data.INFINITE_CARDINALITY:
            return dataset
        steps = int(dataset.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))
    most = int(backend.reduce_max(tf.constant(steps)))
    if most == steps:
        return dataset

    def empty(spec):
        shape = [0 if d is None else d for d in spec.shape.as_list()]
        shape[0] = 0
        return tf.zeros(shape, spec.dtype)

    padding = tf.data.Dataset.from_tensors(
        tf.nest.map_structure(empty, dataset.element_spec)
    ).repeat(most - steps)
    return dataset.concatenate(padding)
