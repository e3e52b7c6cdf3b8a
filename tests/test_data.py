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


@pytest.mark.parametrize(
    "make",
    [
        lambda: tf.data.Dataset.range(8).shuffle(8),
        lambda: tf.data.Dataset.range(8).shuffle(8, seed=1).map(lambda v: v * 2).batch(2),
        lambda: tf.data.Dataset.zip(
            (tf.data.Dataset.range(8).shuffle(8), tf.data.Dataset.range(8))
        ),
    ],
    ids=["shuffle", "shuffle-map-batch", "zip"],
)
def test_shard_refuses_a_dataset_shuffled_before_it(make):
    with pytest.raises(
        ValueError,
        match=r"shard before shuffling\. Received: a dataset with a shuffle \(_ShuffleDataset\)",
    ):
        shard(make(), rank=0, size=2)


def test_shard_refuses_shuffled_file_lists(tmp_path):
    for name in "abcd":
        (tmp_path / f"{name}.txt").write_text(name)
    files = tf.data.Dataset.list_files(str(tmp_path / "*.txt"))  # shuffle=True by default
    with pytest.raises(ValueError, match=r"list_files\(\.\.\., shuffle=False\)"):
        shard(files, rank=1, size=2)
    ordered = tf.data.Dataset.list_files(str(tmp_path / "*.txt"), shuffle=False)
    assert len(list(shard(ordered, rank=1, size=2))) == 2


def test_shard_then_shuffle_gives_disjoint_shards_whatever_the_seeds():
    parts = []
    for rank in range(2):
        tf.random.set_seed(rank)  # each process seeds its random state with its rank
        mine = shard(tf.data.Dataset.range(64), rank=rank, size=2).shuffle(64)
        parts.append({int(v) for v in mine.as_numpy_iterator()})
    assert not parts[0] & parts[1] and parts[0] | parts[1] == set(range(64))


class Longest(LocalBackend):
    """One process that is told another process holds `steps` batches."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def reduce_max(self, value):
        return max(int(value), self.steps)


def test_agree_on_steps_pads_with_empty_batches():
    ds = tf.data.Dataset.from_tensor_slices((np.ones((6, 2), "float32"), np.arange(6))).batch(2)
    padded = list(agree_on_steps(ds, Longest(5)).as_numpy_iterator())
    assert [len(y) for _, y in padded] == [2, 2, 2, 0, 0]
    assert padded[-1][0].shape == (0, 2)
    endless = agree_on_steps(ds, Longest(1 << 62))  # another process's data is endless
    assert [len(y) for _, y in endless.take(7).as_numpy_iterator()] == [2, 2, 2, 0, 0, 0, 0]


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
