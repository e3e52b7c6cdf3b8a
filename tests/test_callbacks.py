"""LearningRateWarmup and GPUMonitor inside Keras fit."""

import keras
import numpy as np
import pytest

import replicate
from replicate.callbacks import GPUMonitor, LearningRateWarmup


def test_warmup_ramps_per_batch_then_holds(mlp_factory, classification_data, devices):
    x, y = classification_data
    parallel = replicate.replicate(mlp_factory(), devices[:2])
    parallel.compile(
        optimizer=keras.optimizers.SGD(0.4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda b, logs: seen.append(float(parallel.optimizer.learning_rate))
    )
    warmup = LearningRateWarmup(0.4, warmup_epochs=2, start_learning_rate=0.1)
    history = parallel.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[warmup, record])
    # 4 batches an epoch: 0.1 + 0.3 * (epoch + batch / 4) / 2, then 0.4.
    expected = [0.1 + 0.3 * (e + b / 4) / 2 for e in range(2) for b in range(4)] + [0.4] * 4
    np.testing.assert_allclose(seen, expected, rtol=1e-6)
    # Logged at each epoch's end: the rate of its last batch.
    np.testing.assert_allclose(
        history.history["learning_rate"], [expected[3], expected[7], 0.4], rtol=1e-6
    )


def test_warmup_starts_from_rate_over_processes(mlp_factory, devices):
    parallel = replicate.replicate(mlp_factory(), devices[:2])
    warmup = LearningRateWarmup(0.8, warmup_epochs=1)
    warmup.set_model(parallel)
    warmup.params = {"steps": 10}
    warmup.on_train_begin()
    assert warmup.initial == 0.8  # one process: no warm-up needed from below
    assert warmup.rate_at(0, 5) == 0.8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_learning_rate": 0.0}, "target_learning_rate=0.0"),
        ({"target_learning_rate": 0.1, "warmup_epochs": -1}, "warmup_epochs=-1"),
    ],
)
def test_warmup_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LearningRateWarmup(**kwargs)


def test_gpu_monitor_adds_readings_or_says_why(mlp_factory, classification_data):
    x, y = classification_data
    model = mlp_factory()
    model.compile(
        optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    monitor = GPUMonitor()
    history = model.fit(x, y, epochs=1, verbose=0, callbacks=[monitor])
    gpu_keys = [k for k in history.history if k.startswith("gpu")]
    if monitor.reason is None:
        assert "gpu0_memory_used_mib" in gpu_keys
    else:
        assert gpu_keys == [] and "NVML" in monitor.reason
