"""Four simulated devices for every test in this process, set before TensorFlow starts."""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Shared helpers (model_zoo, process_worker) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import replicate  # noqa: E402

DEVICES = replicate.simulate_devices(4)


@pytest.fixture
def devices():
    """The four simulated tower devices, `/cpu:0` to `/cpu:3`."""
    return list(DEVICES)


@pytest.fixture
def mlp_factory():
    """Makes the same small MLP (same initial weights) every call."""

    def make(*, batch_norm=False, dropout=0.0, seed=7, inputs=6, classes=3):
        keras.utils.set_random_seed(seed)
        layers = [keras.Input((inputs,)), keras.layers.Dense(16, activation="tanh")]
        if batch_norm:
            layers.append(keras.layers.BatchNormalization())
        if dropout:
            layers.append(keras.layers.Dropout(dropout))
        layers.append(keras.layers.Dense(classes))
        return keras.Sequential(layers, name="mlp")

    return make


@pytest.fixture
def classification_data():
    """61 samples (a prime, so no tower count divides it), 6 features, 3 classes."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(61, 6)).astype("float32")
    y = rng.integers(0, 3, size=61).astype("int32")
    return x, y


@pytest.fixture
def weight_diff():
    """The largest absolute difference between two models' weights."""

    def diff(a: keras.Model, b: keras.Model) -> float:
        pairs = list(zip(a.get_weights(), b.get_weights(), strict=True))
        return max(float(np.abs(u - v).max()) for u, v in pairs)

    return diff
