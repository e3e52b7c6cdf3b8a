"""replicate.check: towers against one device, each cause named, exact models silent."""

import warnings

import keras
import keras_releases
import model_zoo
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import replicate

RNG = np.random.default_rng(71)
X = RNG.normal(size=(40, 6)).astype("float32")
Y = RNG.integers(0, 3, size=40).astype("int32")


def _compiled(model, loss=None):
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _mlp(*layers, seed=1):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, name="hidden"), *layers, keras.layers.Dense(3)]
    )


def _state(model):
    return [v.numpy().copy() for v in model.variables]


class CenterOnBatch(keras.layers.Layer):
    """Subtracts the batch mean in inference too: the output of a sample depends on the
    others (like keras.io's collaborative filtering, whose tensordot sums over the batch)."""

    def call(self, x):
        return x - ops.mean(x, axis=0, keepdims=True)


class FixedBatch(keras.layers.Layer):
    """Reshapes to the batch size it was written for (40)."""

    def call(self, x):
        return ops.reshape(ops.reshape(x, (40, 2, 4)), (-1, 8))


class SamplesSeen(keras.layers.Layer):
    """A user's counter left at Keras' default aggregation."""

    def build(self, shape):
        self.seen = self.add_weight(shape=(), initializer="zeros", trainable=False, name="seen")

    def call(self, x, training=False):
        if training:
            self.seen.assign_add(ops.cast(ops.shape(x)[0], "float32"))
        return x


class SummedActivity(keras.layers.Layer):
    """Adds the sum of its inputs' squares over the batch as a loss (keras.io's training
    guide adds `ops.sum` so)."""

    def call(self, x):
        self.add_loss(1e-2 * ops.sum(ops.square(x)))
        return x


class MeanActivity(keras.layers.Layer):
    """Adds the mean of its inputs' squares as a loss: the towers' shares add up to it."""

    def call(self, x):
        self.add_loss(1e-2 * ops.mean(ops.square(x)))
        return x


class AcrossSamples(keras.regularizers.Regularizer):
    """Penalizes the products of every pair of samples (keras.io's PointNet regularizer
    contracts over the batch so)."""

    def __call__(self, x):
        return 1e-2 * ops.sum(ops.square(ops.matmul(x, ops.transpose(x))))


class InBatchContrastive(keras.Model):
    """Its own train_step with a loss over the whole batch (each sample's negatives are the
    other samples, as in keras.io's SimCLR)."""

    def __init__(self):
        super().__init__()
        self.encoder = keras.layers.Dense(4)
        self.tracker = keras.metrics.Mean(name="loss")

    def call(self, x):
        return self.encoder(x)

    @property
    def metrics(self):
        return [self.tracker]

    def train_step(self, data):
        x, _ = data
        with tf.GradientTape() as tape:
            z = tf.math.l2_normalize(self(x, training=True), axis=1)
            logits = tf.matmul(z, z, transpose_b=True) / 0.1
            labels = tf.range(tf.shape(z)[0])
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        grads = tape.gradient(loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self.tracker.update_state(loss)
        return {"loss": self.tracker.result()}


class SummedLoss(InBatchContrastive):
    """Its own train_step differentiates per-sample losses (`reduction=None`), that is their
    sum, as keras.io's masked language model does; its tracker's mean agrees either way."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = keras.losses.SparseCategoricalCrossentropy(True, reduction=None)(
                y, self(x, training=True)
            )
        grads = tape.gradient(loss, self.trainable_weights)
        self.optimizer.apply(grads, self.trainable_weights)
        self.tracker.update_state(loss)
        return {"loss": self.tracker.result()}


class NormalizedStep(keras.Model):
    """Its own train_step with Adam through a Dense whose bias a synchronized
    BatchNormalization cancels: the bias's gradient is rounding noise, which Adam would
    turn into steps of the learning rate's size (keras.io's Zero-DCE once warned so)."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8)
        self.norm = keras.layers.BatchNormalization(synchronized=True)
        self.out = keras.layers.Dense(3)
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(True)

    def call(self, x, training=False):
        return self.out(self.norm(self.hidden(x), training=training))

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.loss_fn(y, self(x, training=True))
        grads = tape.gradient(loss, self.trainable_weights)
        self.optimizer.apply(grads, self.trainable_weights)
        return {"loss": loss}


