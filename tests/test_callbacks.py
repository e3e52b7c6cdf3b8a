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
        ({"initial_lr": -1.0}, "target_learning_rate=-1.0"),
        ({"target_learning_rate": 0.1, "warmup_epochs": -1}, "warmup_epochs=-1"),
        ({"target_learning_rate": 0.1, "start_learning_rate": -0.1}, "start_learning_rate=-0.1"),
        (
            {"initial_lr": 0.1, "momentum_correction": True},
            r"cannot correct momentum .*Received: momentum_correction=True",
        ),
    ],
)
def test_warmup_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LearningRateWarmup(**kwargs)


def test_warmup_takes_horovods_initial_lr_as_the_rate_to_reach(mlp_factory, devices):
    parallel = replicate.replicate(mlp_factory(), devices[:2])
    horovod_style = LearningRateWarmup(initial_lr=0.8, warmup_epochs=2, verbose=1)
    assert horovod_style.target == LearningRateWarmup(0.8, 2).target == 0.8
    horovod_style.set_model(parallel)
    horovod_style.params = {"steps": 4}
    horovod_style.on_train_begin()
    # Horovod's multiplier at batch b of epoch e, one process (size 1): 1, whatever e and b.
    assert [horovod_style.rate_at(0, b) for b in range(4)] == [0.8] * 4
    # The same target under either name is accepted; two different targets are not.
    assert LearningRateWarmup(0.3, initial_lr=0.3).target == 0.3
    with pytest.raises(TypeError, match=r"give one. Received: target_learning_rate=0.3"):
        LearningRateWarmup(0.3, initial_lr=0.6)
    with pytest.raises(TypeError, match=r"needs the rate to reach"):
        LearningRateWarmup(warmup_epochs=3)


def test_warmup_refuses_the_ambiguous_initial_learning_rate():
    with pytest.raises(TypeError) as error:
        LearningRateWarmup(0.4, initial_learning_rate=0.1)
    message = str(error.value)
    assert "takes no `initial_learning_rate`" in message
    assert "Horovod's `initial_lr` is the rate to reach" in message
    assert "`start_learning_rate`" in message
    assert message.endswith("Received: initial_learning_rate=0.1")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['lr'\]"):
        LearningRateWarmup(0.4, lr=0.1)


def test_warmup_prints_on_the_chief_only(mlp_factory, classification_data, devices, capsys):
    x, y = classification_data
    parallel = replicate.replicate(mlp_factory(), devices[:2])
    parallel.compile(
        optimizer=keras.optimizers.SGD(0.4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    warmup = LearningRateWarmup(0.4, 1, start_learning_rate=0.1, verbose=1)
    parallel.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[warmup])
    assert "LearningRateWarmup: reached learning rate 0.4" in capsys.readouterr().out
    # A process that is not the chief (here: told so by the launcher's environment,
    # for an unreplicated model) stays silent.
    model = mlp_factory()
    model.compile(
        optimizer=keras.optimizers.SGD(0.4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RANK", "1")
        env.setenv("WORLD_SIZE", "2")
        warmup = LearningRateWarmup(0.4, 1, start_learning_rate=0.1, verbose=1)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[warmup])
    assert "LearningRateWarmup" not in capsys.readouterr().out


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
