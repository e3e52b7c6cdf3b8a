"""ReplicaBuilder: one template model on the variable device, one tower per device."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from replicate import reduce
from replicate.devices import canonical_device, validate_devices

# Tower i > 0 draws its random numbers (Dropout masks, noise) from the seed
# shifted by i times this odd constant, so towers never share a mask while
# tower 0 keeps the exact random stream of a single-device run.
_SEED_STRIDE = 1_000_003

LossFn = Callable[..., tf.Tensor]


class TowerStep(NamedTuple):
    """What one pass over all towers produced, merged on the variable device."""

    loss: tf.Tensor | None
    grads: list[Any] | None
    outputs: Any
    sizes: tf.Tensor


def _is_seed_state(variable: keras.Variable) -> bool:
    return variable.name == "seed_generator_state"


def _call_accepts_training(model: keras.Model) -> bool:
    params = inspect.signature(model.call).parameters
    return "training" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )


class ReplicaBuilder:
    """Builds data-parallel towers of one Keras model over several devices.

    The model's variables live once, on `variable_device`. Each tower calls the
    model under `tf.device(devices[i])` and `tf.name_scope(f"tower_{i}")` on its
    slice of the batch; gradients and BatchNormalization statistics come back
    to the variable device, where they are averaged, weighted by slice size, so
    that a step equals the single-device step on the whole batch.

    Every method works eagerly and inside the user's own `tf.function`.

    Args:
        model: A built Keras model, or a zero-argument callable that returns
            one (it is then called under `tf.device(variable_device)`, so the
            weights are created there).
        devices: Tower devices, e.g. `["/gpu:0", "/gpu:1"]`. Defaults to
            `replicate.list_devices()`: every GPU, or every CPU device.
        variable_device: Where the one copy of the weights, the merging and
            the optimizer update live. Defaults to `"/cpu:0"`.
        jit_compile: Compile each tower's forward and backward pass with XLA,
            one computation per device (the merge and the update are not
            compiled, so the towers keep their placement). Defaults to `False`.

    Raises:
        TypeError: If `model` is not a Keras model (or a callable making one).
        ValueError: If a device is missing or repeated, or the model is not
            built.

    Example:

    ```python
    builder = replicate.ReplicaBuilder(model, devices=["/gpu:0", "/gpu:1"])
    optimizer = tf.compat.v1.train.GradientDescentOptimizer(0.1)

    @tf.function
    def step(x, y):
        loss, grads = builder.compute_gradients(loss_fn, x, y)
        builder.apply_gradients(optimizer, grads)
        return loss
    ```
    """

    def __init__(
        self,
        model: keras.Model | Callable[[], keras.Model],
        devices: Sequence[str] | None = None,
        *,
        variable_device: str = "/cpu:0",
        jit_compile: bool = False,
    ) -> None:
        if jit_compile not in (True, False):
            raise ValueError(
                f"`jit_compile` must be True or False. Received: jit_compile={jit_compile!r}"
            )
        self.devices = validate_devices(devices)
        self.variable_device = canonical_device(variable_device, argument="variable_device")
        if (
            not isinstance(model, keras.Model)
            and callable(model)
            and not isinstance(model, keras.layers.Layer)
        ):
            with tf.device(self.variable_device):
                model = model()
        if not isinstance(model, keras.Model):
            raise TypeError(
                "`model` must be a Keras model (keras.Model, Sequential or "
                "functional) or a zero-argument function that returns one. "
                f"Received: model={model!r} of type {type(model).__name__}"
            )
        if not model.built or not model.variables:
            raise ValueError(
                f"The model {model.name!r} must be built before it is replicated, "
                "so that its weights exist once on the variable device. Give it "
                "an `Input`, call `model.build(input_shape)`, or call it on a "
                "batch first."
            )
        self.model = model
        self._training_arg = _call_accepts_training(model)
        self.jit_compile = bool(jit_compile)
        self._compiled: dict[tuple, Any] = {}

    @property
    def num_towers(self) -> int:
        """The number of towers (devices)."""
        return len(self.devices)

    # -- public API ---------------------------------------------------------

    def towers(self, x: Any, training: bool = False) -> list[Any]:
        """Calls the model once per device on its slice of `x`.

        With `training=True`, state updates (BatchNormalization moving
        statistics) from all towers are averaged and written once.

        Returns:
            One output structure per tower, in device order.
        """
        return self._step(x, training=training, merge=False).outputs

    def call(self, x: Any, training: bool = False) -> Any:
        """The tower outputs concatenated on the variable device: `model(x)` in parallel."""
        return self._step(x, training=training).outputs

    def compute_gradients(
        self,
        loss_fn: LossFn,
        x: Any,
        y: Any,
        sample_weight: Any = None,
    ) -> tuple[tf.Tensor, list[Any]]:
        """Loss and gradients of the whole batch, computed tower by tower.

        Each tower computes `loss_fn(y_i, y_pred_i)` (or `loss_fn(y_i, y_pred_i,
        sample_weight_i)` when weights are given) plus the model's own losses
        (`model.losses`: weight and activity regularisation), as Keras `fit`
        does. `loss_fn` must return the mean over its slice, as Keras losses
        do by default; the tower gradients are then averaged weighted by slice
        size, which equals the single-device gradient of the whole batch.
        BatchNormalization statistics are updated (averaged over towers).

        Returns:
            `(loss, grads)`: the batch loss and one gradient per
            `model.trainable_variables` entry (`None` where unconnected).
        """
        step = self._step(x, training=True, loss_fn=loss_fn, y=y, sample_weight=sample_weight)
        return step.loss, step.grads

    def apply_gradients(self, optimizer: Any, grads: Sequence[Any]) -> None:
        """Applies averaged gradients once, on the variable device.

        Args:
            optimizer: A Keras optimizer, a native TensorFlow optimizer
                (`tf.compat.v1.train.GradientDescentOptimizer`,
                `AdamOptimizer`, ...) or a `replicate.optimizers.NativeOptimizer`.
            grads: As returned by `compute_gradients`.

        Raises:
            TypeError: If `optimizer` is neither kind.
        """
        variables = self.model.trainable_variables
        if len(grads) != len(variables):
            raise ValueError(
                f"`grads` must hold one entry per trainable variable "
                f"({len(variables)}). Received {len(grads)} gradients."
            )
        with tf.device(self.variable_device):
            apply_gradients(optimizer, grads, variables, device=self.variable_device)

    # -- the tower loop -----------------------------------------------------

    def _tower_state(self, i: int, values: list[tf.Tensor]) -> list[tf.Tensor]:
        if i == 0:
            return values
        shifted = []
        for variable, value in zip(self.model.non_trainable_variables, values):
            if _is_seed_state(variable):
                value = value + tf.constant([i * _SEED_STRIDE, 0], value.dtype)
            shifted.append(value)
        return shifted

    def _forward(self, trainable, non_trainable, x, training):
        """One stateless model call: outputs, new state values, model losses."""
        model = self.model
        mapping = list(zip(model.trainable_variables, trainable)) + list(
            zip(model.non_trainable_variables, non_trainable)
        )
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            before = {id(v): scope.get_current_value(v) for v in model.non_trainable_variables}
            if self._training_arg:
                outputs = model(x, training=training)
            else:
                outputs = model(x)
            losses = list(model.losses)
        updates = []
        for v in model.non_trainable_variables:
            new = scope.get_current_value(v)
            updates.append(None if new is before[id(v)] else new)
        return outputs, updates, losses

    def _step(
        self,
        x: Any,
        *,
        training: bool,
        loss_fn: LossFn | None = None,
        y: Any = None,
        sample_weight: Any = None,
        merge: bool = True,
        gradients: bool = True,
        scale_loss: Callable[[tf.Tensor], tf.Tensor] | None = None,
        loss_state: Sequence[Any] = (),
    ) -> TowerStep:
        """Runs every tower once and merges what they return.

        Args:
            x, y, sample_weight: The global batch (any nesting).
            training: Passed to the model; state updates are written back
                (averaged over towers) when the model makes any.
            loss_fn: Per-tower loss `loss_fn(y, y_pred[, sample_weight])`;
                `None` for a forward pass only.
            merge: Concatenate the outputs (else one entry per tower).
            gradients: With `loss_fn`, also differentiate it.
            scale_loss: Applied to each tower's loss before differentiating
                (a loss-scale optimizer's `scale_loss`).
            loss_state: Variables that `loss_fn` updates (Keras' per-output
                loss trackers). Towers get their values and return new ones;
                the changes are weighted by slice size, added to the old
                values and written once, outside any XLA computation.
        """
        differentiate = loss_fn is not None and gradients
        n = self.num_towers
        model = self.model
        with tf.device(self.variable_device):
            xs, sizes = reduce.split(x, n)
            ys = reduce.split_as(y, sizes, n)
            sws = reduce.split_as(sample_weight, sizes, n)
            weights = reduce.tower_weights(sizes)

        if not training and loss_fn is None:
            # Inference needs no state handling: call the stateful model.
            outputs = []
            for i, device in enumerate(self.devices):
                with tf.device(device), tf.name_scope(f"tower_{i}"):
                    if self._training_arg:
                        outputs.append(model(xs[i], training=False))
                    else:
                        outputs.append(model(xs[i]))
            return self._finish(outputs, None, None, None, sizes, weights, merge)

        loss_state = list(loss_state)
        with tf.device(self.variable_device):
            state = [tf.convert_to_tensor(v.value) for v in model.non_trainable_variables]
            tracked = [tf.convert_to_tensor(v.value) for v in loss_state]
        tower = self._tower_function(training, loss_fn, differentiate, scale_loss, loss_state)
        outputs, losses, grads, updates, tracker_updates = [], [], [], [], []
        for i, device in enumerate(self.devices):
            with tf.device(device), tf.name_scope(f"tower_{i}"):
                trainable = [tf.identity(v.value) for v in model.trainable_variables]
                out, upd, loss, grad, tracker = tower(
                    trainable, self._tower_state(i, state), tracked, xs[i], ys[i], sws[i]
                )
                if differentiate:
                    grads.append(grad)
                if loss is not None:
                    losses.append(loss)
                outputs.append(out)
                updates.append(upd)
                tracker_updates.append(tracker)
        if loss_state:
            with tf.device(self.variable_device):
                _write_loss_state(loss_state, tracked, tracker_updates, weights)
        return self._finish(outputs, losses or None, grads or None, updates, sizes, weights, merge)

    def _tower_function(self, training, loss_fn, differentiate, scale_loss, loss_state):
        """What one tower computes, as a function of tensors only.

        With `jit_compile`, it is one XLA computation per tower, placed on the
        tower's device by the caller's device scope; the merge and the update
        stay outside XLA, so the placement holds.
        """

        def tower(trainable, state, tracked, x, y, sample_weight):
            tracker = list(tracked)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(trainable)
                out, upd, extra = self._forward(trainable, state, x, training)
                loss = None
                if loss_fn is not None:
                    with keras.StatelessScope(
                        state_mapping=list(zip(loss_state, tracked))
                    ) as scope:
                        if sample_weight is None:
                            loss = loss_fn(y, out)
                        else:
                            loss = loss_fn(y, out, sample_weight)
                    tracker = [scope.get_current_value(v) for v in loss_state]
                    loss = _add_model_losses(loss, extra)
            grads = None
            if differentiate:
                target = scale_loss(loss) if scale_loss is not None else loss
                grads = tape.gradient(target, trainable)
            return out, upd, loss, grads, tracker

        if not self.jit_compile:
            return tower
        key = (training, loss_fn, differentiate, scale_loss, tuple(id(v) for v in loss_state))
        if key not in self._compiled:
            self._compiled[key] = tf.function(tower, jit_compile=True, reduce_retracing=True)
        return self._compiled[key]

    def _finish(self, outputs, losses, grads, updates, sizes, weights, merge) -> TowerStep:
        with tf.device(self.variable_device):
            loss = None
            if losses is not None:
                loss = reduce.weighted_sum([[v] for v in losses], weights)[0]
            total = None
            if grads is not None:
                total = reduce.weighted_sum(grads, weights)
            if updates is not None:
                self._write_state(updates, weights)
            merged = reduce.merge(outputs) if merge else outputs
        return TowerStep(loss, total, merged, sizes)

    def _write_state(self, updates: list[list[Any]], weights: tf.Tensor) -> None:
        for j, variable in enumerate(self.model.non_trainable_variables):
            values = [u[j] for u in updates]
            if values[0] is None:
                continue
            if (
                len(values) == 1
                or _is_seed_state(variable)
                or not variable.dtype.startswith(("float", "bfloat"))
            ):
                # Seeds continue tower 0's stream; integer state is not averaged.
                variable.assign(values[0])
            else:
                variable.assign(reduce.weighted_sum([[v] for v in values], weights)[0])


def _write_loss_state(variables, old, per_tower, weights) -> None:
    """Writes loss-tracker state once: the towers' changes, weighted by slice size.

    A tower's tracker counts its slice as one batch (the slice's size is not
    static), so weighting the changes by slice size counts the whole batch
    once, with the batch's mean loss, as a single device does.
    """
    for j, variable in enumerate(variables):
        news = [tracker[j] for tracker in per_tower]
        if all(new is old[j] for new in news):
            continue
        deltas = [[new - old[j]] for new in news]
        variable.assign(old[j] + reduce.weighted_sum(deltas, weights)[0])


def _add_model_losses(loss: tf.Tensor, extra: list[tf.Tensor]) -> tf.Tensor:
    for value in extra:
        value = tf.reduce_sum(tf.cast(value, loss.dtype))
        loss = loss + value
    return loss


def apply_gradients(
    optimizer: Any, grads: Sequence[Any], variables: Sequence[Any], *, device: str
) -> None:
    """Applies `grads` to Keras `variables` with a Keras or a native TF optimizer."""
    if isinstance(optimizer, keras.optimizers.Optimizer):
        if not optimizer.built:
            with tf.init_scope(), tf.device(device):
                optimizer.build(list(variables))
        optimizer.apply_gradients(zip(grads, variables))
    elif isinstance(optimizer, tf.compat.v1.train.Optimizer):
        pairs = [(g, v.value) for g, v in zip(grads, variables) if g is not None]
        optimizer.apply_gradients(pairs)
    else:
        raise TypeError(
            "`optimizer` must be a Keras optimizer (keras.optimizers.SGD, Adam, "
            "...) or a native TensorFlow optimizer (tf.compat.v1.train."
            "GradientDescentOptimizer, AdamOptimizer, ...). Received: "
            f"optimizer={optimizer!r} of type {type(optimizer).__name__}"
        )
