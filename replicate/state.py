"""State and variable writes: what the towers changed, combined and written once.

Each tower's forward pass returns its new values of the model's state
(BatchNormalization statistics, counters, random seeds) instead of writing
them. Here they are combined by each variable's Keras `aggregation`
(`replicate.reduce.combine_state`), over the towers and then over the
processes, and written once on the variable device; the optimizer's update
is applied once too.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from replicate import _keras_compat, reduce
from replicate.tower import SEED_STRIDE, is_seed_state, row_states


class StateWriter:
    """Writes a step's state once, combined over towers and processes.

    Args:
        model: The template whose variables are written.
        first_tower: The index, over every process, of this process's tower 0
            (its random seeds were shifted by that many strides).
        backend: The process backend, or `None` for one process.
    """

    def __init__(self, model: keras.Model, *, first_tower: int, backend: Any = None) -> None:
        self.model = model
        self.first_tower = first_tower
        self.backend = backend
        self._warned: set[int] = set()

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
        for variable, value in self.combine(variables, per_tower, old, slices, processes=processes):
            variable.assign(value)

    def write_towers(
        self, towers: Sequence[Any], values: Sequence[tf.Tensor], slices: reduce.Slices, **options
    ) -> None:
        """Writes what the towers' forward passes (`replicate.tower.Tower`) wrote: state,
        trainable weights, and the rows of row-aligned state.

        Args:
            towers: The forward passes.
            values: The non-trainable variables' values at the step's start.
            slices: The step's slices.
            **options: `processes=` of `write`.
        """
        model = self.model
        self.write(
            model.non_trainable_variables, [t.updates for t in towers], values, slices, **options
        )
        if any(w is not None for t in towers for w in t.writes):
            old = [tf.convert_to_tensor(v.value) for v in model.trainable_variables]
            self.write(
                model.trainable_variables, [t.writes for t in towers], old, slices, **options
            )
        self.write_rows(row_states(model), [t.rows for t in towers], slices)

    def combine(
        self,
        variables: Sequence[Any],
        per_tower: Sequence[Sequence[Any]],
        old: Sequence[tf.Tensor],
        slices: reduce.Slices,
        *,
        processes: bool = True,
        warn: bool = True,
    ) -> list[tuple[Any, tf.Tensor]]:
        """What `write` would assign: `(variable, new value)` for each changed variable.

        Args:
            variables: The variables the towers may have written.
            per_tower: Per tower, each variable's new value (`None`: unchanged).
            old: Each variable's value at the step's start.
            slices: The step's slices (their sizes weigh the towers).
            processes: Combine over processes too (a collective).
            warn: Warn about a user layer's state at the default aggregation.
        """
        out: list[tuple[Any, tf.Tensor]] = []
        combined: list[tuple[Any, tf.Tensor, tf.Tensor]] = []
        weights = present = None  # each tower's share and presence, split once
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
                out.append((variable, value))
                continue
            if warn and (len(news) > 1 or (self.backend is not None and self.backend.size > 1)):
                self._warn_default_aggregation(variable)
            news = [old[j] if new is None else new for new in news]
            if weights is None:
                weights = reduce.each(slices.weights, len(news))
                present = reduce.each(slices.present, len(news))
            value = reduce.combine_state(variable.aggregation, old[j], news, weights, present)
            combined.append((variable, old[j], value))
        if processes and combined and self.backend is not None and self.backend.size > 1:
            combined = self._over_processes(combined, tf.reduce_sum(slices.sizes))
        return out + [(variable, value) for variable, _, value in combined]

    def write_rows(
        self, variables: Sequence[Any], per_tower: Sequence[Sequence[Any]], slices: reduce.Slices
    ) -> None:
        """Writes row-aligned state (a stateful RNN's) from each tower's real rows, in order.

        Raises:
            ValueError: If the batch does not have as many samples as the
                state has rows, as Keras requires of a stateful RNN
                (`InvalidArgumentError` when the step runs, where the batch's
                size is known only then).
        """
        for j, variable in enumerate(variables):
            news = [rows[j] for rows in per_tower]
            if all(new is None for new in news):
                continue
            value = tf.concat(news, axis=0)
            received = "another size" if value.shape[0] is None else value.shape[0]
            message = (
                f"A stateful RNN's state {variable.path!r} holds {variable.shape[0]} rows, one "
                "per sample of the batch it was built for, and every batch must have that many "
                f"samples (as on one device). Received a batch of {received}: drop the last "
                "partial batch, or batch the data by that size."
            )
            if value.shape[0] is not None and value.shape[0] != variable.shape[0]:
                raise ValueError(message)
            # Known only when the step runs: the assertion fails the step, and the state
            # keeps its old value (Grappler does not keep an assertion ahead of an assign).
            fits = tf.equal(tf.shape(value)[0], variable.shape[0])
            tf.debugging.assert_equal(fits, True, message)
            new, old = value, tf.convert_to_tensor(variable.value)
            value = tf.cond(fits, lambda: new, lambda: old)  # noqa: B023 (called at once)
            variable.assign(tf.cast(value, variable.dtype))

    def _warn_default_aggregation(self, variable: Any) -> None:
        """Warns, once per variable, that a user layer's state at Keras' default
        aggregation is combined by replicate's rule for it."""
        if variable.aggregation != "none" or id(variable) in self._warned:
            return
        layer = owner(self.model, variable)
        if layer is None or type(layer).__module__.split(".")[0] == "keras":
            return  # Keras' own layers: the documented rules fit them
        self._warned.add(id(variable))
        floating = tf.as_dtype(variable.dtype).is_floating
        how = (
            "the towers' values weighted by their share of the batch"
            if floating
            else "tower 0's value"
        )
        warnings.warn(
            f"replicate: layer {layer.name!r} ({type(layer).__name__}) writes its variable "
            f"{variable.path!r} in the forward pass, with Keras' default "
            f'aggregation="none". Each tower writes it from its own slice of the batch, and '
            f"replicate keeps {how} (across processes too). If the variable counts or sums "
            'over samples, create it with aggregation="sum" (every tower\'s change is '
            'added); aggregation="mean" keeps the weighted mean, "only_first_replica" '
            "tower 0's value. Choosing one silences this warning.",
            stacklevel=2,
        )

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


def owner(model: keras.Model, variable: Any) -> keras.Layer | None:
    """The innermost layer of `model` whose weights include `variable`."""
    owners = [
        layer
        for layer in _keras_compat.sublayers(model)
        if any(v is variable for v in layer.weights)
    ]
    return min(owners, key=lambda layer: len(layer.weights)) if owners else None


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
