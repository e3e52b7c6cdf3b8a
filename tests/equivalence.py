"""One device against towers: the check behind the tests of Keras as people write it.

`assert_same_as_one_device` trains a model on one device and through
`replicate.replicate` on 1, 2 and 3 towers, from the same start, with batches
the towers do not divide, and compares `evaluate` before training (relative
1e-6), `evaluate` after it, and the weights after `fit` (1e-5).
"""

import keras
import numpy as np
import tensorflow as tf

import replicate

TOWERS = (1, 2, 3)


def max_weight_difference(a, b):
    pairs = list(zip(a.get_weights(), b.get_weights(), strict=True))
    return max(float(np.abs(u - v).max()) for u, v in pairs) if pairs else 0.0


def _batching(x, batch_size):
    return {} if isinstance(x, tf.data.Dataset) else {"batch_size": batch_size}


def _evaluate(model, x, y, batch_size):
    result = model.evaluate(x, y, verbose=0, return_dict=True, **_batching(x, batch_size))
    return {k: float(v) for k, v in result.items()}


def assert_same_as_one_device(
    make,
    compile_model,
    x,
    y=None,
    *,
    devices,
    towers=TOWERS,
    batch_size=17,
    epochs=2,
    rtol=1e-6,
    weight_tolerance=1e-5,
):
    """Trains `make()` on one device and on each tower count; asserts they agree.

    Args:
        make: Builds the model, the same weights every call.
        compile_model: Compiles a model (the single one, or the replicated one).
        x, y: The data (`fit` and `evaluate` take them as they are).
        devices: The tower devices to take the first n of.
        batch_size: Chosen so that the towers do not divide it, with a short
            last batch.

    Returns:
        `{towers: (max weight difference, evaluate results)}` for the record.
    """
    single = make()
    compile_model(single)
    before = _evaluate(single, x, y, batch_size)
    single.fit(x, y, epochs=epochs, shuffle=False, verbose=0, **_batching(x, batch_size))
    after = _evaluate(single, x, y, batch_size)
    measured = {}
    for n in towers:
        model = make()
        parallel = replicate.replicate(model, devices[:n])
        compile_model(parallel)
        got = _evaluate(parallel, x, y, batch_size)
        for key, value in before.items():
            np.testing.assert_allclose(got[key], value, rtol=rtol, err_msg=f"{n} towers: {key}")
        parallel.fit(x, y, epochs=epochs, shuffle=False, verbose=0, **_batching(x, batch_size))
        difference = max_weight_difference(model, single)
        assert difference <= weight_tolerance, (n, difference)
        got = _evaluate(parallel, x, y, batch_size)
        for key, value in after.items():
            np.testing.assert_allclose(
                got[key], value, rtol=max(rtol, 1e-5), err_msg=f"{n} towers after fit: {key}"
            )
        measured[n] = (difference, got)
    return measured


def sgd(rate=0.1):
    return keras.optimizers.SGD(rate)
