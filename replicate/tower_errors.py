"""Errors raised inside a tower say that the batch was split, and how.

A model that assumes the size of the batch (a reshape to a fixed batch, a
hard-coded `batch_size`, a state sized for the global batch) trains on one
device and fails inside a tower, which sees only its slice. The error then
names the tower, its device, its slice and the global batch, and the likely
cause. Errors raised while the towers are traced get a note
(`describing`); errors raised while a step runs are recognised by the name
scope `tower_i` of the failing op (`described`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence

import tensorflow as tf

from replicate import _keras_compat, reduce

# Tower i's name scope; TensorFlow numbers a second use of it (the backward pass) "tower_i_1".
_TOWER_SCOPE = re.compile(r"(?:^|[^\w])tower_(\d+)(?:_\d+)?/")


# Words of TensorFlow's and Keras' errors about shapes, where a model that assumes the
# batch size fails (a reshape, a matmul, a broadcast, a state of the wrong size).
_ABOUT_SHAPES = re.compile(r"shape|dimension|incompatible|reshape|broadcast|size", re.IGNORECASE)


def describe_tower(
    i: int, devices: Sequence[str], batch: int | None, *, advice: bool = True
) -> str:
    """What an error inside tower `i` should say: the batch was split, and how.

    Args:
        i: The tower.
        devices: Every tower's device.
        batch: The global batch's size, if known (`None` otherwise).
        advice: Add the likely cause of a shape error (a model that assumes the batch
            size) and its fix; errors of another kind get only where they came from.
    """
    counts = None if batch is None else reduce.split_counts(batch, len(devices))
    if counts is None:
        held = (
            f"its slice of the global batch (split as evenly as possible over "
            f"{len(devices)} towers)"
        )
    else:
        held = f"{counts[i]} of the global batch of {sum(counts)} samples (slices {counts})"
    where = (
        f"replicate: this error was raised in tower {i} of {len(devices)} (device "
        f"{devices[i]}), which ran the model on {held}."
    )
    if not advice:
        return where
    return (
        f"{where} Each tower sees only its slice: a model that assumes the batch size (a "
        "reshape to a fixed batch, a hard-coded `batch_size`, a state sized for the global "
        "batch) fails there. Use the batch's own size (`ops.shape(x)[0]`, or -1 in a reshape)."
    )


def about_shapes(message: str) -> bool:
    """Whether an error's message speaks of shapes or sizes (`_ABOUT_SHAPES`), leaving out
    the arguments Keras lists after it (`Arguments received by ...`, tensors printed with
    their `shape=`)."""
    message = message.split("Arguments received by")[0]
    return _ABOUT_SHAPES.search(re.sub(r"shape=\(", "", message)) is not None


@contextlib.contextmanager
def describing(i: int, devices: Sequence[str], batch: int | None) -> Iterator[None]:
    """Adds `describe_tower`'s note to an error raised while tower `i` is built."""
    try:
        yield
    except Exception as error:
        if not any(
            str(n).startswith("replicate: this error") for n in getattr(error, "__notes__", [])
        ):
            error.add_note(describe_tower(i, devices, batch, advice=about_shapes(str(error))))
        _keras_compat.pass_through_autograph(error)
        raise


def described(
    error: tf.errors.OpError, devices: Sequence[str], batch: int | None
) -> tf.errors.OpError | None:
    """`error` (raised while a step ran) with `describe_tower`'s words, or `None` if it did
    not come from a tower.

    Args:
        error: What TensorFlow raised; its message names the failing op.
        devices: Every tower's device.
        batch: The size of the global batch of the failing step, if known.
    """
    found = _TOWER_SCOPE.search(str(error))
    if found is None or int(found.group(1)) >= len(devices):
        return None
    note = describe_tower(int(found.group(1)), devices, batch, advice=about_shapes(error.message))
    return type(error)(error.node_def, error.op, f"{error.message}\n\n{note}")


class TowerErrors:
    """Describes the errors of one builder's towers: it records each step's global batch
    size (one small variable write per step) to say what each tower held.

    Args:
        devices: The towers' devices.
    """

    def __init__(self, devices: Sequence[str]) -> None:
        self.devices = list(devices)
        self._batch: tf.Variable | None = None
        if not tf.inside_function():
            # Created here, not at the first step: a variable created while `fit`'s step
            # is traced makes `tf.function` trace the whole step a second time.
            self._batch = self._variable()

    @staticmethod
    def _variable() -> tf.Variable:
        with tf.init_scope():
            return tf.Variable(-1, trainable=False, dtype=tf.int32, name="replicate_batch")

    def record(self, size: tf.Tensor) -> None:
        """Records the size of the global batch being cut (inside a step, or eagerly)."""
        if self._batch is None:
            self._batch = self._variable()
        self._batch.assign(tf.cast(size, tf.int32))

    def describe(self, error: tf.errors.OpError) -> tf.errors.OpError | None:
        """`error` with what its tower held, or `None` if it did not come from a tower."""
        batch = -1 if self._batch is None else int(self._batch.numpy())
        return described(error, self.devices, None if batch < 0 else batch)
