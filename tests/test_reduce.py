"""The pure tensor functions: splitting, merging, weighted sums."""

import numpy as np
import pytest
import tensorflow as tf

from replicate import reduce


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


def test_split_keeps_nesting_and_none():
    x = {"a": tf.range(10), "b": tf.reshape(tf.range(20.0), (10, 2)), "c": None}
    slices, sizes = reduce.split(x, 3)
    assert sizes.numpy().tolist() == [4, 3, 3]
    assert slices[1]["a"].numpy().tolist() == [4, 5, 6]
    assert slices[2]["b"].shape == (3, 2)
    assert slices[0]["c"] is None
    merged = reduce.merge(slices)
    np.testing.assert_array_equal(merged["b"].numpy(), x["b"].numpy())


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
