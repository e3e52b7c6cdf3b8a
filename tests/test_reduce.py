"""The pure tensor functions: splitting, weighted sums, state by aggregation."""

import numpy as np
import pytest
import tensorflow as tf

from replicate import merge, reduce


@pytest.mark.parametrize(
    "size, n, expected",
    [
        (8, 4, [2, 2, 2, 2]),
        (10, 4, [3, 3, 2, 2]),
        (3, 4, [1, 1, 1, 0]),
        (0, 2, [0, 0]),
        (7, 1, [7]),
    ],
)
def test_split_sizes(size, n, expected):
    assert reduce.split_sizes(size, n).numpy().tolist() == expected


def test_tower_slices_keep_nesting_and_none():
    x = {"a": tf.range(10), "b": tf.reshape(tf.range(20.0), (10, 2)), "c": None}
    slices = reduce.tower_slices(x, 3)
    assert slices.sizes.numpy().tolist() == [4, 3, 3]
    assert slices.parts[1]["a"].numpy().tolist() == [4, 5, 6]
    assert slices.parts[2]["b"].shape == (3, 2)
    assert slices.parts[0]["c"] is None
    merged = merge.merge(slices.parts)
    np.testing.assert_array_equal(merged["b"].numpy(), x["b"].numpy())


def test_no_tower_gets_an_empty_slice():
    # 2 samples over 4 towers: the empty towers get the last row to stand in.
    slices = reduce.tower_slices(tf.constant([[1.0], [2.0]]), 4)
    assert slices.sizes.numpy().tolist() == [1, 1, 0, 0]
    assert [p.numpy().tolist() for p in slices.parts] == [[[1.0]], [[2.0]], [[2.0]], [[2.0]]]
    assert slices.present.numpy().tolist() == [1.0, 1.0, 0.0, 0.0]
    kept = [merge.keep(p, slices.sizes[i]) for i, p in enumerate(slices.parts)]
    assert merge.merge(kept).numpy().tolist() == [[1.0], [2.0]]
    # An empty batch: a row of zeros (empty strings) stands in everywhere.
    empty = reduce.tower_slices({"n": tf.zeros((0, 3)), "s": tf.constant([], tf.string)}, 2)
    assert empty.parts[1]["n"].numpy().tolist() == [[0.0, 0.0, 0.0]]
    assert empty.parts[0]["s"].numpy().tolist() == [b""]
    assert empty.present.numpy().tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "aggregation, dtype, expected",
    [
        ("sum", "float32", 10.0 + 3 + 5),  # every tower's change
        ("sum", "int32", 10 + 3 + 5),
        ("mean", "float32", 0.75 * 13 + 0.25 * 15),  # weighted by slice size
        ("none", "float32", 0.75 * 13 + 0.25 * 15),
        ("none", "int32", 13),  # tower 0
        ("only_first_replica", "float32", 13.0),
    ],
)
def test_combine_state_by_aggregation(aggregation, dtype, expected):
    old = tf.constant(10, dtype)
    news = [tf.constant(13, dtype), tf.constant(15, dtype), tf.constant(99, dtype)]
    sizes = tf.constant([3, 1, 0])  # the third tower held only a stand-in row
    got = reduce.combine_state(
        aggregation, old, news, reduce.tower_weights(sizes), tf.cast(sizes > 0, tf.float32)
    )
    assert got.numpy() == pytest.approx(expected)


def test_weighted_sum_of_dense_sparse_and_none():
    weights = reduce.tower_weights(tf.constant([3, 1]))
    np.testing.assert_allclose(weights.numpy(), [0.75, 0.25])
    dense = [tf.constant([4.0, 8.0]), tf.constant([8.0, 0.0])]
    sparse = [
        tf.IndexedSlices(tf.constant([[1.0, 1.0]]), tf.constant([0]), tf.constant([3, 2])),
        tf.IndexedSlices(tf.constant([[4.0, 4.0]]), tf.constant([2]), tf.constant([3, 2])),
    ]
    total = reduce.weighted_sum([[dense[0], sparse[0], None], [dense[1], sparse[1], None]], weights)
    np.testing.assert_allclose(total[0].numpy(), [5.0, 6.0])
    assert isinstance(total[1], tf.IndexedSlices)
    np.testing.assert_allclose(
        tf.convert_to_tensor(total[1]).numpy(), [[0.75, 0.75], [0, 0], [1.0, 1.0]]
    )
    assert total[2] is None


