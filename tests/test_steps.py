"""A model's own train_step/test_step/predict_step on towers, and synchronized BatchNorm."""

import warnings

import keras
import keras_releases
import model_zoo
import numpy as np
import pytest
import tensorflow as tf
from keras_releases import number

import replicate

_two_step, _compile_two = model_zoo.two_step, model_zoo.compile_two


@pytest.mark.parametrize("towers", [2, 3])
def test_own_train_step_with_two_optimizers_equals_one_device(
    towers, devices, classification_data, weight_diff
):
    x, y = classification_data  # 61 samples, batches of 10: 10 and 1 do not divide
    single = _compile_two(_two_step())
    expected = single.fit(x, y, batch_size=10, epochs=2, shuffle=False, verbose=0).history
    model = _two_step()
    parallel = _compile_two(replicate.replicate(model, devices[:towers]))
    history = parallel.fit(x, y, batch_size=10, epochs=2, shuffle=False, verbose=0).history
    assert weight_diff(model, single) <= 1e-5
    reported = ["error", "first_loss", "second"]  # what the step returns
    if not keras_releases.FIT_REPORTS_STEP_RESULTS:
        reported.remove("second")  # Keras < 3.3 reports `model.metrics` only
    assert sorted(history) == sorted(expected) == reported
    for key in expected:
        np.testing.assert_allclose(history[key], expected[key], atol=1e-5, err_msg=key)
    # The optimizers stepped once per batch, not once per tower.
    assert number(model.first_optimizer.iterations) == 14
    assert number(single.first_optimizer.iterations) == 14


def test_own_test_and_predict_steps(devices, classification_data):
    x, y = classification_data
    single, parallel = _two_step(), replicate.replicate(_two_step(), devices[:3])
    _compile_two(single), _compile_two(parallel)
    np.testing.assert_allclose(
        parallel.evaluate(x, y, batch_size=10, verbose=0),
        single.evaluate(x, y, batch_size=10, verbose=0),
        rtol=1e-6,
    )
    predicted = parallel.predict(x, batch_size=10, verbose=0)
    np.testing.assert_allclose(predicted, single.predict(x, batch_size=10, verbose=0), atol=1e-6)
    np.testing.assert_allclose(predicted.sum(axis=1), 1.0, rtol=1e-5)  # its own predict_step


class Gan(keras.Model):
    """keras.io-style GAN: noise per batch, a discriminator step, then a generator step."""

    latent = 4

    def __init__(self):
        super().__init__()
        self.generator = keras.Sequential(
            [
                keras.Input((self.latent,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(6),
            ]
        )
        self.discriminator = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dropout(0.2),
                keras.layers.Dense(1),
            ]
        )
        self.seed_generator = keras.random.SeedGenerator(11)
        self.d_loss = keras.metrics.Mean(name="d_loss")
        self.g_loss = keras.metrics.Mean(name="g_loss")

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer, self.g_optimizer, self.loss_fn = d_optimizer, g_optimizer, loss_fn

    @property
    def metrics(self):
        return [self.d_loss, self.g_loss]

    def train_step(self, real):
        batch = tf.shape(real)[0]
        noise = keras.random.normal((batch, self.latent), seed=self.seed_generator)
        fake = self.generator(noise)
        images = tf.concat([fake, real], axis=0)
        labels = tf.concat([tf.ones((batch, 1)), tf.zeros((batch, 1))], axis=0)
        with tf.GradientTape() as tape:
            d_loss = self.loss_fn(labels, self.discriminator(images, training=True))
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_weights))
        noise = keras.random.normal((batch, self.latent), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            fooled = self.discriminator(self.generator(noise), training=True)
            g_loss = self.loss_fn(tf.zeros((batch, 1)), fooled)
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights))
        self.d_loss.update_state(d_loss)
        self.g_loss.update_state(g_loss)
        return {"d_loss": self.d_loss.result(), "g_loss": self.g_loss.result()}


def test_gan_with_noise_and_two_optimizers_trains(devices, classification_data):
    x, _ = classification_data
    keras.utils.set_random_seed(4)
    gan = Gan()
    gan.generator.build((None, Gan.latent))
    gan.build((None, 6))
    parallel = replicate.replicate(gan, devices[:3])
    parallel.compile(
        keras.optimizers.Adam(1e-3),
        keras.optimizers.Adam(1e-3),
        keras.losses.BinaryCrossentropy(from_logits=True),
    )
    generator_before = [w.copy() for w in gan.generator.get_weights()]
    discriminator_before = [w.copy() for w in gan.discriminator.get_weights()]
    history = parallel.fit(x, batch_size=16, epochs=2, verbose=0).history
    assert np.isfinite(history["d_loss"]).all() and np.isfinite(history["g_loss"]).all()
    moved = [np.abs(a - b).max() for a, b in zip(gan.generator.get_weights(), generator_before)]
    assert min(moved) > 0
    moved = [
        np.abs(a - b).max() for a, b in zip(gan.discriminator.get_weights(), discriminator_before)
    ]
    assert min(moved) > 0
    assert number(parallel.template.d_optimizer.iterations) == 8  # 4 batches x 2 epochs


