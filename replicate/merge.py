"""The merge and the loss on the variable device: the towers' outputs become one batch again.

The towers' outputs are concatenated along axis 0 with what Keras keeps
beside an output tensor (its mask), and the loss is computed once on the
merged batch, as on one device. A small tape around that computation gives
the loss's gradient with respect to each tower's outputs, which each tower
then backpropagates on its own device (`replicate.tower`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import tensorflow as tf

from replicate import _keras_compat


def keep(structure: Any, size: tf.Tensor) -> Any:
    """The first `size` rows of every tensor (a tower's real outputs), masks kept."""

    def head(t):
        if t is None or not tf.is_tensor(t) or t.shape.rank == 0:
            return t
        out = t[:size]
        mask = _keras_compat.get_mask(t)
        if mask is not None:
            _keras_compat.set_mask(out, mask[:size])
        return out

    return tf.nest.map_structure(head, structure)


def merge(tower_outputs: Sequence[Any]) -> Any:
    """Concatenates per-tower outputs (any nesting) along axis 0, Keras masks too."""
    if len(tower_outputs) == 1:
        return tower_outputs[0]

    def concat(*ts):
        if ts[0] is None:
            return None
        merged = tf.concat(ts, axis=0)
        masks = [_keras_compat.get_mask(t) for t in ts]
        if all(m is not None for m in masks):  # the same model made every tower's
            _keras_compat.set_mask(merged, tf.concat(masks, axis=0))
        return merged

    return tf.nest.map_structure(concat, *tower_outputs)


def combine_model_losses(
    model_losses: Sequence[tf.Tensor | None], weights: tf.Tensor
) -> tf.Tensor | None:
    """The model's own losses of the batch: each tower's, weighted by its share.

    Exact for losses that are means over the batch (Keras' convention:
    regularizers of weights, activity regularizers, `add_loss` of a mean).
    """
    if all(v is None for v in model_losses):
        return None
    return tf.add_n(
        [
            tf.math.multiply_no_nan(v, weights[i])
            for i, v in enumerate(model_losses)
            if v is not None
        ]
    )


class Loss(NamedTuple):
    """The batch loss and its gradient with respect to each tower's targets."""

    value: tf.Tensor  # the batch loss, unscaled
    merged: Any  # the merged outputs, masks attached
    upstream: list[list[Any]]  # per tower: d(target)/d(each of its targets), None if unused


def loss_pass(
    towers: Sequence[Any],
    loss_of: Callable[[Any, tf.Tensor | None], tf.Tensor],
    weights: tf.Tensor,
    *,
    share: tf.Tensor | None = None,
    scale: Callable[[tf.Tensor], tf.Tensor] | None = None,
) -> Loss:
    """The loss of the merged batch, once, and its gradient towards each tower.

    Run under the variable device's scope.

    Args:
        towers: The towers' forward passes (`replicate.tower.Tower`).
        loss_of: `loss_of(merged_outputs, model_loss)` returns the batch loss.
        weights: `(towers,)` each tower's share of the batch.
        share: This process's share of the global batch (several processes).
        scale: Applied to the loss before differentiating (loss scaling).
    """
    watched = [t for tower in towers for t in tower.targets]
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(watched)
        merged = merge([t.outputs for t in towers])
        model_loss = combine_model_losses([t.model_loss for t in towers], weights)
        loss = loss_of(merged, model_loss)
        target = loss if share is None else loss * tf.cast(share, loss.dtype)
        if scale is not None:
            target = scale(target)
    gradients = tape.gradient(target, watched)
    upstream, start = [], 0
    for tower in towers:
        upstream.append(gradients[start : start + len(tower.targets)])
        start += len(tower.targets)
    return Loss(loss, merged, upstream)
