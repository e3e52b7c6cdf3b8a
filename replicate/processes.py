"""Keras `fit` and `evaluate` across processes: agreed steps, one writer, clear failures."""

from __future__ import annotations

import contextlib
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from replicate.backends import Backend
from replicate.data import ProcessBatches, agree_on_steps

# Callbacks that write files: only the chief runs them.
CHIEF_ONLY = (
    keras.callbacks.ModelCheckpoint,
    keras.callbacks.TensorBoard,
    keras.callbacks.CSVLogger,
)


def _is_array_data(x: Any) -> bool:
    leaves = tf.nest.flatten(x)
    return bool(leaves) and all(isinstance(v, np.ndarray) for v in leaves)


def _chief_only_output(call: dict[str, Any], backend: Backend) -> None:
    if backend.is_chief:
        return
    call["verbose"] = 0
    call["callbacks"] = [c for c in call.get("callbacks") or [] if not isinstance(c, CHIEF_ONLY)]


def prepare_fit(call: dict[str, Any], backend: Backend) -> None:
    """Rewrites `fit`'s arguments so that every process runs the same steps."""
    _chief_only_output(call, backend)
    x = call.get("x")
    if isinstance(x, tf.data.Dataset):
        call["x"] = agree_on_steps(x, backend)
        if isinstance(call.get("validation_data"), tf.data.Dataset):
            call["validation_data"] = agree_on_steps(call["validation_data"], backend)
        return
    if not _is_array_data(x):
        return
    batch_size = call.get("batch_size") or 32
    y, weights = call.get("y"), call.get("sample_weight")
    split = call.pop("validation_split", 0.0)
    if split:
        n = len(tf.nest.flatten(x)[0])
        cut = int(n * (1.0 - split))

        def head(a):
            return tf.nest.map_structure(lambda v: None if v is None else v[:cut], a)

        def tail(a):
            return tf.nest.map_structure(lambda v: None if v is None else v[cut:], a)

        call["validation_data"] = ProcessBatches(
            tail(x), tail(y), tail(weights), batch_size=batch_size, backend=backend
        )
        x, y, weights = head(x), head(y), head(weights)
    elif isinstance(call.get("validation_data"), tuple):
        call["validation_data"] = ProcessBatches(
            *call["validation_data"], batch_size=batch_size, backend=backend
        )
    call["x"] = ProcessBatches(
        x,
        y,
        weights,
        batch_size=batch_size,
        backend=backend,
        shuffle=bool(call.get("shuffle", False)),
    )
    call["y"] = call["sample_weight"] = call["batch_size"] = None


def prepare_evaluate(call: dict[str, Any], backend: Backend) -> None:
    """Rewrites `evaluate`'s arguments so that every process runs the same steps."""
    _chief_only_output(call, backend)
    x = call.get("x")
    if isinstance(x, tf.data.Dataset):
        call["x"] = agree_on_steps(x, backend)
        return
    if not _is_array_data(x):
        return
    call["x"] = ProcessBatches(
        x,
        call.get("y"),
        call.get("sample_weight"),
        batch_size=call.get("batch_size") or 32,
        backend=backend,
    )
    call["y"] = call["sample_weight"] = call["batch_size"] = None


@contextlib.contextmanager
def failures(backend: Backend):
    """Turns a lost peer's low-level error into replicate's message naming this process."""
    try:
        yield
    except Exception as error:
        message = backend.describe_failure(error)
        if message is None:
            raise
        raise RuntimeError(message) from error
