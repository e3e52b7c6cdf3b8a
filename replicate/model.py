"""ReplicatedModel: a Keras model whose train/test/predict steps run on towers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

from replicate import (
    _keras_compat,
    building,
    checking,
    merge,
    migration,
    processes,
    reduce,
    results,
    steps,
    writers,
)
from replicate.backends import Backend, get_backend
from replicate.builder import ReplicaBuilder
from replicate.devices import process_devices
from replicate.lockstep import Progress


class ReplicatedModel(keras.Model):
    """A Keras model that splits every batch over towers on several devices.

    Made by `replicate.replicate(model)`. `compile`, `fit`, `evaluate`,
    `predict` and callbacks behave as for the wrapped model; `template` is the
    wrapped model itself (its variables are this model's variables). The
    template is what gets compiled (it holds the optimizer, the loss and the
    metrics), and `save`/`save_weights`/`load_weights` act on it, so that
    checkpoints hold an ordinary compiled model with nothing tower-specific.

    A template that overrides `train_step`, `test_step` or `predict_step` has
    its own step run once per tower (`replicate.steps`); otherwise the loss
    (`compute_loss`, overridable) is computed once on the merged outputs of
    all towers, and the metrics (`compute_metrics`, `metrics`) once on them.
    """

    def __init__(
        self,
        template: keras.Model | Callable[[], keras.Model],
        devices: Sequence[str] | None = None,
        *,
        variable_device: str = "/cpu:0",
        backend: str | Backend = "local",
        check: bool | str = True,
        **backend_options: Any,
    ) -> None:
        if check not in checking.CHECKS:
            raise ValueError(f"`check` must be True, False or 'strict'. Received: check={check!r}")
        distribution = get_backend(backend, **backend_options)
        if devices is None:
            devices = process_devices(distribution.local_rank, distribution.local_size)
        builder = ReplicaBuilder(
            template,
            devices,
            variable_device=variable_device,
            backend=distribution,
            require_weights=False,  # built from the first batch (replicate.building)
        )
        super().__init__(name=f"replicated_{builder.model.name}")
        self.template = builder.model
        self._builder = builder
        self._backend = distribution
        self.skip_batches = 0
        self.check = check  # the automatic check at the first fit (replicate.check)
        self.progress = Progress()
        self.built = True
        if getattr(self.template, "compiled", False):
            self._adopt_compile()

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
        """The process backend ("local", "horovod" or "collective")."""
        return self._backend

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        """The template's metrics: loss tracker, compiled metrics, its own trackers."""
        return self.template.metrics

    # -- compile: the template's own ------------------------------------------

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Compiles the template with its own `compile`; `jit_compile` means XLA per tower.

        Whatever the template's `compile` accepts goes to it (a GAN's
        `compile(d_optimizer, g_optimizer, loss_fn)` included), so the
        template holds the optimizer, loss and metrics, and its saves hold
        them too.

        `jit_compile=True` compiles each tower's forward and backward pass with
        XLA, one computation per device; the merge and the optimizer update
        run outside XLA, so that the towers keep their devices. Keras' own
        whole-step XLA would drop the placement, so it is never used here.
        Defaults to `False` (`"auto"` also means `False`).

        Raises:
            ValueError: For a `jit_compile` other than `True`, `False` or
                `"auto"`, or `True` with synchronized BatchNormalization.
            TypeError: For an optimizer wrapped by Horovod's
                `DistributedOptimizer` (see `replicate.migration`).
            RuntimeError: Inside a `tf.distribute` strategy scope.
        """
        migration.refuse(self.template, (args, kwargs))
        jit_compile = kwargs.pop("jit_compile", False)
        if jit_compile not in (True, False, "auto"):
            raise ValueError(
                "`jit_compile` must be True (XLA per tower), False or 'auto' (False). "
                f"Received: jit_compile={jit_compile!r}"
            )
        self._builder.jit_compile = jit_compile is True
        self.template.compile(*args, **kwargs)
        self._adopt_compile()

    def _adopt_compile(self) -> None:
        """Takes the compiled template's optimizer and settings as this model's own."""
        template = self.template
        optimizer = getattr(template, "optimizer", None)
        keras.Model.compile(
            self,
            optimizer=optimizer,
            loss=None,
            run_eagerly=template.run_eagerly,
            steps_per_execution=template.steps_per_execution,
            jit_compile=False,
            auto_scale_loss=False,
        )
        if optimizer is not None and not optimizer.built and template.variables:
            with tf.device(self.variable_device):
                optimizer.build(template.trainable_variables)

    # -- the steps --------------------------------------------------------------

    def call(self, inputs: Any, training: bool = False) -> Any:
        return self._builder.call(inputs, training=bool(training))

    def compute_output_spec(self, inputs: Any, training: bool = False) -> Any:
        with tf.device(self.variable_device):  # where a template still unbuilt is built
            return self.template.compute_output_spec(inputs)

    def share(self, count: tf.Tensor) -> tf.Tensor | None:
        """This process's share of the global batch; `None` for one process."""
        return None if self._backend.size == 1 else self._backend.share(count)

    def train_step(self, data: Any) -> Any:
        if steps.overridden(self.template, "train_step"):
            return steps.run(self, "train_step", data)
        template = self.template
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        optimizer = template.optimizer
        count = reduce.batch_size(x)
        # Synchronized layers make each process's loss depend on the others'
        # samples: scale it by the process's share before backpropagating, so
        # that summing over processes is exact. Otherwise the share is folded
        # into the step's one collective (`Backend.exchange`).
        share = self.share(count) if self._builder.synchronized else None

        def loss_of(y_pred, model_loss):
            return merge.batch_loss(
                template, x, y, y_pred, sample_weight, model_loss, training=True
            )

        step = self._builder.train_pass(
            x, loss_of, scale=optimizer.scale_loss if optimizer else None, share=share
        )
        with tf.device(self.variable_device):
            _keras_compat.loss_tracker(template).update_state(step.loss, sample_weight=count)
            # Metrics use this step's predictions: update them before the
            # exchange, so that one collective carries gradients and metrics.
            logs = template.compute_metrics(x, y, step.outputs, sample_weight=sample_weight)
            grads, logs = results.exchange(
                self._backend, self.template, count, step.grads, logs, shares=share is not None
            )
            if template.trainable_weights:
                optimizer.apply_gradients(zip(grads, template.trainable_weights))
            return logs

    def test_step(self, data: Any) -> Any:
        if steps.overridden(self.template, "test_step"):
            return steps.run(self, "test_step", data)
        template = self.template
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred, model_loss = self._builder.evaluate_pass(x, processes=True)
        with tf.device(self.variable_device):
            loss = merge.batch_loss(
                template, x, y, y_pred, sample_weight, model_loss, training=False
            )
            count = reduce.batch_size(x)
            _keras_compat.loss_tracker(template).update_state(loss, sample_weight=count)
            logs = template.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
            return results.exchange(self._backend, template, count, (), logs)[1]

    def predict_step(self, data: Any) -> Any:
        if steps.overridden(self.template, "predict_step"):
            return steps.run(self, "predict_step", data)
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self._builder.call(x)

    def make_train_function(self, force: bool = False) -> Any:
        if self.train_function is None or force:
            super().make_train_function(force=True)
            self.train_function = processes.step_function(self, self.train_function, skip=True)
        return self.train_function

    def make_test_function(self, force: bool = False) -> Any:
        if self.test_function is None or force:
            super().make_test_function(force=True)
            self.test_function = processes.step_function(self, self.test_function, skip=False)
        return self.test_function

    def make_predict_function(self, force: bool = False) -> Any:
        if self.predict_function is None or force:
            super().make_predict_function(force=True)
            self.predict_function = processes.step_function(self, self.predict_function, skip=False)
        return self.predict_function

    def combined_results(self, metrics: Sequence[keras.metrics.Metric]) -> list[Any]:
        """Each metric's result over every process's samples (one collective for all).

        See `replicate.results.combined_results`. Works eagerly and inside a step.
        """
        return results.combined_results(metrics, self._backend)

    def get_metrics_result(self) -> dict[str, Any]:
        """The metrics over every process's samples (what Keras shows and records)."""
        if self._backend.size == 1:
            return self.template.get_metrics_result()
        return results.metrics_result(self.metrics, self._backend)

    # -- several processes: one progress bar, one writer, agreed step counts ---

    def fit(self, *args: Any, **kwargs: Any) -> keras.callbacks.History:
        """As `keras.Model.fit`. Across processes, also (`replicate.processes`):

        - the processes agree where they are (here, each epoch and step) and
          on their variables' count, shapes and dtypes, or stop with a
          `DisagreementError` naming each one's position instead of hanging;
        - rank 0's weights and optimizer state are broadcast, by position, so
          every process starts from the same point whatever its random seed;
        - every process runs the same steps (a process with fewer samples gets
          empty batches); `stop_training` on one stops all after the same step;
        - only rank 0 shows progress and runs the callbacks that write files.

        Horovod's Keras callbacks and optimizer wrapper, and a `tf.distribute`
        strategy scope, are refused with what replicate does in their place
        (`replicate.migration`).
        """
        call = processes.bind(keras.Model.fit, self, args, kwargs)
        migration.refuse(self.template, callbacks=call.get("callbacks"))
        building.ensure_weights(self.template, self._builder, call, compiled=True)
        checking.at_first_fit(self, call, self.check)
        self.check = False  # once
        if self._backend.size == 1:
            return super().fit(**call)
        with processes.failures(self._backend), self.progress.in_fit():
            processes.begin_fit(self, call)
            return super().fit(**call)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """As `keras.Model.evaluate`; across processes the results cover every process.

        Every process calls it; on one process alone use `parallel.template.evaluate`.
        """
        call = processes.bind(keras.Model.evaluate, self, args, kwargs)
        building.ensure_weights(self.template, self._builder, call, compiled=True)
        if self._backend.size == 1:
            return super().evaluate(**call)
        with processes.failures(self._backend, during="evaluate"):
            processes.begin_evaluate(self, call)
            return super().evaluate(**call)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """As `keras.Model.predict`, on this process's data; only rank 0 shows progress."""
        call = processes.bind(keras.Model.predict, self, args, kwargs)
        building.ensure_weights(self.template, self._builder, call)
        if not self._backend.is_chief:
            call["verbose"] = 0
        return super().predict(**call)

    # -- saving goes through the template -------------------------------------

    def save(self, filepath: Any, *args: Any, **kwargs: Any) -> None:
        """Saves the compiled template (an ordinary Keras model), on the chief process only.

        The file is written beside its final name and renamed into place, so a
        crash while writing leaves the previous file (a `ModelCheckpoint`) intact.
        Across processes, outside `fit`, every process calls it and the others
        wait for the chief's write (`replicate.writers.on_chief`, which says
        what it raises); inside `fit` (`ModelCheckpoint`) the chief writes alone.
        """
        writers.on_chief(
            self, "save", lambda: writers.atomically(self.template.save, filepath, *args, **kwargs)
        )

    def save_weights(self, filepath: Any, *args: Any, **kwargs: Any) -> None:
        """Saves the template's weights on the chief process only, atomically, as `save`."""
        write = self.template.save_weights
        writers.on_chief(
            self, "save_weights", lambda: writers.atomically(write, filepath, *args, **kwargs)
        )

    def load_weights(self, filepath: Any, *args: Any, **kwargs: Any) -> None:
        """Loads weights saved from the template (or from an unreplicated model)."""
        self.template.load_weights(filepath, *args, **kwargs)

    def get_config(self) -> dict[str, Any]:
        raise NotImplementedError(
            "A ReplicatedModel is not serialised itself; save `model.template` "
            "(what `model.save` does) and replicate it again after loading."
        )


