"""What XLA per tower (`jit_compile=True`) cannot compile (`refuse_xla`): each tower's
forward pass is one XLA computation and its backward pass another."""

from __future__ import annotations

import keras

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
