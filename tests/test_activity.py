"""Activity regularizers in a tower: per sample on Keras < 3.14, untouched after."""

import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from replicate import _keras_compat, activity


def _model():
    keras.utils.set_random_seed(3)
    regularized = keras.layers.Dense(4, activity_regularizer=keras.regularizers.L1(0.5))
    return keras.Sequential([keras.Input((3,)), regularized, keras.layers.Dense(2)])


def test_rows_add_up_to_the_regularizer_value():
    output = tf.constant(np.random.default_rng(1).normal(size=(5, 4)), tf.float32)
    regularizer = keras.regularizers.L1(0.5)
    rows = activity._Rows(regularizer)(output)
    assert rows.shape == (5,)  # one per sample: the tower sums them over its real rows
    np.testing.assert_allclose(float(tf.reduce_sum(rows)), float(regularizer(output)), rtol=1e-6)


def test_swapped_only_while_towers_run_and_only_where_keras_sums():
    model = _model()
    layer = model.layers[0]
    original = layer.activity_regularizer
    rows = activity.ActivityRows(model)
    assert rows.active == (_keras_compat.KERAS_VERSION < (3, 14))
    with rows:
        with rows:  # a second tower, in a thread of a synchronized step
            inside = layer.activity_regularizer
        assert layer.activity_regularizer is inside  # the first tower still runs
    assert layer.activity_regularizer is original  # nothing left for a save to write
    assert (inside is not original) == rows.active


@pytest.mark.skipif(
    _keras_compat.KERAS_VERSION >= activity.MEAN_SINCE, reason="Keras >= 3.14 averages them"
)
def test_towers_in_threads_share_one_swap():
    model = _model()
    layer = model.layers[0]
    original = layer.activity_regularizer
    rows = activity.ActivityRows(model)
    entered, release = threading.Barrier(3), threading.Event()
    seen = []

    def tower():
        with rows:
            entered.wait()
            release.wait()
            seen.append(layer.activity_regularizer)

    threads = [threading.Thread(target=tower) for _ in range(2)]
    for t in threads:
        t.start()
    entered.wait()
    release.set()
    for t in threads:
        t.join()
    assert all(isinstance(r, activity._Rows) for r in seen)
    assert layer.activity_regularizer is original
