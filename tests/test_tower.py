"""The tower pass: what a model writes in its forward pass takes effect as on one device."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from equivalence import assert_same_as_one_device, max_weight_difference, sgd
from keras import ops

import replicate

RNG = np.random.default_rng(21)
X = RNG.normal(size=(50, 6)).astype("float32")
Y = RNG.integers(0, 3, size=50).astype("int32")


def _classifier(model):
    model.compile(optimizer=sgd(0.1), loss=keras.losses.SparseCategoricalCrossentropy(True))


def _spectral():
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.SpectralNormalization(keras.layers.Dense(8, activation="tanh")),
            keras.layers.SpectralNormalization(keras.layers.Dense(3)),
        ]
    )


def test_writes_to_trainable_weights_in_call_take_effect(devices):
    # SpectralNormalization writes its normalized kernel in call(training=True).
    assert_same_as_one_device(_spectral, _classifier, X, Y, devices=devices)
    model = _spectral()
    parallel = replicate.replicate(model, devices[:3])
    _classifier(parallel)
    parallel.fit(X, Y, batch_size=17, epochs=2, shuffle=False, verbose=0)
    kernel = model.layers[0].layer.kernel.numpy()
    # The last write normalized the kernel before the last update moved it a little.
    assert np.linalg.svd(kernel, compute_uv=False)[0] == pytest.approx(1.0, abs=0.05)


SEQUENCES = RNG.normal(size=(150, 5, 3)).astype("float32")
TARGETS = RNG.normal(size=(150, 1)).astype("float32")


def _stateful():
    keras.utils.set_random_seed(8)
    return keras.Sequential(
        [
            keras.Input((5, 3), batch_size=50),
            keras.layers.LSTM(4, stateful=True),
            keras.layers.Dense(1),
        ]
    )


@pytest.mark.parametrize("towers", [1, 2, 3])
def test_stateful_rnn_carries_each_towers_rows(towers, devices):
    single = _stateful()
    single.compile(optimizer=sgd(0.05), loss="mse")
    model = _stateful()
    parallel = replicate.replicate(model, devices[:towers])
    parallel.compile(optimizer=sgd(0.05), loss="mse")
    for m in (single, parallel):
        m.fit(SEQUENCES, TARGETS, batch_size=50, epochs=2, shuffle=False, verbose=0)
    assert max_weight_difference(model, single) <= 1e-5
    for a, b in zip(model.layers[0].states, single.layers[0].states, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    assert np.abs(single.layers[0].states[0].numpy()).max() > 0.01  # the state did move
    expected = single.evaluate(SEQUENCES, TARGETS, batch_size=50, verbose=0)
    np.testing.assert_allclose(
        parallel.evaluate(SEQUENCES, TARGETS, batch_size=50, verbose=0), expected, rtol=1e-5
    )
    for m in (model, single):
        m.layers[0].reset_states()
    expected = single.evaluate(SEQUENCES, TARGETS, batch_size=50, verbose=0)
    np.testing.assert_allclose(
        parallel.evaluate(SEQUENCES, TARGETS, batch_size=50, verbose=0), expected, rtol=1e-5
    )


def test_stateful_rnn_with_another_batch_size_is_an_error(devices):
    parallel = replicate.replicate(_stateful(), devices[:3])
    parallel.compile(optimizer=sgd(0.05), loss="mse")
    with pytest.raises(
        (ValueError, tf.errors.InvalidArgumentError),
        match=r"holds 50 rows, one per sample of the batch it was built for.*a batch of "
        r"(40|another size)",
    ):
        parallel.fit(SEQUENCES[:40], TARGETS[:40], batch_size=40, epochs=1, verbose=0)


class Recorder(keras.layers.Layer):
    """Writes a variable it does not own (a counter shared through a closure)."""

    def __init__(self, counter, **kwargs):
        super().__init__(**kwargs)
        self.record = lambda value: counter.assign_add(value)

    def call(self, x):
        self.record(ops.cast(ops.shape(x)[0], "float32"))
        return x


def test_writing_a_variable_the_model_does_not_track_is_an_error(devices):
    counter = keras.Variable(0.0, name="shared_counter")
    model = keras.Sequential([keras.Input((6,)), Recorder(counter), keras.layers.Dense(3)])
    parallel = replicate.replicate(model, devices[:2])
    _classifier(parallel)
    with pytest.raises(RuntimeError, match=r"assigned variables that are not among its weights"):
        parallel.fit(X, Y, batch_size=17, epochs=1, verbose=0)
    assert float(counter.numpy()) == 0.0  # nothing half-applied


def _traced(towers, devices):
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), keras.layers.Dense(3)])
    parallel = replicate.replicate(model, devices[:towers], check=False)
    _classifier(parallel)
    parallel.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    parallel.evaluate(X, Y, batch_size=16, verbose=0)
    # The step is traced once: nothing replicate creates at its first trace (a variable)
    # makes `tf.function` trace it again.
    assert parallel.builder.train_traces == 1, parallel.builder.train_traces
    return parallel.builder.tower_pass.traces


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "rmsprop", "sgd_momentum"])
@pytest.mark.parametrize("towers", [1, 2])
def test_the_step_is_traced_once_with_state_metrics_and_slots(optimizer, towers, devices):
    # What a model and its optimizer keep (BatchNormalization statistics, Dropout's seed,
    # slots) and the first-fit check create nothing while the step is traced, so
    # `tf.function` traces each step once: each trace of a wide step costs seconds. One
    # tower is traced inline: its forward pass runs once per trace. Compiled metrics are
    # built from the first batch before the step is traced (on one device Keras builds
    # them inside the first trace, and traces twice).
    keras.utils.set_random_seed(6)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(3),
        ]
    )
    parallel = replicate.replicate(model, devices[:towers])
    chosen = (
        keras.optimizers.SGD(0.1, momentum=0.9)
        if optimizer == "sgd_momentum"
        else keras.optimizers.get(optimizer)
    )
    parallel.compile(
        optimizer=chosen,
        loss=keras.losses.SparseCategoricalCrossentropy(True),
        metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(2)],
    )
    parallel.fit(X, Y, batch_size=16, epochs=2, verbose=0)
    parallel.evaluate(X, Y, batch_size=16, verbose=0)
    assert parallel.builder.train_traces == 1, parallel.builder.train_traces
    assert parallel.builder.tower_pass.traces == 2, parallel.builder.tower_pass.traces


@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize("towers", [1, 2])
def test_a_model_with_two_outputs_is_traced_once(towers, check, devices):
    # Keras tracks each output's loss in variables of its own (`compile_loss/<output>_loss`),
    # created where the compiled loss is built: before the step is traced, here.
    keras.utils.set_random_seed(7)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    outputs = [keras.layers.Dense(3, name="a")(hidden), keras.layers.Dense(1, name="b")(hidden)]
    parallel = replicate.replicate(keras.Model(inputs, outputs), devices[:towers], check=check)
    parallel.compile(
        optimizer="adam",
        loss={"a": keras.losses.SparseCategoricalCrossentropy(True), "b": "mse"},
        loss_weights={"a": 1.0, "b": 0.5},
    )
    parallel.fit(X, {"a": Y, "b": X[:, :1]}, batch_size=16, epochs=1, verbose=0)
    assert parallel.builder.train_traces == 1, parallel.builder.train_traces


def test_the_forward_pass_is_traced_once_whatever_the_number_of_towers(devices):
    # Start-up grows with the towers only in TensorFlow's work, not in Python tracing:
    # every tower calls one function, traced once per training flag and step function.
    once = _traced(1, devices)
    assert once > 0, once
    assert _traced(4, devices) == once
