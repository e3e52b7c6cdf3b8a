"""Pure tensor functions: split a batch over towers, merge and average what comes back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

Grad = tf.Tensor | tf.IndexedSlices | None


def batch_size(structure: Any) -> tf.Tensor:
    """Returns the (dynamic) size of axis 0 of the first tensor in `structure`."""
    first = next(t for t in tf.nest.flatten(structure) if t is not None)
    return tf.shape(first, out_type=tf.int32)[0]


def split_sizes(size: tf.Tensor | int, n: int) -> tf.Tensor:
    """Sizes of `n` slices of a batch of `size`, as even as possible.

    The first `size % n` slices get one sample more, so a batch smaller than
    `n` leaves the last towers with empty slices.

    Returns:
        An int32 tensor of shape `(n,)` that sums to `size`.
    """
    size = tf.convert_to_tensor(size, tf.int32)
    base = size // n
    extra = tf.cast(tf.range(n) < size % n, tf.int32)
    return base + extra


def split(structure: Any, n: int) -> tuple[list[Any], tf.Tensor]:
    """Cuts every tensor of `structure` along axis 0 into `n` slices.

    Returns:
        `(slices, sizes)`: one structure per tower (same nesting as the
        input, `None` leaves kept) and the int32 slice sizes.
    """
    sizes = split_sizes(batch_size(structure), n)
    return split_as(structure, sizes, n), sizes


def split_as(structure: Any, sizes: tf.Tensor, n: int) -> list[Any]:
    """Cuts `structure` into `n` slices of the given `sizes` (`None` gives `n` Nones)."""
    if structure is None:
        return [None] * n
    flat = tf.nest.flatten(structure)
    pieces = [None if t is None else tf.split(t, sizes, num=n, axis=0) for t in flat]
    return [
        tf.nest.pack_sequence_as(structure, [None if p is None else p[i] for p in pieces])
        for i in range(n)
    ]


def merge(tower_outputs: Sequence[Any]) -> Any:
    """Concatenates per-tower outputs (any nesting) along axis 0."""
    if len(tower_outputs) == 1:
        return tower_outputs[0]
    return tf.nest.map_structure(
        lambda *ts: None if ts[0] is None else tf.concat(ts, axis=0), *tower_outputs
    )


def tower_weights(sizes: tf.Tensor, dtype: tf.DType = tf.float32) -> tf.Tensor:
    """Each tower's share of the batch, `sizes / sum(sizes)` (zeros for an empty batch)."""
    sizes = tf.cast(sizes, dtype)
    return tf.math.divide_no_nan(sizes, tf.reduce_sum(sizes))


def _scale(value: Grad, weight: tf.Tensor) -> Grad:
    # multiply_no_nan gives exactly 0 for an empty tower, even where that
    # tower's statistics came out NaN (the mean of zero samples).
    if value is None:
        return None
    if isinstance(value, tf.IndexedSlices):
        w = tf.cast(weight, value.values.dtype)
        return tf.IndexedSlices(
            tf.math.multiply_no_nan(value.values, w), value.indices, value.dense_shape
        )
    return tf.math.multiply_no_nan(value, tf.cast(weight, value.dtype))


def _add(values: list[Grad]) -> Grad:
    present = [v for v in values if v is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    if all(isinstance(v, tf.IndexedSlices) for v in present):
        return tf.IndexedSlices(
            tf.concat([v.values for v in present], axis=0),
            tf.concat([v.indices for v in present], axis=0),
            present[0].dense_shape,
        )
    return tf.add_n([tf.convert_to_tensor(v) for v in present])


def weighted_sum(per_tower: Sequence[Sequence[Grad]], weights: tf.Tensor) -> list[Grad]:
    """Sums per-tower lists of values (dense, `IndexedSlices` or `None`) with weights.

    With `weights = tower_weights(sizes)` and each tower's gradient taken of
    its own mean loss, the result is the gradient of the mean loss over the
    whole batch: what one device computes.

    Args:
        per_tower: One list per tower, all of the same length.
        weights: A `(towers,)` tensor.

    Returns:
        One value per position; `None` where every tower had `None`.
    """
    if len(per_tower) == 1:
        return list(per_tower[0])
    scaled = [[_scale(v, weights[i]) for v in values] for i, values in enumerate(per_tower)]
    return [_add(list(column)) for column in zip(*scaled)]
