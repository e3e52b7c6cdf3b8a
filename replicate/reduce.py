"""Pure tensor functions: split a batch over towers (dense, ragged or sparse), weigh and
combine what comes back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import tensorflow as tf

Grad = tf.Tensor | tf.IndexedSlices | None


def rows(t: Any) -> tf.Tensor:
    """The (dynamic) size of axis 0 of a dense, ragged or sparse tensor, as int32."""
    if isinstance(t, tf.RaggedTensor):
        return tf.cast(t.nrows(), tf.int32)
    if isinstance(t, tf.SparseTensor):
        return tf.cast(t.dense_shape[0], tf.int32)
    return tf.shape(t, out_type=tf.int32)[0]


def batch_size(structure: Any) -> tf.Tensor:
    """Returns the (dynamic) size of axis 0 of the first tensor in `structure`."""
    return rows(next(t for t in tf.nest.flatten(structure) if t is not None))


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


def split_counts(size: int, n: int) -> list[int]:
    """`split_sizes` in plain Python, for a batch size known when tracing."""
    base, extra = divmod(size, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


class Slices(NamedTuple):
    """A global batch cut into one non-empty slice per tower."""

    parts: list[Any]  # one structure per tower, each with at least one row
    sizes: tf.Tensor  # int32 (towers,): the real samples of each slice
    present: tf.Tensor  # float32 (towers,): 1 where a slice holds real samples
    batch: int | None = None  # the global batch's size, where known when tracing

    @property
    def weights(self) -> tf.Tensor:
        """Each tower's share of the batch, `sizes / sum(sizes)`."""
        return tower_weights(self.sizes)


def tower_slices(structure: Any, n: int, *, sizes: tf.Tensor | None = None) -> Slices:
    """Cuts a batch into `n` slices, none of them empty.

    Layers do not all accept an empty batch (oneDNN convolutions and pooling,
    recurrent cells, normalization), so a tower whose share is empty (a batch
    smaller than `n`) gets one stand-in row instead: the batch's last row, or
    zeros when the whole batch is empty. Its outputs are dropped (`keep`) and
    its contributions weighted by 0 (`present`), so numbers equal one device.

    Args:
        structure: The batch (any nesting; `None` leaves kept).
        n: The number of towers.
        sizes: Slice sizes; defaults to `split_sizes(batch, n)`.
    """
    first = next((t for t in tf.nest.flatten(structure) if t is not None), None)
    static = None if first is None or sizes is not None else first.shape[0]
    if sizes is None:
        sizes = split_sizes(batch_size(structure), n)
    starts = tf.cumsum(sizes, exclusive=True)
    total = tf.reduce_sum(sizes)
    counts = [tf.maximum(sizes[i], 1) for i in range(n)]

    def cut(t):
        if t is None:
            return [None] * n
        if isinstance(t, tf.SparseTensor):
            return _cut_sparse(t, starts, counts)
        if not isinstance(t, tf.RaggedTensor):
            t = tf.convert_to_tensor(t)
        # An empty batch gets one row of zeros (empty strings, an empty ragged
        # row) to stand in.
        source = tf.cond(total > 0, lambda: t, lambda: _stand_in(t))
        last = rows(source) - 1
        return [
            tf.gather(source, tf.minimum(tf.range(starts[i], starts[i] + counts[i]), last))
            for i in range(n)
        ]

    flat = [cut(t) for t in tf.nest.flatten(structure)]
    parts = [tf.nest.pack_sequence_as(structure, [f[i] for f in flat]) for i in range(n)]
    return Slices(parts, sizes, tf.cast(sizes > 0, tf.float32), static)


def _stand_in(t: Any) -> Any:
    """One row of zeros shaped like a row of `t` (an empty row, for a ragged `t`)."""
    if isinstance(t, tf.RaggedTensor):
        splits = [tf.constant([0, 0], t.row_splits.dtype)] + [
            tf.constant([0], t.row_splits.dtype) for _ in range(t.ragged_rank - 1)
        ]
        return tf.RaggedTensor.from_nested_row_splits(t.flat_values[:0], splits)
    filler = tf.zeros if t.dtype != tf.string else (lambda s, d: tf.fill(s, ""))
    return filler(tf.concat([[1], tf.shape(t)[1:]], 0), t.dtype)


def _cut_sparse(t: tf.SparseTensor, starts: tf.Tensor, counts: list) -> list[tf.SparseTensor]:
    """Rows `[start, start + count)` of a sparse batch per tower; a stand-in row repeats
    the last one (all zeros when the batch is empty)."""
    shape = tf.cast(t.dense_shape, tf.int64)
    last = tf.maximum(shape[0] - 1, 0)
    zeros = tf.zeros_like(shape[1:])
    out = []
    for i, count in enumerate(counts):
        count = tf.cast(count, tf.int64)
        start = tf.minimum(tf.cast(starts[i], tf.int64), last)
        part = tf.sparse.slice(
            t, tf.concat([[start], zeros], 0), tf.concat([[count], shape[1:]], 0)
        )
        # A stand-in row past the end still counts as one row.
        out.append(tf.SparseTensor(part.indices, part.values, tf.concat([[count], shape[1:]], 0)))
    return out


def tower_weights(sizes: tf.Tensor, dtype: tf.DType = tf.float32) -> tf.Tensor:
    """Each tower's share of the batch, `sizes / sum(sizes)` (zeros for an empty batch)."""
    sizes = tf.cast(sizes, dtype)
    return tf.math.divide_no_nan(sizes, tf.reduce_sum(sizes))


