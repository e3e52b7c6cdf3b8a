"""The compatibility matrix, local column: each Keras training feature through replicate()
equals single-device `fit` from the same start (the README's table names these tests)."""

import keras
import keras_releases
import model_zoo
import numpy as np
import pytest
from keras import ops
from keras_releases import number

import replicate

BATCH = 10  # over 3 towers: 4/3/3, and the epoch's last batch of 1 leaves 2 towers empty


@pytest.fixture
def data(classification_data):
    """61 samples, 6 features, 3 classes (conftest's `classification_data`)."""
    return classification_data


_mlp = model_zoo.mlp
_compile = model_zoo.compile_classifier


def _pair(devices, make=_mlp, towers=3, **compile_kwargs):
    """A single-device model and a replicated one from the same start."""
    optimizer = compile_kwargs.pop("optimizer", None)
    single = _compile(make(), optimizer() if optimizer else None, **compile_kwargs)
    model = make()
    parallel = _compile(
        replicate.replicate(model, devices[:towers]),
        optimizer() if optimizer else None,
        **compile_kwargs,
    )
    return single, model, parallel


def _fit(model, *args, **kwargs):
    kwargs = {"batch_size": BATCH, "epochs": 2, "shuffle": False, "verbose": 0, **kwargs}
    return model.fit(*args, **kwargs).history


def _assert_same(history, expected, model, single, weight_diff, tol=1e-5):
    assert weight_diff(model, single) <= tol
    assert sorted(history) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(history[key], expected[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_validation_split_and_validation_data(devices, data, weight_diff):
    x, y = data
    for kwargs in ({"validation_split": 0.25}, {"validation_data": (x[:17], y[:17])}):
        single, model, parallel = _pair(devices)
        expected = _fit(single, x, y, **kwargs)
        history = _fit(parallel, x, y, **kwargs)
        assert "val_loss" in history
        _assert_same(history, expected, model, single, weight_diff)


def test_steps_per_execution(devices, data, weight_diff):
    x, y = data  # 7 batches: the last of 3 executions is short
    if not keras_releases.SHORT_LAST_EXECUTION:
        x, y = x[:60], y[:60]  # 6 batches: Keras < 3.7 defines only whole executions
    single, model, parallel = _pair(devices, steps_per_execution=3)
    _assert_same(_fit(parallel, x, y), _fit(single, x, y), model, single, weight_diff)


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: keras.optimizers.SGD(0.1, gradient_accumulation_steps=2),
        lambda: keras.optimizers.SGD(0.5, clipnorm=0.05),
        lambda: keras.optimizers.SGD(0.5, global_clipnorm=0.05),
        lambda: keras.optimizers.Adam(0.01, use_ema=True, ema_overwrite_frequency=3),
        lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)),
    ],
    ids=["gradient_accumulation", "clipnorm", "global_clipnorm", "use_ema", "LossScaleOptimizer"],
)
def test_optimizer_options(optimizer, devices, data, weight_diff):
    x, y = data
    single, model, parallel = _pair(devices, optimizer=optimizer)
    _assert_same(_fit(parallel, x, y), _fit(single, x, y), model, single, weight_diff)
    for a, b in zip(parallel.optimizer.variables, single.optimizer.variables, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=a.path)


@pytest.fixture
def policy():
    """Sets a global dtype policy for one test, then restores float32."""
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


def test_mixed_float16_overflowing_scale_skips_steps_everywhere(policy, devices, data):
    # An initial scale of 2**40 overflows float16 gradients: single-device fit
    # skips steps and halves the scale until the gradients are finite; the
    # towers must skip the same steps and end with the same scale.
    policy("mixed_float16")
    x, y = data

    def optimizer():
        return keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.1), initial_scale=2.0**40, dynamic_growth_steps=4
        )

    single, model, parallel = _pair(devices, optimizer=optimizer)
    assert model.layers[0].compute_dtype == "float16"
    expected = _fit(single, x, y)
    history = _fit(parallel, x, y)
    assert number(parallel.optimizer.dynamic_scale) == number(single.optimizer.dynamic_scale)
    assert number(single.optimizer.dynamic_scale) < 2.0**40
    assert number(parallel.optimizer.iterations) == number(single.optimizer.iterations)
    for a, b in zip(model.get_weights(), single.get_weights()):
        np.testing.assert_allclose(a, b, atol=2e-3)  # float16 rounding per tower
    np.testing.assert_allclose(history["loss"], expected["loss"], rtol=2e-3)


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_like_one_device(name, policy, devices, data):
    policy(name)
    x, y = data
    single, model, parallel = _pair(devices, optimizer=lambda: keras.optimizers.Adam(0.01))
    expected = _fit(single, x, y, epochs=3)
    history = _fit(parallel, x, y, epochs=3)
    if name == "mixed_float16":
        assert isinstance(parallel.optimizer, keras.optimizers.LossScaleOptimizer)
    assert history["loss"][-1] < history["loss"][0]
    # Rounding in the low-precision dtype differs per slice; measured here:
    # float16 ~1e-3 and bfloat16 ~1e-2 in weights after 3 epochs (README).
    tolerance = 5e-3 if name == "mixed_float16" else 5e-2
    for a, b in zip(model.get_weights(), single.get_weights()):
        np.testing.assert_allclose(a, b, atol=tolerance)
    np.testing.assert_allclose(history["loss"], expected["loss"], rtol=tolerance)


