"""ReplicaBuilder: one template model on the variable device, one tower per device.

A training step, as data flows (`ReplicaBuilder.train`):

1. The batch is cut into one non-empty slice per tower (`reduce.tower_slices`).
2. Each tower, on its device, reads the weights, runs the forward pass
   statelessly (state updates come back as values) and keeps its tape open.
3. On the variable device the towers' outputs are concatenated (masks too)
   and the loss is computed once, on the whole batch, exactly as one device
   computes it; a small tape gives its gradient with respect to each tower's
   outputs.
4. Each tower, on its device, backpropagates its share of that gradient
   through its own tape (`output_gradients`); the towers' gradients add up to
   the single-device gradient.
5. State updates (BatchNormalization statistics, counters) are combined by
   each variable's `aggregation` and written once.

With `BatchNormalization(synchronized=True)` in the model, steps 2 and 4 run
in lockstep threads whose towers meet at each synchronized layer
(`replicate.replica`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import keras
import tensorflow as tf
from keras.src.backend.common import masking  # Keras has no public mask accessor

from replicate import reduce
from replicate.devices import canonical_device, validate_devices
from replicate.replica import TowerGroup

# Tower k (counted over every process) draws its random numbers (Dropout
# masks, noise) from the seed shifted by k times this odd constant, so towers
# never share a mask while tower 0 of process 0 keeps the exact random stream
# of a single-device run.
_SEED_STRIDE = 1_000_003

LossFn = Callable[..., tf.Tensor]


class Step(NamedTuple):
    """What one training pass over all towers produced."""

    loss: tf.Tensor  # the batch loss, unscaled
    grads: list[Any]  # one per trainable variable: this process's gradient
    outputs: Any  # the merged outputs, masks attached
    tower_outputs: list[Any]  # each tower's real outputs
    slices: reduce.Slices


class _Tower(NamedTuple):
    """One tower's forward pass, kept for its backward pass."""

    outputs: Any  # real rows only, masks attached
    targets: list[tf.Tensor]  # what the loss can depend on: float outputs, model loss
    model_loss: tf.Tensor | None  # the model's own losses on this slice, summed
    updates: list[Any]  # new non-trainable values (None where unchanged)
    tape: tf.GradientTape | None
    trainable: list[tf.Tensor]  # this tower's copies of the weights


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
    slice of the batch. The loss is computed once on the merged outputs, each
    tower backpropagates its part on its own device, and state updates are
    combined once, so that a step equals the single-device step on the whole
    batch.

    Every method works eagerly and inside the user's own `tf.function`.

    Args:
        model: A built Keras model, or a zero-argument callable that returns
            one (it is then called under `tf.device(variable_device)`, so the
            weights are created there).
        devices: Tower devices, e.g. `["/gpu:0", "/gpu:1"]`. Defaults to
            `replicate.list_devices()`: every GPU, or every CPU device.
        variable_device: Where the one copy of the weights, the merging and
            the optimizer update live. Defaults to `"/cpu:0"`.
        jit_compile: Compile each tower's forward pass and its backward pass
            with XLA, on the tower's device (the merge, the loss and the
            update are not compiled, so the towers keep their placement).
            Defaults to `False`.
        backend: A process backend (`replicate.get_backend(...)`): tower seeds
            then differ between processes, and synchronized layers sum over
            every process's towers. Defaults to one process.

    Raises:
        TypeError: If `model` is not a Keras model (or a callable making one).
        ValueError: If a device is missing or repeated, the model is not
            built, or `jit_compile` is combined with synchronized layers.

    Example:

    ```python
    builder = replicate.ReplicaBuilder(model, devices=replicate.list_devices())
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
        backend: Any = None,
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
        self.backend = backend
        self._training_arg = _call_accepts_training(model)
        self._compiled: dict[bool, Any] = {}
        self.jit_compile = jit_compile

    @property
    def jit_compile(self) -> bool:
        """Whether each tower's passes are compiled with XLA."""
        return self._jit_compile

    @jit_compile.setter
    def jit_compile(self, value: bool) -> None:
        if value and self.synchronized:
            raise ValueError(
                "XLA per tower (jit_compile=True) cannot be combined with layers that "
                "synchronize the towers (BatchNormalization(synchronized=True)): each "
                "tower's XLA computation would have to pause in the middle to meet the "
                "others. Use jit_compile=False, or synchronized=False."
            )
        self._jit_compile = bool(value)

    @property
    def num_towers(self) -> int:
        """The number of towers (devices)."""
        return len(self.devices)

    @property
    def synchronized(self) -> bool:
        """Whether a layer meets the other towers mid-pass (synchronized BatchNorm)."""
        return any(
            getattr(layer, "synchronized", False) is True
            for layer in self.model._flatten_layers(include_self=False)
        )

    # -- public API ---------------------------------------------------------

    def towers(self, x: Any, training: bool = False) -> list[Any]:
        """Calls the model once per device on its slice of `x`.

        With `training=True`, state updates (BatchNormalization moving
        statistics) from all towers are combined and written once.

        Returns:
            One output structure per tower, in device order (a tower whose
            slice is empty returns zero rows).
        """
        if training:
            return self._train(x, None).tower_outputs
        return self._infer(x, merge=False)

    def call(self, x: Any, training: bool = False) -> Any:
        """The tower outputs concatenated on the variable device: `model(x)` in parallel."""
        if training:
            return self._train(x, None).outputs
        return self._infer(x)

    def compute_gradients(
        self,
        loss_fn: LossFn,
        x: Any,
        y: Any,
        sample_weight: Any = None,
    ) -> tuple[tf.Tensor, list[Any]]:
        """Loss and gradients of the whole batch, the backward pass tower by tower.

        `loss_fn(y, y_pred)` (or `loss_fn(y, y_pred, sample_weight)` when
        weights are given) is called once, on the variable device, with the
        merged outputs of all towers and the whole batch's `y`: any loss
        works as on one device (batch-level and in-batch losses, any
        reduction, masks). The model's own losses (`model.losses`: weight and
        activity regularisation, `add_loss`) are added as Keras `fit` does;
        each tower's are weighted by its share of the batch. BatchNormalization
        statistics are updated (combined over towers).

        Returns:
            `(loss, grads)`: the batch loss and one gradient per
            `model.trainable_variables` entry (`None` where unconnected).
        """

        def loss_of(outputs, model_loss):
            if sample_weight is None:
                loss = loss_fn(y, outputs)
            else:
                loss = loss_fn(y, outputs, sample_weight)
            if model_loss is not None:
                loss = loss + tf.cast(model_loss, loss.dtype)
            return loss

        step = self._train(x, loss_of)
        return step.loss, step.grads

    def apply_gradients(self, optimizer: Any, grads: Sequence[Any]) -> None:
        """Applies gradients once, on the variable device.

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

    # -- the engine -----------------------------------------------------------

    def slices(self, structure: Any) -> reduce.Slices:
        """`structure` cut into one non-empty slice per tower, on the variable device."""
        with tf.device(self.variable_device):
            return reduce.tower_slices(structure, self.num_towers)

    def group(self, slices: reduce.Slices, **options: Any) -> TowerGroup:
        """The towers of one step; threaded where layers synchronize the towers."""
        options.setdefault("threaded", self.synchronized)
        return TowerGroup(
            self.devices,
            self.variable_device,
            backend=self.backend,
            present=slices.present,
            **options,
        )

    def global_tower(self, i: int) -> int:
        """Tower `i` of this process, counted over every process's towers."""
        rank = 0 if self.backend is None else self.backend.rank
        return rank * self.num_towers + i

    def tower_state(self, i: int, values: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Non-trainable values as tower `i` sees them: its own random seeds."""
        shift = self.global_tower(i) * _SEED_STRIDE
        if shift == 0:
            return list(values)
        shifted = []
        for variable, value in zip(self.model.non_trainable_variables, values):
            if _is_seed_state(variable):
                value = value + tf.constant([shift, 0], value.dtype)
            shifted.append(value)
        return shifted

    def _evaluate(self, x: Any, merge: bool = True) -> tuple[Any, tf.Tensor | None]:
        """Inference on each tower: the outputs (merged) and the model's own losses."""
        slices = self.slices(x)
        with tf.device(self.variable_device):
            state = [tf.convert_to_tensor(v.value) for v in self.model.non_trainable_variables]
        towers = self.group(slices).run(
            lambda i: self._tower_forward(i, slices, state, False, watch=False)
        )
        outputs = [t.outputs for t in towers]
        with tf.device(self.variable_device):
            model_loss = self._combine_model_losses(towers, slices.weights)
            return (reduce.merge(outputs) if merge else outputs), model_loss

    def _infer(self, x: Any, merge: bool = True) -> Any:
        return self._evaluate(x, merge=merge)[0]

    def _forward(self, trainable, state, x, training):
        """One stateless model call: outputs, their masks, new state values, model losses."""
        model = self.model
        mapping = list(zip(model.trainable_variables, trainable)) + list(
            zip(model.non_trainable_variables, state)
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
        masks = [masking.get_keras_mask(t) for t in tf.nest.flatten(outputs)]
        return outputs, masks, updates, losses

    def _forward_function(self) -> Callable[..., Any]:
        if not self.jit_compile:
            return self._forward
        if True not in self._compiled:
            self._compiled[True] = tf.function(
                self._forward, jit_compile=True, reduce_retracing=True
            )
        return self._compiled[True]

    def _tower_forward(
        self, i: int, slices: reduce.Slices, state: list, training: bool, *, watch: bool = True
    ) -> _Tower:
        trainable = [tf.identity(v.value) for v in self.model.trainable_variables]
        tape = tf.GradientTape(watch_accessed_variables=False)
        with tape if watch else contextlib.nullcontext():
            if watch:
                tape.watch(trainable)
            out, masks, updates, losses = self._forward_function()(
                trainable, self.tower_state(i, state), slices.parts[i], training
            )
            for t, mask in zip(tf.nest.flatten(out), masks):
                if mask is not None:
                    masking.set_keras_mask(t, mask)
            outputs = reduce.keep(out, slices.sizes[i])
            model_loss = None
            if losses:
                model_loss = tf.add_n([tf.reduce_sum(tf.cast(v, tf.float32)) for v in losses])
        targets = [t for t in tf.nest.flatten(outputs) if t is not None and t.dtype.is_floating]
        if model_loss is not None:
            targets.append(model_loss)
        return _Tower(outputs, targets, model_loss, updates, tape if watch else None, trainable)

    def _tower_backward(self, tower: _Tower, upstream: list, present: tf.Tensor) -> list[Any]:
        pairs = [(t, g) for t, g in zip(tower.targets, upstream) if g is not None]
        if not pairs:
            return [None] * len(tower.trainable)
        targets, output_gradients = zip(*pairs)
        grads = tower.tape.gradient(
            list(targets),
            tower.trainable,
            output_gradients=list(output_gradients),
            unconnected_gradients=tf.UnconnectedGradients.NONE,
        )
        # A tower that held only a stand-in row adds exactly nothing.
        return [reduce._scale(g, present) for g in grads]

    def _train(
        self,
        x: Any,
        loss_of: Callable[[Any, tf.Tensor | None], tf.Tensor] | None,
        *,
        scale: Callable[[tf.Tensor], tf.Tensor] | None = None,
        share: tf.Tensor | None = None,
    ) -> Step:
        """One training pass: forward per tower, the loss once, backward per tower.

        Args:
            x: The global batch's inputs.
            loss_of: `loss_of(merged_outputs, model_loss)` returns the batch
                loss; `model_loss` is the model's own losses combined over the
                towers (`None` if it has none). `None` for a forward pass
                only (state updates are still written).
            scale: Applied to the loss before differentiating (a loss-scale
                optimizer's `scale_loss`).
            share: This process's share of the global batch (several
                processes); the gradients are then this process's part of the
                global gradient, to be summed over processes.
        """
        model = self.model
        slices = self.slices(x)
        with tf.device(self.variable_device):
            state = [tf.convert_to_tensor(v.value) for v in model.non_trainable_variables]
        group = self.group(slices)
        towers = group.run(lambda i: self._tower_forward(i, slices, state, True))
        loss = grads = None
        with tf.device(self.variable_device):
            weights = slices.weights
            if loss_of is not None:
                watched = [t for tower in towers for t in tower.targets]
                with tf.GradientTape(watch_accessed_variables=False) as tape:
                    tape.watch(watched)
                    merged = reduce.merge([t.outputs for t in towers])
                    model_loss = self._combine_model_losses(towers, weights)
                    loss = loss_of(merged, model_loss)
                    target = loss if share is None else loss * tf.cast(share, loss.dtype)
                    if scale is not None:
                        target = scale(target)
                upstream = tape.gradient(target, watched)
            else:
                merged = reduce.merge([t.outputs for t in towers])
        if loss_of is not None:
            per_tower, start = [], 0
            for tower in towers:
                per_tower.append(upstream[start : start + len(tower.targets)])
                start += len(tower.targets)
            tower_grads = group.run(
                lambda i: self._tower_backward(towers[i], per_tower[i], slices.present[i])
            )
            with tf.device(self.variable_device):
                grads = [reduce.add(list(column)) for column in zip(*tower_grads)]
        with tf.device(self.variable_device):
            self._write_state(
                model.non_trainable_variables, [t.updates for t in towers], state, slices
            )
        return Step(loss, grads, merged, [t.outputs for t in towers], slices)

    def _combine_model_losses(self, towers: list[_Tower], weights: tf.Tensor) -> tf.Tensor | None:
        """The model's own losses of the batch: each tower's, weighted by its share.

        Exact for losses that are means over the batch (Keras' convention:
        regularizers of weights, activity regularizers, `add_loss` of a mean).
        """
        values = [t.model_loss for t in towers]
        if all(v is None for v in values):
            return None
        return tf.add_n(
            [tf.math.multiply_no_nan(v, weights[i]) for i, v in enumerate(values) if v is not None]
        )

    def _write_state(
        self,
        variables: list[Any],
        per_tower: list[list[Any]],
        old: list[tf.Tensor],
        slices: reduce.Slices,
        *,
        processes: bool = True,
    ) -> None:
        """Writes `variables` once, combining the towers' new values (`None`:
        unchanged) by each variable's aggregation; over processes too."""
        combined: list[tuple[Any, tf.Tensor, tf.Tensor]] = []
        for j, variable in enumerate(variables):
            news = [updates[j] for updates in per_tower]
            if all(new is None for new in news):
                continue
            if _is_seed_state(variable):
                # Tower 0 continues the stream; its shift comes back off.
                shift = self.global_tower(0) * _SEED_STRIDE
                value = news[0] if news[0] is not None else old[j]
                if shift:
                    value = value - tf.constant([shift, 0], value.dtype)
                variable.assign(value)
                continue
            news = [old[j] if new is None else new for new in news]
            value = reduce.combine_state(
                variable.aggregation, old[j], news, slices.weights, slices.present
            )
            combined.append((variable, old[j], value))
        if processes and combined and self.backend is not None and self.backend.size > 1:
            combined = self._over_processes(combined, tf.reduce_sum(slices.sizes))
        for variable, _, value in combined:
            variable.assign(value)

    def _over_processes(self, combined: list, count: tf.Tensor) -> list:
        """Each process's combined state, combined again over processes: changes
        of "sum" state add up; mean state is weighted by each process's samples."""
        sent, where = [], []
        c = tf.cast(count, tf.float32)
        for k, (variable, old, value) in enumerate(combined):
            dtype = tf.as_dtype(value.dtype)
            if variable.aggregation == "sum":
                sent.append(value - old)
            elif variable.aggregation == "mean" or (
                variable.aggregation == "none" and dtype.is_floating
            ):
                sent.append(tf.math.multiply_no_nan(value, tf.cast(c, dtype)))
            else:
                continue
            where.append(k)
        if not sent:
            return combined
        *received, total = self.backend.all_sum([*sent, c])
        out = list(combined)
        for k, summed in zip(where, received):
            variable, old, value = combined[k]
            if variable.aggregation == "sum":
                new = old + summed
            else:  # an entirely empty step leaves the state as it was
                new = tf.where(total > 0, summed / tf.cast(total, summed.dtype), old)
            out[k] = (variable, old, new)
        return out


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
