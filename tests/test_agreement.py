"""Agreement tokens in one process: positions in words, fingerprints, the identity meeting.

The tokens between processes are tested under real launchers in
tests/test_processes.py (the agree and disagree jobs)."""

import keras
import numpy as np
import pytest

from replicate.backends import LocalBackend
from replicate.backends.agreement import Position, describe_variable, fingerprint


@pytest.mark.parametrize(
    "position, words",
    [
        (Position("fit", 0), "at the start of fit (epoch 1)"),
        (Position("epoch", 2), "in fit, epoch 3, before step 1"),
        (Position("step", 2, 4), "in fit, epoch 3, step 5"),
        (Position("epoch_end", 1), "in fit, at the end of epoch 2"),
        (Position("validation", 1), "in fit's validation after epoch 2"),
        (Position("evaluate", 2), "in evaluate after epoch 2"),
        (Position("evaluate", 0), "in evaluate before any training epoch"),
        (Position("save", 3), "in save after epoch 3"),
        (Position("export", 1), "in export after epoch 1"),
        (Position("fit_end", 4), "at the end of fit after epoch 4"),
    ],
)
def test_positions_in_words(position, words):
    assert position.describe() == words


def _mlp(name, hidden=16):
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(hidden), keras.layers.Dense(3)], name=name
    )


def test_fingerprint_ignores_names_but_not_shapes_dtypes_or_order():
    a, b = _mlp("first"), _mlp("second")
    assert [v.path for v in a.variables] != [v.path for v in b.variables]
    assert fingerprint(a.variables) == fingerprint(b.variables)
    assert fingerprint(a.variables) != fingerprint(_mlp("third", hidden=8).variables)
    assert fingerprint(a.variables) != fingerprint(a.variables[::-1])
    assert fingerprint(a.variables) != fingerprint(a.variables[:-1])
    wide = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(16, dtype="float64"), keras.layers.Dense(3)]
    )
    assert fingerprint(a.variables) != fingerprint(wide.variables)
    assert 0 < fingerprint(a.variables) < 2**24  # exact in a float32 step token


def test_describe_variable():
    kernel = _mlp("mlp").layers[0].kernel
    assert describe_variable(kernel) == f"`{kernel.path}` (6, 16) float32"


def test_one_process_meets_itself():
    agreement = LocalBackend().agreement
    outcome = agreement.meet(Position("fit", 0), variables=_mlp("m").variables, stop=True)
    assert outcome.stop and outcome.failed == [] and outcome.values == [0]
    table = LocalBackend().gather_rows(np.asarray([3, 4], np.int64))
    np.testing.assert_array_equal(table, [[3, 4]])


def test_lockstep_is_on_by_default():
    assert LocalBackend().lockstep
