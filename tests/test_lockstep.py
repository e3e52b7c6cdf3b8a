"""Lockstep in one process: where the chief's checkpoints write, as the other processes
predict it; the model's progress. Stopping together and positions per step are tested
under real launchers in tests/test_processes.py."""

import keras
import numpy as np
import pytest

import replicate
from replicate.lockstep import ChiefWriters, Progress


@pytest.mark.parametrize("save_freq, steps_per_execution", [(3, 1), (4, 2), (2, 3)])
def test_chief_writers_predict_model_checkpoint(
    save_freq, steps_per_execution, tmp_path, mlp_factory, classification_data
):
    x, y = classification_data  # 61 samples: 8 batches of 8 per epoch
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "e{epoch}-b{batch}.weights.h5"),
        save_weights_only=True,
        save_freq=save_freq,
    )
    predicted, writers = [], ChiefWriters([checkpoint])

    class Predict(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if writers.at_batch_end(batch):
                predicted.append(f"e{self.epoch + 1}-b{batch + 1}.weights.h5")

    model = mlp_factory()
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=steps_per_execution)
    model.fit(x, np.eye(3)[y], batch_size=8, epochs=3, verbose=0, callbacks=[checkpoint, Predict()])
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written and sorted(predicted) == written
    assert not ChiefWriters([checkpoint]).every_epoch
    assert ChiefWriters([keras.callbacks.ModelCheckpoint(str(tmp_path / "m.keras"))]).every_epoch


def test_progress_of_a_replicated_model(devices, mlp_factory, classification_data):
    parallel = replicate.replicate(mlp_factory(), devices[:2])
    assert isinstance(parallel.progress, Progress) and not parallel.progress.fitting
    with parallel.progress.in_fit():
        assert parallel.progress.fitting
    assert not parallel.progress.fitting
