"""Models with their own steps: the customizing-fit guide, distillation and SimCLR, small."""

import keras
import pytest
import tensorflow as tf
from keras import layers, ops

from conformance import harness, synthetic
from conformance.criteria import Differs
from conformance.harness import Data, Example

# -- the guide "Customizing what happens in fit() with TensorFlow" -------------------------------


class StepWithCompiledLoss(keras.Model):
    """`train_step` with the compiled loss and metrics (the guide's first model)."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(y=y, y_pred=y_pred)
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


class StepWithOwnTrackers(keras.Model):
    """Lower level: its own loss function, trackers and `metrics` (no compiled loss)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.mae_metric = keras.metrics.MeanAbsoluteError(name="mae")
        self.loss_fn = keras.losses.MeanSquaredError()

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.loss_fn(y, y_pred)
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        self.loss_tracker.update_state(loss)
        self.mae_metric.update_state(y, y_pred)
        return {"loss": self.loss_tracker.result(), "mae": self.mae_metric.result()}

    @property
    def metrics(self):
        return [self.loss_tracker, self.mae_metric]


class StepWithSampleWeight(keras.Model):
    """Unpacks an optional sample weight and hands it to the loss and the metrics."""

    def train_step(self, data):
        x, y, sample_weight = data if len(data) == 3 else (*data, None)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(y=y, y_pred=y_pred, sample_weight=sample_weight)
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred, sample_weight=sample_weight)
        return {m.name: m.result() for m in self.metrics}


class OwnTestStep(keras.Model):
    """Its own evaluation step (the guide's `test_step`)."""

    def test_step(self, data):
        x, y = data
        y_pred = self(x, training=False)
        loss = self.compute_loss(y=y, y_pred=y_pred)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


def _functional(cls):
    inputs = keras.Input((32,))
    return cls(inputs, layers.Dense(1)(inputs))


def _regression(sample_weight=False):
    generator = synthetic.rng(71)
    x, y = generator.random((200, 32)), generator.random((200, 1))
    return Data(x, y, generator.random((200, 1)) if sample_weight else None)


GUIDE = "guides/custom_train_step_in_tensorflow.py"


def _compile_mse(model):
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])


COMPILED_LOSS = Example(
    name="custom_train_step",
    source=GUIDE,
    family="own_step",
    build=lambda: _functional(StepWithCompiledLoss),
    compile=_compile_mse,
    data=_regression,
    batch_size=47,
    epochs=2,
    loss_tolerance=1e-5,
)

OWN_TRACKERS = Example(
    name="custom_train_step_own_metrics",
    source=GUIDE,
    family="own_step",
    build=lambda: _functional(StepWithOwnTrackers),
    compile=lambda model: model.compile(optimizer="adam"),
    data=_regression,
    batch_size=47,
    epochs=2,
    evaluate=False,
    loss_tolerance=1e-5,
)

SAMPLE_WEIGHT_STEP = Example(
    name="custom_train_step_sample_weight",
    source=GUIDE,
    family="own_step",
    build=lambda: _functional(StepWithSampleWeight),
    compile=_compile_mse,
    data=lambda: _regression(sample_weight=True),
    batch_size=47,
    epochs=2,
    loss_tolerance=1e-5,
)

TEST_STEP = Example(
    name="custom_test_step",
    source=GUIDE,
    family="own_step",
    build=lambda: _functional(OwnTestStep),
    compile=lambda model: model.compile(loss="mse", metrics=["mae"]),
    data=_regression,
    batch_size=47,
    loss_tolerance=1e-5,
)

# -- knowledge distillation: compute_loss calls the teacher --------------------------------------


