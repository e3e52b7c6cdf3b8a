"""A step that fails while towers meet in the graph, then the steps after it (one process).

Run by `test_tower_errors.py`; prints one JSON line with what it saw.
"""

import json
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras import ops

import replicate

replicate.simulate_devices(3)
DEVICES = replicate.list_devices()
RNG = np.random.default_rng(61)
X = RNG.normal(size=(61, 8)).astype("float32")
Y = RNG.integers(0, 3, size=61).astype("int32")


class FixedRows(keras.layers.Layer):
    """Reshapes to 20 rows: only the tower that holds 21 fails."""

    def call(self, x):
        return ops.reshape(x, (20, 8))


def synchronized(*first):
    keras.utils.set_random_seed(4)
    return keras.Sequential(
        [
            keras.Input((8,)),
            *first,
            keras.layers.Dense(8, use_bias=False),
            keras.layers.BatchNormalization(synchronized=True),
            keras.layers.Dense(3),
        ]
    )


def compiled(model):
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


parallel = compiled(replicate.replicate(synchronized(FixedRows()), DEVICES, check=False))
data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(61)
data = data.map(lambda x, y: (tf.ensure_shape(x, [None, 8]), y))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        parallel.fit(data, epochs=1, verbose=0)
        error, named = None, False
    except tf.errors.OpError as raised:
        error = type(raised).__name__
        named = (
            "replicate: this error was raised in tower 0 of 3 (device /cpu:0), which ran the "
            "model on 21 of the global batch of 61 samples (slices [21, 20, 20])."
        ) in str(raised)
replicated = [str(w.message) for w in caught if str(w.message).startswith("replicate")]

traces = parallel.builder.tower_pass.traces
history = parallel.fit(X[:60], Y[:60], batch_size=60, epochs=2, verbose=0).history
after = {
    "finite": bool(np.isfinite(history["loss"]).all()),
    "traces": parallel.builder.tower_pass.traces - traces,
}

single = compiled(synchronized())
single.fit(X, Y, batch_size=10, epochs=1, shuffle=False, verbose=0)
model = synchronized()
history = (
    compiled(replicate.replicate(model, DEVICES, check=False))
    .fit(X, Y, batch_size=10, epochs=1, shuffle=False, verbose=0)
    .history
)
difference = max(
    float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), single.get_weights())
)
another = {
    "finite": bool(np.isfinite(history["loss"]).all()),
    "equal_to_one_device": difference <= 1e-5,
}
print(
    json.dumps(
        {
            "error": error,
            "named": named,
            "warnings": replicated,
            "after": after,
            "another_model": another,
        }
    )
)
