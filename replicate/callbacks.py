"""Keras callbacks for replicated training: warm-up, replica consistency, GPU telemetry."""

from __future__ import annotations

from typing import Any

import keras

from replicate import telemetry


def _process_count(model: keras.Model) -> int:
    backend = getattr(model, "backend", None)
    return getattr(backend, "size", 1) if backend is not None else 1


def _is_chief(model: keras.Model) -> bool:
    """Whether this process prints: the model's backend says, else the launcher's environment."""
    backend = getattr(model, "backend", None)
    if backend is not None and hasattr(backend, "is_chief"):
        return bool(backend.is_chief)
    from replicate.cluster import is_chief

    return is_chief()


class LearningRateWarmup(keras.callbacks.Callback):
    """Ramps the learning rate up over the first epochs, batch by batch.

    Large global batches (many processes times many towers) train badly if
    they start at the full scaled learning rate. This starts at
    `target / processes` (what one process would use) and reaches `target`
    linearly after `warmup_epochs`, then leaves it alone: Goyal et al.'s
    gradual warm-up, as Horovod's `LearningRateWarmupCallback` does it.

    The first argument is the rate to *reach*, already scaled by the number
    of processes. Horovod's callback calls that rate `initial_lr`, and that
    keyword is accepted here with the same meaning, so a call copied from a
    Horovod script (`initial_lr=0.1 * hvd.size()`) gives the same rates.
    Where the ramp starts is `start_learning_rate`. (The keyword
    `initial_learning_rate`, which earlier versions took for the start, is
    refused with an error: copied from Horovod it meant the target.) One
    difference from Horovod: its ramp runs one batch ahead (its first batch
    is already `1 / steps_per_epoch` of an epoch into the warm-up).

    Args:
        target_learning_rate: The rate to reach, usually the single-process
            rate times the number of processes.
        warmup_epochs: Epochs of warm-up. Defaults to 5.
        initial_lr: Horovod's name for `target_learning_rate`; give one of
            the two.
        start_learning_rate: Where to start. Defaults to
            `target_learning_rate / processes` (processes from the model's
            backend; 1 for an unreplicated model).
        steps_per_epoch: Batches per epoch; read from `fit` when `None`.
        momentum_correction: Must be `False`. Horovod's callback scales the
            momentum during the warm-up by default; a Keras 3 optimizer reads
            its momentum when the step is traced, so this one cannot.
        verbose: 1 prints the rate at the end of warm-up, on the chief
            process only.

    Raises:
        TypeError: If neither or both of `target_learning_rate` and
            `initial_lr` are given (unless equal), or for
            `initial_learning_rate`.
        ValueError: For a non-positive target, a negative start, a negative
            `warmup_epochs`, or `momentum_correction=True`.

    Example:

    ```python
    parallel = replicate.replicate(model, backend="horovod")
    parallel.compile(optimizer=keras.optimizers.SGD(0.1 * processes), ...)
    parallel.fit(x, y, callbacks=[LearningRateWarmup(0.1 * processes, warmup_epochs=3)])
    ```
    """

    def __init__(
        self,
        target_learning_rate: float | None = None,
        warmup_epochs: float = 5,
        *,
        initial_lr: float | None = None,
        start_learning_rate: float | None = None,
        steps_per_epoch: int | None = None,
        momentum_correction: bool = False,
        verbose: int = 0,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if "initial_learning_rate" in unknown:
            raise TypeError(
                "LearningRateWarmup takes no `initial_learning_rate`: the name is ambiguous "
                "(Horovod's `initial_lr` is the rate to reach, after scaling by the number of "
                "processes). Pass the rate to reach as `target_learning_rate` (or `initial_lr`) "
                "and, if the ramp should not start at target / processes, the start as "
                "`start_learning_rate`. Received: "
                f"initial_learning_rate={unknown['initial_learning_rate']!r}"
            )
        if unknown:
            raise TypeError(
                f"LearningRateWarmup got unexpected keyword arguments {sorted(unknown)}. "
                "It takes target_learning_rate (or initial_lr), warmup_epochs, "
                "start_learning_rate, steps_per_epoch, momentum_correction and verbose."
            )
        if target_learning_rate is None and initial_lr is None:
            raise TypeError(
                "LearningRateWarmup needs the rate to reach: `target_learning_rate` (or "
                "Horovod's name for it, `initial_lr`)."
            )
        if (
            target_learning_rate is not None
            and initial_lr is not None
            and target_learning_rate != initial_lr
        ):
            raise TypeError(
                "`initial_lr` is Horovod's name for `target_learning_rate`; give one. "
                f"Received: target_learning_rate={target_learning_rate!r}, "
                f"initial_lr={initial_lr!r}"
            )
        target = target_learning_rate if target_learning_rate is not None else initial_lr
        if not target > 0:
            raise ValueError(
                "`target_learning_rate` must be positive. Received: "
                f"target_learning_rate={target!r}"
            )
        if start_learning_rate is not None and start_learning_rate < 0:
            raise ValueError(
                "`start_learning_rate` must be >= 0. Received: "
                f"start_learning_rate={start_learning_rate!r}"
            )
        if warmup_epochs < 0:
            raise ValueError(
                f"`warmup_epochs` must be >= 0. Received: warmup_epochs={warmup_epochs!r}"
            )
        if momentum_correction:
            raise ValueError(
                "LearningRateWarmup cannot correct momentum during the warm-up (Horovod's "
                "`momentum_correction`): a Keras 3 optimizer reads its momentum when the "
                "training step is traced, so changing it batch by batch has no effect. "
                "Leave it out. Received: momentum_correction=True"
            )
        self.target = float(target)
        self.warmup_epochs = warmup_epochs
        self.steps_per_epoch = steps_per_epoch
        self.initial = start_learning_rate
        self.verbose = verbose
        self._epoch = 0
        self._done = False

    def on_train_begin(self, logs: Any = None) -> None:
        if self.steps_per_epoch is None:
            self.steps_per_epoch = self.params.get("steps") or 1
        if self.initial is None:
            self.initial = self.target / _process_count(self.model)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch

    def rate_at(self, epoch: int, batch: int) -> float:
        """The learning rate for `batch` of `epoch`."""
        if self.warmup_epochs == 0:
            return self.target
        progress = min(1.0, (epoch + batch / self.steps_per_epoch) / self.warmup_epochs)
        return self.initial + (self.target - self.initial) * progress

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self._done:
            return
        rate = self.rate_at(self._epoch, batch)
        self.model.optimizer.learning_rate = rate
        if rate >= self.target:
            self._done = True
            if self.verbose and _is_chief(self.model):
                print(f"\nLearningRateWarmup: reached learning rate {rate:g}")

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if logs is not None:
            logs["learning_rate"] = float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
            )


