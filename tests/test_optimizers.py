"""NativeOptimizer: native TensorFlow optimizers inside Keras compile/fit."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import replicate
from replicate.optimizers import NativeOptimizer

V1 = tf.compat.v1.train
NATIVE = {
    "sgd": lambda: V1.GradientDescentOptimizer(0.1),
    "momentum": lambda: V1.MomentumOptimizer(0.1, 0.9),
    "nesterov": lambda: V1.MomentumOptimizer(0.1, 0.9, use_nesterov=True),
    "adam": lambda: V1.AdamOptimizer(0.01),
    "rmsprop": lambda: V1.RMSPropOptimizer(0.01, momentum=0.5),
    "centered-rmsprop": lambda: V1.RMSPropOptimizer(0.01, centered=True),
    "adagrad": lambda: V1.AdagradOptimizer(0.1),
}
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _by_hand(model, native, x, y, batch_size):
    variables = [v.value for v in model.trainable_variables]

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = LOSS(yb, model(xb, training=True))
        native.apply_gradients(zip(tape.gradient(loss, variables), variables))

    for i in range(0, len(x), batch_size):
        step(x[i : i + batch_size], y[i : i + batch_size])


@pytest.mark.parametrize("kind", sorted(NATIVE))
def test_fit_with_adapter_equals_native_optimizer_by_hand(
    kind, mlp_factory, classification_data, weight_diff
):
    x, y = classification_data
    by_hand = mlp_factory()
    _by_hand(by_hand, NATIVE[kind](), x, y, 16)
    model = mlp_factory()
    model.compile(optimizer=NativeOptimizer(NATIVE[kind]()), loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert weight_diff(model, by_hand) <= 1e-6


def test_replicated_model_and_builder_accept_it(
    devices, mlp_factory, classification_data, weight_diff
):
    x, y = classification_data
    by_hand = mlp_factory()
    _by_hand(by_hand, V1.AdamOptimizer(0.01), x, y, 16)
    model = mlp_factory()
    parallel = replicate.replicate(model, devices[:3])
    parallel.compile(optimizer=NativeOptimizer("adam", learning_rate=0.01, epsilon=1e-8), loss=LOSS)
    parallel.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert weight_diff(model, by_hand) <= 1e-5

    other = mlp_factory()
    builder = replicate.ReplicaBuilder(other, devices[:2])
    optimizer = NativeOptimizer("adam", learning_rate=0.01, epsilon=1e-8)
    for i in range(0, len(x), 16):
        _, grads = builder.compute_gradients(lambda t, p: LOSS(t, p), x[i : i + 16], y[i : i + 16])
        builder.apply_gradients(optimizer, grads)
    assert weight_diff(other, by_hand) <= 1e-5


def test_keras_callbacks_change_the_learning_rate(mlp_factory, classification_data):
    x, y = classification_data
    model = mlp_factory()
    model.compile(optimizer=NativeOptimizer("momentum", learning_rate=0.1), loss=LOSS)
    seen = []
    # Epoch 0 trains; from epoch 1 on the rate is 0, so the native update moves nothing.
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch: 0.1 if epoch == 0 else 0.0)
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: seen.append([w.copy() for w in model.get_weights()])
    )
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=[schedule, record])
    assert float(model.optimizer.learning_rate) == 0.0
    for a, b in zip(seen[1], seen[2], strict=True):
        np.testing.assert_array_equal(a, b)


def test_state_is_saved_and_restored_with_the_model(
    mlp_factory, classification_data, tmp_path, weight_diff
):
    x, y = classification_data
    straight = mlp_factory()
    straight.compile(optimizer=NativeOptimizer("adam", learning_rate=0.01), loss=LOSS)
    straight.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)

    first = mlp_factory()
    first.compile(optimizer=NativeOptimizer("adam", learning_rate=0.01), loss=LOSS)
    first.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    first.save(tmp_path / "half.keras")
    resumed = keras.models.load_model(tmp_path / "half.keras")
    assert isinstance(resumed.optimizer, NativeOptimizer)
    assert resumed.optimizer.kind == "adam"
    assert int(resumed.optimizer.iterations) == 4
    resumed.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert weight_diff(resumed, straight) <= 1e-6


def test_bad_input():
    with pytest.raises(ValueError, match=r"optimizer='lamb'.*\['sgd', 'momentum'"):
        NativeOptimizer("lamb")
    with pytest.raises(
        ValueError, match=r"'sgd' optimizer has no hyperparameter\(s\) \['beta_1'\]"
    ):
        NativeOptimizer("sgd", beta_1=0.9)
    with pytest.raises(TypeError, match=r"Received: FtrlOptimizer"):
        NativeOptimizer(V1.FtrlOptimizer(0.1))
    with pytest.raises(ValueError, match=r"not both"):
        NativeOptimizer(V1.AdamOptimizer(0.1), learning_rate=0.2)
    with pytest.raises(TypeError, match=r"Received: optimizer=3 of type int"):
        NativeOptimizer(3)
