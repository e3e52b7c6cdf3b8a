"""Leftovers of Horovod's Keras API and of MirroredStrategy are refused with the fix.

The Horovod part runs a real `horovodrun -np 2 -H localhost:2 --gloo` job
(tests/migration_worker.py): every refusal comes before any collective, on
both ranks alike, and the migrated script then trains with identical weights.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import migration_worker
import numpy as np
import pytest
import tensorflow as tf

import replicate

WORKER = Path(migration_worker.__file__)
BIN = Path(sys.executable).parent

try:
    import horovod.tensorflow as _hvd

    HOROVOD_SKIP = None if _hvd.gloo_built() else "this Horovod was built without Gloo"
except ImportError as error:
    HOROVOD_SKIP = (
        f"Horovod is not installed in this environment ({error}); `make horovod` builds it"
    )


@pytest.fixture(scope="module")
def horovod_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("migration")
    command = [BIN / "horovodrun", "-np", "2", "-H", "localhost:2", "--gloo"]
    result = subprocess.run(
        [*command, sys.executable, WORKER, out],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=WORKER.parent,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PATH=f"{BIN}:{os.environ['PATH']}"),
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return out, ranks, result.stdout


@pytest.mark.processes
@pytest.mark.horovod
@pytest.mark.skipif(HOROVOD_SKIP is not None, reason=str(HOROVOD_SKIP))
@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "DistributedOptimizer",
            "TypeError: `optimizer` must be a plain Keras optimizer, not one wrapped by "
            "Horovod's `hvd.DistributedOptimizer`: replicate already sums the gradients",
        ),
        ("DistributedOptimizer", "Received: optimizer=hvd.DistributedOptimizer(SGD(...))"),
        ("compiled template", "Pass the optimizer itself, e.g. `optimizer=keras.optimizers.SGD"),
        (
            "BroadcastGlobalVariablesCallback",
            "replicate broadcasts rank 0's weights and every optimizer's state at the start "
            "of every `fit`",
        ),
        ("MetricAverageCallback", "already cover every process's samples"),
        (
            "LearningRateWarmupCallback",
            "use `replicate.callbacks.LearningRateWarmup(initial_lr=..., warmup_epochs=...",
        ),
        ("CommitStateCallback", "`keras.callbacks.BackupAndRestore(backup_dir)`"),
    ],
)
def test_leftover_horovod_keras_api_is_refused_with_the_fix(horovod_job, name, expected):
    _, ranks, _ = horovod_job
    assert ranks[0]["refused"] == ranks[1]["refused"]  # both ranks alike, no hang
    assert expected in ranks[0]["refused"][name]


@pytest.mark.processes
@pytest.mark.horovod
@pytest.mark.skipif(HOROVOD_SKIP is not None, reason=str(HOROVOD_SKIP))
def test_the_migrated_script_trains_with_horovods_warmup_arguments(horovod_job):
    out, ranks, stdout = horovod_job
    first, second = (np.load(out / f"rank{r}.npz") for r in (0, 1))
    for key in first.files:
        np.testing.assert_array_equal(first[key], second[key])
    assert ranks[0]["loss"] == ranks[1]["loss"]
    # initial_lr is the rate to reach (0.05 x 2 processes); the ramp starts at
    # initial_lr / processes and reaches it after one epoch of 4 batches.
    expected = [0.05 + 0.05 * b / 4 for b in range(4)] + [0.1] * 4
    np.testing.assert_allclose(ranks[0]["rates"], expected, rtol=1e-6)
    assert ranks[0]["rates"] == ranks[1]["rates"]
    # verbose prints on the chief only.
    printed = [line for line in stdout.splitlines() if "LearningRateWarmup: reached" in line]
    assert len(printed) == 1 and printed[0].startswith("[0]"), printed


def test_a_mirrored_strategy_scope_is_refused(mlp_factory, devices):
    parallel = replicate.replicate(mlp_factory(), devices[:2])
    with tf.distribute.MirroredStrategy(devices[:2]).scope():
        with pytest.raises(RuntimeError) as error:
            parallel.compile(optimizer="sgd", loss="mse")
    assert "must not be compiled or trained inside a `MirroredStrategy` scope" in str(error.value)
    assert "Build, compile and fit the model outside `strategy.scope()`" in str(error.value)
    # Nothing was lost: outside the scope the same model compiles and trains.
    parallel.compile(
        optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    history = parallel.fit(np.ones((8, 6)), np.zeros(8), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_a_model_built_in_a_strategy_scope_is_refused(mlp_factory, devices):
    with tf.distribute.MirroredStrategy(devices[:2]).scope():
        model = mlp_factory()
    parallel = replicate.replicate(model, devices[:2])
    with pytest.raises(RuntimeError, match=r"variables were made inside a `tf.distribute`"):
        parallel.compile(optimizer="sgd", loss="mse")
    with pytest.raises(RuntimeError, match=r"Received: variable 'mlp/dense.*MirroredVariable"):
        parallel.fit(np.ones((8, 6)), np.zeros(8), epochs=1, verbose=0)
