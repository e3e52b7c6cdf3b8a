"""The benchmark models and their synthetic data."""

from __future__ import annotations

import keras
import numpy as np

from replicate.bench import MODELS  # noqa: F401 (the choices, re-exported)


def input_shape(name: str) -> tuple[int, ...]:
    return {"mlp": (784,), "convnet": (32, 32, 3), "resnet": (32, 32, 3)}[name]


def build(name: str, *, seed: int = 0, hidden: int = 512) -> keras.Model:
    """Builds benchmark model `name` with fixed initial weights.

    mlp: 784-512-512-10. convnet: two 3x3 convolutions, pooling, a dense head
    on 32x32x3. resnet: a small residual network (3 stages of 2 blocks) on 32x32x3.
    """
    keras.utils.set_random_seed(seed)
    if name == "mlp":
        return keras.Sequential(
            [
                keras.Input((784,)),
                keras.layers.Dense(hidden, activation="relu"),
                keras.layers.Dense(hidden, activation="relu"),
                keras.layers.Dense(10),
            ],
            name="mlp",
        )
    if name == "convnet":
        return keras.Sequential(
            [
                keras.Input((32, 32, 3)),
                keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
                keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
                keras.layers.MaxPooling2D(2),
                keras.layers.Flatten(),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(10),
            ],
            name="convnet",
        )
    if name == "resnet":
        inputs = keras.Input((32, 32, 3))
        h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
        for stage, width in enumerate((16, 32, 64)):
            for block in range(2):
                stride = 2 if stage and not block else 1
                shortcut = h
                h = keras.layers.BatchNormalization()(h)
                h = keras.layers.ReLU()(h)
                if stride != 1 or shortcut.shape[-1] != width:
                    shortcut = keras.layers.Conv2D(width, 1, strides=stride, use_bias=False)(h)
                h = keras.layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False)(h)
                h = keras.layers.BatchNormalization()(h)
                h = keras.layers.ReLU()(h)
                h = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(h)
                h = keras.layers.Add()([h, shortcut])
        h = keras.layers.GlobalAveragePooling2D()(h)
        return keras.Model(inputs, keras.layers.Dense(10)(h), name="resnet")
    raise ValueError(f"Unknown model. Received: model={name!r}. Choose one of {list(MODELS)}.")


def data(name: str, samples: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random inputs and integer labels for model `name`."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, *input_shape(name))).astype("float32")
    y = rng.integers(0, 10, size=samples).astype("int32")
    return x, y
