"""The template's weights, made where they belong, before the first step.

Keras creates a layer's weights on its first call, and `fit` builds a model
that has none from the first batch of its data. A replicated model must have
its weights once, on the variable device, before any tower runs: so the first
`fit`, `evaluate` or `predict` of a replicated model whose template has no
weights yet builds the template from the first batch, under the variable
device, the way Keras' own `fit` does (model, compiled loss and metrics,
optimizer).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from replicate import _keras_compat


def first_batch(call: dict[str, Any]) -> Any:
    """The first batch of what `fit`/`evaluate`/`predict` received, or `None`.

    Arrays and dense, ragged or sparse tensors (any nesting) give their first
    `batch_size` rows, a `tf.data.Dataset` its first element and a
    `keras.utils.PyDataset` its item 0. A Python generator cannot be looked
    into without consuming it: `None`.
    """
    x = call.get("x")
    if isinstance(x, tf.data.Dataset):
        return next(iter(x))
    if isinstance(x, keras.utils.PyDataset):
        return x[0]
    leaves = tf.nest.flatten(x)
    if not leaves or not all(isinstance(v, _BATCHES) for v in leaves):
        return None
    rows = call.get("batch_size") or 32
    parts = [tf.nest.map_structure(lambda t: head(t, rows), x)]
    for key in ("y", "sample_weight"):
        if call.get(key) is not None:
            parts.append(tf.nest.map_structure(lambda t: head(t, rows), call[key]))
    return tuple(parts) if len(parts) > 1 else parts[0]


_BATCHES = (np.ndarray, tf.Tensor, tf.RaggedTensor, tf.SparseTensor)


def head(t: Any, n: int) -> Any:
    """The first `n` rows of `t`: an array, a dense, ragged or sparse tensor, or `None`."""
    if t is None:
        return None
    if isinstance(t, tf.SparseTensor):
        return tf.sparse.slice(t, [0] * t.shape.rank, [n, *t.dense_shape[1:]])
    return t[:n]


def ensure_weights(
    template: keras.Model, builder: Any, call: dict[str, Any], *, compiled: bool = False
) -> None:
    """Builds `template` from the first batch of `call` if it has no weights yet; with
    `compiled`, its compiled metrics and loss too (`fit`, `evaluate`).

    Keras builds compiled metrics at the first step it traces when no distribution
    strategy is set; their variables, created inside that trace, make `tf.function`
    trace the whole step a second time, which for a step of many towers costs seconds.
    Built here from the first batch, as Keras' `fit` does under a strategy, the step is
    traced once. Data that cannot be looked into (a generator), or a model that Keras
    cannot call symbolically, leaves them to Keras' first trace, as on one device.

    Raises:
        ValueError: If it has no weights and the data cannot be looked into (a
            generator): the message says how to build the model first.
    """
    if template.variables:
        if compiled and _keras_compat.compiled_unbuilt(template):
            batch = first_batch(call)
            if batch is not None:
                try:
                    with tf.device(builder.variable_device):
                        _keras_compat.symbolic_build(template, batch)
                except Exception:  # noqa: BLE001 - only a head start: Keras builds them later
                    pass
        return
    batch = first_batch(call)
    if batch is None:
        builder.require_weights()
    with tf.device(builder.variable_device):
        _keras_compat.symbolic_build(template, batch)
    builder.require_weights()