class Distiller(keras.Model):
    """The student's loss and a softened teacher-student KL divergence, in `compute_loss`."""

    def __init__(self, student, teacher):
        super().__init__()
        self.teacher, self.student = teacher, student

    def compile(
        self, optimizer, metrics, student_loss_fn, distillation_loss_fn, alpha, temperature
    ):
        super().compile(optimizer=optimizer, metrics=metrics)
        self.student_loss_fn, self.distillation_loss_fn = student_loss_fn, distillation_loss_fn
        self.alpha, self.temperature = alpha, temperature

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        teacher_pred = self.teacher(x, training=False)
        student_loss = self.student_loss_fn(y, y_pred)
        soft = self.distillation_loss_fn(
            ops.softmax(teacher_pred / self.temperature, axis=1),
            ops.softmax(y_pred / self.temperature, axis=1),
        )
        return self.alpha * student_loss + (1 - self.alpha) * soft * self.temperature**2

    def call(self, x):
        return self.student(x)


def _convnet(first, second, name):
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(first, (3, 3), strides=(2, 2), padding="same"),
            layers.LeakyReLU(negative_slope=0.2),
            layers.MaxPooling2D(pool_size=(2, 2), strides=(1, 1), padding="same"),
            layers.Conv2D(second, (3, 3), strides=(2, 2), padding="same"),
            layers.Flatten(),
            layers.Dense(10),
        ],
        name=name,
    )


def _distiller():
    model = Distiller(student=_convnet(4, 8, "student"), teacher=_convnet(16, 32, "teacher"))
    model(ops.zeros((1, 28, 28, 1)))  # replicate() takes built models (the README's rule)
    return model


def _compile_distiller(model):
    model.compile(
        optimizer=keras.optimizers.Adam(),
        metrics=[keras.metrics.SparseCategoricalAccuracy()],
        student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        distillation_loss_fn=keras.losses.KLDivergence(),
        alpha=0.1,
        temperature=10,
    )


def _digits():
    x = synthetic.images(120, (28, 28, 1), 72)
    x[x < 0.6] = 0.0
    return Data(x, synthetic.learnable_classes(x, 10, 73))


DISTILLATION = Example(
    name="knowledge_distillation",
    source="examples/vision/knowledge_distillation.py",
    family="own_step",
    build=_distiller,
    compile=_compile_distiller,
    data=_digits,
    batch_size=25,
    loss_tolerance=1e-5,
)

# -- SimCLR: a contrastive loss over the batch inside its own step, then a linear probe ------------


class RandomColorAffine(layers.Layer):
    """Random brightness and a random color mix per image (the example's own augmenter)."""

    def __init__(self, brightness=0.6, jitter=0.2, **kwargs):
        super().__init__(**kwargs)
        self.brightness, self.jitter = brightness, jitter
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, images, training=True):
        if not training:
            return images
        batch = ops.shape(images)[0]
        scales = keras.random.uniform(
            (batch, 1, 1, 1), 1 - self.brightness, 1 + self.brightness, seed=self.seed_generator
        )
        mix = keras.random.uniform(
            (batch, 1, 3, 3), -self.jitter, self.jitter, seed=self.seed_generator
        )
        mix = mix * scales + ops.eye(3) * scales
        return ops.clip(ops.matmul(images, mix), 0, 1)


def _augmenter(translation, zoom, brightness, jitter):
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            layers.Rescaling(1 / 255),
            layers.RandomFlip("horizontal"),
            layers.RandomTranslation(translation, translation),
            layers.RandomZoom((-zoom, 0.0), (-zoom, 0.0)),
            RandomColorAffine(brightness, jitter),
        ]
    )


