"""An error raised inside a tower says that the batch was split, where, and how."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import replicate

RNG = np.random.default_rng(61)
X = RNG.normal(size=(120, 8)).astype("float32")
Y = RNG.integers(0, 3, size=120).astype("int32")
GLOBAL_BATCH = 60


class Experts(keras.layers.Layer):
    """Routes tokens as keras.io's Switch Transformer does
    (examples/nlp/text_classification_with_switch_transformer.py): it reshapes to the
    global batch size it was given, which holds on one device only."""

    def call(self, x):
        tokens = ops.reshape(x, (GLOBAL_BATCH * 2, 4))  # [batch * tokens, dim]
        return ops.reshape(tokens, (-1, 8))


def _model():
    return keras.Sequential([keras.Input((8,)), Experts(), keras.layers.Dense(3)])


def _compiled(devices, towers):
    parallel = replicate.replicate(_model(), devices[:towers])
    parallel.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return parallel


def test_the_model_runs_on_one_device_and_one_tower(devices):
    model = _model()
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
    history = _compiled(devices, 1).fit(X, Y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


@pytest.mark.parametrize("towers, slices", [(2, [30, 30]), (3, [20, 20, 20])])
def test_an_error_while_tracing_a_tower_names_it(towers, slices, devices):
    # Static shapes: the reshape fails while tower 0 is traced.
    with pytest.raises(ValueError) as raised:
        _compiled(devices, towers).fit(X, Y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
    assert raised.value.__notes__ == [
        f"replicate: this error was raised in tower 0 of {towers} (device /cpu:0), which ran "
        f"the model on {slices[0]} of the global batch of {GLOBAL_BATCH} samples (slices "
        f"{slices}). Each tower sees only its slice: a model that assumes the batch size (a "
        "reshape to a fixed batch, a hard-coded `batch_size`, a state sized for the global "
        "batch) fails there. Use the batch's own size (`ops.shape(x)[0]`, or -1 in a reshape)."
    ]


class Gate(keras.layers.Layer):
    """A Python `if` on a tensor: Keras' `fit` refuses it on one device, as here."""

    def call(self, x):
        if ops.sum(x) > 0:
            return x
        return -x

    def compute_output_shape(self, input_shape):
        return input_shape


@pytest.mark.parametrize("towers", [1, 2])
def test_an_error_of_another_kind_names_the_tower_without_the_batch_size_advice(towers, devices):
    model = keras.Sequential([keras.Input((8,)), Gate(), keras.layers.Dense(3)])
    parallel = replicate.replicate(model, devices[:towers], check=False)
    parallel.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(tf.errors.OperatorNotAllowedInGraphError) as raised:
        parallel.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
    slices = [GLOBAL_BATCH // towers] * towers
    assert raised.value.__notes__ == [
        f"replicate: this error was raised in tower 0 of {towers} (device /cpu:0), which ran "
        f"the model on {slices[0]} of the global batch of {GLOBAL_BATCH} samples (slices "
        f"{slices})."
    ]


@pytest.mark.parametrize("towers", [2, 3])
def test_an_error_while_a_step_runs_names_the_tower(towers, devices):
    # A dataset whose batch size is known only when the step runs.
    data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(GLOBAL_BATCH)
    data = data.map(lambda x, y: (tf.ensure_shape(x, [None, 8]), y))
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        _compiled(devices, towers).fit(data, epochs=1, verbose=0)
    message = str(raised.value)
    found = message.split("replicate: this error was raised in tower ")[1]
    tower = int(found.split(" ")[0])
    share = GLOBAL_BATCH // towers
    assert found.startswith(
        f"{tower} of {towers} (device /cpu:{tower}), which ran the model on {share} of the "
        f"global batch of {GLOBAL_BATCH} samples (slices {[share] * towers})."
    )
    assert "Use the batch's own size" in message


def test_errors_that_do_not_come_from_a_tower_are_left_alone(devices):
    parallel = replicate.replicate(keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)]))
    parallel.compile("sgd", "mse")
    with pytest.raises(ValueError) as raised:
        parallel.fit(X, Y[:10], verbose=0)  # x and y disagree: Keras' own error
    assert not getattr(raised.value, "__notes__", None)


def _failing_meeting(*mode):
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("failing_meeting_worker.py")), *mode],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_tower_that_fails_while_the_others_wait_at_a_synchronized_layer_names_it():
    # Towers 1 and 2 reach the synchronized layer's collective and wait there for tower 0,
    # whose reshape fails. The step ends with tower 0's own error. TensorFlow may then keep
    # the process's collectives aborted, so later steps meet in threads, with a warning, and
    # train. In a process of its own: what happens there lasts for the process.
    # Another model's steps, traced with collectives before the failure, are traced again.
    got = _failing_meeting()
    assert got["error"] == "InvalidArgumentError"
    assert got["named"], got
    assert got["warnings"] == [
        "replicate: a step failed while the towers of a synchronized layer met inside the "
        "graph. TensorFlow may keep this process's collectives aborted after such a failure, "
        "so from now on the towers meet in threads: later steps are traced again, once per "
        "tower. A `tf.function` of your own that calls a ReplicaBuilder follows once it is "
        "created again."
    ]
    assert got["after"] == {"finite": True, "traces": 3}  # in threads: once per tower
    assert got["other_model_after"] is True
    assert got["another_model"] == {"finite": True, "equal_to_one_device": True}


def test_a_new_function_after_a_failure_in_a_users_own_function_trains():
    # The failure happens where replicate cannot see it; a new function's trace probes the
    # process's collectives and meets in threads if they stay aborted.
    got = _failing_meeting("builder")
    assert got == {"error": "InvalidArgumentError", "warned": None, "equal_to_one_device": True}


def test_a_new_function_in_a_process_whose_collectives_are_aborted_meets_in_threads():
    got = _failing_meeting("aborted")
    assert got == {
        "error": None,
        "warned": ["replicate: a step failed while the towers of a synchronized "],
        "equal_to_one_device": True,
    }
