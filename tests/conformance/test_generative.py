"""Generative models with their own `train_step`: keras.io's VAE, DCGAN and WGAN-GP, small.

As in the examples, the models are given to `fit` unbuilt (a GAN has no `call` to
build it with); `replicate()` refuses them today (kind 5). Their criteria were
measured with the models built first, so they hold once the refusal is lifted.
"""

import keras
import pytest
import tensorflow as tf
from keras import layers, ops

from conformance import harness, synthetic
from conformance.criteria import Moves, Trains
from conformance.harness import Data, Example


def _digits(count, size, seed):
    x = synthetic.images(count, (size, size, 1), seed)
    x[x < 0.6] = 0.0
    return x


# -- a variational autoencoder ------------------------------------------------------------------


class Sampling(layers.Layer):
    """Draws z from N(z_mean, exp(z_log_var)) with its own seed generator."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        epsilon = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * epsilon


class VAE(keras.Model):
    """Reconstruction (per-image summed cross-entropy) plus KL, three trackers."""

    def __init__(self, encoder, decoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder, self.decoder = encoder, decoder
        self.total_loss_tracker = keras.metrics.Mean(name="total_loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")

    @property
    def metrics(self):
        return [self.total_loss_tracker, self.reconstruction_loss_tracker, self.kl_loss_tracker]

    def train_step(self, data):
        with tf.GradientTape() as tape:
            z_mean, z_log_var, z = self.encoder(data)
            reconstruction = self.decoder(z)
            reconstruction_loss = ops.mean(
                ops.sum(keras.losses.binary_crossentropy(data, reconstruction), axis=(1, 2))
            )
            kl = -0.5 * (1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var))
            kl_loss = ops.mean(ops.sum(kl, axis=1))
            total_loss = reconstruction_loss + kl_loss
        grads = tape.gradient(total_loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self.total_loss_tracker.update_state(total_loss)
        self.reconstruction_loss_tracker.update_state(reconstruction_loss)
        self.kl_loss_tracker.update_state(kl_loss)
        return {m.name: m.result() for m in self.metrics}


def _vae():
    image = keras.Input((16, 16, 1))
    x = layers.Conv2D(8, 3, activation="relu", strides=2, padding="same")(image)
    x = layers.Conv2D(16, 3, activation="relu", strides=2, padding="same")(x)
    x = layers.Dense(16, activation="relu")(layers.Flatten()(x))
    z_mean, z_log_var = layers.Dense(2, name="z_mean")(x), layers.Dense(2, name="z_log_var")(x)
    encoder = keras.Model(image, [z_mean, z_log_var, Sampling()([z_mean, z_log_var])])
    latent = keras.Input((2,))
    x = layers.Reshape((4, 4, 16))(layers.Dense(4 * 4 * 16, activation="relu")(latent))
    x = layers.Conv2DTranspose(16, 3, activation="relu", strides=2, padding="same")(x)
    x = layers.Conv2DTranspose(8, 3, activation="relu", strides=2, padding="same")(x)
    decoded = layers.Conv2DTranspose(1, 3, activation="sigmoid", padding="same")(x)
    return VAE(encoder, keras.Model(latent, decoded))


VAE_EXAMPLE = Example(
    name="vae",
    source="examples/generative/vae.py",
    family="generative",
    build=_vae,
    compile=lambda model: model.compile(optimizer=keras.optimizers.Adam()),
    data=lambda: Data(_digits(200, 16, 61)),
    status="tolerance",
    reason="the sampling layer draws per tower (criterion measured with the model built: "
    "the loss fell 0.38%, final losses 0.004% apart)",
    batch_size=47,
    epochs=2,
    evaluate=False,
    criterion=Trains(fall=0.002, band=0.005, key="total_loss", on="history"),
)

# -- DCGAN: a discriminator step, then a generator step, noise from a seed generator ------------


class GAN(keras.Model):
    """Two optimizers; label noise on the discriminator's targets, as the example adds."""

    def __init__(self, discriminator, generator, latent_dim):
        super().__init__()
        self.discriminator, self.generator, self.latent_dim = discriminator, generator, latent_dim
        self.seed_generator = keras.random.SeedGenerator(1337)

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer, self.g_optimizer, self.loss_fn = d_optimizer, g_optimizer, loss_fn
        self.d_loss_metric = keras.metrics.Mean(name="d_loss")
        self.g_loss_metric = keras.metrics.Mean(name="g_loss")

    @property
    def metrics(self):
        return [self.d_loss_metric, self.g_loss_metric]

    def train_step(self, real_images):
        batch = ops.shape(real_images)[0]
        noise = keras.random.normal((batch, self.latent_dim), seed=self.seed_generator)
        combined = ops.concatenate([self.generator(noise), real_images], axis=0)
        labels = ops.concatenate([ops.ones((batch, 1)), ops.zeros((batch, 1))], axis=0)
        labels += 0.05 * keras.random.uniform(ops.shape(labels), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            d_loss = self.loss_fn(labels, self.discriminator(combined))
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_weights))
        noise = keras.random.normal((batch, self.latent_dim), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            fooled = self.discriminator(self.generator(noise))
            g_loss = self.loss_fn(ops.zeros((batch, 1)), fooled)
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights))
        self.d_loss_metric.update_state(d_loss)
        self.g_loss_metric.update_state(g_loss)
        return {"d_loss": self.d_loss_metric.result(), "g_loss": self.g_loss_metric.result()}


