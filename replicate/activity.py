"""Activity regularizers through towers, on the Keras releases that sum them over the batch.

Keras before 3.14 adds a layer's `activity_regularizer(output)` to its losses
as it is: for Keras' own regularizers (`L1`, `L2`, `L1L2`) a sum over the
batch's samples. Keras 3.14 divides it by the batch size (a mean, the
convention of every other model loss), which the towers' mean rule combines
exactly (`replicate.merge.combine_model_losses`). A sum weighted by slice share
would come out a fraction of one device's value, so on the earlier releases
each tower hands its value in as one row per sample of its slice (the value
divided by the rows): the towers' per-sample losses are summed over every row
(`replicate.tower`), which adds the slices' sums up to the whole batch's, as
one device computes it.
"""

from __future__ import annotations

import threading
from typing import Any

import keras
import tensorflow as tf

from replicate import _keras_compat

# The first Keras that divides an activity regularizer's value by the batch size.
MEAN_SINCE = (3, 14)


class _Rows:
    """`regularizer(output)` spread over one row per sample: the rows sum to it."""

    def __init__(self, regularizer: Any) -> None:
        self.regularizer = regularizer

    def __call__(self, output: Any) -> Any:
        value = self.regularizer(output)
        if len(output.shape) == 0:
            return value
        rows = tf.shape(output)[:1]
        return tf.ones(rows, value.dtype) * (value / tf.cast(rows[0], value.dtype))


class ActivityRows:
    """While entered, `model`'s activity regularizers give one row per sample.

    A context manager around a tower's forward pass, on Keras before 3.14
    (after that it does nothing). Towers that run in threads at the same time
    share one: the regularizers are swapped when the first enters and put
    back when the last leaves, so that nothing outside the towers (a save,
    the template on its own) ever sees the stand-ins.

    Args:
        model: The template.
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self.active = _keras_compat.KERAS_VERSION < MEAN_SINCE
        self._lock = threading.Lock()
        self._entered = 0
        self._saved: list[tuple[keras.Layer, Any]] = []

    def __enter__(self) -> ActivityRows:
        if not self.active:
            return self
        with self._lock:
            if self._entered == 0:
                layers = [self.model, *_keras_compat.sublayers(self.model)]
                self._saved = [
                    (layer, layer.activity_regularizer)
                    for layer in layers
                    if getattr(layer, "activity_regularizer", None) is not None
                ]
                for layer, regularizer in self._saved:
                    layer.activity_regularizer = _Rows(regularizer)
            self._entered += 1
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if not self.active:
            return
        with self._lock:
            self._entered -= 1
            if self._entered == 0:
                for layer, regularizer in self._saved:
                    layer.activity_regularizer = regularizer
                self._saved = []