def _own_step(cls, seed, optimizer):
    keras.utils.set_random_seed(seed)
    model = cls()
    model(X[:1])
    model.compile(optimizer)
    return model


def _contrastive():
    return _own_step(InBatchContrastive, 4, keras.optimizers.SGD(0.1))


CAUSES = {
    "mixes samples": (
        lambda: _compiled(_mlp(CenterOnBatch(name="center"))),
        r"^the forward pass mixes samples across the batch: outputs differ with training=False "
        r"\(output 0, training=False: max relative difference \d\.\d\de[+-]\d\d\)$",
    ),
    "batch normalization": (
        lambda: _compiled(_mlp(keras.layers.BatchNormalization(name="bn1"))),
        r"^BatchNormalization layers `bn1` normalize per tower; use synchronized=True$",
    ),
    "fixed batch size": (
        lambda: _compiled(_mlp(FixedBatch(name="fixed"))),
        r"^a tower's slice failed: the model seems to assume a fixed batch size "
        r"\((InvalidArgumentError|ValueError): .*\)$",
    ),
    "aggregation": (
        lambda: _compiled(_mlp(SamplesSeen(name="samples_seen"))),
        r"^layer `samples_seen` writes `sequential(_\d+)?/samples_seen/seen` per tower, and its "
        # Keras' default aggregation: "mean" before Keras 3.8.
        rf"aggregation \('{keras_releases.DEFAULT_AGGREGATION}'\) does not combine the towers' "
        r"values as one device computes "
        r"it \(max relative difference .*\); choose aggregation='sum', 'mean' or "
        r"'only_first_replica' to match what the variable means$",
    ),
    "summed add_loss": (
        lambda: _compiled(_mlp(SummedActivity(name="summed"))),
        r"^the model's own losses differ while its outputs agree \(added by `summed` "
        r"\(add_loss\)\): .* compute a loss that mixes samples in `compute_loss` from an "
        r"output of the model, once over the whole batch \(.*\)$",
    ),
    # Only the layer whose loss the towers change is named, not the exact ones beside it.
    "summed add_loss among exact ones": (
        lambda: _compiled(
            _mlp(
                MeanActivity(name="mean_loss"),
                keras.layers.Dense(8, activity_regularizer="l2", name="l2_activity"),
                SummedActivity(name="summed"),
            )
        ),
        r"^the model's own losses differ while its outputs agree \(added by `summed` "
        r"\(add_loss\)\): .*$",
    ),
    "regularizer across samples": (
        lambda: _compiled(
            _mlp(keras.layers.Dense(4, activity_regularizer=AcrossSamples(), name="gram"))
        ),
        r"^the model's own losses differ while its outputs agree \(added by `gram` "
        r"\(activity_regularizer AcrossSamples\)\): a scalar loss that reduces over the batch "
        r"other than as a mean \(`add_loss` of a sum\), or that mixes samples .*$",
    ),
    "own train_step": (
        _contrastive,
        r"^the model's own train_step gives other results through the towers: each tower "
        r"computes the step's losses on its slice of the batch, so a loss that is not a mean "
        r"over the samples \(a sum, or in-batch: contrastive\) differs \(step result .*\)$",
    ),
    # Only the weights it moved differ (once: "a reason replicate cannot name").
    "own train_step, summed loss": (
        lambda: _own_step(SummedLoss, 4, keras.optimizers.SGD(0.1)),
        r"^the model's own train_step gives other results through the towers: each tower "
        r"computes the step's losses on its slice of the batch, so a loss that is not a mean "
        r"over the samples \(a sum, or in-batch: contrastive\) differs "
        r"\(weight after the step .*\)$",
    ),
}


