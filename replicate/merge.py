"""The merge and the loss on the variable device: the towers' outputs become one batch again.

The towers' outputs are concatenated along axis 0 with what Keras keeps
beside an output tensor: its mask, and the logits behind a sigmoid or
softmax output (Keras' crossentropies read those instead of probabilities
clipped at 1e-7, so a saturated output keeps its loss and its gradient).
The loss is then computed once on the merged batch, as on one device. A small
tape around that computation gives the loss's gradient with respect to each
tower's outputs, which each tower backpropagates on its own device
(`replicate.tower`), and with respect to any weight the loss reads directly
(a `compute_loss` that calls a trainable sub-model, a learned temperature).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from replicate import _keras_compat

# The activations whose logits Keras recovers from the op that made an output
# (graph mode), and the TensorFlow function that makes that op again.
_LOGIT_OPS = {"Sigmoid": tf.math.sigmoid, "Softmax": tf.nn.softmax}


class Logits(NamedTuple):
    """The logits behind one output, and how Keras finds them."""

    tensor: tf.Tensor
    attribute: bool  # Keras attached them to the output (`_keras_logits`)
    op: str | None  # the output is this op of them ("Sigmoid", "Softmax"), or None


def find_logits(t: Any) -> Logits | None:
    """The logits behind output `t`, as Keras' crossentropies would find them, or `None`."""
    if t is None or not tf.is_tensor(t):
        return None
    attached = _keras_compat.get_logits(t)
    op = None
    if not tf.executing_eagerly() and not isinstance(t, tf.Variable):
        try:
            if t.op.type in _LOGIT_OPS and len(t.op.inputs) == 1:
                op = t.op.type
        except AttributeError:  # an eager tensor inside a graph's capture
            op = None
    if attached is not None:
        return Logits(attached, True, op)
    if op is not None:
        return Logits(t.op.inputs[0], False, op)
    return None


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


def merge(tower_outputs: Sequence[Any], logits: Sequence[Sequence[Logits | None]] = ()) -> Any:
    """Concatenates per-tower outputs (any nesting) along axis 0, with their Keras masks and
    the logits behind them (`logits[i][k]`: tower `i`'s, for output leaf `k`)."""
    flat = [tf.nest.flatten(o) for o in tower_outputs]
    merged = []
    for k, leaves in enumerate(zip(*flat)):
        found = [towers[k] if k < len(towers) else None for towers in logits] or [None]
        merged.append(_merge_leaf(list(leaves), found))
    return tf.nest.pack_sequence_as(tower_outputs[0], merged)


def _merge_leaf(leaves: list[Any], logits: list[Logits | None]) -> Any:
    if leaves[0] is None:
        return None
    single = len(leaves) == 1
    both = all(f is not None for f in logits) and len(logits) == len(leaves)
    if both and not logits[0].attribute:
        # Keras recognises these logits by the op that made the output: make it again.
        joined = logits[0].tensor if single else tf.concat([f.tensor for f in logits], 0)
        out = _LOGIT_OPS[logits[0].op](joined)
    else:
        out = leaves[0] if single else tf.concat(leaves, axis=0)
    if both and logits[0].attribute:
        joined = logits[0].tensor if single else tf.concat([f.tensor for f in logits], 0)
        _keras_compat.set_logits(out, joined)
    masks = [_keras_compat.get_mask(t) for t in leaves]
    if not single and all(m is not None for m in masks):  # the same model made every tower's
        _keras_compat.set_mask(out, tf.concat(masks, axis=0))
    elif single and masks[0] is not None:
        _keras_compat.set_mask(out, masks[0])
    return out


def combine_model_losses(towers: Sequence[Any], weights: tf.Tensor) -> tf.Tensor | None:
    """The model's own losses of the batch, from each tower's.

    Scalar losses follow Keras' convention of a mean over the batch (weight
    and activity regularizers, `add_loss` of a mean): each tower's value is
    weighted by its share. Per-sample losses (one row per sample) are summed
    over every row, as Keras sums them: the towers' sums add up. Both exact.
    """
    parts = [
        tf.math.multiply_no_nan(t.model_loss, weights[i])
        for i, t in enumerate(towers)
        if t.model_loss is not None
    ]
    parts += [t.sample_loss for t in towers if t.sample_loss is not None]
    return tf.add_n(parts) if parts else None


def batch_loss(
    model: Any,
    x: Any,
    y: Any,
    y_pred: Any,
    sample_weight: Any,
    model_loss: tf.Tensor | None,
    *,
    training: bool,
) -> tf.Tensor:
    """The model's `compute_loss` on the whole batch, its own losses (combined over the
    towers, `model_loss`) read as `model.losses`.

    Raises:
        ValueError: If there is no loss at all (no compiled loss, no
            `compute_loss` of the model's own, no model losses), as Keras says.
    """
    if model_loss is None:
        own = type(model).compute_loss is not keras.Model.compute_loss
        if _keras_compat.compiled_loss(model) is None and not own:
            raise ValueError("No loss to compute. Provide a `loss` argument in `compile()`.")
        model_loss = tf.zeros((), keras.config.floatx())
    return _keras_compat.compute_loss(
        model,
        x=x,
        y=y,
        y_pred=y_pred,
        sample_weight=sample_weight,
        training=training,
        losses=[model_loss],
    )


class Loss(NamedTuple):
    """The batch loss and its gradients."""

    value: tf.Tensor  # the batch loss, unscaled
    merged: Any  # the merged outputs, masks and logits attached
    upstream: list[list[Any]]  # per tower: d(target)/d(each of its targets), None if unused
    direct: list[Any]  # per weight: the gradient through direct reads in the loss, or None


def loss_pass(
    towers: Sequence[Any],
    loss_of: Callable[[Any, tf.Tensor | None], tf.Tensor],
    weights: tf.Tensor,
    variables: Sequence[Any],
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
        variables: The trainable weights (Keras variables): a loss that reads
            one directly trains it, as on one device.
        share: This process's share of the global batch (several processes).
        scale: Applied to the loss before differentiating (loss scaling).
    """
    watched = [t for tower in towers for t in tower.targets]
    handles = [getattr(v, "value", v) for v in variables]
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(watched)
        tape.watch(handles)
        merged = merge([t.outputs for t in towers], [t.logits for t in towers])
        model_loss = combine_model_losses(towers, weights)
        loss = loss_of(merged, model_loss)
        target = loss if share is None else loss * tf.cast(share, loss.dtype)
        if scale is not None:
            target = scale(target)
    gradients = tape.gradient(target, watched + handles)
    upstream, start = [], 0
    for tower in towers:
        upstream.append(gradients[start : start + len(tower.targets)])
        start += len(tower.targets)
    return Loss(loss, merged, upstream, gradients[len(watched) :])
