"""Crash-safe `BackupAndRestore` across processes.

Keras' own `BackupAndRestore` assumes one process: under several, every
process writes and deletes the same folder. `process_aware_callbacks` puts a
`ProcessBackup` in its place when `fit` runs across processes (one process
keeps Keras' own, unchanged):

- only the chief writes, and atomically: each backup is a complete folder
  (weights, every optimizer's state, the epoch and the batches done in it),
  and `latest.json` is switched to it by an atomic rename, so a crash while
  writing leaves the previous backup in force;
- at the start of `fit` the chief reads the latest backup and broadcasts it:
  every process restores the same weights, optimizer state, epoch and batch,
  whether or not it can see the chief's disk;
- with `save_freq` a number of batches, training resumes after the last batch
  saved, not at the start of its epoch;
- the folder is removed at the end only after every process has finished.

While the chief writes a backup, its watchdog does not count the time, and
the other processes, which know when it writes, wait for it without a limit
(`replicate.watchdog`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from replicate import _keras_compat
from replicate.backends.agreement import Position

LATEST = "latest.json"


def process_aware_callbacks(callbacks: Any, backend: Any) -> list[Any]:
    """`callbacks` with each Keras `BackupAndRestore` replaced by a `ProcessBackup`."""
    out = []
    for callback in callbacks or []:
        if isinstance(callback, keras.callbacks.BackupAndRestore):
            callback = ProcessBackup(
                callback.backup_dir,
                save_freq=callback.save_freq,
                delete_checkpoint=callback.delete_checkpoint,
                backend=backend,
            )
        out.append(callback)
    return out


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class ProcessBackup(keras.callbacks.Callback):
    """`BackupAndRestore` for a `ReplicatedModel` across processes.

    Args:
        backup_dir: The folder of backups (on the chief's disk).
        save_freq: `"epoch"`, or a number of batches.
        delete_checkpoint: Remove the folder when training ends normally.
        backend: The model's process backend.
    """

    def __init__(
        self,
        backup_dir: str | os.PathLike,
        *,
        save_freq: str | int = "epoch",
        delete_checkpoint: bool = True,
        backend: Any,
    ) -> None:
        super().__init__()
        if save_freq != "epoch" and not (isinstance(save_freq, int) and save_freq > 0):
            raise ValueError(
                "`save_freq` must be 'epoch' or a positive number of batches. "
                f"Received: save_freq={save_freq!r}"
            )
        self.backup_dir = Path(backup_dir)
        self.save_freq = save_freq
        self.delete_checkpoint = delete_checkpoint
        self.backend = backend
        self._epoch = 0
        self._batches = 0
        self._since_save = 0

    # -- what is saved ---------------------------------------------------------

    def _variables(self) -> list[Any]:
        from replicate.steps import optimizers

        template = self.model.template
        variables = list(template.variables)
        for optimizer in optimizers(template):
            variables += list(optimizer.variables)
        return variables

    def _save(self, epoch: int, batches: int) -> None:
        if not self.backend.is_chief:
            self.backend.watchdog.expect_writer()  # the chief writes now; wait for it calmly
            return
        with self.backend.watchdog.writing():
            self._write(epoch, batches)

    def _write(self, epoch: int, batches: int) -> None:
        steps = self.params.get("steps")
        if steps and batches >= steps:
            epoch, batches = epoch + 1, 0
        self.backup_dir.mkdir(parents=True, exist_ok=True)
        variables = self._variables()
        name = f"state-{epoch:05d}-{batches:07d}-{time.time_ns()}"
        staging = self.backup_dir / f".{name}.partial"
        staging.mkdir()
        values = {
            f"v{i}": np.asarray(keras.ops.convert_to_numpy(v)) for i, v in enumerate(variables)
        }
        with open(staging / "variables.npz", "wb") as f:
            np.savez(f, **values)
            f.flush()
            os.fsync(f.fileno())
        metadata = {
            "epoch": epoch,
            "batches": batches,
            "variables": [v.path for v in variables],
        }
        _write_file(staging / "training_metadata.json", json.dumps(metadata).encode())
        os.rename(staging, self.backup_dir / name)
        pointer = self.backup_dir / f".{LATEST}.partial"
        _write_file(pointer, json.dumps({"state": name}).encode())
        os.replace(pointer, self.backup_dir / LATEST)  # the switch: atomic
        for old in self.backup_dir.iterdir():
            if old.name != name and old.name.startswith(("state-", ".state-")):
                shutil.rmtree(old, ignore_errors=True)

    def _load(self) -> tuple[list[np.ndarray], int, int] | None:
        pointer = self.backup_dir / LATEST
        if not pointer.exists():
            return None
        state = self.backup_dir / json.loads(pointer.read_text())["state"]
        metadata = json.loads((state / "training_metadata.json").read_text())
        variables = self._variables()
        with np.load(state / "variables.npz") as f:
            values = [f[f"v{i}"] for i in range(len(f.files))]
        shapes = [tuple(v.shape) for v in variables]
        if len(values) != len(variables) or [a.shape for a in values] != shapes:
            raise ValueError(
                f"The backup in {str(self.backup_dir)!r} was written for another model "
                f"({len(values)} variables; this model and its optimizer have "
                f"{len(variables)}). Remove the folder to start afresh, or pass another "
                "`backup_dir`."
            )
        return values, int(metadata["epoch"]), int(metadata["batches"])

    # -- Keras hooks -------------------------------------------------------------

    def on_train_begin(self, logs: Any = None) -> None:
        template = self.model.template
        for optimizer in [o for o in [template.optimizer] if o is not None]:
            if not optimizer.built:
                optimizer.build(template.trainable_variables)
        found = self._load() if self.backend.is_chief else None
        header = [1.0, float(found[1]), float(found[2])] if found else [0.0, 0.0, 0.0]
        header = self.backend.all_sum([tf.constant(header, tf.float64)])[0].numpy()
        if not header[0]:
            return
        variables = self._variables()
        if found:
            for variable, value in zip(variables, found[0]):
                variable.assign(value)
        self.backend.broadcast_variables(variables, root_rank=0)
        epoch, batches = int(header[1]), int(header[2])
        _keras_compat.set_initial_epoch(self.model, epoch)
        self.model.skip_batches = batches

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch
        self._batches = 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        added = batch + 1 - self._batches  # steps_per_execution batches at a time
        self._batches = batch + 1
        if self.save_freq == "epoch":
            return
        self._since_save += added
        if self._since_save >= self.save_freq:
            self._since_save = 0
            self._save(self._epoch, self._batches)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.save_freq == "epoch":
            self._save(epoch + 1, 0)

    def on_train_end(self, logs: Any = None) -> None:
        _keras_compat.set_initial_epoch(self.model, None)
        # Every process has finished (and is at the same point).
        self.backend.agreement.meet(Position("fit_end", self.model.progress.trained))
        if self.delete_checkpoint and self.backend.is_chief and self.backup_dir.exists():
            shutil.rmtree(self.backup_dir)