class ContrastiveModel(keras.Model):
    """NT-Xent between two augmented views, then a linear probe on frozen features."""

    def __init__(self):
        super().__init__()
        self.temperature = 0.1
        self.contrastive_augmenter = _augmenter(0.2, 0.5, 0.6, 0.2)
        self.classification_augmenter = _augmenter(1 / 3, 0.2, 0.2, 0.1)
        self.encoder = keras.Sequential(
            [keras.Input((16, 16, 3))]
            + [layers.Conv2D(8, 3, strides=2, activation="relu") for _ in range(2)]
            + [layers.Flatten(), layers.Dense(8, activation="relu")]
        )
        self.projection_head = keras.Sequential(
            [keras.Input((8,)), layers.Dense(8, activation="relu"), layers.Dense(8)]
        )
        self.linear_probe = keras.Sequential([keras.Input((8,)), layers.Dense(10)])

    def compile(self, contrastive_optimizer, probe_optimizer, **kwargs):
        super().compile(**kwargs)
        self.contrastive_optimizer, self.probe_optimizer = contrastive_optimizer, probe_optimizer
        self.probe_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.contrastive_loss_tracker = keras.metrics.Mean(name="c_loss")
        self.contrastive_accuracy = keras.metrics.SparseCategoricalAccuracy(name="c_acc")
        self.probe_loss_tracker = keras.metrics.Mean(name="p_loss")
        self.probe_accuracy = keras.metrics.SparseCategoricalAccuracy(name="p_acc")

    @property
    def metrics(self):
        return [
            self.contrastive_loss_tracker,
            self.contrastive_accuracy,
            self.probe_loss_tracker,
            self.probe_accuracy,
        ]

    def contrastive_loss(self, projections_1, projections_2):
        similarities = (
            ops.matmul(
                ops.normalize(projections_1, axis=1),
                ops.transpose(ops.normalize(projections_2, axis=1)),
            )
            / self.temperature
        )
        labels = ops.arange(ops.shape(projections_1)[0])
        self.contrastive_accuracy.update_state(labels, similarities)
        self.contrastive_accuracy.update_state(labels, ops.transpose(similarities))
        loss_1_2 = keras.losses.sparse_categorical_crossentropy(labels, similarities, True)
        loss_2_1 = keras.losses.sparse_categorical_crossentropy(
            labels, ops.transpose(similarities), True
        )
        return (loss_1_2 + loss_2_1) / 2

    def train_step(self, data):
        images, labels = data  # the example zips unlabeled and labeled images; here one set
        views = [self.contrastive_augmenter(images, training=True) for _ in range(2)]
        heads = self.encoder.trainable_weights + self.projection_head.trainable_weights
        with tf.GradientTape() as tape:
            projections = [self.projection_head(self.encoder(v, training=True)) for v in views]
            contrastive_loss = self.contrastive_loss(*projections)
        gradients = tape.gradient(contrastive_loss, heads)
        self.contrastive_optimizer.apply_gradients(zip(gradients, heads))
        self.contrastive_loss_tracker.update_state(contrastive_loss)
        preprocessed = self.classification_augmenter(images, training=True)
        with tf.GradientTape() as tape:
            logits = self.linear_probe(self.encoder(preprocessed, training=False), training=True)
            probe_loss = self.probe_loss(labels, logits)
        gradients = tape.gradient(probe_loss, self.linear_probe.trainable_weights)
        self.probe_optimizer.apply_gradients(zip(gradients, self.linear_probe.trainable_weights))
        self.probe_loss_tracker.update_state(probe_loss)
        self.probe_accuracy.update_state(labels, logits)
        return {m.name: m.result() for m in self.metrics}


def _stl10():
    x = (synthetic.images(75, (16, 16, 3), 74) * 255).round()
    return Data(x, synthetic.learnable_classes(x, 10, 75))


def _compile_simclr(model):
    model.compile(
        contrastive_optimizer=keras.optimizers.Adam(), probe_optimizer=keras.optimizers.Adam()
    )


SIMCLR = Example(
    name="simclr_contrastive",
    source="examples/vision/semisupervised_simclr.py",
    family="own_step",
    build=ContrastiveModel,
    compile=_compile_simclr,
    data=_stl10,
    status="limit",
    reason="the contrastive loss is computed inside the model's own step, so each tower "
    "contrasts its slice only (fewer negatives, a lower loss), and augmentations draw per "
    "tower (measured with the model built: c_loss 19% lower at 2 towers, 33% at 3)",
    batch_size=25,
    evaluate=False,
    criterion=Differs(at_least=0.05, key="c_loss"),
)

EXAMPLES = [COMPILED_LOSS, OWN_TRACKERS, SAMPLE_WEIGHT_STEP, TEST_STEP, DISTILLATION, SIMCLR]


@pytest.mark.parametrize("example, towers", harness.cases(EXAMPLES))
def test_own_step(example, towers, runner, record):
    reference, run, measured = runner.measure(example, towers)
    record(measured)
    harness.check(example, reference, run, measured)
