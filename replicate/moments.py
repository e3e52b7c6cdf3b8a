"""The batch statistics of a synchronized layer's masked input, over every tower.

Keras' `BatchNormalization` computes a masked input's statistics from the
calling replica's own samples, whatever `synchronized` says; only an unmasked
input reaches the synchronized path. replicate routes the masked case of every
synchronized layer it replicates through `masked_moments`
(`_keras_compat.route_masked_moments`), which forms the statistics from sums
over every tower (and process), as one device forms them from the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

from replicate import _keras_compat
from replicate.replica import TowerContext


def synchronized_layers(model: keras.Model) -> list[keras.Layer]:
    """The layers of `model` that meet the other towers mid-pass (`synchronized = True`)."""
    return [
        layer
        for layer in _keras_compat.sublayers(model)
        if getattr(layer, "synchronized", False) is True
    ]


def route(model: keras.Model) -> list[keras.Layer]:
    """Routes the masked statistics of `model`'s synchronized layers through
    `masked_moments` (once per layer; later calls find it done).

    Returns:
        The synchronized layers (`synchronized_layers`).
    """
    layers = synchronized_layers(model)
    for layer in layers:
        _keras_compat.route_masked_moments(layer, masked_moments)
    return layers


def masked_moments(inputs: Any, mask: Any, axes: Sequence[int], own: Callable[[], Any]) -> Any:
    """A synchronized BatchNormalization's statistics of a masked input, over every tower.

    Keras computes masked statistics from the calling replica's samples alone,
    `synchronized` or not (`_keras_compat.route_masked_moments`); on one device
    they are the whole batch's. Inside a tower they are formed as one device forms
    them, from sums over every tower (and process): the mean is the masked sum over
    the masked count plus `keras.config.epsilon()`, the variance the masked sum of
    squared distances to that mean over the same count. Outside a tower `own()`
    (Keras' computation) is the answer.

    Args:
        inputs: `(batch, ..., channels)` float values of the tower's slice.
        mask: `(batch, ...)` (one dimension less than `inputs`), true where a
            position counts.
        axes: The axes to reduce (every axis but the channels').
        own: Keras' own computation, for a call outside the towers.

    Returns:
        `(mean, variance)`, each `(channels,)`.
    """
    context = tf.distribute.get_replica_context()
    if not isinstance(context, TowerContext):
        return own()
    weights = tf.broadcast_to(tf.cast(mask, inputs.dtype)[..., None], tf.shape(inputs))
    total, count = context.all_reduce(
        tf.distribute.ReduceOp.SUM,
        [
            tf.reduce_sum(weights * inputs, axes, keepdims=True),
            tf.reduce_sum(weights, axes, keepdims=True),
        ],
    )
    count = count + tf.cast(keras.config.epsilon(), count.dtype)
    mean = total / count
    spread = context.all_reduce(
        tf.distribute.ReduceOp.SUM,
        tf.reduce_sum(weights * tf.square(inputs - mean), axes, keepdims=True),
    )
    return tf.squeeze(mean), tf.squeeze(spread / count)
