"""What Keras itself does differently across the supported releases (3.2 to 3.15).

The tests compare replicate with plain Keras on one device; where Keras' own
behaviour changed between releases, a test asks here what the installed Keras
does, instead of assuming the newest. Each fact names the release that
changed it (read in Keras' sources of 3.2.0 to 3.15.1). None of them is a
promise of replicate's: each is Keras' behaviour on one device, which
replicate follows. `make test-compat` runs the tests on the oldest pair.
"""

import keras

KERAS = tuple(int(part) for part in keras.__version__.split(".")[:2])

# `fit` reports what `train_step` returns (3.3); before, only `model.metrics`' results.
FIT_REPORTS_STEP_RESULTS = KERAS >= (3, 3)

# `compute_loss` sums a loss added with one row per sample (3.3); before, it stays a
# tensor of rows, and the loss `fit` reports is their mean (the gradient is the same).
ADD_LOSS_ROWS_ARE_SUMMED = KERAS >= (3, 3)

# `compute_loss` takes `training` (3.4).
COMPUTE_LOSS_TAKES_TRAINING = KERAS >= (3, 4)

# A short last execution of `steps_per_execution` ends cleanly (3.7, a `tf.while_loop`
# over optional batches). Before, an `OutOfRangeError` ends it in the middle of the
# traced function, and which updates of its finished steps land is left to the
# runtime: one device counted 16 optimizer steps for 14 batches there.
SHORT_LAST_EXECUTION = KERAS >= (3, 7)

# The aggregation `add_weight` gives a variable when none is chosen ("mean" before 3.8).
DEFAULT_AGGREGATION = "none" if KERAS >= (3, 8) else "mean"

# `keras.Input(ragged=True)` (3.9).
RAGGED_INPUTS = KERAS >= (3, 9)

# Metrics apply the outputs' mask without sample weights (3.12); before, only with them.
METRICS_APPLY_MASKS = KERAS >= (3, 12)


def number(variable):
    """A scalar Keras variable as a Python number (`float(variable)` works from Keras 3.5)."""
    return variable.numpy().item()