def replicate(
    model: keras.Model | Callable[[], keras.Model],
    devices: Sequence[str] | None = None,
    *,
    variable_device: str = "/cpu:0",
    backend: str | Backend = "local",
    check: bool | str = True,
    **backend_options: Any,
) -> ReplicatedModel:
    """Makes `model` train data-parallel over several devices.

    Args:
        model: A built Keras model (used as is: same object, same weights;
            compiled or not), or a zero-argument function that builds one on
            `variable_device`.
        devices: Tower devices. Defaults to every GPU, else every CPU device
            (see `replicate.simulate_devices`); under a multi-process backend,
            this process's share of its machine's GPUs
            (`replicate.process_devices`).
        variable_device: Where the weights live and the update is applied.
            Defaults to `"/cpu:0"`.
        backend: `"local"` (one process), `"horovod"` (processes launched by
            `horovodrun`) or `"collective"` (TensorFlow's collective runtime,
            processes launched by `replicate launch` or given `TF_CONFIG`).
        check: At the start of the first `fit`, compare a few samples through
            the towers with one device (`replicate.check`) and warn, naming
            the cause, if they differ. `False` turns it off, `"strict"`
            raises `ValueError` instead of warning. Defaults to `True`.
        **backend_options: Options of the backend, e.g. `compression="fp16"`.

    Returns:
        A `ReplicatedModel`; compile and fit it as the original model. A
        compiled `model` (one loaded with `keras.models.load_model`) needs no
        new `compile`: training continues with its optimizer state.

    Raises:
        TypeError: If `model` is not a Keras model.
        ValueError: For missing or repeated devices, an unknown backend or a
            `check` other than True, False or "strict".

    Example:

    ```python
    parallel = replicate.replicate(model)
    parallel.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    parallel.fit(x, y, batch_size=256, epochs=5)
    parallel.save("model.keras")
    ```
    """
    return ReplicatedModel(
        model,
        devices,
        variable_device=variable_device,
        backend=backend,
        check=check,
        **backend_options,
    )
