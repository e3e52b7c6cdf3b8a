"""State written in the forward pass: combined by aggregation, and a warning where a user's
layer left the aggregation at Keras' default."""

import warnings

import keras
import keras_releases
import numpy as np
import pytest
from keras import ops

import replicate

RNG = np.random.default_rng(51)
X = RNG.normal(size=(300, 6)).astype("float32")
Y = RNG.integers(0, 3, size=300).astype("int32")


class SamplesSeen(keras.layers.Layer):
    """Counts the samples it saw in training, a user's layer as people write it."""

    def __init__(self, aggregation=None, **kwargs):
        super().__init__(**kwargs)
        self.aggregation = aggregation

    def build(self, shape):
        options = {} if self.aggregation is None else {"aggregation": self.aggregation}
        self.seen = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="seen", **options
        )

    def call(self, x, training=False):
        if training:
            self.seen.assign_add(ops.cast(ops.shape(x)[0], "float32"))
        return x


def _fit(towers, devices, aggregation=None):
    counter = SamplesSeen(aggregation, name="samples_seen")
    model = keras.Sequential([keras.Input((6,)), counter, keras.layers.Dense(3)])
    target = replicate.replicate(model, devices[:towers]) if towers else model
    target.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    target.fit(X, Y, batch_size=100, epochs=1, verbose=0)
    return float(counter.seen.numpy())


@pytest.mark.parametrize("towers", [2, 3])
def test_a_user_layers_state_at_the_default_aggregation_is_warned_about(towers, devices):
    with pytest.warns(UserWarning) as record:
        seen = _fit(towers, devices)
    messages = [str(w.message) for w in record if "replicate: layer" in str(w.message)]
    # The check at the first fit names the layer as well (its wording: test_checking.py).
    checked = [str(w.message) for w in record if "replicate: this model" in str(w.message)]
    assert len(checked) == 1 and "layer `samples_seen` writes" in checked[0]
    if keras_releases.DEFAULT_AGGREGATION == "mean":
        # Keras < 3.8 creates the variable at aggregation="mean" itself, which replicate
        # cannot tell from a choice: only the check at the first fit can name it.
        assert messages == [] and "its aggregation ('mean')" in checked[0]
        assert seen == pytest.approx(_weighted_mean(towers))
        return
    assert len(messages) == 1  # once, at the first step
    assert messages[0] == (
        "replicate: layer 'samples_seen' (SamplesSeen) writes its variable "
        f"'{messages[0].split(chr(39))[3]}' in the forward pass, with Keras' default "
        'aggregation="none". Each tower writes it from its own slice of the batch, and '
        "replicate keeps the towers' values weighted by their share of the batch (across "
        "processes too). If the variable counts or sums over samples, create it with "
        'aggregation="sum" (every tower\'s change is added); aggregation="mean" keeps the '
        'weighted mean, "only_first_replica" tower 0\'s value. Choosing one silences this '
        "warning."
    )
    assert messages[0].split("'")[3].endswith("samples_seen/seen")
    # What it warns about: not the 300 samples one device counts.
    assert _fit(None, devices) == 300.0
    assert seen == pytest.approx(_weighted_mean(towers))


def _weighted_mean(towers):
    """Each tower counted its slice, and the slices' counts were averaged by share:
    three batches of 100, split as replicate splits them."""
    slices = [100 // towers + (i < 100 % towers) for i in range(towers)]
    return 3 * sum(n * n for n in slices) / 100


@pytest.mark.parametrize("towers", [1, 2, 3])
def test_a_chosen_aggregation_is_silent_and_exact(towers, devices):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _fit(towers, devices, aggregation="sum") == 300.0


def test_one_tower_and_keras_own_layers_are_silent(devices, mlp_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fit(1, devices)  # one tower: the value is one device's
        model = mlp_factory(batch_norm=True)
        # Per-tower BatchNormalization is named by the check at the first fit
        # (test_checking.py); here: its moving statistics raise no state warning.
        parallel = replicate.replicate(model, devices[:3], check=False)
        parallel.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        parallel.fit(X, Y, batch_size=100, epochs=1, verbose=0)
