"""The merge on the variable device: tower outputs become one batch, with what Keras keeps."""

import tensorflow as tf

from replicate import _keras_compat, merge


def test_merge_concatenates_keras_masks():
    parts = [tf.ones((2, 3)), tf.zeros((1, 3))]
    _keras_compat.set_mask(parts[0], tf.constant([[True, True, False]] * 2))
    _keras_compat.set_mask(parts[1], tf.constant([[True, False, False]]))
    mask = _keras_compat.get_mask(merge.merge(parts))
    assert mask.numpy().tolist() == [[True, True, False]] * 2 + [[True, False, False]]