@pytest.mark.parametrize("cause", list(CAUSES))
def test_each_cause_is_named(cause, devices):
    make, pattern = CAUSES[cause]
    model = make()
    before = _state(model)
    report = replicate.check(model, X, Y, devices=devices[:3], batch_size=40)
    assert not report.exact
    assert len(report.causes) == 1, report.causes
    assert __import__("re").match(pattern, report.causes[0]), report.causes[0]
    # The towers' slices are reported, a failing slice's too (7 samples, or the whole 40).
    assert report.slices in ([3, 2, 2], [14, 13, 13]), report.slices
    # The check wrote nothing: weights, state and seeds as before.
    for a, b in zip(before, _state(model), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cause", ["mixes samples", "batch normalization"])
def test_one_tower_is_always_the_same(cause, devices):
    make, _ = CAUSES[cause]
    assert replicate.check(make(), X, Y, devices=devices[:1]).exact


def _multi_output():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    return keras.Model(
        inputs,
        {
            "label": keras.layers.Dense(3, name="label")(hidden),
            "score": keras.layers.Dense(1, activation="sigmoid", name="score")(hidden),
        },
    )


EXACT = {
    "mlp": lambda: _compiled(_mlp()),
    "dropout": lambda: _compiled(_mlp(keras.layers.Dropout(0.5, name="drop"))),
    "synchronized batch normalization": lambda: _compiled(
        _mlp(keras.layers.BatchNormalization(synchronized=True))
    ),
    "two optimizers (own train_step)": lambda: model_zoo.compile_two(model_zoo.two_step()),
    "own train_step, Adam, a bias before synchronized BatchNormalization": lambda: _own_step(
        NormalizedStep, 6, keras.optimizers.Adam(0.01)
    ),
    # The second layer's inputs are normalized already: its moving mean after a step is
    # about 1e-10 on both sides, and only rounding apart (once called a difference).
    "two synchronized BatchNormalizations in a row": lambda: _compiled(
        _mlp(
            keras.layers.BatchNormalization(synchronized=True),
            keras.layers.BatchNormalization(synchronized=True),
        )
    ),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_models_pass(name, devices):
    report = replicate.check(EXACT[name](), X, Y, devices=devices[:3])
    assert report.exact, str(report)
    assert report.slices == [3, 2, 2]
    assert max(v for _, v in report.differences) <= report.rtol
    if name == "dropout":  # recognised, not a false alarm
        assert report.notes == [
            "layers `drop` draw random numbers; compared with their randomness off (their "
            "draws differ per tower by design, as between any two runs)"
        ]


def test_multi_output_model_passes_and_prints_every_comparison(devices):
    model = _multi_output()
    model.compile(
        optimizer="sgd",
        loss={"label": keras.losses.SparseCategoricalCrossentropy(True), "score": "mse"},
    )
    y = {"label": Y, "score": RNG.random((40, 1)).astype("float32")}
    report = replicate.check(model, X, y, devices=devices[:2])
    assert report.exact, str(report)
    text = str(report)
    assert text.startswith(
        "replicate.check: 2 towers on slices [3, 2] against one device: the same"
    )
    assert "output 1, training=True" in text and "loss, training=True" in text


def test_the_demo_convnet_passes(devices):
    from replicate import demo

    (x, y), _ = demo.load_digits()
    model = demo.make_convnet()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    report = replicate.check(model, x[:64], y[:64], devices=devices[:3])
    assert report.exact, str(report)  # synchronized BatchNormalization; Dropout recognised
    assert report.notes[0].startswith("layers `dropout")


def test_fit_checks_once_and_warns_with_the_cause(devices):
    model = _compiled(_mlp(keras.layers.BatchNormalization(name="bn1")))
    parallel = replicate.replicate(model, devices[:3])
    _compiled(parallel)
    with pytest.warns(UserWarning) as record:
        parallel.fit(X, Y, batch_size=10, epochs=1, verbose=0)
    messages = [str(w.message) for w in record if str(w.message).startswith("replicate:")]
    assert messages == [
        "replicate: this model does not train as on one device through 3 towers: "
        "BatchNormalization layers `bn1` normalize per tower; use synchronized=True. "
        "`print(replicate.check(model, x, y))` shows every comparison. To train anyway without "
        "this check, pass `check=False` to `replicate.replicate`; `check='strict'` raises "
        "instead of warning."
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parallel.fit(X, Y, batch_size=10, epochs=1, verbose=0)  # once per model


def test_check_false_is_silent_and_strict_raises(devices):
    make = CAUSES["batch normalization"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = _compiled(replicate.replicate(make(), devices[:3], check=False))
        quiet.fit(X, Y, batch_size=10, epochs=1, verbose=0)
    strict = _compiled(replicate.replicate(make(), devices[:3], check="strict"))
    before = _state(strict.template)
    with pytest.raises(ValueError, match=r"normalize per tower.*check='strict' was passed"):
        strict.fit(X, Y, batch_size=10, epochs=1, verbose=0)
    for a, b in zip(before, _state(strict.template), strict=True):
        np.testing.assert_array_equal(a, b)  # refused before any step
    with pytest.raises(ValueError, match=r"`check` must be True, False or 'strict'. Received"):
        replicate.replicate(make(), devices[:3], check="warn")


def test_exact_models_fit_in_silence(devices):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("mlp", "dropout"):
            parallel = _compiled(replicate.replicate(EXACT[name](), devices[:3]))
            parallel.fit(X, Y, batch_size=10, epochs=1, verbose=0)


@pytest.mark.parametrize("policy, rtol", [("mixed_float16", 2.0**-7), ("mixed_bfloat16", 2.0**-4)])
def test_mixed_precision_is_compared_at_its_own_precision(policy, rtol, devices):
    # float16 and bfloat16 round 10 and 7 mantissa bits: towers summing in another order
    # than one device differ by a few of their epsilons, which is no cause (rtol is 8 eps).
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = _mlp(keras.layers.Activation("relu"), seed=4)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert replicate.checking.default_rtol(model) == rtol
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parallel = _compiled(replicate.replicate(model, devices[:4]))
        parallel.fit(X, Y, batch_size=10, epochs=1, verbose=0)
    assert replicate.check(parallel, X, Y).rtol == rtol
    # The same comparison at float32's tolerance sees the rounding.
    assert not replicate.check(parallel, X, Y, rtol=1e-6).exact


def test_a_generator_is_refused_with_what_to_pass(devices):
    def batches():
        yield X, Y

    with pytest.raises(ValueError, match=r"cannot look into a Python generator.*one batch"):
        replicate.check(_compiled(_mlp()), batches(), devices=devices[:2])


@pytest.mark.parametrize(
    "argument,value",
    [
        ("samples_per_tower", 0),
        ("samples_per_tower", 1.5),
        ("samples_per_tower", True),
        ("batch_size", -4),
        ("rtol", 0.0),
        ("rtol", float("nan")),
        ("rtol", "1e-4"),
    ],
)
def test_bad_arguments_are_refused_naming_the_value(argument, value, devices):
    # samples_per_tower=0 once compared a batch of 1 sample and said "the same".
    with pytest.raises(ValueError, match=rf"`{argument}` must be a positive .*{argument}="):
        replicate.check(_compiled(_mlp()), X, Y, devices=devices[:2], **{argument: value})


def test_towers_without_samples_are_named_in_the_report(devices):
    # A batch of 2 samples for 4 towers: two towers hold stand-in rows, compared to nothing.
    report = replicate.check(_compiled(_mlp()), X[:2], Y[:2], devices=devices[:4])
    assert report.slices == [1, 1, 0, 0]
    assert report.exact
    assert any(
        n.startswith("towers [2, 3] held no samples: the batch held 2") for n in report.notes
    )
    assert "note: towers [2, 3] held no samples" in str(report)


class NoisyStep(InBatchContrastive):
    """Its own train_step adds noise drawn with `tf.random.normal` (as keras.io's conditional
    GAN draws its latent vectors): no Keras seed moves, and its loss is a plain mean."""

    def noise(self, x):
        return tf.random.normal(tf.shape(x))

    def train_step(self, data):
        x, y = data
        x = x + self.noise(x)
        with tf.GradientTape() as tape:
            loss = keras.losses.SparseCategoricalCrossentropy(True)(y, self(x, training=True))
        grads = tape.gradient(loss, self.trainable_weights)
        self.optimizer.apply(grads, self.trainable_weights)
        self.tracker.update_state(loss)
        return {"loss": self.tracker.result()}


def test_a_step_that_draws_with_tf_random_is_no_false_alarm(devices):
    model = NoisyStep()
    model(X[:1])
    report = replicate.check(_compiled(model), X, Y, devices=devices[:3])
    assert report.exact, str(report)
    assert report.causes == []
    assert any(
        n.startswith("the model's own train_step draws random numbers") for n in report.notes
    ), report.notes


class StepOnly(keras.Model):
    """Its own train_step and no `call`: the step calls its layer."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = keras.losses.SparseCategoricalCrossentropy(True)(y, self.dense(x))
        grads = tape.gradient(loss, self.dense.trainable_weights)
        self.optimizer.apply(grads, self.dense.trainable_weights)
        return {"loss": loss}


def test_a_model_without_call_reports_its_slices(devices):
    model = StepOnly()
    model.dense.build((None, 6))
    report = replicate.check(_compiled(model), X, Y, devices=devices[:3])
    assert report.slices == [3, 2, 2], report.slices
    assert str(report).startswith("replicate.check: 3 towers on slices [3, 2, 2] against one")
    assert "the model has no `call` of its own" in str(report)


def _attention(seed=3):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    tokens = keras.layers.Reshape((2, 3))(inputs)
    attended = keras.layers.MultiHeadAttention(num_heads=1, key_dim=4, name="mha")(tokens, tokens)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(attended)))


def _before_normalization(seed=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, name="pre"),
            keras.layers.BatchNormalization(synchronized=True),
            keras.layers.Dense(3),
        ]
    )


@pytest.mark.parametrize(
    "make, path", [(_attention, "mha/key/bias"), (_before_normalization, "pre/bias")]
)
def test_weights_whose_gradient_is_rounding_noise_are_named_under_adam(make, path, devices):
    # Softmax ignores a shift shared by every key (attention's key bias), a normalization
    # a bias just before it: their gradients are zero but for rounding, which Adam
    # normalizes into full steps (keras.io's masked language model drifted 7.9e-5 so).
    model = make()
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(True))
    report = replicate.check(model, X, Y, devices=devices[:3])
    assert report.exact, str(report)  # the loss does not depend on them: no cause
    noted = [n for n in report.notes if n.startswith("weights whose gradient is zero")]
    assert len(noted) == 1 and f"{path}` (" in noted[0] and "Adam normalizes" in noted[0]
    assert noted[0].count("` (") == 1, noted  # the kernel and the other biases are not named
    sgd = replicate.check(_compiled(make()), X, Y, devices=devices[:3])
    assert not [n for n in sgd.notes if n.startswith("weights whose gradient")], sgd.notes
    scaled = make()  # the optimizer a LossScaleOptimizer wraps is the one that steps
    scaled.compile(
        optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)),
        loss=keras.losses.SparseCategoricalCrossentropy(True),
    )
    report = replicate.check(scaled, X, Y, devices=devices[:3])
    assert not [n for n in report.notes if n.startswith("weights whose gradient")], report.notes


def _tokens(loss, seed=4):
    # A sequence model whose padding (token 0) is masked: Keras' losses then average over
    # the unmasked tokens, not over the samples.
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,), dtype="int32")
    hidden = keras.layers.Embedding(7, 4, mask_zero=True)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    model.compile(optimizer="sgd", loss=loss)
    return model


def _padded(rows, seed=5):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 7, (rows, 5))
    for row, length in enumerate(rng.integers(1, 5, rows)):
        tokens[row, length:] = 0  # every sample has its own number of real tokens
    return tokens, rng.integers(0, 3, (rows, 5))


def test_a_loss_split_over_processes_moves_unless_it_is_a_mean_over_samples():
    from replicate.checking import split_loss_difference

    batch = (X[:12], Y[:12])
    assert split_loss_difference(_compiled(_mlp()), batch, 3) < 1e-6
    summed = _compiled(_mlp(), keras.losses.SparseCategoricalCrossentropy(True, reduction="sum"))
    assert abs(split_loss_difference(summed, batch, 2) - 0.5) < 1e-4  # each half's sum
    masked = _tokens(keras.losses.SparseCategoricalCrossentropy(True))
    assert split_loss_difference(masked, _padded(12), 2) > 1e-2
    assert split_loss_difference(_compiled(_mlp()), (X[:1], Y[:1]), 2) is None
    assert split_loss_difference(NoisyStep(), batch, 2) is None  # its own train_step


WORKER = """
import sys, warnings
import replicate
replicate.simulate_devices(1)
backend = replicate.get_backend("collective")
import keras
sys.path.insert(0, sys.argv[1])
import test_checking as t
loss = keras.losses.SparseCategoricalCrossentropy(True)
for name, model, data in [
    ("mean", t._mlp(), (t.X[:24], t.Y[:24])),
    ("masked", t._tokens(loss), t._padded(24)),
]:
    parallel = replicate.replicate(model, backend=backend)
    parallel.compile(optimizer="sgd", loss=loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parallel.fit(*replicate.shard(data), batch_size=6, epochs=1, verbose=0)
    said = [str(w.message) for w in caught if "not a mean over its samples" in str(w.message)]
    print("RESULT", name, len(said), said[0] if said else "")
"""


def test_processes_warn_of_a_loss_normalized_per_process(tmp_path):
    # Two real processes (replicate launch, the collective backend), one tower each: the
    # first fit splits each process's first batch as the processes split the global one.
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "worker.py").write_text(WORKER)
    result = subprocess.run(
        [Path(sys.executable).with_name("replicate"), "launch", "--nproc", "2", "worker.py"]
        + [str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    said = [line.split("RESULT ", 1)[1] for line in result.stdout.splitlines() if "RESULT" in line]
    assert sorted(line[:8] for line in said) == ["masked 1", "masked 1", "mean 0 ", "mean 0 "], said
    for line in said:
        if line.startswith("masked"):
            assert "masked 1 replicate: this model's loss is not a mean over its samples" in line
            assert "each of the 2 processes normalizes it over its own batch" in line


class UnseededStep(NoisyStep):
    """Its own train_step draws with `keras.random.normal` and no `seed=`: from Keras'
    global SeedGenerator, which the model does not hold."""

    def noise(self, x):
        return 0.1 * keras.random.normal(ops.shape(x))


def test_a_step_drawing_from_keras_global_seed_generator_is_named(devices):
    model = UnseededStep()
    model(X[:1])
    report = replicate.check(_compiled(model), X, Y, devices=devices[:3])
    (cause,) = report.causes
    assert cause.startswith(
        "the model's own train_step fails through the towers (UnseededRandom: A model's own "
        "step drew random numbers with `keras.random` and no `seed=`, from Keras' global "
        "SeedGenerator, which the model does not hold"
    ), cause
    parallel = _compiled(replicate.replicate(model, devices[:3], check=False))
    before = _state(model)
    with pytest.raises(RuntimeError, match=r"drew random numbers with `keras.random` and no"):
        parallel.fit(X, Y, batch_size=12, epochs=1, verbose=0)
    for a, b in zip(before, _state(model), strict=True):
        np.testing.assert_array_equal(a, b)  # nothing half-applied