_synchronized = model_zoo.synchronized_bn


def _compile(model):
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _trains_like_one_device(make, compile_model, devices, x, y, batch_size, weight_diff):
    """Fits `make()` on one device and through `devices`: the first fit's check stays
    silent, the weights (moving statistics included) and losses agree. Returns the
    replicated model's template."""
    single = compile_model(make())
    expected = single.fit(x, y, batch_size=batch_size, epochs=2, shuffle=False, verbose=0)
    model = make()
    parallel = compile_model(replicate.replicate(model, devices))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = parallel.fit(x, y, batch_size=batch_size, epochs=2, shuffle=False, verbose=0)
    assert [str(w.message) for w in caught if str(w.message).startswith("replicate")] == []
    assert weight_diff(model, single) <= 1e-5
    np.testing.assert_allclose(history.history["loss"], expected.history["loss"], rtol=1e-5)
    return model


@pytest.mark.parametrize("towers", [2, 3])
def test_synchronized_batchnorm_equals_one_device(
    towers, devices, classification_data, weight_diff
):
    # The check at the first fit sees the towers equal one device: no false alarm on the
    # biases before the normalization, whose gradients are rounding noise.
    x, y = classification_data
    _trains_like_one_device(_synchronized, _compile, devices[:towers], x, y, 10, weight_diff)


@pytest.mark.parametrize("towers", [2, 4])
def test_synchronized_batchnorm_is_traced_once_whatever_the_number_of_towers(
    towers, devices, classification_data, weight_diff
):
    # The statistics' sums are collectives inside the one traced forward function
    # (replicate.meeting), so start-up traces the model once, not once per tower. The last
    # batch holds 1 sample: at 4 towers three towers hold a stand-in row that adds nothing.
    x, y = classification_data

    def traced(count):
        model = _synchronized()
        parallel = _compile(replicate.replicate(model, devices[:count], check=False))
        parallel.fit(x, y, batch_size=10, epochs=2, shuffle=False, verbose=0)
        parallel.evaluate(x, y, batch_size=10, verbose=0)
        assert parallel.builder.train_traces == 1
        return model, parallel.builder.tower_pass.traces

    single = _compile(_synchronized())
    single.fit(x, y, batch_size=10, epochs=2, shuffle=False, verbose=0)
    model, traces = traced(towers)
    assert traces == traced(1)[1] == 2  # one per training flag
    assert weight_diff(model, single) <= 1e-5


def test_two_forward_passes_in_one_step_each_meet_on_their_own(devices, classification_data):
    # Two views of a batch through the towers in one traced function, as a contrastive
    # model's own loop does: each pass's statistics are its own batch's.
    x, _ = classification_data
    first, second = x[:20], x[20:40] * 3.0 + 1.0
    builder = replicate.ReplicaBuilder(_synchronized(), devices[:2])

    @tf.function
    def both(a, b):
        return builder.call(a, training=True), builder.call(b, training=True)

    got = both(first, second)
    one_device = _synchronized()
    for outputs, batch in zip(got, (first, second)):
        expected = one_device(batch, training=True)
        np.testing.assert_allclose(outputs, expected, atol=1e-5)


def test_synchronized_batchnorm_meets_in_threads_when_run_eagerly(
    devices, classification_data, weight_diff
):
    # Eagerly a collective would wait for towers that have not started: threads meet.
    x, y = classification_data
    single = _compile(_synchronized())
    single.fit(x, y, batch_size=10, epochs=1, shuffle=False, verbose=0)
    model = _synchronized()
    parallel = replicate.replicate(model, devices[:3], check=False)
    parallel.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=True,
    )
    parallel.fit(x, y, batch_size=10, epochs=1, shuffle=False, verbose=0)
    assert weight_diff(model, single) <= 1e-5


def _compile_masked(model, run_eagerly=False):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=run_eagerly,
    )
    return model


@pytest.mark.parametrize("towers,run_eagerly", [(2, False), (3, False), (3, True)])
def test_masked_input_to_synchronized_batchnorm_equals_one_device(
    towers, run_eagerly, devices, weight_diff
):
    # Keras computes a masked input's statistics from the replica's own samples, whatever
    # `synchronized` says; replicate forms them from every tower's sums (in the graph, and
    # in threads eagerly). Before, 2 towers ended 6.7e-3 away from one device.
    x, y = model_zoo.padded_tokens()
    model = _trains_like_one_device(
        model_zoo.masked_synchronized_bn,
        lambda m: _compile_masked(m, run_eagerly),
        devices[:towers],
        x,
        y,
        17,
        weight_diff,
    )
    # Outside the towers the layer computes as Keras does.
    twin = model_zoo.masked_synchronized_bn()
    twin.set_weights(model.get_weights())
    np.testing.assert_allclose(model(x, training=True), twin(x, training=True), atol=1e-6)


