"""The seam to Keras' and TensorFlow's internals: each one replicate reads still exists."""

import importlib

import keras
import tensorflow as tf

from replicate import _keras_compat


def test_every_internal_exists_in_the_installed_versions():
    checked = _keras_compat.verify()
    # The list is the inventory of private names replicate depends on.
    assert "Layer._losses_override" in checked
    assert "collective_ops.all_reduce_v2" in checked
    assert len(checked) == len(set(checked)) >= 20


def test_a_missing_internal_fails_loudly_with_the_versions(monkeypatch):
    # Stands in for a TensorFlow release that dropped the function.
    collective_ops = importlib.import_module("tensorflow.python.ops.collective_ops")
    monkeypatch.delattr(collective_ops, "all_reduce_v2")
    try:
        _keras_compat.verify()
    except RuntimeError as error:
        message = str(error)
    else:
        raise AssertionError("verify() accepted a TensorFlow without all_reduce_v2")
    assert "`collective_ops.all_reduce_v2`" in message
    assert f"Keras {keras.__version__} with TensorFlow {tf.__version__}" in message


def test_masks_and_logits_travel_as_tensor_attributes():
    x = tf.constant([[0.5, -1.0]])
    mask = tf.constant([[True, False]])
    _keras_compat.set_mask(x, mask)
    assert _keras_compat.get_mask(x) is mask
    probabilities = keras.activations.sigmoid(x)
    assert _keras_compat.get_logits(probabilities) is x


def test_compute_loss_reads_the_losses_handed_in():
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1, kernel_initializer="ones")(inputs))
    model.compile(loss="mse")
    x, y = tf.ones((4, 2)), tf.zeros((4, 1))
    loss = _keras_compat.compute_loss(
        model,
        x=x,
        y=y,
        y_pred=model(x),
        sample_weight=None,
        training=True,
        losses=[tf.constant(3.0)],
    )
    assert float(loss) == 4.0 + 3.0  # mse of 2s, plus the model loss handed in
    assert model.losses == []  # handed in for that call only


def test_native_hyperparameters():
    adam = tf.compat.v1.train.AdamOptimizer(0.25, beta1=0.8)
    got = _keras_compat.native_hyperparameters(adam, "AdamOptimizer")
    assert got["learning_rate"] == 0.25 and got["beta_1"] == 0.8
