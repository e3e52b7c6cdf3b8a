"""ReplicaBuilder in a user's own tf.function, with native and Keras optimizers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import replicate


def _loss(y_true, y_pred, sample_weight=None):
    losses = tf.keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
    if sample_weight is not None:
        return tf.reduce_sum(losses * sample_weight) / tf.cast(tf.size(losses), losses.dtype)
    return tf.reduce_mean(losses)


def _single_device_loop(model, optimizer, x, y, batch_size, steps):
    variables = [v.value for v in model.trainable_variables]

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = _loss(yb, model(xb, training=True))
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    return [
        float(step(x[i : i + batch_size], y[i : i + batch_size]))
        for i in _starts(x, batch_size, steps)
    ]


def _starts(x, batch_size, steps):
    return [(k * batch_size) % (len(x) - batch_size + 1) for k in range(steps)]


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda: tf.compat.v1.train.GradientDescentOptimizer(0.2),
        lambda: tf.compat.v1.train.AdamOptimizer(0.01),
    ],
    ids=["GradientDescent", "Adam"],
)
@pytest.mark.parametrize("towers", [2, 3])
def test_native_optimizer_in_user_tf_function_equals_single_device(
    make_optimizer, towers, devices, mlp_factory, classification_data, weight_diff
):
    x, y = classification_data
    single = mlp_factory()
    expected = _single_device_loop(single, make_optimizer(), x, y, 10, steps=6)

    model = mlp_factory()
    builder = replicate.ReplicaBuilder(model, devices[:towers])
    optimizer = make_optimizer()

    @tf.function
    def step(xb, yb):
        loss, grads = builder.compute_gradients(_loss, xb, yb)
        builder.apply_gradients(optimizer, grads)
        return loss

    losses = [float(step(x[i : i + 10], y[i : i + 10])) for i in _starts(x, 10, 6)]
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert weight_diff(model, single) <= 1e-5


def test_keras_optimizer_and_sample_weight_eagerly(
    devices, mlp_factory, classification_data, weight_diff
):
    x, y = classification_data
    w = np.linspace(0.5, 1.5, len(x)).astype("float32")
    single = mlp_factory()
    with tf.GradientTape() as tape:
        expected = _loss(y, single(x, training=True), w)
    keras.optimizers.SGD(0.3).apply_gradients(
        zip(tape.gradient(expected, single.trainable_variables), single.trainable_variables)
    )
    model = mlp_factory()
    builder = replicate.ReplicaBuilder(model, devices[:4])
    loss, grads = builder.compute_gradients(_loss, x, y, sample_weight=w)
    builder.apply_gradients(keras.optimizers.SGD(0.3), grads)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
    assert weight_diff(model, single) <= 1e-6


def test_call_merges_and_towers_split(devices, mlp_factory, classification_data):
    x, _ = classification_data
    model = mlp_factory()
    builder = replicate.ReplicaBuilder(model, devices[:4])
    outputs = builder.towers(x)
    assert [int(o.shape[0]) for o in outputs] == [16, 15, 15, 15]
    np.testing.assert_allclose(builder.call(x).numpy(), model(x).numpy(), atol=1e-6)
    # Averaging two replicas' predictions of the same inputs.
    twice = replicate.ReplicaBuilder(model, devices[:2]).towers(np.concatenate([x[:8], x[:8]]))
    np.testing.assert_allclose(((twice[0] + twice[1]) / 2).numpy(), model(x[:8]).numpy(), atol=1e-6)


def test_model_factory_is_built_on_the_variable_device(devices):
    def make():
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])

    builder = replicate.ReplicaBuilder(make, devices[:2], variable_device="/cpu:1")
    assert all("CPU:1" in v.value.device for v in builder.model.variables)


def test_not_a_keras_model(devices):
    with pytest.raises(TypeError, match=r"must be a Keras model.*Received: model=42 of type int"):
        replicate.ReplicaBuilder(42, devices[:2])
    with pytest.raises(TypeError, match=r"Received: model=<Dense"):
        replicate.ReplicaBuilder(keras.layers.Dense(3), devices[:2])


def test_a_model_without_weights_is_refused_with_advice_that_works(devices):
    model = keras.Sequential([keras.layers.Dense(2)], name="unbuilt")
    with pytest.raises(ValueError, match=r"'unbuilt' has no weights yet.*`model\(x\[:1\]\)`"):
        replicate.ReplicaBuilder(model, devices)
    model(np.zeros((1, 3), "float32"))  # the advice
    builder = replicate.ReplicaBuilder(model, devices[:2])
    assert builder.call(np.ones((3, 3), "float32")).shape == (3, 2)


def test_unknown_variable_device(devices, mlp_factory):
    with pytest.raises(ValueError, match=r"variable_device='/gpu:7'.*Available devices"):
        replicate.ReplicaBuilder(mlp_factory(), devices, variable_device="/gpu:7")


def test_wrong_optimizer_type(devices, mlp_factory, classification_data):
    x, y = classification_data
    builder = replicate.ReplicaBuilder(mlp_factory(), devices[:2])
    _, grads = builder.compute_gradients(_loss, x, y)
    with pytest.raises(TypeError, match=r"Received: optimizer='sgd' of type str"):
        builder.apply_gradients("sgd", grads)
    with pytest.raises(ValueError, match=r"one entry per trainable variable \(4\)"):
        builder.apply_gradients(keras.optimizers.SGD(), grads[:2])