def _dcgan():
    discriminator = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            layers.Conv2D(8, kernel_size=4, strides=2, padding="same"),
            layers.LeakyReLU(negative_slope=0.2),
            layers.Conv2D(16, kernel_size=4, strides=2, padding="same"),
            layers.LeakyReLU(negative_slope=0.2),
            layers.Flatten(),
            layers.Dropout(0.2),
            layers.Dense(1, activation="sigmoid"),
        ]
    )
    generator = keras.Sequential(
        [
            keras.Input((16,)),
            layers.Dense(4 * 4 * 16),
            layers.Reshape((4, 4, 16)),
            layers.Conv2DTranspose(16, kernel_size=4, strides=2, padding="same"),
            layers.LeakyReLU(negative_slope=0.2),
            layers.Conv2DTranspose(16, kernel_size=4, strides=2, padding="same"),
            layers.LeakyReLU(negative_slope=0.2),
            layers.Conv2D(3, kernel_size=5, padding="same", activation="sigmoid"),
        ]
    )
    return GAN(discriminator, generator, latent_dim=16)


def _compile_dcgan(model):
    model.compile(
        d_optimizer=keras.optimizers.Adam(learning_rate=1e-4),
        g_optimizer=keras.optimizers.Adam(learning_rate=1e-4),
        loss_fn=keras.losses.BinaryCrossentropy(),
    )


DCGAN = Example(
    name="dcgan",
    source="examples/generative/dcgan_overriding_train_step.py",
    family="generative",
    build=_dcgan,
    compile=_compile_dcgan,
    data=lambda: Data(synthetic.images(120, (16, 16, 3), 62)),
    status="tolerance",
    reason="noise, label noise and Dropout draw per tower (criterion measured with the model "
    "built: final losses 4e-4 apart)",
    batch_size=25,
    epochs=2,
    evaluate=False,
    criterion=Moves(keys=("d_loss", "g_loss"), band=0.01),
)

# -- WGAN-GP: several critic steps per generator step, a gradient penalty ----------------------


