"""Each process's share of the data, and step counts that all processes agree on."""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from replicate import _keras_compat
from replicate.backends import Backend
from replicate.cluster import is_chief, process_count, process_rank

__all__ = ["ProcessBatches", "agree_on_steps", "is_chief", "process_count", "process_rank", "shard"]


def shard(data: Any, *, rank: int | None = None, size: int | None = None) -> Any:
    """This process's shard of numpy arrays (any nesting) or of a `tf.data.Dataset`.

    Arrays are cut into `size` contiguous blocks along axis 0 (the first
    `len % size` blocks one sample longer); a dataset is `dataset.shard(size,
    rank)`. Shard first, then shuffle, then batch: each process shuffles its
    own shard, and the shards stay disjoint whatever each process's random
    seed.

    ```python
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    dataset = replicate.shard(dataset).shuffle(1024).batch(64)
    ```

    A dataset shuffled before it is sharded is refused: each process would
    shuffle the whole dataset in its own order and take every n-th element
    of it, so the shards overlap (some samples are seen by two processes, as
    many by none) without any error. `rank` and `size` default to the
    launcher's environment (`horovodrun`, `replicate launch`, `TF_CONFIG`).

    Args:
        data: Numpy arrays (any nesting; `None` leaves stay `None`) or an
            unbatched or batched `tf.data.Dataset`.
        rank: This process's index. Defaults to the launcher's.
        size: The number of processes. Defaults to the launcher's.

    Returns:
        This process's share, of the same kind as `data`.

    Raises:
        ValueError: If `rank` is outside `[0, size)`, arrays differ in
            length, or a dataset is shuffled before the shard.
    """
    rank = process_rank() if rank is None else rank
    size = process_count() if size is None else size
    if not 0 <= rank < size:
        raise ValueError(f"`rank` must be in [0, size). Received: rank={rank}, size={size}.")
    if isinstance(data, tf.data.Dataset):
        shuffled = _keras_compat.shuffled_upstream(data)
        if shuffled is not None:
            raise ValueError(
                "`replicate.shard` must come before any shuffle: shard before shuffling. "
                f"Received: a dataset with a shuffle ({shuffled}) before the shard; each "
                "process shuffles in its own order, so the shards would overlap. Write "
                "`replicate.shard(dataset).shuffle(...)` (for files: "
                "`Dataset.list_files(..., shuffle=False)`, then shard, then shuffle)."
            )
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


# An endless dataset's step count, in the agreement on the most steps.
_ENDLESS = 1 << 62


def agree_on_steps(dataset: tf.data.Dataset, backend: Backend) -> tf.data.Dataset:
    """Pads a batched dataset with empty batches up to the most steps of any process.

    An endless dataset (`repeat()`) is left as it is; a finite one on a
    process where another is endless is padded without end.
    """
    steps = int(dataset.cardinality())
    if steps == tf.data.INFINITE_CARDINALITY:
        steps = _ENDLESS
    elif steps < 0:  # unknown: count once
        steps = int(dataset.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))
    most = int(backend.reduce_max(tf.constant(steps, tf.int64)))
    if most == steps:
        return dataset

    def empty(spec):
        shape = [0 if d is None else d for d in spec.shape.as_list()]
        shape[0] = 0
        return tf.zeros(shape, spec.dtype)

    padding = tf.data.Dataset.from_tensors(tf.nest.map_structure(empty, dataset.element_spec))
    return dataset.concatenate(padding.repeat(None if most == _ENDLESS else most - steps))
