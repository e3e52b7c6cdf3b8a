"""replicate(model): Keras fit/evaluate/predict over towers equals one device."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from placement import placed_ops

import replicate


def _compile(model, lr=0.1, **kwargs):
    model.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        **kwargs,
    )
    return model


def _fit(model, x, y, batch_size, **kwargs):
    return model.fit(x, y, batch_size=batch_size, epochs=2, shuffle=False, verbose=0, **kwargs)


@pytest.mark.parametrize("towers", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [12, 10, 3])
def test_fit_equals_single_device(
    towers, batch_size, devices, mlp_factory, classification_data, weight_diff
):
    # 61 samples: every epoch ends on a short batch; batch 10 splits unevenly
    # over 3 and 4 towers; batch 3 is smaller than 4 towers.
    x, y = classification_data
    single = _compile(mlp_factory())
    expected = _fit(single, x, y, batch_size).history

    model = mlp_factory()
    parallel = _compile(replicate.replicate(model, devices[:towers]))
    history = _fit(parallel, x, y, batch_size).history

    assert weight_diff(model, single) <= 1e-5
    np.testing.assert_allclose(history["loss"], expected["loss"], rtol=1e-5)
    np.testing.assert_allclose(history["accuracy"], expected["accuracy"], rtol=1e-6)
    assert parallel.template is model


def test_evaluate_and_predict_equal_single_device(devices, mlp_factory, classification_data):
    x, y = classification_data
    single = _compile(mlp_factory())
    parallel = _compile(replicate.replicate(mlp_factory(), devices[:3]))
    np.testing.assert_allclose(
        parallel.predict(x, batch_size=16, verbose=0),
        single.predict(x, batch_size=16, verbose=0),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        parallel.evaluate(x, y, batch_size=16, verbose=0),
        single.evaluate(x, y, batch_size=16, verbose=0),
        rtol=1e-6,
    )


def test_sample_and_class_weights(devices, mlp_factory, classification_data, weight_diff):
    x, y = classification_data
    weights = np.linspace(0.2, 2.0, len(x)).astype("float32")
    classes = {0: 1.0, 1: 3.0, 2: 0.5}
    for kwargs in ({"sample_weight": weights}, {"class_weight": classes}):
        single = _compile(mlp_factory())
        expected = _fit(single, x, y, 10, **kwargs).history
        model = mlp_factory()
        parallel = _compile(replicate.replicate(model, devices[:3]))
        history = _fit(parallel, x, y, 10, **kwargs).history
        assert weight_diff(model, single) <= 1e-5, kwargs
        np.testing.assert_allclose(history["loss"], expected["loss"], rtol=1e-5)


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index):
        part = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[part], self.y[part]


def test_dataset_and_pydataset_inputs(devices, mlp_factory, classification_data, weight_diff):
    x, y = classification_data
    single = _compile(mlp_factory())
    expected = _fit(single, x, y, 10).history["loss"]
    inputs = {
        "tf.data": lambda: tf.data.Dataset.from_tensor_slices((x, y)).batch(10),
        "PyDataset": lambda: _Batches(x, y, 10),
    }
    for name, make in inputs.items():
        model = mlp_factory()
        parallel = _compile(replicate.replicate(model, devices[:4]))
        history = parallel.fit(make(), epochs=2, shuffle=False, verbose=0).history
        assert weight_diff(model, single) <= 1e-5, name
        np.testing.assert_allclose(history["loss"], expected, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("towers, jit", [(2, False), (4, False), (2, True)])
def test_batchnorm_statistics_are_averaged(towers, jit, devices, mlp_factory):
    # One step on equal slices: the moving mean is the mean of the tower
    # means, which equals the whole batch's mean. The last tower alone
    # (last-writer-wins) would give something else.
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(16, 6)) * np.arange(1, 17)[:, None]).astype("float32")
    y = rng.integers(0, 3, size=16)
    single = _compile(mlp_factory(batch_norm=True))
    single.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model = mlp_factory(batch_norm=True)
    # check=False: per-tower BatchNormalization is what this test measures (the check names it).
    parallel = _compile(replicate.replicate(model, devices[:towers], check=False), jit_compile=jit)
    parallel.fit(x, y, batch_size=16, epochs=1, verbose=0)

    bn, bn_single = model.layers[1], single.layers[1]
    np.testing.assert_allclose(bn.moving_mean.numpy(), bn_single.moving_mean.numpy(), atol=1e-6)

    last = mlp_factory(batch_norm=True)
    _compile(last).fit(x[-16 // towers :], y[-16 // towers :], batch_size=16, epochs=1, verbose=0)
    assert np.abs(last.layers[1].moving_mean.numpy() - bn.moving_mean.numpy()).max() > 1e-3


def test_dropout_masks_differ_between_towers(devices):
    inputs = keras.Input((64,))
    model = keras.Model(inputs, keras.layers.Dropout(0.5, seed=1)(inputs))
    builder = replicate.ReplicaBuilder(model, devices[:2])
    ones = np.ones((4, 64), "float32")
    first, second = builder.towers(ones, training=True)
    kept_first, kept_second = first.numpy() > 0, second.numpy() > 0
    assert 0.2 < kept_first.mean() < 0.8
    assert (kept_first != kept_second).mean() > 0.2
    # Inference keeps everything.
    np.testing.assert_array_equal(builder.call(ones).numpy(), ones)


def test_checkpoint_and_save_hold_the_plain_template(
    devices, mlp_factory, classification_data, tmp_path
):
    x, y = classification_data
    model = mlp_factory()
    parallel = _compile(replicate.replicate(model, devices[:2]))
    path = tmp_path / "best.keras"
    parallel.fit(
        x,
        y,
        batch_size=10,
        epochs=1,
        verbose=0,
        callbacks=[keras.callbacks.ModelCheckpoint(path)],
    )
    loaded = keras.models.load_model(path)
    assert loaded.name == "mlp"
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)

    parallel.save(tmp_path / "saved.keras")
    assert keras.models.load_model(tmp_path / "saved.keras").count_params() == model.count_params()


def test_towers_run_on_their_devices():
    # Where TensorFlow's placer really put each tower's ops (the forward pass is traced
    # once and called by every tower under its device scope).
    placed = placed_ops(
        """
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5), keras.layers.Dense(3)])
        builder = replicate.ReplicaBuilder(model, devices[:2])
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        step = tf.function(lambda a, b: builder.compute_gradients(loss, a, b))
        step(tf.ones((5, 6)), tf.zeros((5,), tf.int32))
        """
    )
    forward = {
        name: device
        for name, (kind, device) in placed.items()
        if kind == "MatMul" and "gradients" not in name
    }
    assert len(forward) == 4, forward  # two Dense layers, two towers
    for name, device in forward.items():
        tower = re.match(r"tower_(\d+)/", name)
        assert tower and device == f"CPU:{tower.group(1)}", (name, device)


@pytest.mark.parametrize("towers, batch_size", [(2, 12), (3, 10)])
def test_xla_per_tower_equals_single_device(
    towers, batch_size, devices, mlp_factory, classification_data, weight_diff
):
    x, y = classification_data
    single = _compile(mlp_factory())
    expected = _fit(single, x, y, batch_size).history
    model = mlp_factory()
    parallel = _compile(replicate.replicate(model, devices[:towers]), jit_compile=True)
    history = _fit(parallel, x, y, batch_size).history
    assert weight_diff(model, single) <= 1e-5
    np.testing.assert_allclose(history["loss"], expected["loss"], rtol=1e-5)


def test_xla_towers_keep_their_devices(devices, mlp_factory):
    builder = replicate.ReplicaBuilder(mlp_factory(), devices[:2], jit_compile=True)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    graph = (
        tf.function(lambda a, b: builder.compute_gradients(loss, a, b))
        .get_concrete_function(tf.TensorSpec((None, 6)), tf.TensorSpec((None,), tf.int32))
        .graph
    )
    calls = [op for op in graph.get_operations() if op.type.endswith("PartitionedCall")]
    compiled = {op.name.split("/")[0]: op.device for op in calls if op.get_attr("_XlaMustCompile")}
    assert "CPU:0" in compiled["tower_0"] and "CPU:1" in compiled["tower_1"], compiled


@pytest.mark.parametrize("jit", [False, True])
def test_multi_output_model_and_per_output_losses(jit, devices, classification_data, weight_diff):
    x, y = classification_data
    targets = {"cls": y, "reg": (x[:, :1] * 2).astype("float32")}

    def make():
        keras.utils.set_random_seed(2)
        inputs = keras.Input((6,), name="x")
        h = keras.layers.Dense(8, activation="relu")(inputs)
        outputs = {
            "cls": keras.layers.Dense(3, name="cls")(h),
            "reg": keras.layers.Dense(1, name="reg")(h),
        }
        return keras.Model(inputs, outputs)

    def compile_(model, **kwargs):
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss={
                "cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                "reg": "mse",
            },
            metrics={"cls": ["accuracy"]},
            **kwargs,
        )
        return model

    single = compile_(make())
    expected = single.fit(x, targets, batch_size=10, epochs=2, shuffle=False, verbose=0).history
    model = make()
    parallel = compile_(replicate.replicate(model, devices[:3]), jit_compile=jit)
    history = parallel.fit(x, targets, batch_size=10, epochs=2, shuffle=False, verbose=0).history
    assert weight_diff(model, single) <= 1e-5
    assert sorted(history) == sorted(expected)  # loss, cls_loss, reg_loss, cls_accuracy
    for key in expected:
        np.testing.assert_allclose(history[key], expected[key], rtol=1e-5, err_msg=key)


def _recurrent(unroll):
    keras.utils.set_random_seed(4)
    inputs = keras.Input((4, 6))
    hidden = keras.layers.LSTM(5, unroll=unroll, name="lstm")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(hidden))


def test_xla_per_tower_refuses_a_recurrent_loop_and_trains_it_unrolled(devices, weight_diff):
    # A loop's saved values cannot leave an XLA computation for the backward pass
    # ("TensorList crossing the XLA/TF boundary"); unrolled, there is no loop.
    parallel = replicate.replicate(_recurrent(False), devices[:2])
    with pytest.raises(ValueError, match=r"cannot compile the loop of recurrent layers \['lstm'\]"):
        parallel.compile(optimizer="sgd", loss="mse", jit_compile=True)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(24, 4, 6)).astype("float32"), rng.normal(size=(24, 3))
    single = _recurrent(True)
    single.compile(optimizer="sgd", loss="mse", jit_compile=True)
    single.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    model = _recurrent(True)
    parallel = replicate.replicate(model, devices[:3], check=False)
    parallel.compile(optimizer="sgd", loss="mse", jit_compile=True)
    parallel.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert weight_diff(model, single) <= 1e-5


def test_bad_jit_compile_value(devices, mlp_factory):
    parallel = replicate.replicate(mlp_factory(), devices[:2])
    with pytest.raises(ValueError, match=r"Received: jit_compile='yes'"):
        parallel.compile(optimizer="sgd", loss="mse", jit_compile="yes")


def test_unknown_backend_lists_choices(devices, mlp_factory):
    with pytest.raises(ValueError, match=r"backend='nccl'.*\['local', 'horovod', 'collective'\]"):
        replicate.replicate(mlp_factory(), devices[:2], backend="nccl")
