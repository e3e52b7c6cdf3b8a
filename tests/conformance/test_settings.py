"""Settings that change how a batch is weighed or what a layer writes, from keras.io guides."""

import keras
import numpy as np
import pytest
from keras import layers, ops

from conformance import harness, synthetic
from conformance.criteria import Differs
from conformance.harness import Data, Example

# -- multi-input, multi-output: the functional API guide's ticket classifier -----------------------


def _tickets_model():
    title = keras.Input((None,), name="title")
    body = keras.Input((None,), name="body")
    tags = keras.Input((12,), name="tags")
    title_features = layers.LSTM(16)(layers.Embedding(500, 8)(title))
    body_features = layers.LSTM(8)(layers.Embedding(500, 8)(body))
    x = layers.concatenate([title_features, body_features, tags])
    outputs = {
        "priority": layers.Dense(1, name="priority")(x),
        "department": layers.Dense(4, name="department")(x),
    }
    return keras.Model([title, body, tags], outputs)


def _tickets_data():
    generator = synthetic.rng(81)
    x = {
        "title": generator.integers(500, size=(200, 10)),
        "body": generator.integers(500, size=(200, 20)),
        "tags": generator.integers(2, size=(200, 12)).astype("float32"),
    }
    y = {
        "priority": generator.random(size=(200, 1)),
        "department": generator.integers(2, size=(200, 4)),
    }
    return Data(x, y)


def _compile_tickets(model):
    model.compile(
        optimizer=keras.optimizers.RMSprop(1e-3),
        loss={
            "priority": keras.losses.BinaryCrossentropy(from_logits=True),
            "department": keras.losses.CategoricalCrossentropy(from_logits=True),
        },
        loss_weights={"priority": 1.0, "department": 0.2},
    )


MULTI_IO = Example(
    name="multi_input_multi_output",
    source="guides/functional_api.py",
    family="settings",
    build=_tickets_model,
    compile=_compile_tickets,
    data=_tickets_data,
    batch_size=47,
    loss_tolerance=1e-5,
)

# -- sample weights and class weights (the built-in training guide) --------------------------------

TRAINING_GUIDE = "guides/training_with_built_in_methods.py"


def _digits_mlp():
    inputs = keras.Input((784,), name="digits")
    x = layers.Dense(16, activation="relu", name="dense_1")(inputs)
    x = layers.Dense(16, activation="relu", name="dense_2")(x)
    return keras.Model(inputs, layers.Dense(10, activation="softmax", name="predictions")(x))


def _compile_digits(model):
    model.compile(
        optimizer="rmsprop",
        loss="sparse_categorical_crossentropy",
        metrics=["sparse_categorical_accuracy"],
    )


def _flat_digits(sample_weight=False, class_weight=False):
    x = synthetic.images(200, (784,), 82)
    y = synthetic.learnable_classes(x, 10, 83)
    weights = np.where(y == 5, 2.0, 1.0).astype("float32") if sample_weight else None
    classes = {c: (2.0 if c == 5 else 1.0) for c in range(10)} if class_weight else None
    return Data(x, y, sample_weight=weights, class_weight=classes)


SAMPLE_WEIGHTS = Example(
    name="sample_weights",
    source=TRAINING_GUIDE,
    family="settings",
    build=_digits_mlp,
    compile=_compile_digits,
    data=lambda: _flat_digits(sample_weight=True),
    batch_size=47,
    loss_tolerance=1e-5,
)

CLASS_WEIGHTS = Example(
    name="class_weights",
    source=TRAINING_GUIDE,
    family="settings",
    build=_digits_mlp,
    compile=_compile_digits,
    data=lambda: _flat_digits(class_weight=True),
    batch_size=47,
    loss_tolerance=1e-5,
)

# -- model losses: a mean (endpoint layer) and a sum (activity regularization) ---------------------


class LogisticEndpoint(layers.Layer):
    """Computes its own loss from targets and sample weights, adds it, returns predictions."""

    def __init__(self, name=None):
        super().__init__(name=name)
        self.loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)

    def call(self, logits, targets=None, sample_weight=None):
        if targets is not None:
            self.add_loss(self.loss_fn(targets, logits, sample_weight))
        return ops.softmax(logits)


def _endpoint_model():
    inputs = keras.Input((64,), name="inputs")
    targets = keras.Input((1,), name="targets")
    sample_weight = keras.Input((1,), name="sample_weight")
    logits = layers.Dense(1)(inputs)
    return keras.Model(
        [inputs, targets, sample_weight], LogisticEndpoint()(logits, targets, sample_weight)
    )


def _endpoint_data():
    generator = synthetic.rng(84)
    return Data(
        {
            "inputs": generator.random((200, 64)),
            "targets": generator.random((200, 1)),
            "sample_weight": generator.random((200, 1)),
        }
    )


ENDPOINT = Example(
    name="endpoint_layer_mean_loss",
    source="examples/keras_recipes/endpoint_layer_pattern.py",
    family="settings",
    build=_endpoint_model,
    compile=lambda model: model.compile(keras.optimizers.Adam(1e-3)),
    data=_endpoint_data,
    batch_size=47,
    epochs=2,
    loss_tolerance=1e-5,
)