def test_compute_loss_and_compute_metrics_overrides(devices, data, weight_diff):
    x, y = data
    single, model, parallel = _pair(devices, make=model_zoo.own_loss)
    expected = _fit(single, x, y)
    history = _fit(parallel, x, y)
    assert "penalty" in history
    # Keras < 3.3 reports `model.metrics` only: `mean_logit` is a value compute_metrics adds.
    assert ("mean_logit" in history) == keras_releases.FIT_REPORTS_STEP_RESULTS
    _assert_same(history, expected, model, single, weight_diff)


def test_metrics_property_override(devices, data, weight_diff):
    class OnlyLoss(keras.Sequential):
        @property
        def metrics(self):
            return [self._loss_tracker]

    def make():
        keras.utils.set_random_seed(7)
        return OnlyLoss([keras.Input((6,)), keras.layers.Dense(3)])

    x, y = data
    single, model, parallel = _pair(devices, make=make)
    expected, history = _fit(single, x, y), _fit(parallel, x, y)
    assert sorted(history) == ["loss"]
    _assert_same(history, expected, model, single, weight_diff)


def test_multi_input_model(devices, data, weight_diff):
    x, y = data
    inputs = model_zoo.split_inputs(x)
    single, model, parallel = _pair(devices, make=model_zoo.multi_input)
    _assert_same(_fit(parallel, inputs, y), _fit(single, inputs, y), model, single, weight_diff)


def _mobilenet(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=5
    )


def test_keras_applications_model(devices, weight_diff):
    # MobileNetV2: 52 BatchNormalization layers.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 5, 24)

    def compile_(model):
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
        return model

    # One tower: one step equals plain fit.
    single = compile_(_mobilenet())
    single.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)
    model = _mobilenet()
    compile_(replicate.replicate(model, devices[:1])).fit(
        x[:8], y[:8], batch_size=8, epochs=1, verbose=0
    )
    assert weight_diff(model, single) <= 1e-5

    # Three towers train it.
    model = _mobilenet()
    before = model.get_weights()
    with pytest.warns(UserWarning, match=r"`bn_Conv1`, .* and 49 more normalize per tower"):
        history = (
            compile_(replicate.replicate(model, devices[:3]))
            .fit(x, y, batch_size=10, epochs=2, verbose=0)
            .history
        )
    assert np.isfinite(history["loss"]).all()
    assert max(float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), before)) > 0


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("interrupted")


def test_backup_and_restore_one_process(devices, data, weight_diff, tmp_path):
    x, y = data
    single, _, _ = _pair(devices)
    _fit(single, x, y, epochs=4)

    model = _mlp()
    parallel = _compile(replicate.replicate(model, devices[:3]))
    backup = keras.callbacks.BackupAndRestore(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(parallel, x, y, epochs=4, callbacks=[backup, _Interrupt()])
    resumed = _mlp(seed=99)  # a new process: other weights, restored from the backup
    parallel = _compile(replicate.replicate(resumed, devices[:3]))
    history = _fit(parallel, x, y, epochs=4, callbacks=[backup])
    assert len(history["loss"]) == 2  # epochs 3 and 4 only
    assert weight_diff(resumed, single) <= 1e-5
    assert not (tmp_path / "backup").exists()


def test_early_stopping_reduce_lr_and_best_checkpoint(devices, data, weight_diff, tmp_path):
    x, y = data

    def callbacks(name):
        return [
            keras.callbacks.EarlyStopping("val_loss", patience=2, min_delta=0.5),
            keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.5, patience=0, min_delta=1.0),
            keras.callbacks.ModelCheckpoint(
                tmp_path / f"{name}.keras", monitor="val_loss", save_best_only=True
            ),
        ]

    single, model, parallel = _pair(devices)
    kwargs = {"epochs": 8, "validation_data": (x[:20], y[:20])}
    expected = _fit(single, x, y, callbacks=callbacks("single"), **kwargs)
    history = _fit(parallel, x, y, callbacks=callbacks("replicated"), **kwargs)
    assert len(history["loss"]) == len(expected["loss"]) < 8  # stopped at the same epoch
    np.testing.assert_allclose(history["learning_rate"], expected["learning_rate"])
    assert min(expected["learning_rate"]) < 0.1  # the rate was reduced
    _assert_same(history, expected, model, single, weight_diff)
    best, best_single = (
        keras.models.load_model(tmp_path / f"{n}.keras") for n in ("replicated", "single")
    )
    assert weight_diff(best, best_single) <= 1e-5


