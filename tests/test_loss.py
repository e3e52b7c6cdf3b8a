"""One loss over the whole batch: losses that are not a plain mean over samples are exact."""

import re

import keras
import numpy as np
import pytest
from keras import ops
from placement import placed_ops

import replicate

SAMPLES = 61  # a prime: no tower count divides it, and every epoch ends on a short batch
BATCH = 7  # 7 % 2 == 7 % 3 == 1; the last batch (5) is uneven too


def _contrastive(y_true, y_pred):
    """CLIP-style: each sample's negatives are the rest of the batch."""
    del y_true
    a, b = ops.split(y_pred, 2, axis=-1)
    a = a / ops.norm(a, axis=-1, keepdims=True)
    b = b / ops.norm(b, axis=-1, keepdims=True)
    logits = ops.matmul(a, ops.transpose(b)) * 5.0
    labels = ops.arange(ops.shape(logits)[0])
    ce = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    ce_t = keras.losses.sparse_categorical_crossentropy(
        labels, ops.transpose(logits), from_logits=True
    )
    return (ops.mean(ce) + ops.mean(ce_t)) / 2


def _per_token(y_true, y_pred):
    """Summed over real tokens, divided by the batch's number of real tokens."""
    real = ops.cast(ops.not_equal(y_true, 0), "float32")
    ce = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
    return ops.sum(ce * real) / ops.maximum(ops.sum(real), 1.0)


def _sequences(seed=4):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 12, size=(SAMPLES, 9))
    lengths = rng.integers(2, 10, size=SAMPLES)
    x[np.arange(9)[None, :] >= lengths[:, None]] = 0  # padding
    y = np.where(x > 0, (x * 3) % 5 + 1, 0)
    return x.astype("int32"), y.astype("int32")


def _embedder():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(16, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(8)(h))


def _tagger(*, mask_zero):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((9,), dtype="int32")
    h = keras.layers.Embedding(12, 8, mask_zero=mask_zero)(inputs)
    h = keras.layers.LSTM(8, return_sequences=True)(h)
    return keras.Model(inputs, keras.layers.Dense(6)(h))


def _mlp():
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)]
    )


def _case(name):
    rng = np.random.default_rng(1)
    dense_x = rng.normal(size=(SAMPLES, 6)).astype("float32")
    if name == "contrastive":
        return _embedder, _contrastive, dense_x, np.zeros((SAMPLES,), "float32")
    if name == "token-normalized":
        x, y = _sequences()
        return (lambda: _tagger(mask_zero=False)), _per_token, x, y
    if name == "sum-reduction":
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
        return _mlp, loss, dense_x, rng.integers(0, 3, SAMPLES)
    if name == "masked-sequence":
        x, y = _sequences()
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        return (lambda: _tagger(mask_zero=True)), loss, x, y
    raise ValueError(name)


CASES = ["contrastive", "token-normalized", "sum-reduction", "masked-sequence"]


@pytest.mark.parametrize("towers", [2, 3])
@pytest.mark.parametrize("name", CASES)
def test_batch_losses_equal_one_device(name, towers, devices, weight_diff):
    make, loss, x, y = _case(name)

    def compile_(model):
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss)
        return model

    single = compile_(make())
    model = make()
    parallel = compile_(replicate.replicate(model, devices[:towers]))
    # Before training: the evaluate loss is the whole batch's loss.
    expected = single.evaluate(x, y, batch_size=BATCH, verbose=0)
    got = parallel.evaluate(x, y, batch_size=BATCH, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)

    history = single.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history
    replicated = parallel.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history
    assert weight_diff(model, single) <= 1e-5, name
    np.testing.assert_allclose(replicated["loss"], history["loss"], rtol=1e-5)


def test_per_tower_losses_would_differ(devices):
    # The contrastive loss depends on the batch: the mean of the towers'
    # losses is far from it, so the test above tells the two designs apart.
    make, loss, x, y = _case("contrastive")
    model = make()
    whole = float(loss(y[:BATCH], model(x[:BATCH])))
    parts = [slice(0, 4), slice(4, 7)]
    per_tower = sum(float(loss(y[p], model(x[p]))) * (p.stop - p.start) for p in parts) / BATCH
    assert abs(per_tower - whole) / whole > 0.1


def test_model_losses_follow_the_mean_rule(devices, weight_diff):
    # Weight and activity regularizers (Keras normalizes the latter by the
    # batch size) are means: towers weighted by slice size are exact.
    def make():
        keras.utils.set_random_seed(9)
        return keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(
                    16,
                    activation="tanh",
                    kernel_regularizer=keras.regularizers.L2(0.01),
                    activity_regularizer=keras.regularizers.L1(0.01),
                ),
                keras.layers.Dense(3),
            ]
        )

    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(SAMPLES, 6)).astype("float32"), rng.integers(0, 3, SAMPLES)

    def compile_(model):
        model.compile(
            optimizer=keras.optimizers.SGD(0.05),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    single = compile_(make())
    expected = single.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history
    model = make()
    parallel = compile_(replicate.replicate(model, devices[:3]))
    history = parallel.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history
    assert weight_diff(model, single) <= 1e-5
    np.testing.assert_allclose(history["loss"], expected["loss"], rtol=1e-5)


def test_tower_gradients_run_on_their_devices():
    # Each tower backpropagates its share on its own device: where TensorFlow's placer
    # really put the gradient matmuls of a replicated model's train step.
    placed = placed_ops(
        """
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5), keras.layers.Dense(3)])
        parallel = replicate.replicate(model, devices[:3], check=False)
        parallel.compile(
            optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        parallel.fit(np.ones((7, 6), "float32"), np.zeros((7,), "int32"), batch_size=7, verbose=0)
        """
    )
    backward = {}
    for name, (kind, device) in placed.items():
        tower = re.search(r"tower_(\d+)(_\d+)?/", name)
        if kind == "MatMul" and "gradients" in name and tower:
            backward.setdefault(int(tower.group(1)), set()).add(device)
    # Two Dense layers: each tower has its own gradient matmuls, on its device.
    assert backward == {0: {"CPU:0"}, 1: {"CPU:1"}, 2: {"CPU:2"}}, backward
