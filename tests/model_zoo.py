"""Models shared by the single-process tests and the multi-process worker."""

import keras
import keras_releases
import numpy as np
import tensorflow as tf
from keras import ops


def mlp(seed=7, inputs=6, classes=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((inputs,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(classes),
        ],
        name="mlp",
    )


def compile_classifier(model, optimizer=None, **kwargs):
    model.compile(
        optimizer=optimizer if optimizer is not None else keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        **kwargs,
    )
    return model


class TwoStep(keras.Model):
    """Two optimizers; the second update reads the weights the first one wrote."""

    def __init__(self):
        super().__init__()
        self.first = keras.layers.Dense(8, activation="tanh")
        self.second = keras.layers.Dense(3)
        self.first_loss = keras.metrics.Mean(name="first_loss")
        self.error = keras.metrics.MeanAbsoluteError(name="error")

    def call(self, x, training=False):
        return self.second(self.first(x))

    def compile(self, first_optimizer, second_optimizer, **kwargs):
        super().compile(**kwargs)
        self.first_optimizer = first_optimizer
        self.second_optimizer = second_optimizer

    @property
    def metrics(self):
        return [self.first_loss, self.error]

    def train_step(self, data):
        x, y = data
        target = tf.one_hot(y, 3)
        with tf.GradientTape() as tape:
            first = tf.reduce_mean(tf.square(self(x, training=True) - target))
        grads = tape.gradient(first, self.first.trainable_weights)
        self.first_optimizer.apply_gradients(zip(grads, self.first.trainable_weights))
        with tf.GradientTape() as tape:
            prediction = self(x, training=True)  # sees the first update
            second = tf.reduce_mean(tf.abs(prediction - target))
        grads = tape.gradient(second, self.second.trainable_weights)
        self.second_optimizer.apply(grads, self.second.trainable_weights)
        self.first_loss.update_state(first)  # one scalar per step
        self.error.update_state(target, prediction)  # per sample
        return {
            "first_loss": self.first_loss.result(),
            "error": self.error.result(),
            "second": second,
        }

    def test_step(self, data):
        x, y = data
        prediction = self(x, training=False)
        self.error.update_state(tf.one_hot(y, 3), prediction)
        return {"error": self.error.result()}

    def predict_step(self, data):
        return tf.nn.softmax(self(data, training=False))


def two_step(seed=2):
    keras.utils.set_random_seed(seed)
    model = TwoStep()
    model(np.zeros((1, 6), "float32"))
    return model


def compile_two(model):
    model.compile(keras.optimizers.SGD(0.1, momentum=0.5), keras.optimizers.Adam(0.01))
    return model


class OwnLoss(keras.Model):
    """Overrides compute_loss (an extra term) and the metrics it reports."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(16, activation="tanh")
        self.out = keras.layers.Dense(3)
        self.penalty = keras.metrics.Mean(name="penalty")

    def call(self, x, training=False):
        return self.out(self.hidden(x))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        # Keras < 3.4's compute_loss has no `training`, and people's overrides follow it.
        extra = (training,) if keras_releases.COMPUTE_LOSS_TAKES_TRAINING else ()
        loss = super().compute_loss(x, y, y_pred, sample_weight, *extra)
        penalty = 0.1 * ops.mean(ops.square(y_pred))
        self.penalty.update_state(penalty)
        return loss + penalty

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        logs = super().compute_metrics(x, y, y_pred, sample_weight)
        logs["mean_logit"] = ops.mean(y_pred)
        return logs


def own_loss(seed=7):
    keras.utils.set_random_seed(seed)
    model = OwnLoss()
    model(np.zeros((1, 6), "float32"))
    return model


def synchronized_bn(seed=1, synchronized=True):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(synchronized=synchronized),
            keras.layers.Activation("relu"),
            keras.layers.Dense(3),
        ]
    )


def masked_synchronized_bn(seed=1):
    """Token ids (0 is padding) through `Embedding(mask_zero=True)`, so the mask reaches a
    synchronized BatchNormalization; the shape of keras.io's text classifiers."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((7,), dtype="int32")
    h = keras.layers.Embedding(20, 8, mask_zero=True)(tokens)
    h = keras.layers.BatchNormalization(synchronized=True)(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, keras.layers.Dense(2)(h))


def padded_tokens(samples=50, seed=0):
    """`(samples, 7)` token ids, each of the last three padded (0) at random, and 2 classes."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 20, size=(samples, 7))
    x[:, 4:] *= rng.random((samples, 3)) > 0.5
    return x, rng.integers(0, 2, size=(samples,))


def multi_input(seed=2):
    keras.utils.set_random_seed(seed)
    a, b = keras.Input((4,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Concatenate()([keras.layers.Dense(8)(a), b])
    return keras.Model({"a": a, "b": b}, keras.layers.Dense(3)(h))


def split_inputs(x):
    return {"a": x[:, :4], "b": x[:, 4:]}