def _tagger(seed=5):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((9,), dtype="int32")
    h = keras.layers.Embedding(12, 8, mask_zero=True)(inputs)
    h = keras.layers.LSTM(8, return_sequences=True)(h)
    return keras.Model(inputs, keras.layers.Dense(6)(h))


def test_masks_reach_metrics_and_loss(devices, weight_diff):
    rng = np.random.default_rng(4)
    x = rng.integers(1, 12, size=(48, 9))
    x[np.arange(9)[None, :] >= rng.integers(2, 10, size=48)[:, None]] = 0
    y = np.where(x > 0, (x * 3) % 5 + 1, 0)
    single, model, parallel = _pair(devices, make=_tagger)
    expected = single.evaluate(x, y, batch_size=BATCH, verbose=0, return_dict=True)
    got = parallel.evaluate(x, y, batch_size=BATCH, verbose=0, return_dict=True)
    for key in expected:  # accuracy counts real tokens only
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, err_msg=key)
    unmasked = (single.predict(x, verbose=0).argmax(-1) == y).mean()
    if keras_releases.METRICS_APPLY_MASKS:  # Keras < 3.12 counts padding too, on one device
        assert abs(unmasked - expected["accuracy"]) > 0.01  # padding would change it
    _assert_same(_fit(parallel, x, y), _fit(single, x, y), model, single, weight_diff)


def test_saves_hold_the_compiled_state_and_resume(devices, data, weight_diff, tmp_path):
    x, y = data
    single, model, parallel = _pair(devices, optimizer=lambda: keras.optimizers.Adam(0.01))
    _fit(single, x, y)
    _fit(parallel, x, y, callbacks=[keras.callbacks.ModelCheckpoint(tmp_path / "ckpt.keras")])
    parallel.save(tmp_path / "saved.keras")
    single.save(tmp_path / "single.keras")
    for name in ("ckpt", "saved"):
        loaded = keras.models.load_model(tmp_path / f"{name}.keras")
        assert isinstance(loaded.optimizer, keras.optimizers.Adam)
        assert number(loaded.optimizer.iterations) == 14
        assert weight_diff(loaded, single) <= 1e-5
    # Resume without compiling again, as a loaded Keras model does.
    resumed = keras.models.load_model(tmp_path / "saved.keras")
    reference = keras.models.load_model(tmp_path / "single.keras")
    history = _fit(replicate.replicate(resumed, devices[:3]), x, y)
    expected = _fit(reference, x, y)
    assert weight_diff(resumed, reference) <= 1e-5
    np.testing.assert_allclose(history["loss"], expected["loss"], rtol=1e-5)


def _conv(norm, seed=3):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, padding="same")]
    if norm in ("batch", "synchronized"):
        layers.append(keras.layers.BatchNormalization(synchronized=norm == "synchronized"))
    elif norm == "layer":
        layers.append(keras.layers.LayerNormalization())
    layers += [
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ]
    return keras.Sequential(layers)