class GPUMonitor(keras.callbacks.Callback):
    """Adds NVML readings of every GPU to the logs at each epoch's end.

    Keys are `gpu{i}_utilization`, `gpu{i}_memory_used_mib`,
    `gpu{i}_temperature_c` and `gpu{i}_power_w`, so they reach `History`,
    `CSVLogger` and `TensorBoard`. Where NVML is absent, nothing is added and
    `reason` says why.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reason: str | None = None

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if logs is None:
            return
        gpus, self.reason = telemetry.gpu_stats()
        for gpu in gpus:
            readings = {
                "utilization": gpu.utilization_percent,
                "memory_used_mib": gpu.memory_used_mib,
                "temperature_c": gpu.temperature_c,
                "power_w": gpu.power_w,
            }
            for key, value in readings.items():
                if value is not None:
                    logs[f"gpu{gpu.index}_{key}"] = float(value)


class ConsistencyCheck(keras.callbacks.Callback):
    """Stops training when a process's weights drift from the chief's.

    Every `every_n_batches` batches each process computes a checksum of its
    weights (and its optimizers' state); one small all-reduce gives every
    process everyone's checksums, and if any differs from process 0's, every
    process stops with an error naming the processes that differ. Replicas
    apply identical updates, so their checksums are equal bit for bit; a
    difference means silent desynchronization (a bad host, a callback that
    changed one process's weights). With one process it does nothing.

    Args:
        every_n_batches: How often to compare. Defaults to 100.
        include_optimizer: Compare the optimizers' state too. Defaults to True.

    Raises:
        ValueError: If `every_n_batches` is not a positive integer.

    Example:

    ```python
    parallel.fit(x, y, callbacks=[replicate.callbacks.ConsistencyCheck(every_n_batches=100)])
    ```
    """

    def __init__(self, every_n_batches: int = 100, *, include_optimizer: bool = True) -> None:
        super().__init__()
        if (
            isinstance(every_n_batches, bool)
            or not isinstance(every_n_batches, int)
            or (every_n_batches < 1)
        ):
            raise ValueError(
                "`every_n_batches` must be a positive integer. Received: "
                f"every_n_batches={every_n_batches!r}"
            )
        self.every_n_batches = every_n_batches
        self.include_optimizer = include_optimizer
        self._batches = 0
        self._epoch = 0
        self._checksum = None
        self._traced_for: list[int] = []

    def _variables(self) -> list[Any]:
        from replicate.steps import optimizers

        template = getattr(self.model, "template", self.model)
        variables = list(template.variables)
        if self.include_optimizer:
            for optimizer in optimizers(template):
                variables += list(optimizer.variables)
        return [getattr(v, "value", v) for v in variables]

    def on_train_begin(self, logs: Any = None) -> None:
        import tensorflow as tf

        variables = self._variables()
        if self._checksum is not None and self._traced_for == [id(v) for v in variables]:
            return  # the same model: keep the traced checksum
        self._traced_for = [id(v) for v in variables]

        @tf.function
        def checksum():
            # Position-weighted sums, in float64: equal only for equal weights
            # (up to contrived coincidences).
            total = tf.zeros((2,), tf.float64)
            for i, v in enumerate(variables):
                x = tf.reshape(tf.cast(v, tf.float64), [-1])
                ramp = tf.cast(tf.range(tf.size(x)) % 7 + 1, tf.float64)
                total += float(i + 1) * tf.stack([tf.reduce_sum(x), tf.reduce_sum(x * ramp)])
            return total

        self._checksum = checksum

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self._batches += 1
        backend = getattr(self.model, "backend", None)
        if backend is None or backend.size == 1 or self._batches % self.every_n_batches:
            return
        import tensorflow as tf

        mine = self._checksum()
        table = tf.scatter_nd([[backend.rank]], mine[None], (backend.size, 2))
        table = backend.all_sum([table])[0].numpy()
        differ = [r for r in range(backend.size) if not (table[r] == table[0]).all()]
        if differ:
            named = "; ".join(
                f"process {r} of {backend.size}: weights differ from process 0 (checksum "
                f"{table[r][1]:.17g} vs {table[0][1]:.17g})"
                for r in differ
            )
            raise RuntimeError(
                f"replicate.callbacks.ConsistencyCheck at batch {batch + 1} of epoch "
                f"{self._epoch + 1}: {named}. Replicas must apply identical updates; "
                "look for code that changes one process's weights (a callback, a custom "
                "step that branches on the rank) or a faulty host."
            )
