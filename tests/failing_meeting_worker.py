"""A step that fails while towers meet in the graph, then the steps after it (one process).

Run by `test_tower_errors.py`; prints one JSON line with what it saw.
"""

import json
import sys
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


class TwentyRows(keras.layers.Layer):
    """Asserts 20 rows when the step runs: only the tower that holds 21 fails."""

    def call(self, x):
        with tf.control_dependencies([tf.debugging.assert_equal(tf.shape(x)[0], 20)]):
            return tf.identity(x)


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


if sys.argv[1:] == ["aborted"]:
    # What a failed step may leave: the process's collectives aborted (as TensorFlow's own
    # `abort_collective_ops` does). A ReplicaBuilder's next trace finds out and meets in
    # threads.
    from replicate import _keras_compat

    _keras_compat.abort_collectives(10, "aborted to test replicate")  # ABORTED

if sys.argv[1:] in (["builder"], ["aborted"]):
    # A failure inside a user's own tf.function around a ReplicaBuilder, then a new one.
    failing = replicate.ReplicaBuilder(synchronized(TwentyRows()), DEVICES)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(input_signature=[tf.TensorSpec([None, 8]), tf.TensorSpec([None], tf.int32)])
    def failing_step(x, y):
        return failing.compute_gradients(loss, x, y)[0]

    error = None
    if sys.argv[1:] == ["builder"]:
        try:
            failing_step(X, Y)
        except tf.errors.OpError as raised:
            error = type(raised).__name__
    model, single = synchronized(), synchronized()
    builder = replicate.ReplicaBuilder(model, DEVICES)
    optimizer, reference = keras.optimizers.SGD(0.1), keras.optimizers.SGD(0.1)

    @tf.function
    def step(x, y):
        value, grads = builder.compute_gradients(loss, x, y)
        builder.apply_gradients(optimizer, grads)
        return value

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(X[:20], Y[:20])
    replicated = [str(w.message)[:60] for w in caught if str(w.message).startswith("replicate")]
    for start in range(0, 60, 20):
        if start:
            step(X[start : start + 20], Y[start : start + 20])
        with tf.GradientTape() as tape:
            value = loss(Y[start : start + 20], single(X[start : start + 20], training=True))
        reference.apply(
            tape.gradient(value, single.trainable_variables), single.trainable_variables
        )
    difference = max(
        float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), single.get_weights())
    )
    print(
        json.dumps(
            {
                "error": error,
                "warned": replicated if sys.argv[1:] == ["aborted"] else None,
                "equal_to_one_device": difference <= 1e-5,
            }
        )
    )
    sys.exit(0)

other = compiled(replicate.replicate(synchronized(), DEVICES, check=False))
other.fit(X[:60], Y[:60], batch_size=30, epochs=1, verbose=0)  # traced with collectives
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

history = other.fit(X[:60], Y[:60], batch_size=30, epochs=1, verbose=0).history
other_after = bool(np.isfinite(history["loss"]).all())

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
            "other_model_after": other_after,
            "another_model": another,
        }
    )
)
