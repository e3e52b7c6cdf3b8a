"""ReplicaBuilder: one template model on the variable device, one tower per device.

The facade over the step engine: `replicate.tower` (each tower's forward and
backward pass on its device), `replicate.merge` (the merge and the loss, once,
on the variable device) and `replicate.state` (what the towers wrote, combined
and written once). `docs/architecture.md` draws one step through them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from replicate import meeting, moments, reduce, replica, state, tower_errors
from replicate import merge as _merge
from replicate.devices import canonical_device, validate_devices
from replicate.tower import TowerPass, row_states
from replicate.xla import refuse_xla

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

    Every method works eagerly and inside the user's own `tf.function` (where synchronized
    layers meet in the graph, and after a failed step such a function must be made again:
    `replicate.meeting`).

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
        require_weights: Refuse a model that has no weights yet. `False` lets
            it in (`ReplicatedModel` builds it at its first `fit`, as Keras
            does); its passes raise until it has them. Defaults to `True`.

    Raises:
        TypeError: If `model` is not a Keras model (or a callable making one).
        ValueError: If a device is missing or repeated, the model has no
            weights yet, or `jit_compile` is combined with synchronized layers.

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
        require_weights: bool = True,
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
        self.model = model
        self.backend = backend
        with tf.device(self.variable_device):
            self.errors = tower_errors.TowerErrors(self.devices)
        if require_weights:
            self.require_weights()
        self.job = meeting.Job(backend, len(self.devices))
        self.tower_pass = TowerPass(model, job=self.job)
        self.state_writer = state.StateWriter(
            model, first_tower=self.global_tower(0), backend=backend
        )
        self.jit_compile = jit_compile
        self.train_traces = 0  # how many times a training pass was traced (its Python ran)
        self.met_in_graph = False  # whether a traced step's towers met in the graph

    def require_weights(self) -> None:
        """Raises `ValueError` if the model has no weights yet (see the class's Raises)."""
        if not self.model.variables:
            raise ValueError(
                f"The model {self.model.name!r} has no weights yet, so they cannot live once "
                "on the variable device: Keras creates a layer's weights on its first call. "
                "Call the model once on a batch first (`model(x[:1])`), or start it with "
                "`keras.Input`; a model with its own `train_step` is ready once the "
                "sub-models it holds have weights. `replicate.replicate(model)` builds such a "
                "model itself at its first `fit`, `evaluate` or `predict`, as Keras does."
            )

    @property
    def jit_compile(self) -> bool:
        """Whether each tower's passes are compiled with XLA."""
        return self._jit_compile

    @jit_compile.setter
    def jit_compile(self, value: bool) -> None:
        if value:
            refuse_xla(self.model, self.synchronized)
        self._jit_compile = bool(value)
        self.tower_pass.jit_compile = self._jit_compile

    @property
    def num_towers(self) -> int:
        """The number of towers (devices)."""
        return len(self.devices)

    @property
    def synchronized(self) -> bool:
        """Whether a layer meets the other towers mid-pass (synchronized BatchNorm)."""
        return bool(moments.synchronized_layers(self.model))

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
        self, loss_fn: LossFn, x: Any, y: Any, sample_weight: Any = None
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
        """`structure` cut into one non-empty slice per tower, on the variable device.

        The global batch's size is recorded as the slices are cut (`self.errors`),
        so that an error raised later, while a step runs, can say what each
        tower held.
        """
        with tf.device(self.variable_device):
            slices = reduce.tower_slices(structure, self.num_towers)
            self.errors.record(tf.reduce_sum(slices.sizes))
            return slices

    def group(self, slices: reduce.Slices, **options: Any) -> replica.TowerGroup:
        """The towers of one step; where layers synchronize the towers, they meet inside
        the graph (a traced step, in one process or over the job: `replicate.meeting`) or
        in threads."""
        if moments.route(self.model) and not options.get("threaded"):
            in_graph = not tf.executing_eagerly() and self.job.meets()
            options.setdefault("in_graph", in_graph and meeting.usable(self.devices))
            options.setdefault("threaded", not options["in_graph"])
            self.met_in_graph |= options["in_graph"]  # read after a failed step
        return replica.TowerGroup(
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

    def _read(self, variables: list[Any]) -> list[tf.Tensor]:
        """The values of `variables`, read once on the variable device for every tower."""
        with tf.device(self.variable_device):
            return [tf.convert_to_tensor(v.value) for v in variables]

    def forward_passes(
        self, group: replica.TowerGroup, slices: reduce.Slices, training: bool, watch: bool
    ):
        """Every tower's forward pass, and the step's starting state values."""
        self.require_weights()
        values = self._read(self.model.non_trainable_variables)
        row_variables = row_states(self.model)
        with tf.device(self.variable_device):
            rows = reduce.tower_slices(
                [v.value for v in row_variables], self.num_towers, sizes=slices.sizes
            ).parts

        # Towers that meet mid-pass are traced each on its own; one tower is traced inline
        # in the step, as Keras traces a model (a function call costs it start-up).
        shared = not group.threaded and self.num_towers > 1
        weights = None if group.threaded else self._read(self.model.trainable_variables)
        call = meeting.call_index(self.tower_pass.keys) if group.in_graph else 0

        def forward(i):
            with tower_errors.describing(i, self.devices, slices.batch):
                return self.tower_pass.forward(
                    self.global_tower(i),
                    slices.parts[i],
                    slices.sizes[i],
                    values,
                    rows[i],
                    training,
                    watch=watch,
                    shared=shared,
                    weights=weights,
                    present=slices.present[i] if group.in_graph else None,
                    devices=self.devices if group.in_graph else None,
                    call=call,
                )

        return group.run(forward), values

    def evaluate_pass(
        self, x: Any, merge: bool = True, *, processes: bool = False
    ) -> tuple[Any, tf.Tensor | None]:
        """Inference on each tower: the outputs (merged) and the model's own losses.

        What the model writes in inference (a stateful RNN's state, a user's
        counter) is written as on one device, combined over the towers; over
        the processes too with `processes=True` (inside `evaluate`, a
        collective step already).
        """
        slices = self.slices(x)
        towers, values = self.forward_passes(self.group(slices), slices, False, False)
        with tf.device(self.variable_device):
            self.state_writer.write_towers(towers, values, slices, processes=processes)
            model_loss = _merge.combine_model_losses(towers, slices.weights)
            if not merge:
                return [t.outputs for t in towers], model_loss
            merged = _merge.merge([t.outputs for t in towers], [t.logits for t in towers])
            return merged, model_loss

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
        if not tf.executing_eagerly():
            self.train_traces += 1
        slices = self.slices(x)
        group = self.group(slices)
        towers, values = self.forward_passes(group, slices, True, True)
        loss = grads = None
        with tf.device(self.variable_device):
            if loss_of is not None:
                result = _merge.loss_pass(
                    towers,
                    loss_of,
                    slices.weights,
                    model.trainable_variables,
                    share=share,
                    scale=scale,
                )
                loss, merged = result.value, result.merged
            else:
                merged = _merge.merge([t.outputs for t in towers], [t.logits for t in towers])
        if loss_of is not None:
            tower_grads = group.run(
                lambda i: self.tower_pass.backward(towers[i], result.upstream[i], slices.present[i])
            )
            with tf.device(self.variable_device):
                grads = [
                    reduce.add([*column, direct])
                    for *column, direct in zip(*tower_grads, result.direct)
                ]
        with tf.device(self.variable_device):
            self.state_writer.write_towers(towers, values, slices)
        return Step(loss, grads, merged, [t.outputs for t in towers], slices)
