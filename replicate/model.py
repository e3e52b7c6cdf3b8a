"""ReplicatedModel: a Keras model whose train/test/predict steps run on towers."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from replicate import reduce
from replicate.backends import Backend, get_backend
from replicate.builder import ReplicaBuilder
from replicate.data import ProcessBatches, agree_on_steps

# Reductions under which a tower's loss is the mean over its slice, so that
# weighting towers by slice size gives the loss of the whole batch.
_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", None)


class ReplicatedModel(keras.Model):
    """A Keras model that splits every batch over towers on several devices.

    Made by `replicate.replicate(model)`. `compile`, `fit`, `evaluate`,
    `predict` and callbacks behave as for the wrapped model; `template` is the
    wrapped model itself (its variables are this model's variables), and
    `save`/`save_weights`/`load_weights` act on it, so that checkpoints hold an
    ordinary model with nothing tower-specific.
    """

    def __init__(
        self,
        template: keras.Model | Callable[[], keras.Model],
        devices: Sequence[str] | None = None,
        *,
        variable_device: str = "/cpu:0",
        backend: str | Backend = "local",
        **backend_options: Any,
    ) -> None:
        builder = ReplicaBuilder(template, devices, variable_device=variable_device)
        distribution = get_backend(backend, **backend_options)
        super().__init__(name=f"replicated_{builder.model.name}")
        self.template = builder.model
        self._builder = builder
        self._backend = distribution
        self.built = True

    # -- what users read -----------------------------------------------------

    @property
    def devices(self) -> list[str]:
        """The tower devices, in order."""
        return list(self._builder.devices)

    @property
    def variable_device(self) -> str:
        """The device that holds the weights and applies the update."""
        return self._builder.variable_device

    @property
    def builder(self) -> ReplicaBuilder:
        """The `ReplicaBuilder` behind the steps."""
        return self._builder

    @property
    def backend(self) -> Backend:
        """The process backend ("local" or "horovod")."""
        return self._backend

    # -- Keras hooks -----------------------------------------------------------

    def compile(
        self, optimizer: Any = "rmsprop", loss: Any = None, *args: Any, **kwargs: Any
    ) -> None:
        """As `keras.Model.compile`, with `jit_compile` meaning XLA per tower.

        `jit_compile=True` compiles each tower's forward and backward pass with
        XLA, one computation per device; the merge and the optimizer update
        run outside XLA, so that the towers keep their devices. Keras' own
        whole-step XLA would drop the placement, so it is never used here.
        Defaults to `False` (`"auto"` also means `False`).

        Raises:
            ValueError: For a `jit_compile` other than `True`, `False` or
                `"auto"`, or for a loss whose reduction is not a mean over the
                batch.
        """
        jit_compile = kwargs.pop("jit_compile", False)
        if jit_compile not in (True, False, "auto"):
            raise ValueError(
                "`jit_compile` must be True (XLA per tower), False or 'auto' (False). "
                f"Received: jit_compile={jit_compile!r}"
            )
        for item in tf.nest.flatten(loss):
            reduction = getattr(item, "reduction", None)
            if reduction not in _MEAN_REDUCTIONS:
                raise ValueError(
                    "Replicated training averages the towers' losses weighted by "
                    "slice size, which equals the whole batch's loss only for a "
                    "mean over the batch. Received a loss with "
                    f"reduction={reduction!r} ({item!r}). Use "
                    "reduction='sum_over_batch_size' (the Keras default)."
                )
        self._builder.jit_compile = jit_compile is True
        super().compile(optimizer, loss, *args, jit_compile=False, **kwargs)
        with tf.device(self.variable_device):
            self.optimizer.build(self.template.trainable_variables)

    def call(self, inputs: Any, training: bool = False) -> Any:
        return self._builder.call(inputs, training=bool(training))

    def compute_output_spec(self, inputs: Any, training: bool = False) -> Any:
        return self.template.compute_output_spec(inputs)

    def _tower_loss(self, y: Any, y_pred: Any, sample_weight: Any = None) -> tf.Tensor:
        loss = self._compile_loss(y, y_pred, sample_weight) if self._compile_loss else None
        if loss is None:
            loss = tf.zeros((), dtype=keras.config.floatx())
        return loss

    def _loss_trackers(self) -> list[Any]:
        """The variables of Keras' per-output loss trackers (multi-output models)."""
        metrics = getattr(self._compile_loss, "metrics", None) or []
        return [v for m in metrics for v in m.variables]

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        step = self._builder._step(
            x,
            training=True,
            loss_fn=self._tower_loss,
            y=y,
            sample_weight=sample_weight,
            scale_loss=self.optimizer.scale_loss,
            loss_state=self._loss_trackers(),
        )
        count = reduce.batch_size(x)
        variables = self.template.trainable_variables
        with tf.device(self.variable_device):
            grads = self._backend.reduce_gradients(step.grads, count)
            self.optimizer.apply_gradients(zip(grads, variables))
        return self._update_metrics(x, y, step.outputs, sample_weight, step.loss, count)

    def test_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        step = self._builder._step(
            x,
            training=False,
            loss_fn=self._tower_loss,
            y=y,
            sample_weight=sample_weight,
            gradients=False,
            loss_state=self._loss_trackers(),
        )
        count = reduce.batch_size(x)
        return self._update_metrics(x, y, step.outputs, sample_weight, step.loss, count)

    def _update_metrics(self, x, y, y_pred, sample_weight, loss, count) -> dict[str, Any]:
        with tf.device(self.variable_device):
            self._loss_tracker.update_state(loss, sample_weight=count)
            return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def get_metrics_result(self) -> dict[str, Any]:
        """The metrics over every process's samples (what Keras shows and records).

        Across processes, each metric's state (totals and counts) is combined
        first, then the result is computed from it: a loss averaged over 100
        samples on one process and 90 on another is the mean over all 190.
        """
        if self._backend.size == 1:
            return super().get_metrics_result()
        results: dict[str, Any] = {}
        for metric in self.metrics:
            variables = metric.variables
            state = self._backend.reduce_state(
                [v.value for v in variables], [v.aggregation for v in variables]
            )
            result = metric.stateless_result(state)
            if isinstance(result, dict):
                results.update(result)
            else:
                results[metric.name] = result
        if tf.executing_eagerly():
            results = {
                k: float(v) if np.ndim(v) == 0 else np.asarray(v) for k, v in results.items()
            }
        return results

    # -- several processes: one progress bar, one writer, agreed step counts ---

    def fit(self, *args: Any, **kwargs: Any) -> keras.callbacks.History:
        """As `keras.Model.fit`. Across processes (Horovod), also:

        - rank 0's weights and optimizer state are broadcast first, so every
          process starts from the same point whatever its random seed;
        - numpy data is batched so that every process runs the same number
          of steps (a process with fewer samples gets empty batches);
        - only rank 0 shows the progress bar and runs the callbacks that
          write files (`ModelCheckpoint`, `TensorBoard`, `CSVLogger`).
        """
        call = _bind(keras.Model.fit, self, args, kwargs)
        if self._backend.size == 1:
            return super().fit(**call)
        self._broadcast_state()
        self._distribute_call(call, training=True)
        try:
            return super().fit(**call)
        except Exception as error:
            message = self._backend.describe_failure(error)
            if message is None:
                raise
            raise RuntimeError(message) from error

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """As `keras.Model.evaluate`; across processes the results are averaged."""
        call = _bind(keras.Model.evaluate, self, args, kwargs)
        # Inside fit, Keras evaluates the validation data it already prepared.
        if self._backend.size > 1 and not call.get("_use_cached_eval_dataset"):
            self._distribute_call(call, training=False)
        return super().evaluate(**call)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """As `keras.Model.predict`, on this process's data; only rank 0 shows progress."""
        call = _bind(keras.Model.predict, self, args, kwargs)
        if not self._backend.is_chief:
            call["verbose"] = 0
        return super().predict(**call)

    def _broadcast_state(self) -> None:
        variables = list(self.template.variables)
        if self.optimizer is not None:
            variables += list(self.optimizer.variables)
        self._backend.broadcast_variables(variables, root_rank=0)

    def _distribute_call(self, call: dict[str, Any], *, training: bool) -> None:
        backend = self._backend
        if not backend.is_chief:
            call["verbose"] = 0
            call["callbacks"] = [
                c for c in call.get("callbacks") or [] if not isinstance(c, _CHIEF_ONLY)
            ]
        x = call.get("x")
        if isinstance(x, tf.data.Dataset):
            call["x"] = agree_on_steps(x, backend)
            if training and isinstance(call.get("validation_data"), tf.data.Dataset):
                call["validation_data"] = agree_on_steps(call["validation_data"], backend)
            return
        if not _is_array_data(x):
            return
        batch_size = call.get("batch_size") or 32
        y, weights = call.get("y"), call.get("sample_weight")
        split = call.pop("validation_split", 0.0) if training else 0.0
        if split:
            n = len(tf.nest.flatten(x)[0])
            cut = int(n * (1.0 - split))

            def head(a):
                return tf.nest.map_structure(lambda v: None if v is None else v[:cut], a)

            def tail(a):
                return tf.nest.map_structure(lambda v: None if v is None else v[cut:], a)

            call["validation_data"] = ProcessBatches(
                tail(x), tail(y), tail(weights), batch_size=batch_size, backend=backend
            )
            x, y, weights = head(x), head(y), head(weights)
        elif training and isinstance(call.get("validation_data"), tuple):
            call["validation_data"] = ProcessBatches(
                *call["validation_data"], batch_size=batch_size, backend=backend
            )
        call["x"] = ProcessBatches(
            x,
            y,
            weights,
            batch_size=batch_size,
            backend=backend,
            shuffle=bool(call.get("shuffle", False)) and training,
        )
        call["y"] = call["sample_weight"] = call["batch_size"] = None

    # -- saving goes through the template -------------------------------------

    def save(self, filepath: Any, *args: Any, **kwargs: Any) -> None:
        """Saves the template model (an ordinary Keras model) on the chief process only."""
        if self._backend.is_chief:
            self.template.save(filepath, *args, **kwargs)

    def save_weights(self, filepath: Any, *args: Any, **kwargs: Any) -> None:
        """Saves the template's weights on the chief process only."""
        if self._backend.is_chief:
            self.template.save_weights(filepath, *args, **kwargs)

    def load_weights(self, filepath: Any, *args: Any, **kwargs: Any) -> None:
        """Loads weights saved from the template (or from an unreplicated model)."""
        self.template.load_weights(filepath, *args, **kwargs)

    def get_config(self) -> dict[str, Any]:
        raise NotImplementedError(
            "A ReplicatedModel is not serialised itself; save `model.template` "
            "(what `model.save` does) and replicate it again after loading."
        )


_CHIEF_ONLY = (
    keras.callbacks.ModelCheckpoint,
    keras.callbacks.TensorBoard,
    keras.callbacks.CSVLogger,
)


def _bind(method: Callable[..., Any], model: keras.Model, args: tuple, kwargs: dict) -> dict:
    bound = inspect.signature(method).bind(model, *args, **kwargs)
    bound.apply_defaults()
    call = dict(bound.arguments)
    call.pop("self")
    call.update(call.pop("kwargs", {}))
    return call


def _is_array_data(x: Any) -> bool:
    leaves = tf.nest.flatten(x)
    return bool(leaves) and all(isinstance(v, np.ndarray) for v in leaves)


def replicate(
    model: keras.Model | Callable[[], keras.Model],
    devices: Sequence[str] | None = None,
    *,
    variable_device: str = "/cpu:0",
    backend: str | Backend = "local",
    **backend_options: Any,
) -> ReplicatedModel:
    """Makes `model` train data-parallel over several devices.

    Args:
        model: A built Keras model (used as is: same object, same weights), or
            a zero-argument function that builds one on `variable_device`.
        devices: Tower devices. Defaults to every GPU, else every CPU device
            (see `replicate.simulate_devices`).
        variable_device: Where the weights live and the update is applied.
            Defaults to `"/cpu:0"`.
        backend: `"local"` (one process) or `"horovod"` (processes launched
            by `horovodrun`).
        **backend_options: Options of the backend, e.g. `compression="fp16"`
            for Horovod.

    Returns:
        A `ReplicatedModel`; compile and fit it as the original model.

    Raises:
        TypeError: If `model` is not a Keras model.
        ValueError: For missing or repeated devices, or an unknown backend.

    Example:

    ```python
    parallel = replicate.replicate(model)
    parallel.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    parallel.fit(x, y, batch_size=256, epochs=5)
    parallel.template.save("model.keras")
    ```
    """
    return ReplicatedModel(
        model, devices, variable_device=variable_device, backend=backend, **backend_options
    )