def test_empty_tower_contributes_nothing_even_when_nan():
    weights = reduce.tower_weights(tf.constant([2, 0]))
    total = reduce.weighted_sum([[tf.constant([1.0])], [tf.constant([np.nan])]], weights)
    np.testing.assert_array_equal(total[0].numpy(), [1.0])


def test_weights_of_an_empty_batch_are_zero():
    np.testing.assert_array_equal(reduce.tower_weights(tf.constant([0, 0])).numpy(), [0.0, 0.0])


def test_ragged_and_sparse_batches_split_by_rows():
    ragged = tf.ragged.constant([[1, 2], [3], [4, 5, 6], [7]])
    slices = reduce.tower_slices({"r": ragged}, 3)
    assert [p["r"].to_list() for p in slices.parts] == [[[1, 2], [3]], [[4, 5, 6]], [[7]]]
    sparse = tf.sparse.from_dense(tf.constant([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]]))
    parts = reduce.tower_slices(sparse, 2).parts
    assert [tf.sparse.to_dense(p).numpy().tolist() for p in parts] == [
        [[0.0, 1.0], [2.0, 0.0]],
        [[0.0, 3.0]],
    ]
    # A batch smaller than the towers: stand-in rows, as for dense batches.
    short = reduce.tower_slices((ragged[:1], tf.sparse.slice(sparse, [0, 0], [1, 2])), 2)
    assert short.sizes.numpy().tolist() == [1, 0]
    assert short.parts[1][0].to_list() == [[1, 2]]
    assert tf.sparse.to_dense(short.parts[1][1]).numpy().tolist() == [[0.0, 1.0]]
    empty = reduce.tower_slices((ragged[:0], tf.sparse.slice(sparse, [0, 0], [0, 2])), 2)
    assert empty.parts[0][0].to_list() == [[]]
    assert tf.sparse.to_dense(empty.parts[1][1]).numpy().tolist() == [[0.0, 0.0]]


# -- ragged and sparse batches train as on one device --------------------------------------

import keras  # noqa: E402
import keras_releases  # noqa: E402
from equivalence import assert_same_as_one_device  # noqa: E402

import replicate  # noqa: E402

RNG = np.random.default_rng(31)


def _ragged_data():
    tokens = [RNG.integers(1, 20, RNG.integers(1, 6)).tolist() for _ in range(50)]
    labels = np.array([sum(t) % 2 for t in tokens], "float32")
    ragged = tf.ragged.constant(tokens, dtype=tf.int32)
    return tf.data.Dataset.from_tensor_slices((ragged, labels)).batch(17)


def _ragged_model():
    keras.utils.set_random_seed(6)
    tokens = keras.Input((None,), ragged=True, dtype="int32")
    embedded = keras.layers.Embedding(20, 4)(tokens)
    pooled = keras.layers.Lambda(lambda t: tf.reduce_mean(t, axis=1))(embedded)
    return keras.Model(tokens, keras.layers.Dense(1, activation="sigmoid")(pooled))


def _sparse_data():
    dense = (RNG.random((50, 10)) < 0.2) * RNG.normal(size=(50, 10))
    sparse = tf.sparse.from_dense(dense.astype("float32"))
    labels = RNG.integers(0, 2, 50).astype("float32")
    return tf.data.Dataset.from_tensor_slices((sparse, labels)).batch(17)


def _sparse_model():
    keras.utils.set_random_seed(7)
    features = keras.Input((10,), sparse=True)
    hidden = keras.layers.Dense(8, activation="tanh")(features)
    return keras.Model(features, keras.layers.Dense(1, activation="sigmoid")(hidden))


