"""Sharding data per process and agreeing on step counts."""

import numpy as np
import pytest
import tensorflow as tf

import replicate
from replicate.backends import LocalBackend
from replicate.data import ProcessBatches, agree_on_steps, shard


def test_shard_arrays_covers_everything_once():
    x, y = np.arange(10), np.arange(10) * 2
    parts = [shard((x, y), rank=r, size=3) for r in range(3)]
    assert [len(p[0]) for p in parts] == [4, 3, 3]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
    np.testing.assert_array_equal(parts[1][1], [8, 10, 12])


def test_shard_dataset_and_defaults_outside_horovodrun():
    ds = tf.data.Dataset.range(7)
    assert list(shard(ds, rank=1, size=2).as_numpy_iterator()) == [1, 3, 5]
    assert replicate.is_chief()
    np.testing.assert_array_equal(shard(np.arange(5)), np.arange(5))


def test_shard_errors():
    with pytest.raises(ValueError, match=r"Received: rank=2, size=2"):
        shard(np.arange(4), rank=2, size=2)
    with pytest.raises(ValueError, match=r"lengths \[3, 4\]"):
        shard((np.arange(3), np.arange(4)), rank=0, size=2)


def test_process_batches_in_one_process():
    x, y = np.arange(10.0)[:, None], np.arange(10)
    batches = ProcessBatches(x, y, batch_size=4, backend=LocalBackend())
    assert len(batches) == 3
    bx, by = batches[2]
    np.testing.assert_array_equal(by, [8, 9])
    assert bx.shape == (2, 1)


def test_agree_on_steps_is_identity_in_one_process():
    ds = tf.data.Dataset.range(10).batch(4)
    assert agree_on_steps(ds, LocalBackend()) is ds
