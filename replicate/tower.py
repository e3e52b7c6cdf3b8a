"""The tower pass: one tower's forward pass on its device, kept open for its backward pass.

A tower reads the shared weights into tower-local tensors, calls the model
statelessly on its slice of the batch (`keras.StatelessScope`: what the model
writes and the losses it adds come back as values instead of being applied),
and keeps its tape, so that once the loss is known on the variable device it
can backpropagate its share of the loss's gradient on its own device
(`output_gradients`). With `jit_compile` the forward call is one XLA
computation per tower, placed on the tower's device.

What a forward pass can write, and how each kind comes back:

- non-trainable state (BatchNormalization statistics, counters, seeds):
  new values, combined over towers by aggregation (`replicate.state`);
- trainable weights (`SpectralNormalization` writes its normalized kernel in
  `call(training=True)`): the new value, which later reads of the weight in
  the same pass see, with the gradient going to the weight as one device's
  gradient does (to the variable as read, not through the write);
- row-aligned state (a stateful RNN's `states`, one row per sample): each
  tower reads and writes its own rows;
- anything else the model does not track is an error naming it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from replicate import _keras_compat, activity, meeting, merge, reduce

# Tower k (counted over every process) draws its random numbers (Dropout
# masks, noise) from the seed shifted by k times this odd constant, so towers
# never share a mask while tower 0 of process 0 keeps the exact random stream
# of a single-device run.
SEED_STRIDE = 1_000_003


def is_seed_state(variable: keras.Variable) -> bool:
    """Whether `variable` is a Keras `SeedGenerator`'s state."""
    return variable.name == "seed_generator_state"


def row_layers(model: keras.Model) -> list[keras.Layer]:
    """The layers that keep one row of state per sample: stateful RNNs."""
    return [
        layer
        for layer in _keras_compat.sublayers(model)
        if getattr(layer, "stateful", False) is True and getattr(layer, "states", None)
    ]


def row_states(model: keras.Model) -> list[keras.Variable]:
    """The state variables with one row per sample: those of stateful RNN layers.

    Keras keeps them outside the layer's weights (`RNN.states`), sized by the
    batch the layer was built for.
    """
    found: dict[int, keras.Variable] = {}
    for layer in row_layers(model):
        for variable in tf.nest.flatten(layer.states):
            if _keras_compat.is_variable(variable):
                found.setdefault(id(variable), variable)
    return list(found.values())


def _call_accepts_training(model: keras.Model) -> bool:
    params = inspect.signature(model.call).parameters
    return "training" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )


@tf.custom_gradient
def _read_after_write(variable_read: tf.Tensor, written: tf.Tensor) -> tf.Tensor:
    """`written`, whose gradient goes to the weight as read (`variable_read`), as it
    does on one device, where an assignment is not differentiated through."""

    def grad(upstream):
        return upstream, tf.zeros_like(written)

    return tf.identity(written), grad


class _TowerScope(keras.StatelessScope):
    """A stateless scope that routes writes to trainable weights (see the module)."""

    def __init__(self, mapping: list, trainable: dict[int, tf.Tensor]) -> None:
        super().__init__(state_mapping=mapping, collect_losses=True)
        self.trainable = trainable
        self.written: dict[int, Any] = {}

    def add_update(self, update: tuple[Any, Any]) -> None:
        variable, value = update
        self.written[id(variable)] = variable
        read = self.trainable.get(id(variable))
        if read is not None:
            value = _read_after_write(read, tf.cast(value, read.dtype))
        super().add_update((variable, value))


class Tower(NamedTuple):
    """One tower's forward pass, kept for its backward pass."""

    outputs: Any  # real rows only, masks attached
    logits: list[merge.Logits | None]  # per output leaf: the logits behind it
    targets: list[tf.Tensor]  # what the loss can depend on: float outputs, logits, model loss
    model_loss: tf.Tensor | None  # the model's own scalar losses on this slice, summed
    sample_loss: tf.Tensor | None  # its per-sample losses, summed over the slice's rows
    updates: list[Any]  # new non-trainable values (None where unchanged)
    writes: list[Any]  # new trainable values written in the pass (None where unchanged)
    rows: list[Any]  # new rows of each row-aligned state (None where unchanged)
    tape: tf.GradientTape | None
    trainable: list[tf.Tensor]  # this tower's copies of the weights