@pytest.mark.parametrize(
    "make, data", [(_ragged_model, _ragged_data), (_sparse_model, _sparse_data)]
)
def test_ragged_and_sparse_batches_train_as_on_one_device(make, data, devices):
    if make is _ragged_model and not keras_releases.RAGGED_INPUTS:
        pytest.skip(f"keras.Input(ragged=True) needs Keras 3.9 (installed: {keras.__version__})")

    def compile_model(model):
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="binary_crossentropy")

    assert_same_as_one_device(make, compile_model, data(), devices=devices)


# -- embeddings: the rows of a sparse gradient, as Keras' optimizers see them ------------


class _AddPosition(keras.layers.Layer):
    """keras.io's position embedding: one lookup at arange(length), added to every sample
    (re-expressed from the TokenAndPositionEmbedding layer of the text examples)."""

    def __init__(self, length, width, **kwargs):
        super().__init__(**kwargs)
        self.positions = keras.layers.Embedding(length, width)

    def call(self, x):
        return x + self.positions(keras.ops.arange(0, keras.ops.shape(x)[1], 1))


def _positions_model():
    keras.utils.set_random_seed(12)
    inputs = keras.Input((4, 8))
    return keras.Model(inputs, keras.layers.Dense(1)(_AddPosition(4, 8)(inputs)))


def _tokens_model():
    keras.utils.set_random_seed(13)
    tokens = keras.Input((5,), dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(6, 4)(tokens))
    return keras.Model(tokens, keras.layers.Dense(1)(pooled))


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop", "adagrad"])
def test_a_lookup_every_sample_shares_trains_as_on_one_device(optimizer, devices):
    # Adam, RMSprop and Adagrad square each row of a sparse gradient before adding rows of
    # the same index: a position table's rows must come once, as on one device, not once
    # per tower (which moved the table 6e-4 away in one Adam step on 3 towers).
    x = RNG.normal(size=(50, 4, 8)).astype("float32")
    y = RNG.normal(size=(50, 1)).astype("float32")
    assert_same_as_one_device(
        _positions_model,
        lambda m: m.compile(optimizer=optimizer, loss="mse"),
        x,
        y,
        devices=devices,
    )


def test_a_lookup_per_sample_with_repeated_ids_trains_as_on_one_device(devices):
    # Ids repeat inside and across the towers' slices: one device has a row per lookup.
    x = RNG.integers(0, 6, size=(50, 5)).astype("int32")
    y = RNG.normal(size=(50, 1)).astype("float32")
    assert_same_as_one_device(
        _tokens_model, lambda m: m.compile(optimizer="adam", loss="mse"), x, y, devices=devices
    )


def test_the_check_compares_the_rows_an_optimizer_squares(devices):
    model = _positions_model()
    model.compile(optimizer="adam", loss="mse")
    x = RNG.normal(size=(9, 4, 8)).astype("float32")
    report = replicate.check(model, x, RNG.normal(size=(9, 1)), devices=devices[:3])
    rows = [v for k, v in report.differences if "embeddings rows squared" in k]
    assert len(rows) == 1 and rows[0] <= report.rtol, str(report)  # training=True
    assert report.exact


def test_the_check_names_sparse_rows_an_optimizer_squares_apart(devices):
    # A sparse batch through Dense: Keras looks up the batch's unique feature ids, one row per
    # id on one device, one per id per tower here. The sums agree; Adam's squares do not.
    keras.utils.set_random_seed(14)
    model = keras.Sequential([keras.Input((12,), sparse=True), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    dense = (RNG.random((9, 12)) < 0.5) * RNG.normal(size=(9, 12))
    x = tf.sparse.from_dense(dense.astype("float32"))
    report = replicate.check(model, x, RNG.normal(size=(9, 2)), devices=devices[:3])
    (cause,) = report.causes
    assert cause.startswith(
        f"the sparse gradients of `{model.layers[0].kernel.path}` have other rows through the "
        "towers than on one device"
    )
    assert "SGD is exact" in cause
    # With SGD only the rows' sums matter, and they agree: nothing to say.
    model.compile(optimizer="sgd", loss="mse")
    assert replicate.check(model, x, RNG.normal(size=(9, 2)), devices=devices[:3]).exact
