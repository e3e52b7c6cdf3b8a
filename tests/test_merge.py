"""The merge on the variable device: tower outputs become one batch, with what Keras keeps."""

import tensorflow as tf

from replicate import _keras_compat, merge


def test_merge_concatenates_keras_masks():
    parts = [tf.ones((2, 3)), tf.zeros((1, 3))]
    _keras_compat.set_mask(parts[0], tf.constant([[True, True, False]] * 2))
    _keras_compat.set_mask(parts[1], tf.constant([[True, False, False]]))
    mask = _keras_compat.get_mask(merge.merge(parts))
    assert mask.numpy().tolist() == [[True, True, False]] * 2 + [[True, False, False]]


# -- Keras as people write it: what the merge must keep ---------------------------------------

import keras  # noqa: E402
import keras_releases  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from equivalence import assert_same_as_one_device, max_weight_difference, sgd  # noqa: E402
from keras import ops  # noqa: E402

import replicate  # noqa: E402

RNG = np.random.default_rng(11)
# Unnormalized features saturate the outputs: only the logits keep the loss.
WIDE = RNG.normal(0.0, 50.0, size=(50, 4)).astype("float32")
LABELS = RNG.integers(0, 3, size=50).astype("int32")


class OpSigmoid(keras.Model):
    """Returns `tf.math.sigmoid` of its logits: Keras finds them by the op, not an attribute."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return tf.math.sigmoid(self.dense(x))


def _binary():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])


def _softmax():
    keras.utils.set_random_seed(2)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])


def _op_sigmoid():
    keras.utils.set_random_seed(3)
    model = OpSigmoid()
    model(WIDE[:1])
    return model


@pytest.mark.parametrize(
    "make, loss, y",
    [
        (_binary, keras.losses.BinaryCrossentropy, (LABELS > 0).astype("float32")),
        (_softmax, keras.losses.SparseCategoricalCrossentropy, LABELS),
        (_softmax, keras.losses.CategoricalCrossentropy, np.eye(3, dtype="float32")[LABELS]),
        (_op_sigmoid, keras.losses.BinaryCrossentropy, (LABELS > 0).astype("float32")),
    ],
    ids=["sigmoid", "softmax-sparse", "softmax-categorical", "sigmoid-op"],
)
def test_sigmoid_and_softmax_outputs_keep_their_logits(make, loss, y, devices):
    def compile_model(model):
        model.compile(optimizer=sgd(1e-4), loss=loss())

    measured = assert_same_as_one_device(make, compile_model, WIDE, y, devices=devices)
    # Not a vacuous match: from probabilities clipped at 1e-7, the loss is far lower.
    single = make()
    probabilities = ops.convert_to_numpy(single(WIDE))
    clipped = float(loss()(y, tf.constant(probabilities)))
    assert measured[1][1]["loss"] > 1.5 * clipped


class Temperature(keras.Model):
    """A classifier whose loss divides its logits by a learned temperature."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)
        self.temperature = self.add_weight(shape=(), initializer="ones", name="temperature")

    def call(self, x):
        return self.dense(x)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        scaled = y_pred / self.temperature
        return ops.mean(keras.losses.sparse_categorical_crossentropy(y, scaled, from_logits=True))


class Distiller(keras.Model):
    """Distillation as keras.io writes it (examples/vision/knowledge_distillation.py),
    with a teacher left trainable: on one device its weights train through the loss."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student, self.teacher = student, teacher

    def call(self, x):
        return self.student(x)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        soft = ops.softmax(self.teacher(x, training=False) / 3.0)
        distill = keras.losses.KLDivergence()(soft, ops.softmax(y_pred / 3.0))
        student = keras.losses.sparse_categorical_crossentropy(y, y_pred, from_logits=True)
        return 0.9 * ops.mean(student) + 0.1 * 9.0 * distill


def _temperature():
    keras.utils.set_random_seed(4)
    model = Temperature()
    model(WIDE[:1])
    return model


def _distiller():
    keras.utils.set_random_seed(5)

    def net(width):
        return keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(width), keras.layers.Dense(3)]
        )

    return Distiller(net(8), net(16))


@pytest.mark.parametrize("make", [_temperature, _distiller], ids=["temperature", "distiller"])
def test_a_loss_that_reads_weights_directly_trains_them(make, devices):
    x = WIDE / 50.0
    assert_same_as_one_device(
        make, lambda m: m.compile(optimizer=sgd(0.1)), x, LABELS, devices=devices
    )
    # The weights the loss alone reads moved, as on one device.
    model = make()
    start = [w.copy() for w in model.get_weights()]
    model.compile(optimizer=sgd(0.1))
    model.fit(x, LABELS, batch_size=17, epochs=1, verbose=0)
    assert not np.allclose(model.get_weights()[-1], start[-1])


class Endpoint(keras.layers.Layer):
    """An endpoint layer that adds one loss per sample, as the keras.io captcha OCR
    example adds its CTC loss (examples/vision/captcha_ocr.py)."""

    def call(self, labels, logits):
        per_sample = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        self.add_loss(ops.expand_dims(per_sample, -1))  # (batch, 1): summed by Keras
        return logits


def _endpoint():
    keras.utils.set_random_seed(6)
    features, labels = keras.Input((4,)), keras.Input((), dtype="int32")
    logits = keras.layers.Dense(3)(keras.layers.Dense(8, activation="tanh")(features))
    return keras.Model([features, labels], Endpoint()(labels, logits))


def test_a_per_sample_add_loss_is_summed_over_every_row(devices):
    x = [WIDE / 50.0, LABELS]
    if not keras_releases.ADD_LOSS_ROWS_ARE_SUMMED:
        # Keras < 3.3 keeps the rows unreduced: its gradient is the sum's, but the loss it
        # reports is their mean, where replicate reports the sum. The training is compared.
        single = _endpoint()
        single.compile(optimizer=sgd(0.01))
        single.fit(x, batch_size=17, epochs=2, shuffle=False, verbose=0)
        for towers in (1, 2, 3):
            model = _endpoint()
            parallel = replicate.replicate(model, devices[:towers])
            parallel.compile(optimizer=sgd(0.01))
            parallel.fit(x, batch_size=17, epochs=2, shuffle=False, verbose=0)
            assert max_weight_difference(model, single) <= 1e-5
        return
    measured = assert_same_as_one_device(
        _endpoint, lambda m: m.compile(optimizer=sgd(0.01)), x, None, devices=devices
    )
    # Summed over the 17 samples of a batch, not averaged: far above ln(3) per sample.
    assert measured[3][1]["loss"] > 10 * np.log(3) / 2