class TowerPass:
    """Runs the forward and backward pass of one tower of `model` at a time.

    Args:
        model: The template (its variables live on the variable device).
        jit_compile: Compile each tower's forward pass with XLA.
        job: How its in-graph all-reduces meet over the job's processes
            (`replicate.meeting.Job`), or `None` for this process's towers only.
    """

    def __init__(self, model: keras.Model, *, jit_compile: bool = False, job: Any = None) -> None:
        self.model = model
        self.job = job
        self.jit_compile = jit_compile
        self._training_arg = _call_accepts_training(model)
        self._functions: dict[bool, Callable[..., Any]] = {}
        self._logit_kinds: list[tuple[bool, str | None]] = []
        self.traces = 0  # how many times the forward pass was traced (its Python ran)
        self.keys = meeting.Keys()  # its in-graph all-reduces' instance keys
        self._activity = activity.ActivityRows(model)  # Keras < 3.14 sums them per batch

    # -- random seeds -----------------------------------------------------------

    def tower_state(self, tower: int, values: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Non-trainable values as global tower `tower` sees them: its own random seeds."""
        shift = tower * SEED_STRIDE
        if shift == 0:
            return list(values)
        shifted = []
        for variable, value in zip(self.model.non_trainable_variables, values):
            if is_seed_state(variable):
                value = value + tf.constant([shift, 0], value.dtype)
            shifted.append(value)
        return shifted

    # -- forward ------------------------------------------------------------------

    def _call(self, trainable, state, rows, x, training, present=None, devices=None, call=0):
        """One stateless model call: outputs, masks, logits, writes and model losses.

        `present`, `devices` and `call` are given where the towers meet in the graph
        (`replicate.meeting`): the calling tower's presence, every tower's device and
        which forward pass of the step this is.
        """
        self.traces += 1
        in_graph = None
        if present is not None:
            in_graph = meeting.Meeting(devices, self.keys, present, call, self.job)
        model = self.model
        row_variables = row_states(model)
        mapping = list(zip(model.trainable_variables, trainable)) + list(
            zip(model.non_trainable_variables, state)
        )
        reads = {id(v): t for v, t in zip(model.trainable_variables, trainable)}
        scope = _TowerScope(mapping, reads)
        for variable, value in zip(row_variables, rows):
            # A tower's rows: not the variable's shape, which the mapping would demand.
            keras.StatelessScope.add_update(scope, (variable, value))
        mapping += list(zip(row_variables, rows))
        with (
            scope,
            _keras_compat.any_batch_size(row_layers(model)),
            self._activity,
            meeting.tracing(in_graph),
        ):
            if self._training_arg:
                outputs = model(x, training=training)
            else:
                outputs = model(x)
            losses = list(model.losses)
        initial = {id(v): t for v, t in mapping}

        def written(variables):
            news = [scope.get_current_value(v) for v in variables]
            return [None if new is initial[id(v)] else new for v, new in zip(variables, news)]

        self._check_tracked(scope, [v for v, _ in mapping])
        flat = tf.nest.flatten(outputs)
        masks = [_keras_compat.get_mask(t) for t in flat]
        found = [merge.find_logits(t) for t in flat]
        self._logit_kinds = [(f.attribute, f.op) if f else (False, None) for f in found]
        logits = [f.tensor if f else None for f in found]
        scalars, samples = _split_losses(losses, x)
        return (
            outputs,
            masks,
            logits,
            written(model.non_trainable_variables),
            written(model.trainable_variables),
            written(row_variables),
            scalars,
            samples,
        )

    def _check_tracked(self, scope: _TowerScope, known: list[Any]) -> None:
        ids = {id(v) for v in known} | {id(v) for v in self.model.metrics_variables}
        untracked = [v for k, v in scope.written.items() if k not in ids]
        if untracked:
            names = [getattr(v, "path", getattr(v, "name", repr(v))) for v in untracked]
            raise RuntimeError(
                f"The forward pass of {self.model.name!r} assigned variables that are not "
                f"among its weights: {names}. replicate combines what each tower writes by "
                "the variable's aggregation, so it must know the variable: create it with "
                "`self.add_weight(...)` in a layer (trainable=False for state), or keep it "
                "out of `call`."
            )

    def _call_function(self, shared: bool) -> Callable[..., Any]:
        """The forward call: one traced function that every tower calls under its device
        scope (an XLA computation with `jit_compile`), so that the model is traced once
        whatever the number of towers; the model's own Python, traced inline, where the
        towers meet mid-pass in threads (`shared=False`), where there is one tower
        (`shared=False`), or eagerly.

        The function is inlined into the step where it is called (TensorFlow's default):
        its ops take the calling tower's device, and an error names `tower_i/`. AutoGraph
        is off, as in Keras' own step functions, so Python control flow in a model
        behaves as it does on one device.
        """
        if not self.jit_compile and (not shared or tf.executing_eagerly()):
            return self._call
        if self.jit_compile not in self._functions:
            self._functions[self.jit_compile] = tf.function(
                self._call, jit_compile=self.jit_compile, reduce_retracing=True, autograph=False
            )
        return self._functions[self.jit_compile]

    def forward(
        self,
        tower: int,
        part: Any,
        size: tf.Tensor,
        state: list,
        rows: list,
        training: bool,
        *,
        watch: bool = True,
        shared: bool = True,
        weights: list | None = None,
        present: tf.Tensor | None = None,
        devices: Sequence[str] | None = None,
        call: int = 0,
    ) -> Tower:
        """The forward pass of one tower on `part` (its slice, `size` real rows).

        Args:
            tower: The tower's index over every process (for its random seeds).
            part: The tower's slice of the batch (at least one row).
            size: How many of its rows are real samples.
            state: The non-trainable variables' values at the step's start.
            rows: This tower's rows of each row-aligned state (`row_states`).
            training: The model's `training` argument.
            watch: Keep a tape for the backward pass.
            shared: Call the one traced forward function (see `_call_function`);
                `False` where the towers meet in the middle of the pass, and for a
                single tower.
            weights: The trainable variables' values, read once for every tower
                (`None`: read here).
            present: Where the towers meet in the graph (`replicate.meeting`):
                `()` float, 1 where this tower holds real samples. `None` otherwise.
            devices: With `present`, every tower's device, in tower order.
            call: With `present`, which forward pass of the step this is
                (`meeting.call_index`).
        """
        if weights is None:
            weights = [v.value for v in self.model.trainable_variables]
        trainable = [tf.identity(w) for w in weights]  # this tower's copy, on its device
        tape = tf.GradientTape(watch_accessed_variables=False)
        with tape if watch else contextlib.nullcontext():
            if watch:
                tape.watch(trainable)
            out, masks, logits, updates, writes, new_rows, scalars, samples = self._call_function(
                shared
            )(
                trainable,
                self.tower_state(tower, state),
                rows,
                part,
                training,
                present,
                None if devices is None else tuple(devices),
                call,
            )
            for t, mask in zip(tf.nest.flatten(out), masks):
                if mask is not None:
                    _keras_compat.set_mask(t, mask)
            outputs = merge.keep(out, size)
            found = [
                None if t is None else merge.Logits(t[:size], attribute, op)
                for t, (attribute, op) in zip(logits, self._logit_kinds)
            ]
            model_loss = sample_loss = None
            if scalars:
                model_loss = tf.add_n([tf.reduce_sum(tf.cast(v, tf.float32)) for v in scalars])
            if samples:
                sample_loss = tf.add_n(
                    [tf.reduce_sum(tf.cast(v[:size], tf.float32)) for v in samples]
                )
            new_rows = [None if r is None else r[:size] for r in new_rows]
        targets = [t for t in tf.nest.flatten(outputs) if t is not None and t.dtype.is_floating]
        targets += [f.tensor for f in found if f is not None and f.tensor.dtype.is_floating]
        targets += [v for v in (model_loss, sample_loss) if v is not None]
        return Tower(
            outputs,
            found,
            targets,
            model_loss,
            sample_loss,
            updates,
            writes,
            new_rows,
            tape if watch else None,
            trainable,
        )

    # -- backward -----------------------------------------------------------------

    @staticmethod
    def backward(tower: Tower, upstream: list, present: tf.Tensor) -> list[Any]:
        """Tower `tower`'s gradients of the batch loss, given the loss's gradient with
        respect to its targets (`upstream`, `None` where unconnected)."""
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
        return [reduce.scale(g, present) for g in grads]


def _split_losses(losses: Sequence[Any], x: Any) -> tuple[list[Any], list[Any]]:
    """The model's losses as `(scalars, per_sample)`.

    A loss with one row per sample of the slice (an endpoint layer's
    `add_loss` of a `(batch, 1)` tensor) is per-sample: Keras sums it over
    the batch, so the towers' sums add up exactly. Any other loss (weight and
    activity regularizers, `add_loss` of a mean) follows the mean rule: each
    tower's value weighted by its share of the batch. A loss's rows are
    recognised by its leading dimension: the slice's, or unknown (it depends
    on the data) where the slice's is unknown.
    """
    first = next((t for t in tf.nest.flatten(x) if t is not None), None)
    batch = None if first is None else first.shape[0]
    scalars, samples = [], []
    for loss in losses:
        loss = tf.convert_to_tensor(loss)
        rank = loss.shape.rank
        if rank is not None and rank >= 1 and loss.shape[0] == batch:
            samples.append(loss)
        else:
            scalars.append(loss)
    return scalars, samples
