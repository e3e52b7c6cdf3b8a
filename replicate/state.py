"""State and variable writes: what the towers changed, combined and written once.

Each tower's forward pass returns its new values of the model's state
(BatchNormalization statistics, counters, random seeds) instead of writing
them. Here they are combined by each variable's Keras `aggregation`
(`replicate.reduce.combine_state`), over the towers and then over the
processes, and written once on the variable device; the optimizer's update
is applied once too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from replicate import reduce
from replicate.tower import SEED_STRIDE, is_seed_state


class StateWriter:
    """Writes a step's state once, combined over towers and processes.

    Args:
        first_tower: The index, over every process, of this process's tower 0
            (its random seeds were shifted by that many strides).
        backend: The process backend, or `None` for one process.
    """

    def __init__(self, *, first_tower: int, backend: Any = None) -> None:
        self.first_tower = first_tower
        self.backend = backend

    def write(
        self,
        variables: Sequence[Any],
        per_tower: Sequence[Sequence[Any]],
        old: Sequence[tf.Tensor],
        slices: reduce.Slices,
        *,
        processes: bool = True,
    ) -> None:
        """Writes `variables` once, combining the towers' new values (`None`:
        unchanged) by each variable's aggregation; over processes too."""
        combined: list[tuple[Any, tf.Tensor, tf.Tensor]] = []
        for j, variable in enumerate(variables):
            news = [updates[j] for updates in per_tower]
            if all(new is None for new in news):
                continue
            if is_seed_state(variable):
                # Tower 0 continues the stream; its shift comes back off.
                shift = self.first_tower * SEED_STRIDE
                value = news[0] if news[0] is not None else old[j]
                if shift:
                    value = value - tf.constant([shift, 0], value.dtype)
                variable.assign(value)
                continue
            news = [old[j] if new is None else new for new in news]
            value = reduce.combine_state(
                variable.aggregation, old[j], news, slices.weights, slices.present
            )
            combined.append((variable, old[j], value))
        if processes and combined and self.backend is not None and self.backend.size > 1:
            combined = self._over_processes(combined, tf.reduce_sum(slices.sizes))
        for variable, _, value in combined:
            variable.assign(value)

    def _over_processes(self, combined: list, count: tf.Tensor) -> list:
        """Each process's combined state, combined again over processes: changes
        of "sum" state add up; mean state is weighted by each process's samples."""
        sent, where = [], []
        c = tf.cast(count, tf.float32)
        for k, (variable, old, value) in enumerate(combined):
            dtype = tf.as_dtype(value.dtype)
            if variable.aggregation == "sum":
                sent.append(value - old)
            elif variable.aggregation == "mean" or (
                variable.aggregation == "none" and dtype.is_floating
            ):
                sent.append(tf.math.multiply_no_nan(value, tf.cast(c, dtype)))
            else:
                continue
            where.append(k)
        if not sent:
            return combined
        *received, total = self.backend.all_sum([*sent, c])
        out = list(combined)
        for k, summed in zip(where, received):
            variable, old, value = combined[k]
            if variable.aggregation == "sum":
                new = old + summed
            else:  # an entirely empty step leaves the state as it was
                new = tf.where(total > 0, summed / tf.cast(total, summed.dtype), old)
            out[k] = (variable, old, new)
        return out


def apply_gradients(
    optimizer: Any, grads: Sequence[Any], variables: Sequence[Any], *, device: str
) -> None:
    """Applies `grads` to Keras `variables` with a Keras or a native TF optimizer.

    Raises:
        TypeError: If `optimizer` is neither kind.
    """
    if isinstance(optimizer, keras.optimizers.Optimizer):
        if not optimizer.built:
            with tf.init_scope(), tf.device(device):
                optimizer.build(list(variables))
        optimizer.apply_gradients(zip(grads, variables))
    elif isinstance(optimizer, tf.compat.v1.train.Optimizer):
        pairs = [(g, v.value) for g, v in zip(grads, variables) if g is not None]
        optimizer.apply_gradients(pairs)
    else:
        raise TypeError(
            "`optimizer` must be a Keras optimizer (keras.optimizers.SGD, Adam, "
            "...) or a native TensorFlow optimizer (tf.compat.v1.train."
            "GradientDescentOptimizer, AdamOptimizer, ...). Received: "
            f"optimizer={optimizer!r} of type {type(optimizer).__name__}"
        )
