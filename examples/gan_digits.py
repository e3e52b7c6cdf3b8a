"""A GAN with its own `train_step` and two optimizers, trained over towers.

    python examples/gan_digits.py

The model is written as for one device (keras.io style: `compile(d_optimizer,
g_optimizer, loss_fn)`, a `train_step` with a discriminator update, then a
generator update, and `Mean` trackers). `replicate(gan)` runs that step once
per tower on its slice of each batch; each `apply_gradients` averages the
towers' gradients and applies them once, so the generator step sees the
discriminator's new weights, as on one device. The digits are scikit-learn's
8x8 images (nothing is downloaded).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import replicate  # noqa: E402
from replicate.demo import load_digits  # noqa: E402

LATENT = 16


class GAN(keras.Model):
    def __init__(self):
        super().__init__()
        self.generator = keras.Sequential(
            [
                keras.Input((LATENT,)),
                keras.layers.Dense(64),
                keras.layers.LeakyReLU(0.2),
                keras.layers.Dense(64, activation="tanh"),
            ],
            name="generator",
        )
        self.discriminator = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(64),
                keras.layers.LeakyReLU(0.2),
                keras.layers.Dropout(0.2),
                keras.layers.Dense(1),
            ],
            name="discriminator",
        )
        self.noise = keras.random.SeedGenerator(1)
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.loss_fn = loss_fn

    @property
    def metrics(self):
        return [self.d_loss_tracker, self.g_loss_tracker]

    def train_step(self, real):
        batch = tf.shape(real)[0]
        noise = keras.random.normal((batch, LATENT), seed=self.noise)
        images = tf.concat([self.generator(noise), real], axis=0)
        labels = tf.concat([tf.ones((batch, 1)), tf.zeros((batch, 1))], axis=0)
        with tf.GradientTape() as tape:
            d_loss = self.loss_fn(labels, self.discriminator(images, training=True))
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_weights))

        noise = keras.random.normal((batch, LATENT), seed=self.noise)
        with tf.GradientTape() as tape:
            judged = self.discriminator(self.generator(noise), training=True)
            g_loss = self.loss_fn(tf.zeros((batch, 1)), judged)  # "real"
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights))

        self.d_loss_tracker.update_state(d_loss)
        self.g_loss_tracker.update_state(g_loss)
        return {m.name: m.result() for m in self.metrics}


def main() -> None:
    devices = replicate.simulate_devices(2) if not tf.config.list_physical_devices("GPU") else None
    keras.utils.set_random_seed(0)
    (x, _), _ = load_digits()
    real = x.reshape(len(x), 64) * 2.0 - 1.0  # [-1, 1], like the generator's tanh

    gan = GAN()
    gan.generator.build((None, LATENT))
    gan.build((None, 64))
    start = [w.copy() for w in gan.generator.get_weights()]
    parallel = replicate.replicate(gan, devices)
    parallel.compile(
        d_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5),
        g_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5),
        loss_fn=keras.losses.BinaryCrossentropy(from_logits=True),
    )
    history = parallel.fit(real, batch_size=64, epochs=5, verbose=2).history

    moved = max(float(np.abs(a - b).max()) for a, b in zip(gan.generator.get_weights(), start))
    samples = gan.generator(keras.random.normal((256, LATENT), seed=7)).numpy()
    print(f"towers: {len(parallel.devices)} on {parallel.devices}")
    print(f"final d_loss: {history['d_loss'][-1]:.4f}")
    print(f"final g_loss: {history['g_loss'][-1]:.4f}")
    print(f"discriminator steps: {int(gan.d_optimizer.iterations)}")
    print(f"generator moved: {moved:.4f}")
    print(f"sample range: {samples.min():.3f} {samples.max():.3f}")


if __name__ == "__main__":
    main()