class _CenterOnBatch(keras.layers.Layer):
    """Subtracts the global batch's mean, as a layer written for `tf.distribute` does."""

    synchronized = True  # what tells replicate that the layer meets the other towers

    def call(self, x):
        context = tf.distribute.get_replica_context()
        return x - context.all_reduce("mean", keras.ops.mean(x, axis=0))


@pytest.mark.parametrize("towers", [2, 3])
def test_a_layer_that_averages_over_the_towers_equals_one_device(towers, devices, weight_diff):
    # Even slices: the towers' mean of slice means is the batch's mean, forward and backward.
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 6)).astype("float32")
    y = rng.integers(0, 3, size=60).astype("int32")

    def centered():
        keras.utils.set_random_seed(9)
        return keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(8), _CenterOnBatch(), keras.layers.Dense(3)]
        )

    single = _compile(centered())
    single.fit(x, y, batch_size=30, epochs=2, shuffle=False, verbose=0)
    model = centered()
    parallel = _compile(replicate.replicate(model, devices[:towers], check=False))
    parallel.fit(x, y, batch_size=30, epochs=2, shuffle=False, verbose=0)
    assert weight_diff(model, single) <= 1e-5


def test_a_layer_that_meets_the_towers_inside_a_branch_is_an_error(devices):
    # A tower whose predicate took the other branch would never reach the collective.
    class Branching(_CenterOnBatch):
        def call(self, x):
            return tf.cond(tf.reduce_sum(x) > 0, lambda: super(Branching, self).call(x), lambda: x)

    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), Branching()])
    parallel = replicate.replicate(model, devices[:2], check=False)
    parallel.compile(optimizer="sgd", loss="mse")
    with pytest.raises(RuntimeError, match=r"called `all_reduce` inside `tf.cond`"):
        parallel.fit(np.ones((4, 6), "float32"), np.ones((4, 8), "float32"), verbose=0)


def test_a_layer_that_meets_the_towers_without_saying_so_is_an_error(devices):
    class Unsaid(_CenterOnBatch):
        synchronized = False

    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), Unsaid()])
    parallel = replicate.replicate(model, devices[:2], check=False)
    parallel.compile(optimizer="sgd", loss="mse")
    with pytest.raises(RuntimeError, match=r"must set the attribute `synchronized = True`"):
        parallel.fit(np.ones((4, 6), "float32"), np.ones((4, 8), "float32"), verbose=0)


def test_unsynchronized_batchnorm_keeps_per_tower_statistics(
    devices, classification_data, weight_diff
):
    x, y = classification_data
    single = _compile(_synchronized(synchronized=False))
    single.fit(x, y, batch_size=10, epochs=2, shuffle=False, verbose=0)
    model = _synchronized(synchronized=False)
    with pytest.warns(UserWarning, match=r"BatchNormalization layers .* normalize per tower"):
        _compile(replicate.replicate(model, devices[:3])).fit(
            x, y, batch_size=10, epochs=2, shuffle=False, verbose=0
        )
    assert weight_diff(model, single) > 1e-3  # normalized per tower, as documented


def test_synchronized_batchnorm_refuses_xla_per_tower(devices):
    parallel = replicate.replicate(_synchronized(), devices[:2])
    with pytest.raises(ValueError, match=r"jit_compile=True\) cannot be combined"):
        parallel.compile(optimizer="sgd", loss="mse", jit_compile=True)


def test_towers_that_take_different_paths_are_an_error(devices):
    class Diverging(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

        def train_step(self, data):
            context = tf.distribute.get_replica_context()
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(self(data))
            grads = tape.gradient(loss, self.trainable_weights)
            if tf.get_static_value(context.replica_id_in_sync_group) == 0:  # only tower 0
                self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
            return {}

    model = Diverging()
    model(np.ones((1, 3), "float32"))
    parallel = replicate.replicate(model, devices[:2])
    parallel.compile(optimizer="sgd")
    with pytest.raises(  # the optimizer's name: `SGD` before Keras 3.15, `sgd` after
        RuntimeError, match=r"diverged \(tower 0: (?i:sgd)\w*.apply, tower 1: finished\)"
    ):
        parallel.fit(np.ones((4, 3), "float32"), batch_size=4, verbose=0)


def test_a_step_that_assigns_other_variables_is_an_error(devices):
    steps_seen = keras.Variable(0.0, name="steps_seen")  # not the model's: cannot be combined

    class Counts(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

        def train_step(self, data):
            steps_seen.assign_add(1.0)
            return {}

    model = Counts()
    model(np.ones((1, 3), "float32"))
    parallel = replicate.replicate(model, devices[:2])
    parallel.compile(optimizer="sgd")
    with pytest.raises(
        RuntimeError, match=r"assigned variables that replicate cannot combine.*does not track"
    ):
        parallel.fit(np.ones((4, 3), "float32"), batch_size=4, verbose=0)
