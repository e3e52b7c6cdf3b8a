"""The demo job: a small convnet on scikit-learn's 8x8 digits, trained over towers."""

from __future__ import annotations

import time
from pathlib import Path

import keras
import numpy as np


def load_digits(seed: int = 0, test_fraction: float = 0.2):
    """The 1797 8x8 digit images that scikit-learn ships (no download).

    Returns:
        `((x_train, y_train), (x_test, y_test))`, images as float32 in
        [0, 1] of shape `(n, 8, 8, 1)`, labels as int32, split with a fixed
        per-class shuffle so that both parts hold every digit.

    Raises:
        ModuleNotFoundError: If scikit-learn, an optional dependency (the
            `demo` extra), is not installed; the message says how to add it.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "The demo's 8x8 digits come from scikit-learn, which keras-replicate does not "
            "install by default. Install the `demo` extra: "
            "pip install 'keras-replicate[demo]' (or pip install scikit-learn).",
            name=error.name,
        ) from error

    data = sklearn_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    y = data.target.astype("int32")
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        test[idx[: int(round(len(idx) * test_fraction))]] = True
    order = rng.permutation(len(y))
    train_idx = order[~test[order]]
    test_idx = order[test[order]]
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


def make_convnet(input_shape=(8, 8, 1), classes: int = 10) -> keras.Model:
    """A small convnet: two 3x3 convolutions, pooling, dropout and a softmax head.

    Its BatchNormalization is synchronized, so that it trains through any number
    of towers exactly as on one device (`replicate.check` finds it exact).
    """
    inputs = keras.Input(input_shape, name="image")
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.BatchNormalization(synchronized=True)(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dropout(0.25)(h)
    h = keras.layers.Dense(128, activation="relu")(h)
    outputs = keras.layers.Dense(classes, activation="softmax", name="digit")(h)
    return keras.Model(inputs, outputs, name="digits_convnet")


def run(
    devices: list[str],
    *,
    epochs: int = 15,
    batch_size: int = 64,
    output: str | Path | None = "digits_convnet.keras",
    verbose: int | str = "auto",
    seed: int = 0,
) -> float:
    """Trains the demo convnet over `devices`, prints speed and accuracy.

    Returns:
        The test accuracy.
    """
    import tensorflow as tf

    import replicate

    keras.utils.set_random_seed(seed)
    (x_train, y_train), (x_test, y_test) = load_digits(seed)
    with tf.device("/cpu:0"):
        model = make_convnet()
    parallel = replicate.replicate(model, devices)
    parallel.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    print(f"towers: {len(devices)} on {', '.join(devices)}; weights on {parallel.variable_device}")
    start = time.perf_counter()
    parallel.fit(
        x_train,
        y_train,
        batch_size=batch_size,
        epochs=epochs,
        verbose=verbose,
        validation_split=0.1,
    )
    seconds = time.perf_counter() - start
    examples = epochs * len(x_train) * 0.9
    _, accuracy = parallel.evaluate(x_test, y_test, batch_size=256, verbose=0)
    per_tower = -(-batch_size // len(devices))
    print(f"examples per second: {examples / seconds:.0f} (including the first epoch's tracing)")
    print(f"global batch: {batch_size}, per-tower batch: {per_tower}")
    if output:
        parallel.template.save(output)
        print(f"saved the template model to {output}")
    print(f"test accuracy: {accuracy:.4f}")
    return float(accuracy)
