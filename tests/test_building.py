"""Models as keras.io writes them, built or not: replicate takes them as Keras' fit does."""

import keras
import keras_releases
import numpy as np
import pytest
import tensorflow as tf
from equivalence import assert_same_as_one_device
from keras import ops

import replicate

RNG = np.random.default_rng(41)
X = RNG.normal(size=(50, 4)).astype("float32")
Y = RNG.integers(0, 3, size=50).astype("int32")


class GAN(keras.Model):
    """The shape of keras.io's GAN examples (generative/dcgan_overriding_train_step.py):
    a subclassed model, never built itself, holding two built sub-models."""

    def __init__(self, discriminator, generator, latent_dim):
        super().__init__()
        self.discriminator, self.generator = discriminator, generator
        self.latent_dim = latent_dim
        self.seed_generator = keras.random.SeedGenerator(1337)
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")

    @property
    def metrics(self):
        return [self.d_loss_tracker]

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer, self.g_optimizer, self.loss_fn = d_optimizer, g_optimizer, loss_fn

    def train_step(self, real):
        batch = ops.shape(real)[0]
        noise = keras.random.normal((batch, self.latent_dim), seed=self.seed_generator)
        both = ops.concatenate([self.generator(noise), real], 0)
        labels = ops.concatenate([ops.ones((batch, 1)), ops.zeros((batch, 1))], 0)
        with tf.GradientTape() as tape:
            d_loss = self.loss_fn(labels, self.discriminator(both))
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_weights))
        noise = keras.random.normal((batch, self.latent_dim), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            fooled = self.discriminator(self.generator(noise))
            g_loss = self.loss_fn(ops.zeros((batch, 1)), fooled)
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights))
        self.d_loss_tracker.update_state(d_loss)
        return {"d_loss": self.d_loss_tracker.result(), "g_loss": g_loss}


def _gan():
    keras.utils.set_random_seed(3)
    discriminator = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)]
    )
    generator = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4)])
    return GAN(discriminator, generator, latent_dim=2)


def _compile_gan(model):
    loss = keras.losses.BinaryCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3), loss)


@pytest.mark.parametrize("towers", [1, 2, 3])
def test_an_unbuilt_model_with_built_sub_models_trains(towers, devices):
    model = _gan()
    assert not model.built and model.variables  # as the example writes it
    parallel = replicate.replicate(model, devices[:towers])
    _compile_gan(parallel)
    start = [w.copy() for w in model.get_weights()]
    history = parallel.fit(X, batch_size=17, epochs=2, verbose=0).history
    # Keras < 3.3 reports only `model.metrics`: `g_loss` is not one.
    reported = ["d_loss", "g_loss"] if keras_releases.FIT_REPORTS_STEP_RESULTS else ["d_loss"]
    assert sorted(history) == reported and np.isfinite(history["d_loss"]).all()
    assert all(not np.allclose(a, b) for a, b in zip(model.get_weights(), start))


class Subclassed(keras.Model):
    """Layers made in __init__, weights made on the first call (keras.io's subclassing guide)."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.out = keras.layers.Dense(3)

    def call(self, x):
        return self.out(self.hidden(x))


def _subclassed():
    keras.utils.set_random_seed(5)
    return Subclassed()


def _compile(model):
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(True))


def test_a_model_without_weights_is_built_at_the_first_fit(devices):
    assert_same_as_one_device(_subclassed, _compile, X, Y, devices=devices)
    model = _subclassed()
    parallel = replicate.replicate(model, devices[1:3], variable_device="/cpu:3")
    parallel.compile(keras.optimizers.Adam(), keras.losses.SparseCategoricalCrossentropy(True))
    parallel.fit(X, Y, batch_size=17, epochs=1, verbose=0)
    # Built once, on the variable device, with its optimizer's slots.
    assert model.variables and all("CPU:3" in v.value.device for v in model.variables)
    slots = [v for v in parallel.optimizer.variables if "momentum" in v.path]
    assert len(slots) == len(model.trainable_variables)
    assert all("CPU:3" in v.value.device for v in slots)


@pytest.mark.parametrize("data", ["dataset", "pydataset"])
def test_a_model_without_weights_is_built_from_any_input_kind(data, devices):
    if data == "dataset":
        x = tf.data.Dataset.from_tensor_slices((X, Y)).batch(17)
    else:

        class Batches(keras.utils.PyDataset):
            def __len__(self):
                return 3

            def __getitem__(self, i):
                return X[17 * i : 17 * (i + 1)], Y[17 * i : 17 * (i + 1)]

        x = Batches()
    model = _subclassed()
    parallel = replicate.replicate(model, devices[:2])
    _compile(parallel)
    assert len(parallel.predict(x, verbose=0)) == 50


def test_a_model_without_weights_and_a_generator_gets_advice_that_works(devices):
    def batches():
        while True:
            yield X[:17], Y[:17]

    model = _subclassed()
    parallel = replicate.replicate(model, devices[:2])
    _compile(parallel)
    with pytest.raises(ValueError, match=r"has no weights yet.*`model\(x\[:1\]\)`"):
        parallel.fit(batches(), steps_per_epoch=2, verbose=0)
    model(X[:1])  # the advice
    history = parallel.fit(batches(), steps_per_epoch=2, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"]).all()
