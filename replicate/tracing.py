"""How every tower calls the one traced forward pass: slices of any size share its
trace (`open_batch`), and where XLA per tower cannot compile it (`refuse_xla`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from replicate import _keras_compat


def refuse_xla(model: keras.Model, synchronized: bool) -> None:
    """Refuses XLA per tower (`jit_compile=True`) where it cannot compile a tower's passes.

    Raises:
        ValueError: With layers that synchronize the towers (each tower's XLA
            computation would have to pause mid-pass to meet the others), or with a
            recurrent layer that loops (`unroll=False`): its backward pass needs the
            values its loop saved, which TensorFlow cannot hand out of an XLA
            computation ("TensorList crossing the XLA/TF boundary"), where Keras'
            own whole-step XLA keeps the backward pass inside.
    """
    if synchronized:
        raise ValueError(
            "XLA per tower (jit_compile=True) cannot be combined with layers that "
            "synchronize the towers (BatchNormalization(synchronized=True)): each "
            "tower's XLA computation would have to pause in the middle to meet the "
            "others. Use jit_compile=False, or synchronized=False."
        )
    loops = [
        layer.name
        for layer in _keras_compat.sublayers(model)
        if isinstance(layer, keras.layers.RNN) and not getattr(layer, "unroll", False)
    ]
    if loops:
        raise ValueError(
            f"XLA per tower (jit_compile=True) cannot compile the loop of recurrent layers "
            f"{loops}: each tower's forward pass is one XLA computation and its backward "
            "pass another, and the values the loop saves for the backward pass cannot leave "
            "an XLA computation in TensorFlow. Use jit_compile=False, or unroll=True on "
            "those layers (short sequences of a fixed length)."
        )


def open_batch(parts: Sequence[Any]) -> list[Any]:
    """The towers' slices, with the batch dimension of each dense tensor left open
    (`None`) where the slices differ in size (a batch of 14 on 4 towers: 4, 4, 3, 3
    rows), so that one trace of the shared forward function serves every tower. A
    slice size of its own would make `tf.function` trace again (its second trace
    leaves the dimension open anyway: `reduce_retracing`). Slices of one size are
    returned as they are: the model is traced with the batch dimension known, as
    Keras traces it."""

    def rows(t):
        return t.shape[0] if isinstance(t, tf.Tensor) and t.shape.rank else None

    if len({rows(t) for part in parts for t in tf.nest.flatten(part)} - {None}) < 2:
        return list(parts)

    def opened(t):
        if rows(t) is None:
            return t
        return tf.compat.v1.placeholder_with_default(t, [None, *t.shape[1:]])

    return [tf.nest.map_structure(opened, part) for part in parts]