@pytest.mark.parametrize("norm", [None, "layer", "synchronized"])
def test_batches_smaller_than_the_towers(norm, devices, weight_diff):
    # 11 samples in batches of 3: the last batch of 2 leaves one tower of 3 empty.
    rng = np.random.default_rng(6)
    x = rng.normal(size=(11, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, 11)
    single, model, parallel = _pair(devices, make=lambda: _conv(norm))
    expected = _fit(single, x, y, batch_size=3)
    history = _fit(parallel, x, y, batch_size=3)
    _assert_same(history, expected, model, single, weight_diff)
    np.testing.assert_allclose(
        parallel.predict(x[:1], verbose=0), single.predict(x[:1], verbose=0), atol=1e-5
    )


def test_batches_smaller_than_the_towers_with_per_tower_batchnorm(devices):
    # Unsynchronized BatchNorm normalizes each tower's slice (as documented),
    # so only "it works" is comparable: no shape error, finite, and inference
    # (moving statistics) equals the template's own.
    rng = np.random.default_rng(6)
    x = rng.normal(size=(11, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, 11)
    model = _conv("batch")
    parallel = _compile(replicate.replicate(model, devices[:3]))
    with pytest.warns(UserWarning, match=r"BatchNormalization layers .* normalize per tower"):
        history = _fit(parallel, x, y, batch_size=3)
    assert np.isfinite(history["loss"]).all()
    np.testing.assert_allclose(
        parallel.predict(x[:2], verbose=0), model.predict(x[:2], verbose=0), atol=1e-6
    )


def test_predict_one_sample_through_an_lstm(devices):
    model = _tagger()
    x = np.array([[3, 4, 5, 0, 0, 0, 0, 0, 0]], "int32")
    got = replicate.replicate(model, devices[:3]).predict(x, verbose=0)
    np.testing.assert_allclose(got, model.predict(x, verbose=0), atol=1e-6)


class Counting(keras.layers.Layer):
    """Counts the samples it has seen, in three aggregations."""

    def build(self, input_shape):
        self.seen = self.add_weight(
            shape=(), initializer="zeros", trainable=False, aggregation="sum", name="seen"
        )
        self.seen_int = self.add_weight(
            shape=(),
            initializer="zeros",
            trainable=False,
            aggregation="sum",
            dtype="int32",
            name="seen_int",
        )
        self.mean_abs = self.add_weight(
            shape=(), initializer="zeros", trainable=False, aggregation="mean", name="mean_abs"
        )
        self.first = self.add_weight(
            shape=(),
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
            dtype="int32",
            name="first",
        )

    def call(self, x, training=False):
        if training:
            n = ops.shape(x)[0]
            self.seen.assign_add(ops.cast(n, "float32"))
            self.seen_int.assign_add(ops.cast(n, "int32"))
            self.mean_abs.assign(ops.mean(ops.abs(x)))
            self.first.assign_add(1)
        return x


def test_layer_state_follows_variable_aggregation(devices, data):
    x, y = data

    def make():
        keras.utils.set_random_seed(1)
        return keras.Sequential([keras.Input((6,)), Counting(), keras.layers.Dense(3)])

    single, model, parallel = _pair(devices, make=make)
    _fit(single, x[:60], y[:60], epochs=1, batch_size=20)  # 3 equal batches
    _fit(parallel, x[:60], y[:60], epochs=1, batch_size=20)
    counting, counting_single = model.layers[0], single.layers[0]
    assert number(counting.seen) == number(counting_single.seen) == 60.0
    assert number(counting.seen_int) == number(counting_single.seen_int) == 60
    np.testing.assert_allclose(number(counting.mean_abs), number(counting_single.mean_abs), 1e-6)
    assert number(counting.first) == number(counting_single.first) == 3  # once per step


def test_sum_form_add_loss_is_scaled_by_slice_share(devices, data):
    """The documented exception: a sum over the batch in `add_loss` counts each tower's
    slice by its share, so it comes out about 1/towers of one device's."""

    class SumPenalty(keras.layers.Layer):
        def call(self, x):
            self.add_loss(0.01 * ops.sum(x**2))
            return x

    class MeanPenalty(keras.layers.Layer):
        def call(self, x):
            self.add_loss(0.01 * ops.mean(ops.sum(x**2, axis=-1)))
            return x

    x, y = data

    def make(layer):
        def build():
            keras.utils.set_random_seed(7)
            return keras.Sequential([keras.Input((6,)), layer(), keras.layers.Dense(3)])

        return build

    results = {}
    for name, layer in (("sum", SumPenalty), ("mean", MeanPenalty)):
        single, _, parallel = _pair(devices, make=make(layer))
        results[name] = (
            single.evaluate(x[:60], y[:60], batch_size=30, verbose=0)[0],
            parallel.evaluate(x[:60], y[:60], batch_size=30, verbose=0)[0],
        )
    one, towers = results["mean"]
    assert towers == pytest.approx(one, rel=1e-6)  # the Keras convention: exact
    one, towers = results["sum"]
    penalty = 0.01 * float(np.sum(x[:30] ** 2) + np.sum(x[30:60] ** 2)) / 2
    cross_entropy = one - penalty
    # Three equal towers: each adds its slice's sum weighted by 1/3.
    assert towers == pytest.approx(cross_entropy + penalty / 3, rel=1e-4)
