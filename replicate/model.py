"""ReplicatedModel: a Keras model whose train/test/predict steps run on towers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

from replicate import _keras_compat, processes, reduce, results, steps, writers
from replicate.backends import Backend, get_backend
from replicate.backends.agreement import Position
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
        **backend_options: Any,
    ) -> None:
        distribution = get_backend(backend, **backend_options)
        if devices is None:
            devices = process_devices(distribution.local_rank, distribution.local_size)
        builder = ReplicaBuilder(
            template, devices, variable_device=variable_device, backend=distribution
        )
        super().__init__(name=f"replicated_{builder.model.name}")
        self.template = builder.model
        self._builder = builder
        self._backend = distribution
        self.skip_batches = 0
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
        """
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
        if optimizer is not None and not optimizer.built:
            with tf.device(self.variable_device):
                optimizer.build(template.trainable_variables)

    # -- the steps --------------------------------------------------------------

    def call(self, inputs: Any, training: bool = False) -> Any:
        return self._builder.call(inputs, training=bool(training))

    def compute_output_spec(self, inputs: Any, training: bool = False) -> Any:
        return self.template.compute_output_spec(inputs)

    def share(self, count: tf.Tensor) -> tf.Tensor | None:
        """This process's share of the global batch; `None` for one process."""
        return None if self._backend.size == 1 else self._backend.share(count)

    def _batch_loss(self, x, y, y_pred, sample_weight, model_loss, training) -> tf.Tensor:
        """The template's `compute_loss` on the whole batch, its own losses included."""
        template = self.template
        if model_loss is None:
            if _keras_compat.compiled_loss(template) is None and not steps.overridden(
                template, "compute_loss"
            ):
                raise ValueError("No loss to compute. Provide a `loss` argument in `compile()`.")
            model_loss = tf.zeros((), keras.config.floatx())
        # `model.losses` inside compute_loss: the towers' losses, combined.
        return _keras_compat.compute_loss(
            template,
            x=x,
            y=y,
            y_pred=y_pred,
            sample_weight=sample_weight,
            training=training,
            losses=[model_loss],
        )

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
            return self._batch_loss(x, y, y_pred, sample_weight, model_loss, training=True)

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
        y_pred, model_loss = self._builder.evaluate_pass(x)
        with tf.device(self.variable_device):
            loss = self._batch_loss(x, y, y_pred, sample_weight, model_loss, training=False)
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
            self.train_function = self._marked(self.train_function, skip=True)
        return self.train_function

    def make_test_function(self, force: bool = False) -> Any:
        if self.test_function is None or force:
            super().make_test_function(force=True)
            self.test_function = self._marked(self.test_function, skip=False)
        return self.test_function

    def _marked(self, function: Callable[[Any], Any], *, skip: bool) -> Callable[[Any], Any]:
        """`function` (one execution of steps) marked for the watchdog; across
        processes a step is made of collectives. For training, it first passes
        over the batches a restored backup had already trained on."""
        watchdog = self._backend.watchdog

        def marked(iterator):
            lockstep = self.progress.lockstep if skip else None  # across processes, in fit
            if skip and self.skip_batches > 0:
                for _ in range(min(self.skip_batches, self.steps_per_execution)):
                    next(iterator)
                    self.skip_batches -= 1
                if lockstep is not None:
                    lockstep.after(self.steps_per_execution, ran=False)
                return {}
            with lockstep or contextlib.nullcontext(), watchdog.waiting():
                logs = function(iterator)
                token = logs.pop(results.TOKEN, None) if isinstance(logs, dict) else None
                if lockstep is not None:
                    lockstep.returned = token
                return logs

        return marked

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
        - rank 0's weights and optimizer state are broadcast, by position;
        - every process runs the same steps (a process with fewer samples gets
          empty batches); `stop_training` on one stops all after the same step;
        - only rank 0 shows progress and runs the callbacks that write files.
        """
        call = processes.bind(keras.Model.fit, self, args, kwargs)
        if self._backend.size == 1:
            return super().fit(**call)
        with processes.failures(self._backend), self.progress.in_fit():
            variables = processes.state_variables(self.template)
            start = Position("fit", int(call.get("initial_epoch") or 0))
            self._backend.agreement.meet(start, variables=variables)
            self._backend.broadcast_variables(variables, root_rank=0)
            processes.prepare_fit(call, self._backend, variables)
            return super().fit(**call)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """As `keras.Model.evaluate`; across processes the results cover every process.

        Every process calls it; on one process alone use `parallel.template.evaluate`.
        """
        call = processes.bind(keras.Model.evaluate, self, args, kwargs)
        if self._backend.size == 1:
            return super().evaluate(**call)
        with processes.failures(self._backend, during="evaluate"):
            # Inside fit, Keras evaluates the validation data it already prepared.
            inside = bool(call.get("_use_cached_eval_dataset"))
            where = (
                ("validation", self.progress.epoch)
                if inside
                else ("evaluate", self.progress.trained)
            )
            self._backend.agreement.meet(Position(*where), variables=self.template.variables)
            if not inside:
                processes.prepare_evaluate(call, self._backend)
            return super().evaluate(**call)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """As `keras.Model.predict`, on this process's data; only rank 0 shows progress."""
        call = processes.bind(keras.Model.predict, self, args, kwargs)
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
        **backend_options: Options of the backend, e.g. `compression="fp16"`.

    Returns:
        A `ReplicatedModel`; compile and fit it as the original model. A
        compiled `model` (one loaded with `keras.models.load_model`) needs no
        new `compile`: training continues with its optimizer state.

    Raises:
        TypeError: If `model` is not a Keras model.
        ValueError: For missing or repeated devices, or an unknown backend.

    Example:

    ```python
    parallel = replicate.replicate(model)
    parallel.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    parallel.fit(x, y, batch_size=256, epochs=5)
    parallel.save("model.keras")
    ```
    """
    return ReplicatedModel(
        model, devices, variable_device=variable_device, backend=backend, **backend_options
    )