class ActivityRegularizationLayer(layers.Layer):
    """Adds 0.1 x the sum of its inputs over the whole batch as a model loss."""

    def call(self, inputs):
        self.add_loss(ops.sum(inputs) * 0.1)
        return inputs


def _regularized_model():
    inputs = keras.Input((784,), name="digits")
    x = layers.Dense(16, activation="relu", name="dense_1")(inputs)
    x = ActivityRegularizationLayer()(x)
    x = layers.Dense(16, activation="relu", name="dense_2")(x)
    return keras.Model(inputs, layers.Dense(10, name="predictions")(x))


def _compile_regularized(model):
    model.compile(
        optimizer=keras.optimizers.RMSprop(learning_rate=1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


SUM_LOSS = Example(
    name="activity_regularization_sum",
    alarm=r"the model's own losses differ while its outputs agree",
    source=TRAINING_GUIDE,
    family="settings",
    build=_regularized_model,
    compile=_compile_regularized,
    data=_flat_digits,
    status="limit",
    reason="a loss added as a sum over the batch is each tower's sum weighted by its share "
    "(README, Model losses)",
    batch_size=47,
    criterion=Differs(at_least=0.1, on="history"),
)

# -- a layer that writes weights in call: SpectralNormalization ------------------------------------


def _spectral_discriminator():
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            layers.SpectralNormalization(
                layers.Conv2D(8, kernel_size=4, strides=2, padding="same")
            ),
            layers.LeakyReLU(negative_slope=0.2),
            layers.SpectralNormalization(
                layers.Conv2D(16, kernel_size=4, strides=2, padding="same")
            ),
            layers.LeakyReLU(negative_slope=0.2),
            layers.Flatten(),
            layers.Dense(1),
        ]
    )


def _real_or_fake():
    x = synthetic.images(120, (16, 16, 3), 85)
    y = (x.mean(axis=(1, 2, 3)) > 0.5).astype("float32")
    return Data(x, y)


SPECTRAL = Example(
    name="spectral_normalization",
    source="examples/generative/dcgan_overriding_train_step.py",
    family="settings",
    build=_spectral_discriminator,
    compile=lambda model: model.compile(
        keras.optimizers.Adam(1e-3), keras.losses.BinaryCrossentropy(from_logits=True)
    ),
    data=_real_or_fake,
    batch_size=25,
    loss_tolerance=1e-5,
)

# -- a layer that keeps its own running total (non-trainable, default aggregation) -----------------


class ComputeSum(layers.Layer):
    """Keeps the running sum of its inputs in a non-trainable weight; passes them through."""

    def __init__(self, input_dim):
        super().__init__()
        self.total = self.add_weight(
            initializer="zeros", shape=(input_dim,), trainable=False, name="total"
        )

    def call(self, inputs):
        self.total.assign_add(ops.sum(inputs, axis=0))
        return inputs


def _counting_model():
    inputs = keras.Input((2,))
    return keras.Model(inputs, layers.Dense(1)(ComputeSum(2)(inputs)))


COUNTER = Example(
    name="running_sum_layer",
    alarm=r"writes (its variable )?.*total",
    source="guides/making_new_layers_and_models_via_subclassing.py",
    family="settings",
    build=_counting_model,
    compile=lambda model: model.compile("sgd", "mse"),
    data=lambda: Data(np.ones((200, 2), "float32"), np.ones((200, 1), "float32")),
    batch_size=47,
    status="limit",
    reason="the layer writes its running total at Keras' default aggregation, so the towers' "
    "totals are averaged by their share of the batch (the warning names the layer; "
    'aggregation="sum" makes it exact, running_sum_layer_sum)',
    criterion=Differs(at_least=50.0, on="weights"),
)


class ComputeSumAdded(ComputeSum):
    """The same layer with its total declared as a sum over samples."""

    def __init__(self, input_dim):
        layers.Layer.__init__(self)
        self.total = self.add_weight(
            initializer="zeros",
            shape=(input_dim,),
            trainable=False,
            name="total",
            aggregation="sum",
        )


def _summing_model():
    inputs = keras.Input((2,))
    return keras.Model(inputs, layers.Dense(1)(ComputeSumAdded(2)(inputs)))


COUNTER_SUM = Example(
    name="running_sum_layer_sum",
    source="guides/making_new_layers_and_models_via_subclassing.py",
    family="settings",
    build=_summing_model,
    compile=lambda model: model.compile("sgd", "mse"),
    data=lambda: Data(np.ones((200, 2), "float32"), np.ones((200, 1), "float32")),
    batch_size=47,
    loss_tolerance=1e-5,
)

EXAMPLES = [
    MULTI_IO,
    SAMPLE_WEIGHTS,
    CLASS_WEIGHTS,
    ENDPOINT,
    SUM_LOSS,
    SPECTRAL,
    COUNTER,
    COUNTER_SUM,
]


@pytest.mark.parametrize("example, towers", harness.cases(EXAMPLES))
def test_settings(example, towers, runner, record):
    reference, run, measured = runner.measure(example, towers)
    record(measured)
    harness.check(example, reference, run, measured)