def scale(value: Grad, weight: tf.Tensor) -> Grad:
    """`value * weight`, exactly 0 where `weight` is 0 (dense, `IndexedSlices` or `None`)."""
    # multiply_no_nan gives exactly 0 for an empty tower, even where that
    # tower's values came out NaN.
    if value is None:
        return None
    if not value.dtype.is_floating:  # counts: no NaN to guard against
        return value * tf.cast(weight, value.dtype)
    if isinstance(value, tf.IndexedSlices):
        w = tf.cast(weight, value.values.dtype)
        return tf.IndexedSlices(
            tf.math.multiply_no_nan(value.values, w), value.indices, value.dense_shape
        )
    return tf.math.multiply_no_nan(value, tf.cast(weight, value.dtype))


def add(values: Sequence[Grad]) -> Grad:
    """Sums values that may be dense, `IndexedSlices` (kept sparse) or `None`."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    if all(isinstance(v, tf.IndexedSlices) for v in present):
        return _add_slices(present)
    return tf.add_n([tf.convert_to_tensor(v) for v in present])


def _add_slices(slices: Sequence[tf.IndexedSlices]) -> tf.IndexedSlices:
    """Sums `IndexedSlices` with the rows one device would have.

    Keras' optimizers treat each row of an `IndexedSlices` on its own before
    rows of the same index are added (Adam, RMSprop and Adagrad square each
    row: `ops.square` keeps the slices), so the rows themselves must be one
    device's, not only their sum. A lookup per sample (`Embedding` on the
    inputs) gives one row per looked-up id on one device: the towers' rows
    put together. A lookup the batch does not shape (a position embedding
    looked up at `arange(length)`, added to every sample) gives its rows
    once on one device and once per tower here: where every tower's
    indices have the same static shape and the same values, the towers'
    values are added row by row into the first tower's rows (the others'
    rows become zeros, which no optimizer sees).
    """
    indices = tf.concat([s.indices for s in slices], axis=0)
    values = tf.concat([s.values for s in slices], axis=0)
    shapes = {tuple(s.indices.shape) for s in slices}
    if len(shapes) != 1 or not slices[0].indices.shape.is_fully_defined():
        return tf.IndexedSlices(values, indices, slices[0].dense_shape)
    first = slices[0].indices
    same = tf.reduce_all([tf.reduce_all(tf.equal(first, s.indices)) for s in slices[1:]])
    folded = tf.concat(
        [tf.add_n([s.values for s in slices])] + [tf.zeros_like(s.values) for s in slices[1:]],
        axis=0,
    )
    return tf.IndexedSlices(tf.where(same, folded, values), indices, slices[0].dense_shape)


def each(values: tf.Tensor | Sequence[tf.Tensor], n: int) -> list[tf.Tensor]:
    """A `(towers,)` tensor as one scalar per tower (a list is returned as it is).

    Splitting once, where a step combines many variables, spares one slicing op per
    variable and tower in the traced step.
    """
    if isinstance(values, (list, tuple)):
        return list(values)
    return tf.unstack(values, num=n)


def weighted_sum(
    per_tower: Sequence[Sequence[Grad]], weights: tf.Tensor | Sequence[tf.Tensor]
) -> list[Grad]:
    """Sums per-tower lists of values (dense, `IndexedSlices` or `None`) with weights.

    With `weights = tower_weights(sizes)` and each tower's gradient taken of
    its own mean loss, the result is the gradient of the mean loss over the
    whole batch: what one device computes.

    Args:
        per_tower: One list per tower, all of the same length.
        weights: A `(towers,)` tensor, or its scalars (`each`).

    Returns:
        One value per position; `None` where every tower had `None`.
    """
    weights = each(weights, len(per_tower))
    if len(per_tower) == 1:
        return [scale(v, weights[0]) if v is not None else None for v in per_tower[0]]
    scaled = [[scale(v, weights[i]) for v in values] for i, values in enumerate(per_tower)]
    return [add(list(column)) for column in zip(*scaled)]


def combine_state(
    aggregation: str,
    old: tf.Tensor,
    news: Sequence[tf.Tensor],
    weights: tf.Tensor | Sequence[tf.Tensor],
    present: tf.Tensor | Sequence[tf.Tensor],
) -> tf.Tensor:
    """One variable's new value from the values its towers left, by its `aggregation`.

    The rule, per Keras' variable `aggregation`:

    - `"sum"` (metric totals and counts, counters): the old value plus every
      tower's change, so a count of samples counts each sample once.
    - `"mean"`, and `"none"` for floating-point state (BatchNormalization's
      moving statistics): the towers' values weighted by slice size.
    - `"only_first_replica"`, and `"none"` for other dtypes (integers, seeds):
      tower 0's value.

    Towers without real samples (`present` 0) contribute nothing. `weights` and
    `present` are `(towers,)` tensors or their scalars (`each`).
    """
    dtype = tf.as_dtype(old.dtype)
    present = each(present, len(news))
    if aggregation == "sum":
        changes = [
            tf.math.multiply_no_nan(new - old, tf.cast(present[i], dtype))
            if dtype.is_floating
            else (new - old) * tf.cast(present[i], dtype)
            for i, new in enumerate(news)
        ]
        return old + tf.add_n(changes) if len(changes) > 1 else old + changes[0]
    if aggregation == "mean" or (aggregation == "none" and dtype.is_floating):
        if not dtype.is_floating:
            total = weighted_sum([[tf.cast(n, tf.float32)] for n in news], weights)[0]
            return tf.cast(tf.round(total), dtype)
        combined = weighted_sum([[n] for n in news], weights)[0]
        # An entirely empty batch leaves the state as it was.
        return tf.where(tf.add_n(present) > 0, combined, old)
    return news[0]