class WGAN(keras.Model):
    """Critic steps with a gradient penalty on interpolated images, then a generator step."""

    def __init__(self, discriminator, generator, latent_dim, discriminator_extra_steps=3):
        super().__init__()
        self.discriminator, self.generator, self.latent_dim = discriminator, generator, latent_dim
        self.d_steps, self.gp_weight = discriminator_extra_steps, 10.0

    def compile(self, d_optimizer, g_optimizer, d_loss_fn, g_loss_fn):
        super().compile()
        self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer
        self.d_loss_fn, self.g_loss_fn = d_loss_fn, g_loss_fn

    def gradient_penalty(self, batch, real, fake):
        alpha = tf.random.uniform([batch, 1, 1, 1], 0.0, 1.0)
        interpolated = real + alpha * (fake - real)
        with tf.GradientTape() as tape:
            tape.watch(interpolated)
            prediction = self.discriminator(interpolated, training=True)
        grads = tape.gradient(prediction, [interpolated])[0]
        norm = tf.sqrt(tf.reduce_sum(tf.square(grads), axis=[1, 2, 3]))
        return tf.reduce_mean((norm - 1.0) ** 2)

    def train_step(self, real):
        batch = tf.shape(real)[0]
        for _ in range(self.d_steps):
            noise = tf.random.normal(shape=(batch, self.latent_dim))
            with tf.GradientTape() as tape:
                fake = self.generator(noise, training=True)
                fake_logits = self.discriminator(fake, training=True)
                real_logits = self.discriminator(real, training=True)
                cost = self.d_loss_fn(real_img=real_logits, fake_img=fake_logits)
                d_loss = cost + self.gradient_penalty(batch, real, fake) * self.gp_weight
            grads = tape.gradient(d_loss, self.discriminator.trainable_variables)
            self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_variables))
        noise = tf.random.normal(shape=(batch, self.latent_dim))
        with tf.GradientTape() as tape:
            fake_logits = self.discriminator(self.generator(noise, training=True), training=True)
            g_loss = self.g_loss_fn(fake_logits)
        grads = tape.gradient(g_loss, self.generator.trainable_variables)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_variables))
        return {"d_loss": d_loss, "g_loss": g_loss}


def _wgan():
    critic = keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            layers.Conv2D(8, 5, strides=2, padding="same"),
            layers.LeakyReLU(0.2),
            layers.Conv2D(16, 5, strides=2, padding="same"),
            layers.LeakyReLU(0.2),
            layers.Dropout(0.3),
            layers.Flatten(),
            layers.Dropout(0.2),
            layers.Dense(1),
        ]
    )
    generator = keras.Sequential(
        [
            keras.Input((16,)),
            layers.Dense(4 * 4 * 16, use_bias=False),
            layers.BatchNormalization(),
            layers.LeakyReLU(0.2),
            layers.Reshape((4, 4, 16)),
            layers.UpSampling2D((2, 2)),
            layers.Conv2D(8, 3, padding="same", use_bias=False),
            layers.BatchNormalization(),
            layers.LeakyReLU(0.2),
            layers.UpSampling2D((2, 2)),
            layers.Conv2D(1, 3, padding="same", use_bias=False),
            layers.BatchNormalization(),
            layers.Activation("tanh"),
        ]
    )
    return WGAN(critic, generator, latent_dim=16)


def _compile_wgan(model):
    model.compile(
        d_optimizer=keras.optimizers.Adam(learning_rate=2e-4, beta_1=0.5, beta_2=0.9),
        g_optimizer=keras.optimizers.Adam(learning_rate=2e-4, beta_1=0.5, beta_2=0.9),
        d_loss_fn=lambda real_img, fake_img: tf.reduce_mean(fake_img) - tf.reduce_mean(real_img),
        g_loss_fn=lambda fake_img: -tf.reduce_mean(fake_img),
    )


WGAN_GP = Example(
    name="wgan_gp",
    alarm=r"BatchNormalization layers .* normalize per tower",
    source="examples/generative/wgan_gp.py",
    family="generative",
    build=_wgan,
    compile=_compile_wgan,
    data=lambda: Data((_digits(75, 16, 63) - 0.5) / 0.5),
    status="tolerance",
    reason="noise, interpolation weights and Dropout draw per tower, the generator's "
    "BatchNormalization is per tower (criterion measured with the model built: final "
    "losses 0.13 apart)",
    batch_size=25,
    epochs=2,
    evaluate=False,
    criterion=Moves(keys=("d_loss", "g_loss"), band=0.5),
)

EXAMPLES = [VAE_EXAMPLE, DCGAN, WGAN_GP]


@pytest.mark.parametrize("example, towers", harness.cases(EXAMPLES))
def test_generative(example, towers, runner, record):
    reference, run, measured = runner.measure(example, towers)
    record(measured)
    harness.check(example, reference, run, measured)
