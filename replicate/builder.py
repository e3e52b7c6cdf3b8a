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

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from replicate import _keras_compat, reduce, state
from replicate import merge as _merge
from replicate.devices import canonical_device, validate_devices
from replicate.replica import TowerGroup
from replicate.tower import TowerPass

LossFn = Callable[..., tf.Tensor]


class Step(NamedTuple):
    """What one training pass over all towers produced."""

    loss: tf.Tensor  # the batch loss, unscaled
    grads: list[Any]  # one per trainable variable: this process's gradient
    outputs: Any  # the merged outputs, masks attached
    tower_outputs: list[Any]  # each tower's real outputs
    slices: reduce.Slices


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
        self.tower_pass = TowerPass(model)
        self.state_writer = state.StateWriter(first_tower=self.global_tower(0), backend=backend)
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
        self.tower_pass.jit_compile = self._jit_compile

    @property
    def num_towers(self) -> int:
        """The number of towers (devices)."""
        return len(self.devices)

    @property
    def synchronized(self) -> bool:
        """Whether a layer meets the other towers mid-pass (synchronized BatchNorm)."""
        return any(
            getattr(layer, "synchronized", False) is True
            for layer in _keras_compat.sublayers(self.model)
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
            return self.train_pass(x, None).tower_outputs
        return self.evaluate_pass(x, merge=False)[0]

    def call(self, x: Any, training: bool = False) -> Any:
        """The tower outputs concatenated on the variable device: `model(x)` in parallel."""
        if training:
            return self.train_pass(x, None).outputs
        return self.evaluate_pass(x)[0]

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

        step = self.train_pass(x, loss_of)
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
            state.apply_gradients(optimizer, grads, variables, device=self.variable_device)

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
        return self.tower_pass.tower_state(self.global_tower(i), values)

    def _state_values(self) -> list[tf.Tensor]:
        with tf.device(self.variable_device):
            return [tf.convert_to_tensor(v.value) for v in self.model.non_trainable_variables]

    def evaluate_pass(self, x: Any, merge: bool = True) -> tuple[Any, tf.Tensor | None]:
        """Inference on each tower: the outputs (merged) and the model's own losses."""
        slices = self.slices(x)
        values = self._state_values()
        towers = self.group(slices).run(
            lambda i: self.tower_pass.forward(
                self.global_tower(i), slices.parts[i], slices.sizes[i], values, False, watch=False
            )
        )
        outputs = [t.outputs for t in towers]
        with tf.device(self.variable_device):
            model_loss = _merge.combine_model_losses([t.model_loss for t in towers], slices.weights)
            return (_merge.merge(outputs) if merge else outputs), model_loss

    def train_pass(
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
        values = self._state_values()
        group = self.group(slices)
        towers = group.run(
            lambda i: self.tower_pass.forward(
                self.global_tower(i), slices.parts[i], slices.sizes[i], values, True
            )
        )
        loss = grads = None
        with tf.device(self.variable_device):
            if loss_of is not None:
                result = _merge.loss_pass(towers, loss_of, slices.weights, share=share, scale=scale)
                loss, merged = result.value, result.merged
            else:
                merged = _merge.merge([t.outputs for t in towers])
        if loss_of is not None:
            tower_grads = group.run(
                lambda i: self.tower_pass.backward(towers[i], result.upstream[i], slices.present[i])
            )
            with tf.device(self.variable_device):
                grads = [reduce.add(list(column)) for column in zip(*tower_grads)]
        with tf.device(self.variable_device):
            self.write_state(
                model.non_trainable_variables, [t.updates for t in towers], values, slices
            )
        return Step(loss, grads, merged, [t.outputs for t in towers], slices)

    def write_state(
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
        self.state_writer.write(variables, per_tower, old, slices, processes=processes)
