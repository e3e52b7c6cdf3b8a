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
